"""Peak memory of one TiledOcclusion call on large inputs, against the goal of issue #21.

The goal: a call peaks at most at the perturbation budget (``BUFFER_BUDGET_BYTES``, 256 MiB) plus
the result plus one input-sized temporary. Each case runs in a fresh subprocess: the input is
made and a tiny call warms torch up, the resident set size is read, the call runs, and the peak
is the kernel's high-water mark (``resource.getrusage(...).ru_maxrss``) minus that reading. The
model reads every 1000th element (two scores per example), so the model itself costs nothing
and what is measured is the package: the unperturbed pass, the skip check, the perturbation
buffers and masks, the accumulation of the map and the result.

Each case runs twice: with the chunk size chosen automatically (the tuner may use fewer copies
than the budget allows) and with ``perturbations_per_eval`` so large that the buffers fill the
budget (the worst case).

Run from the repository root: ``PYTHONPATH=$PWD python -m benchmarks.memory`` (about 2 minutes
on 2 CPU cores; ``--quick`` leaves out the 256³ volume, ``--large`` adds a 512³ one). Writes
``benchmarks/results/memory.md``.
To compare with another checkout, point ``PYTHONPATH`` at it and give ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Dict, List

import torch

RESULT = os.path.join("benchmarks", "results", "memory.md")
MIB = 2**20

# name, input shape, window, k
CASES = [
    ("1-D series", (1, 15_000_000), 15_000_000 // 4, 2),
    ("96³ volume", (1, 1, 96, 96, 96), (1, 48, 48, 48), (1, 2, 2, 2)),
    ("256³ volume", (1, 1, 256, 256, 256), (1, 128, 128, 128), (1, 2, 2, 2)),
]
#: With ``--large``: the CT volume of the issue (512 MiB; about 1.5 GB of memory and a few minutes).
LARGE = ("512³ volume", (1, 1, 512, 512, 512), (1, 256, 256, 256), (1, 2, 2, 2))

CHILD = r"""
import json, os, resource, sys
import torch
from extra_attrib import TiledOcclusion
from extra_attrib._engine import BUFFER_BUDGET_BYTES

shape, window, k, chunk = json.loads(sys.argv[1])
window = window if isinstance(window, int) else tuple(window)
k = k if isinstance(k, int) else tuple(k)

class EveryThousandth(torch.nn.Module):
    def forward(self, x):
        v = x.flatten(1)[:, ::1000]
        return torch.stack([v.sum(1), v.square().sum(1)], 1)

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

torch.manual_seed(0)
x = torch.randn(*shape)
tiled = TiledOcclusion(EveryThousandth().eval())
small = x[(slice(None),) * (x.dim() - 1) + (slice(0, 8),)]
tiled.attribute(small, target=0, window=4, k=2)  # warm-up: torch's own allocations
before = rss()
attr = tiled.attribute(x, target=0, window=window, k=k, perturbations_per_eval=chunk)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({
    "input": x.numel() * x.element_size(),
    "result": attr.numel() * attr.element_size(),
    "budget": BUFFER_BUDGET_BYTES,
    "peak": peak - before,
    "perturbations": tiled.last_perturbations,
    "evaluations": tiled.last_evaluations,
}))
"""


def run_case(shape, window, k, chunk) -> Dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    args = json.dumps([list(shape), window, k, chunk])
    done = subprocess.run(
        [sys.executable, "-c", CHILD, args], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="leave out the 256³ volume")
    parser.add_argument("--large", action="store_true", help="add the 512³ volume (auto only)")
    parser.add_argument("--out", default=RESULT, help=f"results file (default {RESULT})")
    options = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    cases = (CASES[:2] if options.quick else CASES) + ([LARGE] if options.large else [])
    for name, shape, window, k in cases:
        # A 512³ copy alone exceeds the budget: the buffers hold one copy either way.
        chunks = (("auto", None),) if name == LARGE[0] else (("auto", None), ("budget full", 10**6))
        for label, chunk in chunks:
            r = run_case(shape, window, k, chunk)
            goal = r["budget"] + r["result"] + r["input"]
            rows.append(
                f"| {name} | {label} | {r['input'] / MIB:.0f} | {r['peak'] / MIB:.0f} | "
                f"{r['peak'] / r['input']:.2f} | {goal / MIB:.0f} | "
                f"{'yes' if r['peak'] <= goal else 'NO'} | {r['perturbations']} |"
            )
            print(rows[-1], flush=True)
    lines = [
        "# Peak memory of one TiledOcclusion call on large inputs",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC, `PYTHONPATH=$PWD python -m benchmarks.memory`, "
        f"torch {torch.__version__}, {platform.machine()}, one subprocess per row. The machine "
        "was shared with other work; peaks are high-water marks of the resident set "
        "(`ru_maxrss`) minus the resident set just before the call, so other processes do not "
        "enter them, but the allocator's rounding does (a few MiB).",
        "",
        "Goal (#21): peak <= budget (256 MiB) + result + one input. `auto` lets the tuner choose "
        "the chunk size; `budget full` asks for more copies than fit, so the buffers take the "
        "whole budget.",
        "",
        "| input | chunks | input MiB | peak MiB | peak / input | goal MiB | within | "
        "perturbations |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    os.makedirs(os.path.dirname(options.out) or ".", exist_ok=True)
    with open(options.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
