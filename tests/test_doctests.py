"""Every docstring example in imgmw runs and prints what it shows (the standard library's doctest)."""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import imgmw

MODULES = sorted(m.name for m in pkgutil.walk_packages(imgmw.__path__, "imgmw."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"


def test_the_examples_are_found():
    attempted = sum(doctest.testmod(importlib.import_module(name), verbose=False).attempted for name in MODULES)
    assert attempted >= 9 and "imgmw.ot.mixture" in MODULES
