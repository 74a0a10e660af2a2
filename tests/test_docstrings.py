"""Every public class and function documents itself with a runnable example, and it runs."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import lightning_reg

MODULES = [
    m.name
    for m in pkgutil.walk_packages(lightning_reg.__path__, "lightning_reg.")
    if not m.name.startswith("lightning_reg.demo")
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


@pytest.mark.parametrize("name", sorted(n for n in lightning_reg.__all__ if n[0].isupper()))
def test_public_classes_have_args_example_and_reference(name):
    doc = inspect.getdoc(getattr(lightning_reg, name)) or ""
    assert "Example" in doc, f"{name} has no Example"
    assert ">>>" in doc or "::" in doc, f"{name}'s example is not code"
