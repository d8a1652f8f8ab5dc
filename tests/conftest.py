"""Every test sees 4 fake CPU devices, so multi-device code is tested on CPU.

XLA reads the flag once, when the backend starts, so it is set here, before
any test module imports jax.

The run also shares one persistent compilation cache, new for each session
(unless you set `JAX_COMPILATION_CACHE_DIR` yourself): many tests compile the
same programs, in this process and in the training binaries they start as
subprocesses (which inherit the environment), and on a 2-core CPU compiling
is much of the suite's time. A hit returns the program XLA compiled for the
same computation, so results do not change.
"""
import atexit
import os
import shutil
import tempfile

import pytest

_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="rar_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  # Cache every program, however small or quick to compile.
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# As the binaries do: XLA:CPU convolutions on Eigen (BUILD.md, Performance).
from rar_jax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
runtime.prefer_eigen_convolutions()


# Files whose tests take longest (compiling, training binaries, the notebook),
# handed out first, the notebook (one 130 s test) ahead of all, so that the
# two worker processes (`-n 2 --dist loadfile` in setup.cfg) finish together
# rather than one waiting on a long file at the end. `--no-loadscope-reorder`
# (setup.cfg) makes xdist hand out files in this order; by default it orders
# them by their number of tests, and the 2-test notebook came last. Seconds
# in the suite on 2 cores, 2026-12-02: 134, 144, 142, 129, 117, 86, 83, 71, 71.
_LONGEST_FIRST = ("notebook_test.py", "train_test.py",
                  "attribution_attack_test.py", "reliability_test.py",
                  "models_test.py", "objectives_test.py", "benchmark_test.py",
                  "attribution_test.py", "evaluation_test.py")


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  def rank(item):
    name = os.path.basename(str(item.fspath))
    return (_LONGEST_FIRST.index(name) if name in _LONGEST_FIRST
            else len(_LONGEST_FIRST))
  items.sort(key=rank)  # Stable: the order within a file is kept.


@pytest.fixture
def find_eqns():
  """`find_eqns(fn, *args, primitive="scan")`: the equations of that
  primitive in `fn`'s jaxpr, nested ones (inside loops, jits, custom rules)
  included, outer ones first."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.extend import core as jex_core  # pylint: disable=g-import-not-at-top

  def find(jaxpr, primitive):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == primitive:
        yield eqn
      for sub in jex_core.jaxprs_in_params(eqn.params):
        yield from find(sub, primitive)

  return lambda fn, *args, primitive="scan": list(
      find(jax.make_jaxpr(fn)(*args).jaxpr, primitive))


@pytest.fixture
def count_eqns(find_eqns):
  """`count_eqns(fn, *args, primitive="scan")`: how many `find_eqns` finds."""
  return lambda fn, *args, primitive="scan": len(
      find_eqns(fn, *args, primitive=primitive))
