"""Cost of leaving the user's model untouched, side by side with the plain forward pass.

What the hardening of issue #9 added to every call, measured in one process, interleaved and
repeated (medians, with the spread as min-max):

- ``guard``: entering and leaving :func:`extra_attrib._model_state.model_state_kept` (one copy of
  every parameter and buffer, a bitwise comparison on exit), against one forward pass of batch 1;
- ``TiledOcclusion``: a whole small attribution with the guard against the same call with the
  guard replaced by a no-op;
- ``FusionGrad``: a whole ``FusionGrad(Saliency)`` call with the check that the noisy weights are
  used (a ``TorchFunctionMode`` during the first wrapped call) against the same call without it.

Run from the repository root: ``PYTHONPATH=$PWD python -m benchmarks.model_guard`` (about 3
minutes on 2 CPU cores) or with ``--quick`` (under a minute). Writes
``benchmarks/results/model_guard.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import time
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch
import torchvision
from captum.attr import Saliency
from torch import nn

from extra_attrib import FusionGrad, TiledOcclusion
from extra_attrib import fusion_grad as fusion_grad_module
from extra_attrib import tiled_occlusion as tiled_module
from extra_attrib._model_state import model_state_kept

RESULT = os.path.join("benchmarks", "results", "model_guard.md")


@contextlib.contextmanager
def _no_guard(_model: object) -> Iterator[None]:
    yield


@contextlib.contextmanager
def patched(module: object, name: str, value: object) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _unwatched(watch: fusion_grad_module._UseWatch, call: Callable[[], object]) -> object:
    watch.seen = True  # skip the check: the call runs without the TorchFunctionMode
    return call


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    candidates: Dict[str, Callable[[], object]], repeats: int
) -> Dict[str, List[float]]:
    """Run every candidate once per round, ``repeats`` rounds, after one warm-up round."""
    for fn in candidates.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].append(timed(fn))
    return times


def summary(values: Sequence[float]) -> Tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def model_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def run_case(name: str, repeats: int) -> List[str]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224)

    def forward() -> object:
        with torch.no_grad():
            return model(x)

    def guard() -> None:
        with model_state_kept(model):
            pass

    def tiled() -> object:
        return TiledOcclusion(model).attribute(
            x, target=0, window=(3, 112, 112), perturbations_per_eval=2
        )

    def tiled_unguarded() -> object:
        with patched(tiled_module, "model_state_kept", _no_guard):
            return tiled()

    def fusion() -> object:
        torch.manual_seed(0)
        return FusionGrad(Saliency(model)).attribute(x, target=0, n=2, m=1, std=0.02)

    def fusion_unwatched() -> object:
        with patched(fusion_grad_module._UseWatch, "wrap", _unwatched):
            return fusion()

    times = interleaved(
        {
            "forward": forward,
            "guard": guard,
            "tiled": tiled,
            "tiled_unguarded": tiled_unguarded,
            "fusion": fusion,
            "fusion_unwatched": fusion_unwatched,
        },
        repeats,
    )
    med = {k: summary(v) for k, v in times.items()}
    fwd = med["forward"][0]
    rows = []

    def row(label: str, key: str, base: str, base_label: str) -> None:
        m, lo, hi = med[key]
        b = med[base][0]
        rows.append(
            f"| {name} | {label} | {m * 1e3:.1f} ({lo * 1e3:.1f}-{hi * 1e3:.1f}) | "
            f"{m / b:.3f} x {base_label} | {m / fwd:.2f} |"
        )

    row("forward pass, batch 1", "forward", "forward", "forward")
    row("guard enter + exit", "guard", "forward", "forward")
    row("TiledOcclusion, 4 windows, no guard", "tiled_unguarded", "tiled_unguarded", "itself")
    row("TiledOcclusion, 4 windows, guarded", "tiled", "tiled_unguarded", "no guard")
    row("FusionGrad(Saliency) n=2, m=1, no check", "fusion_unwatched", "fusion_unwatched", "itself")
    row("FusionGrad(Saliency) n=2, m=1, checked", "fusion", "fusion_unwatched", "no check")
    rows.append(
        f"| {name} | guard memory: parameters + buffers copied | "
        f"{model_bytes(model) / 2**20:.1f} MiB | | |"
    )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet18 only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 7, quick 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    cases = ["resnet18"] if args.quick else ["resnet18", "resnet50"]
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Cost of the model-state guard and the noisy-weight check",
        "",
        f"Run {started}, `PYTHONPATH=$PWD python -m benchmarks.model_guard"
        f"{' --quick' if args.quick else ''}`, torch {torch.__version__}, "
        f"{args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"{repeats} interleaved rounds after a warm-up; median (min-max) in ms.",
        "",
        "| model | what | ms | ratio | / forward |",
        "|---|---|---|---|---|",
    ]
    for case in cases:
        lines += run_case(case, repeats)
        print("\n".join(lines), flush=True)
    os.makedirs(os.path.dirname(RESULT), exist_ok=True)
    with open(RESULT, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
