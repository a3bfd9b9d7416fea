"""The rules the test suite itself follows: one CI rule for a missing browser or Playwright (a failure in CI,
a skip elsewhere), and one place that says where Chromium is."""

from __future__ import annotations

import shutil

import pytest

import helpers


@pytest.mark.parametrize("value, ci", [("1", True), ("true", True), ("yes", True), ("True", True), ("on", True),
                                       ("", False), ("0", False), ("false", False), ("no", False), (None, False)])
def test_ci_is_any_truthy_value_of_ci(monkeypatch, value, ci):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert helpers.in_ci() is ci


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_a_missing_browser_fails_in_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="Chromium .* is missing in CI"):
        helpers.missing("Chromium (/nowhere/chromium)", "apt-get install chromium")


def test_a_missing_browser_skips_elsewhere_saying_how_to_install_it(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        helpers.missing("Chromium (/nowhere/chromium)", "apt-get install chromium")


def test_chromium_is_found_on_the_path_as_ci_looks_for_it():
    assert helpers.CHROMIUM == (shutil.which("chromium") or "/usr/bin/chromium")
