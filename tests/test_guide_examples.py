"""Every ```python block of the README and of the user guide (docs/guide/*.md) runs as written.

Each block runs offline in a fresh namespace, in a temporary working directory (the examples write
files such as ``val_attr.zarr`` and ``view.png``), with the random seed fixed. A block that cannot
run in a test (a shell command, ``torchrun``) is written as a ``bash`` block, not exempted here.
Blocks whose results say something specific are checked further by the functions in ``CHECKS``,
keyed by the file and the heading the block sits under.
"""

import re
from pathlib import Path

import pytest
import torch

from extra_attrib import TiledOcclusion

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guide"
PAGES = [ROOT / "README.md", *sorted(GUIDE.glob("*.md"))]


def python_blocks(path):
    """``(line, heading, code)`` for each ```python block of a Markdown file.

    ``line`` is the block's first code line (1-based), ``heading`` the last heading above it.
    """
    blocks, heading, fence, code, start = [], "", None, [], 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if fence is None:
            if line.startswith("```"):
                fence, code, start = line[3:].strip(), [], number + 1
            elif re.match(r"#+ ", line):
                heading = line
        elif line.startswith("```"):
            if fence == "python":
                blocks.append((start, heading, "\n".join(code) + "\n"))
            fence = None
        else:
            code.append(line)
    assert fence is None, f"{path.name}: a code block is not closed"
    return blocks


def check_quick_start(namespace, out):
    x = namespace["x"]
    assert namespace["attr"].shape == x.shape
    assert namespace["smooth"].shape == x.shape
    assert namespace["maps"].shape == (3, *x.shape)
    assert namespace["fused"].shape == x.shape
    assert float(namespace["attr"].abs().max()) > 0


def check_segmentation(namespace, out):
    attr, x = namespace["attr"], namespace["x"]
    assert attr.shape == x.shape and bool(torch.isfinite(attr).all())
    assert "torch.Size([1, 3, 64, 64])" in out
    assert float(attr.abs().max()) > 0
    if namespace["tiled"].last_engine == "dense":
        return  # the example ran the dense engine itself; the engines agree in test_score_outputs
    dense = TiledOcclusion(namespace["model"]).attribute(
        x,
        target=15,
        window=(3, 16, 16),
        k=(1, 2, 2),
        score=namespace["class_over_region"],
        engine="dense",
    )
    torch.testing.assert_close(attr, dense, rtol=1e-4, atol=1e-6)


def check_several_targets(namespace, out):
    assert namespace["maps"].shape == (3, *namespace["x"].shape)
    assert "torch.Size([3, 2, 3, 32, 32])" in out


def check_dataset(namespace, out):
    store = namespace["store"]
    assert bool(store.done.all()) and len(store.done) == len(namespace["val_set"])
    assert store.item(17).shape == (3, 32, 32)


def check_drilldown(namespace, out):
    assert namespace["tiled"].last_evaluations < namespace["full_evaluations"]


def check_recipe(namespace, out):
    """A recipe's map has the input's shape (after any leading target axis) and is finite."""
    attr, x = namespace["attr"], namespace["x"]
    assert attr.shape[-x.dim() :] == x.shape and bool(torch.isfinite(attr).all())


RECIPES = (
    "## Classification",
    "### Multi-label classification",
    "## Semantic segmentation: one class over a region",
    "## Object detection: one detected object",
    "## Regression: one output, or a function of several",
)

CHECKS = {
    **{("recipes.md", heading): check_recipe for heading in RECIPES},
    ("README.md", "## Quick start"): check_quick_start,
    ("definition.md", "## Models with other outputs: one class over a region"): check_segmentation,
    ("definition.md", "## Several targets in one sweep"): check_several_targets,
    ("dataset.md", "## From Python"): check_dataset,
    ("drilldown.md", "## What it computes"): check_drilldown,
}

BLOCKS = [
    pytest.param(path, line, heading, code, id=f"{path.relative_to(ROOT)}:{line}")
    for path in PAGES
    for line, heading, code in python_blocks(path)
]


def test_the_readme_and_the_guide_have_examples():
    found = {(path.name, heading) for path, _, heading, _ in (block.values for block in BLOCKS)}
    assert set(CHECKS) <= found, f"checked examples not found: {set(CHECKS) - found}"
    assert len(BLOCKS) >= 9


@pytest.mark.parametrize(("path", "line", "heading", "code"), BLOCKS)
def test_example_runs(path, line, heading, code, tmp_path, monkeypatch, capsys):
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": f"example_{path.stem}_{line}"}
    # blank lines first, so that a traceback's line numbers point into the Markdown file
    exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)
    plt.close("all")
    check = CHECKS.get((path.name, heading))
    if check is not None:
        check(namespace, capsys.readouterr().out)


def test_the_readme_commands_are_what_ci_runs():
    """The README's two set-up commands; the second installs and tests as .ci/run does."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    demo, tests = re.findall(r"^python3 -m venv \.venv && (.*)$", text, re.M)
    assert demo == '. .venv/bin/activate && pip install -e ".[demo]" && python -m extra_attrib demo'
    install, run = re.fullmatch(
        r'\. \.venv/bin/activate && pip install -e "(\.\[[\w,]+\])" && (python -m pytest -q)', tests
    ).groups()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert f'pip install -q -e "{install}"' in ci
    assert re.search(rf"^{re.escape(run)}$", ci, re.M)
