"""Dense vs incremental vs auto on a model of two image inputs (#20).

The model: two ResNet-18 trunks (torchvision, random weights, eval), one per input image, their
pooled features concatenated before a linear head, as a two-view or image-plus-mask network
would be. ``TiledOcclusion.attribute((x, y), ...)`` occludes each input in turn with the other
clean; the incremental engine gives each input its own boxes, and the other trunk's activations
come from the clean pass.

Whole calls are timed, each with a fresh ``TiledOcclusion`` (so ``auto``'s tracing, self-check
and engine race count), the three engines interleaved, ``--repeats`` rounds; the table gives the
median and [min, max] seconds per call and each engine's speed-up over dense (median over
median). Every call's maps are compared with the first dense call's (largest difference relative
to the map's largest value). One thread unless ``--threads`` says otherwise.

Run from the repository root: ``PYTHONPATH=$PWD python -m benchmarks.multi_input_speed``
(about 20 s at 128² on a 2-core CPU, about 3 minutes with ``--size 224``). The table is
printed; ``--out PATH`` also writes it as Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from typing import Dict, List

import torch
import torchvision
from torch import Tensor, nn

from extra_attrib import TiledOcclusion


class TwoTrunks(nn.Module):
    """Two ResNet-18 trunks, one per input image, fused by concatenation before the head."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.first = nn.Sequential(*list(torchvision.models.resnet18().children())[:-1])
        self.second = nn.Sequential(*list(torchvision.models.resnet18().children())[:-1])
        self.head = nn.Linear(2 * 512, classes)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        a = self.first(x).flatten(1)
        b = self.second(y).flatten(1)
        return self.head(torch.cat([a, b], 1))


def _call(model: nn.Module, inputs: tuple, engine: str, window: int, k: int) -> tuple:
    tiled = TiledOcclusion(model)
    began = time.perf_counter()
    maps = tiled.attribute(
        inputs,
        target=0,
        window=((3, window, window),) * 2,
        k=((1, k, k),) * 2,
        engine=engine,
    )
    return time.perf_counter() - began, maps, tiled.last_engine, tiled.last_engine_reason


def main(argv: List[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image side (default 128)")
    parser.add_argument("--window", type=int, default=32, help="window side (default 32)")
    parser.add_argument("--k", type=int, default=2, help="tiling k (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=None, help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TwoTrunks().eval()
    s = args.size
    inputs = (torch.randn(1, 3, s, s), torch.randn(1, 3, s, s))
    engines = ("dense", "incremental", "auto")
    times: Dict[str, List[float]] = {e: [] for e in engines}
    chosen: Dict[str, str] = {}
    errors: Dict[str, float] = {e: 0.0 for e in engines}
    reference = None
    for _ in range(args.repeats):
        for engine in engines:
            seconds, maps, last, reason = _call(model, inputs, engine, args.window, args.k)
            times[engine].append(seconds)
            chosen[engine] = f"{last}: {reason}"
            if reference is None:
                reference = maps
            scale = max(float(r.abs().max()) for r in reference)
            error = max(float((m - r).abs().max()) for m, r in zip(maps, reference)) / scale
            errors[engine] = max(errors[engine], error)
    dense = statistics.median(times["dense"])
    grid = (s + args.window // args.k - 1) // (args.window // args.k) + args.k - 1
    lines = [
        f"Two ResNet-18 trunks fused by concatenation, inputs 2 x (1, 3, {s}, {s}), window "
        f"{args.window}, k {args.k} ({grid}² = {grid * grid} windows per input), "
        f"{args.threads} thread(s), {args.repeats} interleaved rounds, "
        f"{platform.processor() or platform.machine()}, {datetime.date.today()}; machine "
        "shared with other jobs, so the spread matters.",
        "",
        "| engine | median s per call [min, max] | vs dense | largest difference from dense |",
        "|---|---|---|---|",
    ]
    for engine in engines:
        t = times[engine]
        lines.append(
            f"| {engine} | {statistics.median(t):.2f} [{min(t):.2f}, {max(t):.2f}] | "
            f"{dense / statistics.median(t):.2f}x | {errors[engine]:.1e} |"
        )
    lines += ["", "What ran, and why:", ""]
    lines += [f"- {engine}: {chosen[engine]}" for engine in engines]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return table


if __name__ == "__main__":
    main()
