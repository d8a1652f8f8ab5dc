"""Runs the `Example:` sections of every public module's docstrings."""

import doctest
import importlib

import pytest

MODULES = [
    "rar_jax.attribution", "rar_jax.metrics", "rar_jax.objectives",
    "rar_jax.attacks.pgd_attack", "rar_jax.attacks.attribution_attack",
    "rar_jax.summary", "rar_jax.checks",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
  module = importlib.import_module(name)
  results = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert results.attempted > 0, f"{name} has no docstring examples"
  assert results.failed == 0, f"{results.failed} doctest(s) failed in {name}"
