"""Incremental vs dense occlusion, side by side with the plain forward-pass floor.

For each case, in one process and one run, with ``torch.set_num_threads(1)`` unless
``--threads`` says otherwise:

- floor: the best per-example forward time over batch sizes (plain ``model(x)``, timed in the
  same interleaved loop as the engines, median per batch size), which times
  ``P`` is the floor of any engine that runs one forward pass per window;
- dense: the dense engine's evaluator (``DenseEvaluator``) on chunks of as many windows as
  the floor's best batch size;
- incremental: :class:`~extra_attrib._incremental.IncrementalSweep` on chunks of ``B`` windows,
  for ``B`` = 8 and 16 (8 with ``--quick``), the faster reported;
- auto: which engine ``engine="auto"`` picks, and why (where it races the engines, the faster
  of the two above).

Full sweeps at 224² take too long on a 2-core CPU, so every engine evaluates the same fixed
windows: ``--chunks`` consecutive chunks of windows from the middle of the window grid (interior
windows, the costliest for incremental). The figures are times per perturbation. Candidates are
interleaved (one chunk each in turn), repeated ``--repeats`` times; the table gives medians and the
[min, max] spread, and each engine's speed-up over the floor (floor per-example time / engine time
per perturbation). Peak memory: the growth of the peak RSS over the RSS after loading the
model, for one chunk at the timed chunk size, each engine in a fresh process (Linux
``clear_refs``); for incremental it includes the clean pass and the stored activations.

Run from the repository root: ``PYTHONPATH=$PWD python -m benchmarks.incremental_speed``
(about 10 minutes on 2 shared CPU cores), or ``--quick`` for a smoke run (about a minute).
The table goes to ``benchmarks/results/incremental_speed.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torchvision
from torch import nn

from extra_attrib._engine import DenseEvaluator
from extra_attrib._geometry import TileGeometry
from extra_attrib._incremental import (
    IncrementalSweep,
    central_box,
    choose_engine,
    program_for,
)

RESULTS = os.path.join("benchmarks", "results", "incremental_speed.md")


def cnn3d(channels: Sequence[int] = (16, 32, 64, 128)) -> nn.Module:
    """Four conv-BN-ReLU blocks (max-pooled between), global pool, linear head."""
    layers: List[nn.Module] = []
    c_in = 1
    for i, c in enumerate(channels):
        layers += [nn.Conv3d(c_in, c, 3, padding=1), nn.BatchNorm3d(c), nn.ReLU(inplace=True)]
        if i < len(channels) - 1:
            layers.append(nn.MaxPool3d(2))
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(c_in, 2))


def build_case(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    if name == "efficientnet_lite0":
        from extra_attrib.imagenet import load_efficientnet_lite0

        return load_efficientnet_lite0().eval()
    if name == "cnn3d":
        model = cnn3d()
    else:
        model = getattr(torchvision.models, name)(num_classes=1000)
    for m in model.modules():  # realistic BatchNorm statistics, not the identity
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn: Callable[[], object]) -> Tuple[float, float]:
    """Seconds and peak RSS growth (MiB) of one call."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass
    start_rss = _rss_mib("VmRSS")
    began = time.perf_counter()
    fn()
    seconds = time.perf_counter() - began
    return seconds, _rss_mib("VmHWM") - start_rss


def floor_per_example(
    model: nn.Module, x: torch.Tensor, sizes: Sequence[int], repeats: int
) -> Dict[int, float]:
    """Median per-example forward time per batch size, batch sizes interleaved."""
    samples: Dict[int, List[float]] = {b: [] for b in sizes}
    batches = {b: x.repeat(b, *([1] * (x.dim() - 1))) for b in sizes}
    with torch.no_grad():
        for b in sizes:
            model(batches[b])  # warm-up
        for _ in range(repeats):
            for b in sizes:
                samples[b].append(timed(lambda b=b: model(batches[b]))[0] / b)
    return {b: statistics.median(v) for b, v in samples.items()}


def setup(name: str, size: int, window: int, k: int):
    model = build_case(name, size)
    spatial = 3 if name == "cnn3d" else 2
    channels = 1 if name == "cnn3d" else 3
    x = torch.randn(1, channels, *([size] * spatial))
    geometry = TileGeometry(
        tuple(x.shape[1:]), (channels,) + (window,) * spatial, (1,) + (k,) * spatial
    )
    return model, x, geometry


