"""The docs build with Sphinx, warnings treated as errors: the user guide and the API reference.

The user guide is MyST Markdown in docs/guide/ (one page per topic) plus the tutorial notebook,
rendered from its saved outputs; the API reference is built from the docstrings.

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

# The guide's pages (docs/guide/<name>.md; the tutorial is docs/guide/tutorial.ipynb, a link to
# tutorials/TiledOcclusion.ipynb). Other pages may be added; these must stay.
GUIDE_PAGES = (
    "index",
    "definition",
    "engines",
    "drilldown",
    "recipes",
    "fusiongrad",
    "dataset",
    "report",
    "visualisation",
    "quality",
    "patent",
    "troubleshooting",
    "tutorial",
)

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
@pytest.mark.filterwarnings("ignore:.*Check CHANGES for Sphinx API modifications")  # myst-parser's
def test_docs_build_without_new_warnings(tmp_path):
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
    _check_guide(tmp_path / "html")


def _check_guide(html):
    """The guide's pages are built, linked from the front page, and their links resolve."""
    assert 'href="guide/index.html"' in (html / "index.html").read_text(encoding="utf-8")
    for name in GUIDE_PAGES:
        assert (html / "guide" / f"{name}.html").exists(), f"guide page {name} not built"
    tutorial = (html / "guide" / "tutorial.html").read_text(encoding="utf-8")
    assert tutorial.count("<img") >= 5, "the tutorial's saved figures are not rendered"
    assert "equals Captum Occlusion" in tutorial  # a printed output of the executed notebook
    for page in (html / "guide").glob("*.html"):
        text = page.read_text(encoding="utf-8")
        for link in re.findall(r'href="([^"#:?]+)["#?]', text):
            target = (page.parent / link).resolve()
            assert target.exists(), f"{page.name}: link {link} leads nowhere"
    engines = (html / "guide" / "engines.html").read_text(encoding="utf-8")
    assert re.search(r'href="[^"]*_downloads/[^"]*/zoo\.md"', engines), "results files not linked"


def test_every_guide_page_exists_in_the_source():
    for name in GUIDE_PAGES:
        suffix = ".ipynb" if name == "tutorial" else ".md"
        assert os.path.exists(os.path.join(DOCS, "guide", name + suffix)), name
