"""Sphinx configuration: the API reference, built from the package's docstrings.

Build from the repository root (``pip install -e ".[docs]"`` first)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import extra_attrib

project = "extra_attrib"
author = "extra_attrib developers"
copyright = "extra_attrib developers"
release = extra_attrib.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
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
