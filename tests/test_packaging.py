"""The Python version the package declares is one its dependencies install on, and is tested."""

import configparser
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _floor(spec: str) -> tuple:
    match = re.fullmatch(r"\s*>=\s*(\d+)\.(\d+)\s*", spec)
    assert match, f"python_requires={spec!r} is not of the form '>=X.Y'"
    return int(match.group(1)), int(match.group(2))


def _declared() -> tuple:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return _floor(cfg["options"]["python_requires"])


def _requirement_names() -> list:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"] + cfg["options.extras_require"]["scale"]
    names = [re.split(r"[<>=!~\[ ]", line.strip())[0] for line in lines.splitlines()]
    return [n for n in names if n]


def test_running_python_satisfies_python_requires():
    assert sys.version_info[:2] >= _declared()


@pytest.mark.parametrize("name", _requirement_names())
def test_python_requires_is_no_older_than_a_dependency_needs(name):
    # A floor below a dependency's own Requires-Python promises an install that cannot happen
    # (python_requires >= 3.9 with captum 0.9, which needs 3.10, and zarr 3, which needs 3.11).
    try:
        needed = metadata.metadata(name).get("Requires-Python")
    except metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed")
    if not needed:
        return
    floors = re.findall(r">=\s*(\d+)\.(\d+)", needed)
    for major, minor in floors:
        assert _declared() >= (int(major), int(minor)), (name, needed)


def test_linters_target_the_declared_python():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    major, minor = _declared()
    assert config["tool"]["ruff"]["target-version"] == f"py{major}{minor}"
    assert config["tool"]["mypy"]["python_version"] == f"{major}.{minor}"
