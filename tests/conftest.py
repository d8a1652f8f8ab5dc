"""Every test sees 4 fake CPU devices, so multi-device code is tested on CPU.

XLA reads the flag once, when the backend starts, so it is set here, before
any test module imports jax.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# As the binaries do: XLA:CPU convolutions on Eigen (BUILD.md, Performance).
from rar_jax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
runtime.prefer_eigen_convolutions()
