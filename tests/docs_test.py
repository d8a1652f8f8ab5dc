"""Every public function and class of rar_jax documents itself fully.

Its docstring has a `References:` section and an `Example:` with doctest
lines (`>>>`); `pytest` runs those examples (`--doctest-modules` in
setup.cfg), so this test only checks that they exist.
"""

import importlib
import inspect
import pkgutil

import jax
import pytest

import rar_jax


def _modules():
  names = ["rar_jax"] + [m.name for m in pkgutil.walk_packages(
      rar_jax.__path__, "rar_jax.")]
  return [n for n in names if not n.endswith("conftest")]


def _public_api(module):
  """`(name, object)` of the functions and classes `module` defines."""
  names = getattr(module, "__all__", None)
  if names is None:
    names = [n for n in vars(module) if not n.startswith("_")]
  for name in names:
    obj = getattr(module, name)
    if isinstance(obj, (jax.custom_jvp, jax.custom_vjp)):
      obj = obj.__wrapped__   # a function with its own derivative rule
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
      continue
    if getattr(obj, "__module__", None) != module.__name__:
      continue   # re-exported: checked where it is defined
    if inspect.isclass(obj) and issubclass(obj, Exception):
      continue   # an error type: its one-line docstring says enough
    yield name, obj


@pytest.mark.parametrize("module_name", _modules())
def test_public_functions_have_references_and_an_example(module_name):
  module = importlib.import_module(module_name)
  missing = []
  for name, obj in _public_api(module):
    doc = inspect.getdoc(obj) or ""
    checks = (("References:", "References:" in doc),
              ("Example: with >>>", "Example:" in doc and ">>>" in doc))
    lacks = [part for part, present in checks if not present]
    if lacks:
      missing.append(f"{name} ({', '.join(lacks)})")
  assert not missing, (
      f"{module_name}: docstrings without {'; '.join(missing)}")
