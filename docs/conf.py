"""Sphinx configuration: the user guide (MyST Markdown, docs/guide/) and the API reference.

Build from the repository root (``pip install -e ".[docs]"`` first)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import re

from sphinx.util import logging

import extra_attrib

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)

project = "extra_attrib"
author = "extra_attrib developers"
copyright = "extra_attrib developers"
release = extra_attrib.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",  # MyST Markdown pages and notebooks (it brings myst_parser)
]

# The docstrings use the Google/Captum form: ``Args:``, ``Returns:``, ``Example::``.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"show-inheritance": True}

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list = []

# The user guide: MyST Markdown pages (docs/guide/*.md) and the tutorial notebook
# (docs/guide/tutorial.ipynb, a link to tutorials/TiledOcclusion.ipynb), rendered from its
# committed outputs: never executed here, so the build works offline and takes seconds.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
nb_execution_mode = "off"
myst_heading_anchors = 3
suppress_warnings = ["mystnb.unknown_mime_type"]

# Links from the guide to files of the repository outside docs/ (benchmark results, the changelog,
# the tutorial's script) are written as plain relative paths, ``../../benchmarks/results/x.md``,
# so that they work when the page is read on GitHub. Sphinx would take a ``.md`` target for a
# document of the guide; such a link to a ``.md``/``.rst``/``.ipynb`` file becomes a download link
# (``path:``), the file copied beside the HTML, except a link to a file that a page of the guide is
# a symbolic link to (the tutorial), which becomes a link to that page. A link to a file that does
# not exist is a warning, so the build fails on it.
_REPO_LINK = re.compile(r"\]\((\.\./)+(?P<rest>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")
_logger = logging.getLogger(__name__)


def _linked_pages():
    """The real path of each file that a page under docs/ is a symbolic link to -> that page."""
    pages = {}
    for folder, _, names in os.walk(DOCS):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                pages[os.path.realpath(path)] = path
    return pages


def _link_repository_files(app, docname, source):
    directory = os.path.dirname(app.env.doc2path(docname))
    linked = _linked_pages()

    def replace(match):
        link = match.group(0)[2:-1]
        target = os.path.normpath(os.path.join(directory, link.split("#")[0]))
        if os.path.commonpath([target, DOCS]) == DOCS:
            return match.group(0)  # a page of the guide: Sphinx resolves it
        if not os.path.exists(target):
            _logger.warning("%s: link to a missing file %s", docname, link)
            return match.group(0)
        if os.path.isdir(target):
            _logger.warning("%s: link to a folder %s (link a file)", docname, link)
            return match.group(0)
        if os.path.realpath(target) in linked:
            page = os.path.splitext(linked[os.path.realpath(target)])[0]
            return f"]({os.path.relpath(page, directory)})"
        if not target.endswith((".md", ".rst", ".ipynb")):
            return match.group(0)  # an image or another file: MyST copies it as it is
        return f"](path:{link.split('#')[0]})"

    source[0] = _REPO_LINK.sub(replace, source[0])


def setup(app):
    app.connect("source-read", _link_repository_files)
