"""Package metadata that installs without deprecation warnings and has one version."""

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

import moe

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    # a {text = ...} table makes setuptools print a deprecation warning on every install
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    [setuptools] = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert tuple(map(int, re.search(r">=(\d+)", setuptools).group(1).split("."))) >= (77,)


def test_the_version_is_written_once():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "moe.__version__"}
    assert importlib.metadata.version("moe") == moe.__version__