def memory_probe(name: str, size: int, window: int, k: int, engine: str, chunk: int) -> float:
    """Peak RSS growth (MiB) of one chunk of ``chunk`` interior windows, this process only."""
    model, x, geometry = setup(name, size, window, k)
    base = torch.tensor(0.0)
    mid = geometry.num_perturbations // 2
    windows = list(range(mid, mid + chunk))

    def one_chunk() -> None:
        with torch.no_grad():
            if engine == "dense":
                evaluator = DenseEvaluator(model, (x,), (base,), (geometry,), (), chunk)
            else:
                evaluator = IncrementalSweep(program_for(model, x), (x,), (base,), geometry)
            evaluator.evaluate(0, windows, torch.tensor(windows))

    return timed(one_chunk)[1]


def measure_memory(case: Tuple[str, int, int, int], engine: str, chunk: int) -> float:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.incremental_speed",
        "--memory-probe",
        ",".join(map(str, case)),
        engine,
        str(chunk),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def run_case(name: str, size: int, window: int, k: int, args: argparse.Namespace) -> dict:
    model, x, geometry = setup(name, size, window, k)
    base = torch.tensor(0.0)
    sizes = [b for b in args.floor_batches if b <= args.max_batch.get(name, 64)]
    # A first, separate look at the floor only to size the dense engine's chunks; the floor
    # reported is measured again below, interleaved with the engines.
    first_look = floor_per_example(model, x, sizes, 1)
    best_batch = min(first_look, key=first_look.get)

    choice = choose_engine("auto", model, (x,), (base,), (), central_box(geometry))
    incr = IncrementalSweep(program_for(model, x), (x,), (base,), geometry)
    stored = incr.activation_bytes / 2**20  # what the sweep keeps (a box reads it)
    chunk_sizes = {"dense": best_batch}
    for b in args.incr_chunks:
        chunk_sizes[f"incremental B={b}"] = b
    total = max(chunk_sizes.values()) * args.chunks
    mid = geometry.num_perturbations // 2 - total // 2
    windows = list(range(max(mid, 0), max(mid, 0) + total))
    dense = DenseEvaluator(model, (x,), (base,), (geometry,), (), max(chunk_sizes.values()))

    samples: Dict[str, List[float]] = {c: [] for c in chunk_sizes}
    floor_samples: Dict[int, List[float]] = {b: [] for b in sizes}
    batches = {b: x.repeat(b, *([1] * (x.dim() - 1))) for b in sizes}

    def forward(b: int) -> None:
        with torch.no_grad():
            model(batches[b])

    def run(candidate: str, start: int) -> None:
        b = chunk_sizes[candidate]
        chunk = windows[start * b : (start + 1) * b]
        evaluator = dense if candidate == "dense" else incr
        with torch.no_grad():
            evaluator.evaluate(0, chunk, torch.tensor(chunk))

    for candidate in chunk_sizes:  # warm-up
        run(candidate, 0)
    for _ in range(args.repeats):
        for b in sizes:
            floor_samples[b].append(timed(lambda b=b: forward(b))[0] / b)
        for candidate in chunk_sizes:
            for chunk in range(args.chunks):
                seconds, _ = timed(lambda c=candidate, i=chunk: run(c, i))
                samples[candidate].append(seconds / chunk_sizes[candidate])
    floor = {b: statistics.median(v) for b, v in floor_samples.items()}
    t_floor = min(floor.values())
    med = {c: statistics.median(v) for c, v in samples.items()}
    best_incr = min((c for c in med if c != "dense"), key=med.get)
    if choice.engine == "measure":  # auto races the engines and keeps the faster
        auto = min((best_incr, "dense"), key=med.get)
        picked = f"race: {'incremental' if auto != 'dense' else 'dense'}"
    else:
        auto = best_incr if choice.engine == "incremental" else "dense"
        picked = choice.engine
    case = (name, size, window, k)
    peaks = {
        "dense": measure_memory(case, "dense", best_batch),
        best_incr: measure_memory(case, "incremental", chunk_sizes[best_incr]),
    }
    return {
        "case": name,
        "input": "x".join(map(str, x.shape)),
        "window": window,
        "k": k,
        "P": geometry.num_perturbations,
        "best_batch": best_batch,
        "floor": t_floor,
        "samples": samples,
        "median": med,
        "peaks": peaks,
        "best_incr": best_incr,
        "auto": picked,
        "auto_reason": choice.reason,
        "auto_over_dense": med[auto] / med["dense"],
        "stored": stored,
    }


