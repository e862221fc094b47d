"""Every method of ``benchmarks.localisation_sota`` on a model whose answer is known (#28).

The model's output 0 is the mean of its red feature over region A, output 1 the mean of its
green feature over region B; the image holds a red square in A and a green one in B. Explaining
output 0 every method must point into A (and for output 1 into B): this catches a wrong target,
a transposed or flipped map, a lost channel or a map upsampled to the wrong place in each
library's adapter before its numbers on the real model are trusted.
"""

from __future__ import annotations

import importlib.util
from typing import Tuple

import pytest
import torch
from torch import nn

from benchmarks import _localisation_data as data

needs_bench = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("pytorch_grad_cam", "shap", "rise", "cv2")),
    reason="the benchmark extra (pip install -e .[bench]) is not installed",
)

SIDE = 32
A = (slice(4, 12), slice(4, 12))
B = (slice(20, 28), slice(18, 26))


class RegionModel(nn.Module):
    """Output 0: mean of the red feature over A; output 1: green over B; output 2: 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3)[:, :, None, None])
            self.conv.bias.zero_()
        self.features = nn.Sequential(self.conv, nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        a = f[:, 0, A[0], A[1]].mean((1, 2))
        b = f[:, 1, B[0], B[1]].mean((1, 2))
        return torch.stack([a, b, 0 * a], 1)


def image(with_b: bool = True) -> torch.Tensor:
    x = torch.zeros(1, 3, SIDE, SIDE)
    x[0, 0, A[0], A[1]] = 1.0
    if with_b:
        x[0, 1, B[0], B[1]] = 1.0
    return x


def box(region: Tuple[slice, slice]) -> torch.Tensor:
    out = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    out[region] = True
    return out


def methods():
    from benchmarks import _sota_methods as sm

    layer = lambda model: model.features  # noqa: E731
    return {
        "GradCAM": sm.cam("GradCAM", layer),
        "GradCAMPlusPlus": sm.cam("GradCAMPlusPlus", layer),
        "ScoreCAM": sm.cam("ScoreCAM", layer, batch_size=2),
        "AblationCAM": sm.cam("AblationCAM", layer, batch_size=2),
        "LayerCAM": sm.cam("LayerCAM", layer),
        "RISE": sm.rise(1000, 4),
        "SHAP blur": sm.shap_partition(500, blur=8),
        "SHAP grey": sm.shap_partition(500, blur=None),
        "LIME": sm.lime(200, 16),
        "FeatureAblation": sm.feature_ablation(16),
        "Saliency": sm.gradient("saliency"),
        "IG": sm.gradient("ig", steps=8),
        "SmoothGrad": sm.gradient("saliency", m=8, sg_std=0.2),
        "NoiseGrad": sm.gradient("saliency", n=8, std=0.02),
        "FusionGrad": sm.gradient("saliency", n=2, m=4, std=0.02, sg_std=0.2),
        "FusionGrad(IG)": sm.gradient("ig", steps=4, n=2, m=2, std=0.02, sg_std=0.2),
        "Tiled k=2": sm.tiled(8, 2),
        "Tiled k=2 blur": sm.tiled(8, 2, blur=8),
        "Tiled drill": sm.tiled(8, 4, refine=0.25),
    }


@needs_bench
@pytest.mark.parametrize("name", [] if needs_bench.args[0] else list(methods()))
@pytest.mark.parametrize("target,region", [(0, A), (1, B)])
def test_every_method_points_into_the_region_that_makes_the_output(name, target, region):
    torch.manual_seed(0)
    model = RegionModel().eval()
    a, evals = methods()[name](model, image(), target, 0)
    assert a.shape == (SIDE, SIDE)
    assert evals >= 1
    assert data.pointing(a, box(region)) == 1.0, name
    # Rank, not mass: RISE's map carries a positive offset everywhere (E[f] p), by design.
    assert data.relevance_rank(a, box(region)) > 0.5, name


@needs_bench
def test_eigencam_is_class_agnostic_but_points_at_the_only_object():
    # EigenCAM takes no target (the first principal component of the activations): it can only
    # be checked on an image with one object.
    from benchmarks import _sota_methods as sm

    model = RegionModel().eval()
    a, evals = sm.cam("EigenCAM", lambda mdl: mdl.features)(model, image(with_b=False), 0, 0)
    assert evals == 1
    assert data.pointing(a, box(A)) == 1.0


@needs_bench
def test_counted_evaluations_are_the_documented_ones():
    from benchmarks import _sota_methods as sm

    model = RegionModel().eval()
    x = image()
    assert sm.cam("ScoreCAM", lambda mdl: mdl.features, batch_size=2)(model, x, 0, 0)[1] == 1 + 3
    assert sm.rise(50, 4)(model, x, 0, 0)[1] == 50
    assert sm.gradient("ig", steps=8)(model, x, 0, 0)[1] == 8
    assert sm.gradient("saliency", n=2, m=4, std=0.02, sg_std=0.2)(model, x, 0, 0)[1] == 8
    # 7 x 7 windows and the clean pass at most; windows where the image equals the baseline
    # change nothing and are skipped.
    assert 1 <= sm.tiled(8, 2)(model, x, 0, 0)[1] <= 7 * 7 + 1
    evals = sm.shap_partition(100, blur=None)(model, x, 0, 0)[1]
    assert 50 <= evals <= 110  # SHAP spends at most about max_evals (plus its clean passes)


def test_matched_budgets_are_tiled_occlusions_evaluations():
    from benchmarks import localisation_sota as ls

    assert ls.tiled_evals(224, 56, 2) == 82
    assert ls.tiled_evals(224, 56, 4) == 362


def test_every_budget_of_the_issue_is_among_the_methods():
    pytest.importorskip("pytorch_grad_cam")  # make_methods builds the bench extra's methods
    from benchmarks import localisation_sota as ls

    keys = {m.key for m in ls.make_methods(ls.Settings())}
    assert {"rise82", "rise362", "rise4000", "shap_blur82", "shap_grey362", "lime82"} <= keys
    assert {"shap_blur1000", "shap_grey1000", "lime362", "scorecam", "ablationcam"} <= keys


def test_tiers_nest_and_every_heavy_image_also_runs_the_lighter_methods():
    from benchmarks import localisation_sota as ls

    s = ls.Settings()
    tiers = [ls.tier_of(p, s) for p in range(16)]
    assert tiers.count("heavy") == 4 and tiers.count("mid") == 4 and tiers.count("light") == 8
    assert ls.Settings().n_images == 64
    assert all(ls.runs_tier(m, "heavy") for m in ls.TIERS)
    assert not ls.runs_tier("mid", "light") and not ls.runs_tier("heavy", "mid")
    share = ls.assign_workers(16, s, 2)
    assert set(share) == {0, 1}


def test_pareto_front_and_best_cheaper_method():
    from benchmarks import _sota_report as rep

    points = {"a": (1.0, 0.5), "b": (10.0, 0.4), "c": (10.0, 0.7), "d": (100.0, 0.7)}
    assert rep.pareto_front(points, "mass") == ["a", "c"]
    # Lower is better for deletion: "b" (0.4 at cost 10) dominates "c" and "d", not "a".
    assert rep.pareto_front(points, "deletion") == ["a", "b"]
    rows = [
        {
            "index": i,
            "methods": {
                "a": {"evals": 1, "mass": 0.5},
                "b": {"evals": 10, "mass": 0.4},
                "c": {"evals": 10, "mass": 0.7 + 0.01 * i},
            },
        }
        for i in range(3)
    ]
    assert rep.best_cheaper(rows, ["a", "b", "c"], "c", "mass") == "a"
    assert rep.best_cheaper(rows, ["a", "b", "c"], "b", "mass") == "c"  # equal cost counts
    assert rep.best_cheaper(rows, ["a", "b", "c"], "a", "mass") is None


def test_the_stored_run_is_of_these_settings_and_a_second_model_is_another_run():
    import dataclasses
    import json
    import os

    from benchmarks import localisation_sota as ls

    s = ls.Settings()
    stored = os.path.join("benchmarks", "results", "localisation_sota_runs", "kept.json")
    with open(stored) as f:
        assert json.load(f)["fingerprint"] == ls.fingerprint(s)
    lite1 = dataclasses.replace(s, model="lite1")
    assert ls.fingerprint(lite1) != ls.fingerprint(s)
    # The number of images is left out: a run may grow.
    assert ls.fingerprint(dataclasses.replace(s, n_images=3)) == ls.fingerprint(s)


def test_methods_can_be_chosen_by_key_and_an_unknown_key_is_named():
    pytest.importorskip("pytorch_grad_cam")  # make_methods builds the bench extra's methods
    from benchmarks import localisation_sota as ls

    s = ls.Settings()
    assert [m.key for m in ls.select_methods(s, ["gradcam", "tiled2"])] == ["tiled2", "gradcam"]
    with pytest.raises(ValueError, match=r"--methods names \['nope'\]"):
        ls.select_methods(s, ["tiled2", "nope"])
    with pytest.raises(ValueError, match="model='lite9'"):
        ls.load_model("lite9")
