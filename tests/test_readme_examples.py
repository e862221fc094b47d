"""The README's code examples run as written (offline) and give what they say."""

import re
from pathlib import Path

import torch

from extra_attrib import TiledOcclusion

README = Path(__file__).resolve().parent.parent / "README.md"


def _block_under(heading):
    text = README.read_text(encoding="utf-8")
    start = text.index(heading)
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"no python block after {heading!r}"
    return match.group(1)


def test_segmentation_example_runs_and_matches_the_dense_engine(capsys):
    torch.manual_seed(0)
    namespace = {}
    exec(compile(_block_under("### Segmentation models"), str(README), "exec"), namespace)
    attr, x = namespace["attr"], namespace["x"]
    assert attr.shape == x.shape and bool(torch.isfinite(attr).all())
    assert "torch.Size([1, 3, 64, 64])" in capsys.readouterr().out
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
