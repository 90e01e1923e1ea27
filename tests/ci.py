"""Under CI nothing skips: a test whose input is missing (ComfyUI, a browser, a committed model, a test dependency)
skips on a developer's machine and *fails* under CI, with the reason, because CI must run every test.

- ``in_ci()``: is this a CI run (``$CI``)?
- ``skip_or_fail(reason)``: inside a test or fixture, instead of ``pytest.skip``.
- ``importorskip(name)``: instead of ``pytest.importorskip``; under CI a missing test dependency fails.
- ``pytest.mark.needs(available, reason)``: instead of ``pytest.mark.skipif(not available, ...)`` on a test or a
  module (``pytestmark``); ``conftest.py`` applies it through :func:`apply_needs_marks`.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

NOT_CI_VALUES = ("", "0", "false", "no")
"""Values of $CI (any case, surrounding spaces ignored) that do not mean CI; unset is not CI either. Anything else
does: CI services set CI=true, some CI=1."""
INSTALL_HINT = "pip install -e '.[test]'"
NEEDS_MARK = "needs(available, reason): skip the test when `available` is false; under CI ($CI set) fail it instead"


def in_ci() -> bool:
    """True when ``$CI`` is set to anything but "", "0", "false" or "no" (any case)."""
    return os.environ.get("CI", "").strip().lower() not in NOT_CI_VALUES


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the running test for ``reason``; under CI fail it, saying that CI must run it."""
    __tracebackhide__ = True  # the skip or failure is reported at the caller's line
    if in_ci():
        pytest.fail(f"{reason}. Under CI (CI={os.environ.get('CI')!r}) nothing may skip: provide it.", pytrace=False)
    pytest.skip(reason)


def importorskip(name: str) -> ModuleType:
    """``pytest.importorskip(name)`` on a developer's machine; under CI the module must import (the test extras,
    ``pip install -e '.[test]'``, install every test dependency), else the test module fails with the import error."""
    __tracebackhide__ = True
    if not in_ci():
        return pytest.importorskip(name, reason=f"{name} is not installed ({INSTALL_HINT})")
    try:
        return importlib.import_module(name)
    except ImportError as error:
        problem = f"{name} does not import under CI ({error}); CI installs the test extras: {INSTALL_HINT}"
    pytest.fail(problem, pytrace=False)


def apply_needs_marks(item: pytest.Item) -> None:
    """Skip (or under CI fail) ``item`` when one of its ``needs`` marks says its input is not available."""
    __tracebackhide__ = True
    for mark in item.iter_markers("needs"):
        available, reason = mark.args
        if not available:
            skip_or_fail(reason)
