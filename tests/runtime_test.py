"""Tests for rar_jax.runtime: the XLA flag is added only where it can act;
`run_once` compiles with its options and computes what `jax.jit` computes."""

import os
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from rar_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = """
import os, jax, jax.numpy as jnp
from rar_jax import runtime
print(runtime.prefer_eigen_convolutions())
print(os.environ.get("XLA_FLAGS", ""))
x = jnp.ones((1, 6, 6, 1)); k = jnp.ones((3, 3, 1, 2))
y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
print(float(y.sum()))
print(runtime.prefer_eigen_convolutions())  # The backend has started.
"""


def _probe(xla_flags):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=True)
  return out.stdout.split("\n")


def test_flag_added_before_the_backend_starts_and_xla_accepts_it():
  added, flags, total, again = _probe("--xla_force_host_platform_device_count=2")[:4]
  assert added == "True" and again == "False"
  assert flags == ("--xla_force_host_platform_device_count=2 "
                   + runtime.EIGEN_CONVOLUTIONS)
  # Convs still run: 2 channels x (2+3+3+3+3+2)^2 in-bounds taps.
  assert float(total) == 2 * 16 * 16


def test_a_flag_the_user_set_stands():
  mine = f"--{runtime.FLAG_NAME}=individual_dot"
  added, flags = _probe(mine)[:2]
  assert added == "False" and flags == mine


def _draws(key, x):
  """Random draws as an initialiser makes them, and float arithmetic."""
  k1, k2 = jax.random.split(key)
  return {"normal": jax.random.truncated_normal(k1, -2.0, 2.0, (64, 32)),
          "uniform": jax.random.uniform(k2, (16,), minval=-1.0, maxval=1.0),
          "bits": jax.random.bits(k2, (8,)),
          "tanh": jnp.tanh(x) * jnp.exp(-x) + jnp.sqrt(x)}


def test_run_once_compiles_with_its_options_and_equals_jit():
  key, x = jax.random.key(3), jnp.linspace(0.0, 4.0, 257)
  compiled_with = []
  compile_ = jax.stages.Lowered.compile

  def spy(lowered, *args, **kwargs):
    compiled_with.append(kwargs.get("compiler_options"))
    return compile_(lowered, *args, **kwargs)

  with mock.patch.object(jax.stages.Lowered, "compile", spy):
    once = runtime.run_once(_draws, key, x)
    # With traced arguments, it is part of the outer program.
    outer = jax.jit(lambda k, x: runtime.run_once(_draws, k, x))(key, x)
  # The tests run on CPU with jaxlib 0.10 (setup.cfg, conftest.py).
  assert jax.default_backend() == "cpu"
  assert jaxlib.__version__.startswith(runtime._KNOWN_JAXLIB)
  assert compiled_with == [runtime.RUN_ONCE_OPTIONS["cpu"]]
  jitted = jax.jit(_draws)(key, x)
  jax.tree.map(np.testing.assert_array_equal, outer, jitted)
  # Threefry's integer bits are the same; floats within float32 rounding
  # (a few ulps of the largest value: LLVM's optimisations reorder them).
  np.testing.assert_array_equal(once["bits"], jitted["bits"])
  for name in ("normal", "uniform", "tanh"):
    scale = float(np.abs(jitted[name]).max())
    np.testing.assert_allclose(once[name], jitted[name], rtol=0,
                               atol=4 * np.finfo(np.float32).eps * scale,
                               err_msg=name)
  assert np.abs(np.asarray(once["normal"])).max() <= 2.0
