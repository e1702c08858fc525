"""The version check holds transformers/PEFT to exactly what requirements.txt pins and the tests ran on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dsocr import versions

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line.strip()):
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_tested_versions_equal_requirements_pins():
    pins = _pins()
    for name, version in versions.TESTED_VERSIONS.items():
        assert pins.get(name) == version, f"{name}: version check {version}, requirements.txt {pins.get(name)}"


def test_minimum_versions_admit_the_pinned_ones():
    from packaging.version import Version

    pins = _pins()
    for name, minimum in versions.MIN_VERSIONS.items():
        assert Version(pins[name]) >= Version(minimum), name


def test_installed_versions_pass():
    assert versions.version_problems() == []


def test_untested_version_is_refused_with_the_fix(monkeypatch):
    import importlib.metadata as md

    real = md.version
    monkeypatch.setattr(md, "version", lambda name: "5.99.0" if name == "transformers" else real(name))
    monkeypatch.delenv(versions.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"transformers 5\.99\.0 is not the tested 5\.17\.0.*pip install -r requirements.txt"):
        versions.check_versions()
    monkeypatch.setenv(versions.ALLOW_UNTESTED_ENV, "1")
    versions.check_versions()  # a warning only
