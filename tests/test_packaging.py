"""Packaging: the version in one place, the mlx-lm range pyproject pins is the one `kvtrie serve`
checks at start, and a release outside it is refused with a message naming the range."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import kvtrie
from kvtrie.compat import MLX_LM_TESTED, OVERRIDE, UntestedDependencyError, check_mlx_lm, version_tuple
from kvtrie.compat import tested as in_range

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_lives_in_one_place():
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kvtrie.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", kvtrie.__version__)
    assert f"## {kvtrie.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_license_is_an_spdx_string_with_its_file():
    assert PYPROJECT["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert (ROOT / "src" / "kvtrie" / "py.typed").exists()


def test_every_mlx_lm_pin_is_the_tested_range():
    low, high = MLX_LM_TESTED
    extras = PYPROJECT["project"]["optional-dependencies"]
    pins = [d for deps in extras.values() for d in deps if d.startswith("mlx-lm")]
    assert pins and all(d == f"mlx-lm>={low},<{high}" for d in pins), pins


@pytest.mark.parametrize("version, ok", [
    ("0.32.2", True), ("0.32.9", True), ("0.32.1", False), ("0.31.0", False), ("0.33.0", False),
    ("0.33.0rc1", False), ("0.32.3.dev0", True), ("1.0", False),
])
def test_the_tested_range(version, ok):
    assert in_range(version) == ok


def test_an_untested_release_is_refused_naming_the_range(monkeypatch):
    monkeypatch.delenv(OVERRIDE, raising=False)
    with pytest.raises(UntestedDependencyError, match=r"mlx-lm >= 0\.32\.2, < 0\.33 .* mlx-lm 0\.40\.0 is installed"):
        check_mlx_lm("0.40.0")
    monkeypatch.setenv(OVERRIDE, "1")
    assert check_mlx_lm("0.40.0") == "0.40.0"
    assert version_tuple("0.32.2+cpu") == (0, 32, 2)


def test_the_installed_mlx_lm_is_in_range_and_serve_starts_its_help():
    pytest.importorskip("mlx_lm")
    assert in_range(check_mlx_lm())
    out = subprocess.run([sys.executable, "-m", "kvtrie.cli", "serve", "--help"], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "KVTRIE_HUGE_PAGES": "0"})
    assert out.returncode == 0 and "--api-keys" in out.stdout