def _speedup(floor: float, values: List[float]) -> str:
    med = statistics.median(values)
    return f"{floor / med:.2f}x [{floor / max(values):.2f}-{floor / min(values):.2f}]"


def render(rows: List[dict], args: argparse.Namespace, started: str) -> str:
    lines = [
        f"Incremental occlusion speed, run started {started} UTC, {platform.machine()}, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"{'quick' if args.quick else 'full'} run, {args.chunks} chunk(s) x {args.repeats} "
        "repeats per candidate, interleaved.",
        "",
        "Each engine evaluates the same interior windows (fixed number of chunks, not a full "
        "sweep); figures are speed-ups over the forward floor (best per-example forward time), "
        "median [min-max] over the timed chunks. Peak: growth of the peak RSS over the RSS "
        "after loading the model, for one chunk at the timed chunk size, each engine in a fresh "
        "process (incremental: its clean pass and stored activations included); stored: the "
        "clean activations the incremental sweep keeps (those a box reads; the others are "
        "recomputed when read). auto picks: `race` where auto times both engines on the sweep's "
        "windows and keeps the faster (the engine named is the faster here), else its decision.",
        "",
        "| case | input | window, k | P | floor batch | dense / floor | incremental (best B) "
        "/ floor | incremental over dense | auto picks | auto / dense time | peak MiB dense / "
        "incr | stored activations MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, i = r["samples"]["dense"], r["samples"][r["best_incr"]]
        lines.append(
            f"| {r['case']} | {r['input']} | {r['window']}, {r['k']} | {r['P']} | "
            f"{r['best_batch']} | {_speedup(r['floor'], d)} | {_speedup(r['floor'], i)} "
            f"({r['best_incr'].split('=')[1]}) | "
            f"{r['median']['dense'] / r['median'][r['best_incr']]:.2f}x | {r['auto']} | "
            f"{r['auto_over_dense']:.2f} | {r['peaks']['dense']:.0f} / "
            f"{r['peaks'][r['best_incr']]:.0f} | {r['stored']:.0f} |"
        )
    lines += ["", "auto's reasons:", ""]
    for r in rows:
        lines.append(f"- {r['case']} {r['input']} w{r['window']} k{r['k']}: {r['auto_reason']}")
    return "\n".join(lines) + "\n"


CASES_FULL = [
    ("vgg16", 224, 32, 2),
    ("resnet18", 224, 32, 2),
    ("mobilenet_v2", 224, 32, 2),
    ("efficientnet_lite0", 224, 32, 2),
    ("cnn3d", 64, 16, 2),
    ("cnn3d", 96, 16, 2),
    ("resnet18", 224, 16, 4),
    ("vgg16", 224, 16, 4),
]
CASES_QUICK = [("resnet18", 112, 32, 2), ("cnn3d", 48, 16, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--chunks", type=int, default=None)
    parser.add_argument(
        "--cases", nargs="*", default=None, help="subset of case names (e.g. vgg16 cnn3d)"
    )
    parser.add_argument("--memory-probe", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        case, engine, chunk = args.memory_probe
        name, *numbers = case.split(",")
        size, window, k = map(int, numbers)
        print(memory_probe(name, size, window, k, engine, int(chunk)))
        return
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.chunks = args.chunks or 1
    args.floor_batches = [1, 4, 8] if args.quick else [1, 2, 4, 8, 16]
    args.max_batch = {"vgg16": 8, "cnn3d": 8}
    args.incr_chunks = [8] if args.quick else [8, 16]
    cases = CASES_QUICK if args.quick else CASES_FULL
    if args.cases:
        cases = [c for c in cases if c[0] in args.cases]
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    rows = []
    for name, size, window, k in cases:
        row = run_case(name, size, window, k, args)
        rows.append(row)
        print(render([row], args, started).splitlines()[-5], flush=True)
    table = render(rows, args, started)
    print(table)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    name = RESULTS.replace(".md", "_quick.md") if args.quick else RESULTS
    with open(name, "w") as out:
        out.write(table)


if __name__ == "__main__":
    main()
