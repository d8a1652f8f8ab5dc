"""Process-level settings of the XLA runtime that make rar_jax faster.

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

References:
  XLA:CPU debug options, `xla_cpu_experimental_ynn_fusion_type`.
"""

import os
from typing import MutableMapping, Optional

import jaxlib

# The XLA flag and the jaxlib releases known to have it: an unknown flag in
# XLA_FLAGS is a fatal error at backend start, so other releases are left
# alone.
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


__all__ = ["FLAG_NAME", "EIGEN_CONVOLUTIONS", "prefer_eigen_convolutions"]
