"""Settings of the XLA runtime that make rar_jax faster.

`prefer_eigen_convolutions()` adds one XLA:CPU flag to `XLA_FLAGS`, before
JAX starts its backends: it keeps convolutions out of XLA:CPU's YNNPACK
fusions, so they run on XLA's Eigen convolution. On the 2-core CPU of
`BUILD.md` ("Performance") the MNIST CNN's 5x5x32x64 convolution ran at
~180 GFLOP/s on Eigen against ~95 GFLOP/s on YNNPACK, and every benchmark
workload got faster: IG 1.2x, PGD 1.4x, the Madry and IG-NORM training steps
1.5x and 1.4x. Matmuls stay on YNNPACK. GPU and TPU programs are unaffected.

The training, evaluation and benchmark binaries call it first thing; from a
notebook, call it before the first JAX computation, or set the flag in the
shell. A flag you set yourself is never overridden.

`run_once(fn, *args)` runs code that runs once per process, such as a
model's initialiser, as one jitted program compiled without LLVM optimisation
on CPU: XLA:CPU spent 8-28 s optimising the random-number kernels of
`tiny_resnet`'s initialiser, which then run once in milliseconds.

References:
  XLA:CPU debug options, `xla_cpu_experimental_ynn_fusion_type` and
  `xla_backend_optimization_level`.
"""

import os
from typing import Any, Callable, MutableMapping, Optional

import jaxlib

# The XLA flag and the jaxlib releases known to have it and to accept
# `RUN_ONCE_OPTIONS`: an unknown flag in XLA_FLAGS is a fatal error at
# backend start (an unknown compiler option fails the compile), so other
# releases are left alone.
FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
EIGEN_CONVOLUTIONS = f"--{FLAG_NAME}=-individual_convolution"
_KNOWN_JAXLIB = ("0.10.",)


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # Unknown jax: assume started.
    return True


def prefer_eigen_convolutions(
    environ: Optional[MutableMapping[str, str]] = None) -> bool:
  """Adds `EIGEN_CONVOLUTIONS` to `XLA_FLAGS` where it can take effect.

  Nothing is changed when `XLA_FLAGS` already names `FLAG_NAME` (your
  choice stands), when the installed jaxlib is not one known to accept the
  flag, or when JAX's backends have already started (the flag would be
  ignored; restart the process and call this first).

  Args:
    environ: the environment to edit (default `os.environ`).

  Returns:
    True if the flag was added now.

  References:
    `BUILD.md`, "Performance" (the measurements).

  Example:
    >>> env = {"XLA_FLAGS": f"--{FLAG_NAME}=individual_dot"}
    >>> prefer_eigen_convolutions(env), env["XLA_FLAGS"]  # yours stands
    (False, '--xla_cpu_experimental_ynn_fusion_type=individual_dot')
  """
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if FLAG_NAME in flags:
    return False
  if not jaxlib.__version__.startswith(_KNOWN_JAXLIB) or _backends_started():
    return False
  environ["XLA_FLAGS"] = f"{flags} {EIGEN_CONVOLUTIONS}".strip()
  return True


# Compiler options of `run_once`, per platform: LLVM at -O0 on XLA:CPU.
RUN_ONCE_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


def run_once(fn: Callable[..., Any], *args: Any) -> Any:
  """`jax.jit(fn)(*args)`, compiled for a program that runs once.

  On CPU, with a jaxlib known to accept them, the program is compiled with
  `RUN_ONCE_OPTIONS["cpu"]`: XLA:CPU's kernels are not optimised by LLVM.
  That is for code whose compile time dwarfs its run time, such as a
  model's initialiser (threefry hashes and truncated normals, one kernel per
  parameter): `jax.jit(init_fn)` of `tiny_resnet` took 8-28 s to compile on
  a 2-core CPU, `run_once` 1-3 s, and `mnist_cnn`'s 6.5 s against 1.4 s.
  The results equal `jax.jit(fn)(*args)` up to float32 rounding (the
  initialisers' parameters differ by at most 1 ulp; threefry's integer bits
  are identical). Elsewhere (GPU, TPU, other jaxlib releases) the program is
  compiled with XLA's defaults. Called with traced arguments (inside `jit`,
  `vmap`, `grad`), it is `jax.jit(fn)(*args)`, part of the outer program.
  Each call traces `fn` again (no keyword arguments; it is meant for one
  call).

  Args:
    fn: a function of arrays (pytrees) that `jax.jit` accepts.
    *args: its positional arguments, all arrays or pytrees of arrays.

  Returns:
    `fn(*args)`, computed by one compiled program.

  References:
    XLA's `DebugOptions.xla_backend_optimization_level`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from rar_jax import models
    >>> init_fn, _, _ = models.make_apply_fns("tiny_cnn", num_classes=10)
    >>> params = run_once(init_fn, jax.random.key(0), jnp.zeros([1, 28, 28, 1]))
    >>> params["conv1"]["kernel"].shape
    (3, 3, 1, 2)
  """
  import jax  # pylint: disable=g-import-not-at-top
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args)):
    return jax.jit(fn)(*args)
  return compile_for_one_run(jax.jit(fn).lower(*args))(*args)


def compile_for_one_run(lowered: Any) -> Any:
  """`lowered.compile()`, with `RUN_ONCE_OPTIONS` where they are accepted.

  The compiled program of `run_once`; also for programs compiled only to be
  inspected (XLA's cost and memory analyses are made on the optimised HLO,
  which these options leave alone: they only change LLVM's code generation).

  Args:
    lowered: a `jax.stages.Lowered` (`jax.jit(fn).lower(*args)`).

  Returns:
    The `jax.stages.Compiled` program.

  References:
    XLA's `DebugOptions.xla_backend_optimization_level`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> lowered = jax.jit(lambda x: x @ x).lower(jnp.ones((4, 4)))
    >>> compile_for_one_run(lowered).cost_analysis()["flops"]
    128.0
  """
  import jax  # pylint: disable=g-import-not-at-top
  options = None
  if jaxlib.__version__.startswith(_KNOWN_JAXLIB):
    options = RUN_ONCE_OPTIONS.get(jax.default_backend())
  return lowered.compile(compiler_options=options)


__all__ = ["FLAG_NAME", "EIGEN_CONVOLUTIONS", "RUN_ONCE_OPTIONS",
           "prefer_eigen_convolutions", "run_once", "compile_for_one_run"]
