"""Tests for rar_jax.runtime: the XLA flag is added only where it can act."""

import os
import subprocess
import sys

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
