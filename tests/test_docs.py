"""The API reference in docs/ builds from the docstrings with Sphinx, warnings treated as errors.

Sphinx runs with ``--keep-going -w <file>`` so that every warning is collected; the build fails on
any warning except the ones listed in ``KNOWN_WARNINGS`` below (empty: keep it so; it exists to
park a warning while a fix is under way). A listed warning that no longer occurs fails the test
too, so the list cannot go stale. Needs the ``docs`` extra (skipped without Sphinx).
"""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

# (file name, docstring owner, message): each is a docutils/Sphinx warning text fragment.
KNOWN_WARNINGS: set = set()


def _parse(line):
    """``path:docstring of owner:line: WARNING: message`` -> (file name, owner, message)."""
    match = re.match(
        r"(?P<path>[^:]*):docstring of (?P<owner>[^:]+):\d+: WARNING: (?P<msg>.*?)"
        r"( \[[\w.]+\])?$",
        line,
    )
    if match is None:
        return None, None, line
    return os.path.basename(match["path"]), match["owner"], match["msg"]


@pytest.mark.filterwarnings("ignore:The mapping interface for autodoc options")  # Sphinx's own
def test_api_reference_builds_without_new_warnings(tmp_path):
    pytest.importorskip("sphinx")
    from sphinx.cmd.build import build_main

    log = tmp_path / "warnings.txt"
    status = build_main(
        [
            "-b",
            "html",
            "-q",
            "--keep-going",
            "-w",
            str(log),
            "-d",
            str(tmp_path / "doctrees"),
            DOCS,
            str(tmp_path / "html"),
        ]
    )
    lines = [line for line in log.read_text().splitlines() if "WARNING" in line]
    found = {_parse(line) for line in lines}
    assert found - KNOWN_WARNINGS == set(), "new Sphinx warnings:\n" + "\n".join(lines)
    assert KNOWN_WARNINGS - found == set(), "fixed: remove these from KNOWN_WARNINGS"
    assert status == 0
    assert (tmp_path / "html" / "api.html").exists()
    api = (tmp_path / "html" / "api.html").read_text(encoding="utf-8")
    for name in (
        "TiledOcclusion",
        "attribute_multi",
        "FusionGrad",
        "plot_1d_attribution",
        "quantus_explain_func",
        "load_efficientnet_lite0",
    ):
        assert name in api
