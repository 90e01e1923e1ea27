"""``ci.py``: which values of $CI mean a CI run, and that under CI a missing input or test dependency fails the test
instead of skipping it (and still skips on a developer's machine)."""

from __future__ import annotations

import pytest

import ci

FAILED, SKIPPED = pytest.fail.Exception, pytest.skip.Exception


def outcome(function, *args) -> tuple[type | None, str]:
    """(FAILED or SKIPPED, message) of what ``function(*args)`` raised, (None, "") when it returned: caught here
    because a skip escaping ``pytest.raises(FAILED)`` would skip this test instead of failing it."""
    try:
        function(*args)
    except (FAILED, SKIPPED) as raised:
        return type(raised), str(raised)
    return None, ""


@pytest.mark.parametrize("value, expected", [
    ("true", True), ("1", True), ("TRUE", True), (" yes ", True), ("github-actions", True),
    ("", False), ("false", False), ("0", False), ("False", False), ("no", False), (None, False),
])
def test_in_ci_reads_the_usual_values_of_ci(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert ci.in_ci() is expected


def test_under_ci_a_missing_input_fails_with_the_reason(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert outcome(ci.skip_or_fail, "no chromium executable") == (
        FAILED, "no chromium executable. Under CI (CI='true') nothing may skip: provide it.")
    assert outcome(ci.importorskip, "refinery_no_such_module") == (
        FAILED, "refinery_no_such_module does not import under CI (No module named 'refinery_no_such_module'); CI "
        "installs the test extras: pip install -e '.[test]'")
    assert ci.importorskip("json").__name__ == "json"


def test_outside_ci_a_missing_input_skips(monkeypatch):
    monkeypatch.setenv("CI", "0")
    assert outcome(ci.skip_or_fail, "no chromium executable") == (SKIPPED, "no chromium executable")
    assert outcome(ci.importorskip, "refinery_no_such_module") == (
        SKIPPED, "refinery_no_such_module is not installed (pip install -e '.[test]')")


@pytest.mark.parametrize("value, expected", [("true", FAILED), ("0", SKIPPED)])
def test_the_needs_mark_skips_or_fails_a_test_whose_input_is_missing(request, monkeypatch, value, expected):
    """What conftest.py does before each test: with a ``needs(True, ...)`` mark it runs; with a ``needs(False, ...)``
    mark it is skipped, or failed under CI. (This test's own item carries the marks.)"""
    monkeypatch.setenv("CI", value)
    request.node.add_marker(pytest.mark.needs(True, "the committed toy-clip"))
    assert outcome(ci.apply_needs_marks, request.node) == (None, "")
    request.node.add_marker(pytest.mark.needs(False, "toy-clip is not trained yet"))
    kind, message = outcome(ci.apply_needs_marks, request.node)
    assert kind is expected and message.startswith("toy-clip is not trained yet")
