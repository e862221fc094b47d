"""Exactness of the close-race trial on real architectures, in float64 (#30).

A long ``auto`` run (``expected_calls``) on torchvision CNNs at 3x64² (window 16, k = 2, random
weights), with every race counted as close (``CLOSE_MARGIN`` infinite) and the cost model's
per-layer costs zeroed so that every model races: the trial's calls alternate the engines, and
every call's map is compared with a dense call's in float64. Not a speed measurement (the
verdicts at 64² say which engine won there, nothing more).

Run from the repository root: ``PYTHONPATH=$PWD python -m benchmarks.call_trial_exact``; writes
``benchmarks/results/call_trial_exact.md``.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import List

import torch
import torchvision

from extra_attrib import TiledOcclusion
from extra_attrib import _call_trial as call_trial
from extra_attrib._incremental import _ops
from extra_attrib._run_hint import expected_calls

RESULTS = os.path.join("benchmarks", "results", "call_trial_exact.md")
MODELS = [
    "resnet18",
    "mobilenet_v2",
    "densenet121",
    "vgg11",
    "regnet_x_400mf",
    "shufflenet_v2_x1_0",
]
CALLS = 14


def run(name: str) -> str:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).double().eval()
    xs = torch.randn(CALLS, 1, 3, 64, 64, dtype=torch.float64)
    reference, tiled = TiledOcclusion(model), TiledOcclusion(model)
    worst, engines = 0.0, []
    for i in range(CALLS):
        dense = reference.attribute(xs[i], target=1, window=16, k=2, engine="dense")
        with expected_calls(CALLS - i):
            auto = tiled.attribute(xs[i], target=1, window=16, k=2)
        scale = dense.abs().max().clamp_min(1e-300)
        worst = max(worst, float((auto - dense).abs().max() / scale))
        engines.append(tiled.last_engine[0])
    trial = next(iter(tiled._trials.values()), None)
    verdict = trial.verdict if trial is not None else "no trial"
    return f"| {name} | {''.join(engines)} | {worst:.1e} | {verdict} |"


def main() -> None:
    call_trial.CLOSE_MARGIN = float("inf")
    _ops.DENSE_NODE_COST = _ops.INCREMENTAL_NODE_COST = 0.0
    began = datetime.datetime.now(datetime.timezone.utc)
    rows: List[str] = [
        f"# The close-race trial in float64 (#30)\n\n## {began:%Y-%m-%d %H:%M} UTC\n",
        f"`python -m benchmarks.call_trial_exact`: {CALLS} calls per model, one image each, "
        "3x64², window 16, k = 2; engines per call (d dense, i incremental); error relative to "
        "the dense map's largest value.\n",
        "| model | engines | largest error | trial |",
        "|---|---|---|---|",
    ]
    start = time.perf_counter()
    for name in MODELS:
        rows.append(run(name))
        print(rows[-1], flush=True)
    rows.append(f"\n{time.perf_counter() - start:.0f} s in all.\n")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.write("\n".join(rows))


if __name__ == "__main__":
    main()
