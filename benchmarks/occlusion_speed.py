"""Occlusion speed and memory, side by side with Captum and the plain forward-pass floor.

For each case, in one process and one run, interleaved in rounds (every round measures every
candidate once, so a passing load on a shared machine hits all of them alike):

- floor: P perturbations x the best per-example forward time over batch sizes 1-64 (each size
  the fastest of 3 passes);
- TiledOcclusion with its default settings, on one object across rounds, as a user explaining
  batch after batch would (the first, untimed call tunes the chunk size; later calls reuse it),
  and the first call of a new object (which tunes from scratch);
- Captum ``Occlusion`` with the same window at stride ``window / k`` (no border windows, so fewer
  perturbations), at its best ``perturbations_per_eval``;
- ``attribute_multi`` with 3 targets against 1 target;
- tensor operations TiledOcclusion dispatches per perturbation outside the model (counted with
  ``TorchDispatchMode``, the model's own operations subtracted), over the first call of a new
  object (which tunes) and over its next call;
- peak memory of the volume case, each method in a fresh subprocess.

Every method is timed the same number of times per round and its fastest run counts, like the
floor's passes: 3 times where one attribution takes under a second, once otherwise. Ratios are
computed within a round and reported as the median over rounds with their range. Run
``PYTHONPATH=$PWD python -m benchmarks.occlusion_speed`` (about 6 minutes on 2 CPU cores) or with
``--quick`` (about 1 minute).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torchvision
from captum.attr import Occlusion
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from extra_attrib import TiledOcclusion

ALL_CASES = ["mobilenet_v3_small", "resnet18", "volume96", "tabular64", "cifar16", "series1d"]


def volume_model() -> nn.Module:
    """A light 3D model: the cost of writing perturbed copies matters most here."""
    return nn.Sequential(nn.AvgPool3d(4), nn.Flatten(), nn.Linear(24**3, 10))


def small_cnn() -> nn.Module:
    """A light CNN for 32x32 images."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def series_model() -> nn.Module:
    """A light 1D CNN for time series."""
    return nn.Sequential(
        nn.Conv1d(1, 16, 7, padding=3),
        nn.ReLU(),
        nn.MaxPool1d(4),
        nn.Conv1d(16, 16, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def build_case(name: str, quick: bool):
    torch.manual_seed(0)
    if name == "tabular64":
        model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
        x = torch.randn(64, 512)
        window, k = (8,), (2,)
    elif name == "cifar16":
        model = small_cnn()
        x = torch.randn(16, 3, 32, 32)
        window, k = (3, 8, 8) if quick else (3, 4, 4), (1, 2, 2)
    elif name == "series1d":
        model = series_model()
        x = torch.randn(4, 1, 2048)
        window, k = (1, 64) if quick else (1, 32), (1, 2)
    elif name == "mobilenet_v3_small":
        model = torchvision.models.mobilenet_v3_small(num_classes=1000)
        x = torch.randn(1, 3, 224, 224)
        window, k = (3, 56, 56) if quick else (3, 32, 32), (1, 2, 2)
    elif name == "resnet18":
        model = torchvision.models.resnet18(num_classes=1000)
        x = torch.randn(1, 3, 224, 224)
        window, k = (3, 56, 56) if quick else (3, 32, 32), (1, 2, 2)
    elif name == "volume96":
        model = volume_model()
        x = torch.randn(1, 1, 96, 96, 96)
        window, k = (1, 32, 32, 32) if quick else (1, 16, 16, 16), (1, 2, 2, 2)
    else:
        raise ValueError(f"unknown case {name!r}")
    return model.eval(), x, window, k


#: The clock timings use: CPU time of this process (default) or wall-clock time.
CLOCK: Callable[[], float] = time.process_time


def best_of(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return min(times)


def per_example_forward(
    model: nn.Module, x: torch.Tensor, sizes: Sequence[int]
) -> Dict[int, float]:
    out = {}
    with torch.inference_mode():
        for b in sizes:
            xb = x.repeat(b, *([1] * (x.dim() - 1)))
            out[b] = best_of(lambda xb=xb: model(xb), 3) / b
    return out


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_outside_model(model: nn.Module, x: torch.Tensor, window, k) -> Tuple[float, float, int]:
    """Dispatched operations per perturbation outside the model, cold and warm, and the chunk.

    Counted over whole attributions of the dense engine (setup and the unperturbed pass
    included); the model's own operations per forward pass are counted separately and
    subtracted. The incremental engine has no "outside the model" (it runs the layers itself),
    so rows timed with it still count the dense engine here. Cold: the first call of a new
    TiledOcclusion, which tunes the chunk size; warm: the next call of that object, which
    re-tunes from half the size it chose. A perturbation is one window over the whole batch
    (``last_perturbations``), as Captum counts them; divide by the batch size for the operations
    per perturbed example.
    """
    calls: List[Tuple[int, int]] = []
    counter = _OpCounter()

    def counted(batch: torch.Tensor) -> torch.Tensor:
        before = counter.count
        out = model(batch)
        calls.append((counter.count - before, batch.shape[0]))
        return out

    tiled = TiledOcclusion(counted)
    per_perturbation = []
    for _ in range(2):
        calls.clear()
        counter.count = 0
        with counter:
            tiled.attribute(x, target=0, window=window, k=k, engine="dense")
        inside = sum(c for c, _ in calls)
        per_perturbation.append((counter.count - inside) / tiled.last_perturbations)
    chunk = max(rows for _, rows in calls[1:]) // x.shape[0] if len(calls) > 1 else 1
    return per_perturbation[0], per_perturbation[1], chunk


def run_case(name: str, quick: bool, rounds: int) -> dict:
    model, x, window, k = build_case(name, quick)
    stride = tuple(w // kk for w, kk in zip(window, k))
    sizes = [1, 4, 16] if quick else [1, 2, 4, 8, 16, 32, 64]
    tiled = TiledOcclusion(model)
    occ = Occlusion(model)
    captum_settings = [1, 16] if quick else [1, 8, 16, 32]
    if name == "volume96":  # ppe=1 would take minutes here
        captum_settings = [16] if quick else [16, 64]
    p_captum = math.prod((s - w) // t + 1 for s, w, t in zip(x.shape[1:], window, stride))
    # Warm up every path once; then each round times every candidate once, interleaved.
    per_example_forward(model, x, sizes[:1])
    began = CLOCK()
    tiled.attribute(x, target=0, window=window, k=k)
    # Every method gets the same repeats within a round, the fastest counting, as the floor's
    # forward passes do: best of 3 where a call is short, 1 where it would take too long.
    repeats = 3 if CLOCK() - began < 1.0 else 1
    p_tiled = tiled.last_perturbations
    records: List[dict] = []
    for _ in range(rounds):
        per_ex = per_example_forward(model, x, sizes)
        best_batch = min(per_ex, key=per_ex.get)
        t_floor = per_ex[best_batch]
        t_tiled = best_of(lambda: tiled.attribute(x, target=0, window=window, k=k), repeats, False)
        t_first = best_of(
            lambda: TiledOcclusion(model).attribute(x, target=0, window=window, k=k), repeats, False
        )
        t_multi = best_of(
            lambda: tiled.attribute_multi(x, [0, 1, 2], window=window, k=k), repeats, False
        )
        t_captum = {}
        for ppe in captum_settings:
            t_captum[ppe] = best_of(
                lambda ppe=ppe: occ.attribute(
                    x,
                    target=0,
                    sliding_window_shapes=window,
                    strides=stride,
                    perturbations_per_eval=ppe,
                ),
                repeats,
                False,
            )
        best_ppe = min(t_captum, key=t_captum.get)
        records.append(
            {
                "best_batch": best_batch,
                "tiled_over_floor": t_tiled / (p_tiled * t_floor),
                "first_call_over_floor": t_first / (p_tiled * t_floor),
                "captum_over_floor": t_captum[best_ppe] / (p_captum * t_floor),
                "captum_best_ppe": best_ppe,
                "captum_ppe1_over_floor": (
                    t_captum[1] / (p_captum * t_floor) if 1 in t_captum else None
                ),
                "speedup_per_perturbation": (t_captum[best_ppe] / p_captum) / (t_tiled / p_tiled),
                "multi3_over_single": t_multi / t_tiled,
            }
        )
    ops_cold, ops_warm, chunk = ops_outside_model(model, x, window, k)
    row = {
        "case": name,
        "input": "x".join(map(str, x.shape)),
        "batch": x.shape[0],
        "window": window,
        "k": k,
        "P_tiled": p_tiled,
        "P_captum": p_captum,
        "rounds": rounds,
        "repeats": repeats,
        "ops_per_perturbation": ops_cold,
        "ops_per_perturbation_warm": ops_warm,
        "chunk": chunk,
        "best_batch": statistics.mode(r["best_batch"] for r in records),
        "captum_best_ppe": statistics.mode(r["captum_best_ppe"] for r in records),
    }
    for key in (
        "tiled_over_floor",
        "first_call_over_floor",
        "captum_over_floor",
        "captum_ppe1_over_floor",
        "speedup_per_perturbation",
        "multi3_over_single",
    ):
        values = [r[key] for r in records if r[key] is not None]
        row[key] = statistics.median(values) if values else None
        row[key + "_range"] = (min(values), max(values)) if values else None
    return row


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(method: str, quick: bool) -> dict:
    """Run one volume attribution in this process; report RSS before and its peak during, MiB.

    The peak (VmHWM) is reset just before the attribution (Linux ``clear_refs``), so it measures
    the attribution alone, not imports or model construction.
    """
    model, x, window, k = build_case("volume96", quick)
    with torch.inference_mode():
        model(x)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    start = _rss_mib("VmRSS")
    if method == "tiled":
        TiledOcclusion(model).attribute(x, target=0, window=window, k=k)
    else:
        stride = tuple(w // kk for w, kk in zip(window, k))
        Occlusion(model).attribute(
            x, target=0, sliding_window_shapes=window, strides=stride, perturbations_per_eval=16
        )
    return {"method": method, "start_mib": start, "peak_mib": _rss_mib("VmHWM")}


def measure_memory(method: str, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.occlusion_speed", "--memory-probe", method]
    cmd += ["--quick"] if quick else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _ratio(row: dict, key: str) -> str:
    value, spread = row[key], row[key + "_range"]
    if value is None:
        return "-"
    if spread is None or row["rounds"] == 1:
        return f"{value:.2f}x"
    return f"{value:.2f}x ({spread[0]:.2f}-{spread[1]:.2f})"


def render(rows: List[dict], memory: List[dict], quick: bool) -> str:
    lines = [
        f"Occlusion speed, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{'quick' if quick else 'full'} run, {'CPU' if CLOCK is time.process_time else 'wall'}"
        f" time; medians over rounds (range)",
        "",
        "| case | input | window, k | P ours / Captum | best batch | ours / floor "
        "| ours, first call of a new object / floor "
        "| Captum / floor (best ppe) | Captum default ppe=1 / floor "
        "| speed-up per perturbation vs Captum's best | 3 targets / 1 "
        "| dense engine: ops / perturbation outside the model, first call / later calls "
        "(chunk) | the same per perturbed example, later calls |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['input']} | {r['window']}, {r['k']} | {r['P_tiled']} / "
            f"{r['P_captum']} | {r['best_batch']} | {_ratio(r, 'tiled_over_floor')} | "
            f"{_ratio(r, 'first_call_over_floor')} | "
            f"{_ratio(r, 'captum_over_floor')} ({r['captum_best_ppe']}) | "
            f"{_ratio(r, 'captum_ppe1_over_floor')} | "
            f"{_ratio(r, 'speedup_per_perturbation')} | {_ratio(r, 'multi3_over_single')} | "
            f"{r['ops_per_perturbation']:.2f} / {r['ops_per_perturbation_warm']:.2f} "
            f"({r['chunk']}) | {r['ops_per_perturbation_warm'] / r['batch']:.2f} |"
        )
    if memory:
        lines += [
            "",
            "| volume96 peak RSS | start (MiB) | peak (MiB) | extra (MiB) |",
            "|---|---|---|---|",
        ]
        for m in memory:
            lines.append(
                f"| {m['method']} | {m['start_mib']:.0f} | {m['peak_mib']:.0f} | "
                f"{m['peak_mib'] - m['start_mib']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller windows, fewer settings")
    parser.add_argument("--cases", nargs="+", choices=ALL_CASES, default=ALL_CASES)
    parser.add_argument(
        "--out",
        default="benchmarks/results/occlusion_speed.md",
        help="where the table goes (default: %(default)s); '-' for none",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on shared 2-core VMs, 2-thread "
        "timings swing by +-30%% between runs, 1-thread ones are stable)",
    )
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: CPU time of this process (default; with 1 thread it is what "
        "the work costs, and it barely moves when other jobs load a shared "
        "machine); wall: elapsed time",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds per case (default: 3, 1 with --quick)",
    )
    parser.add_argument("--memory-probe", choices=["tiled", "captum"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.quick)))
        return 0
    rows = []
    for case in args.cases:
        row = run_case(case, args.quick, args.rounds or (1 if args.quick else 3))
        print(json.dumps(row), flush=True)
        rows.append(row)
    memory = []
    if not args.no_memory and "volume96" in args.cases:
        memory = [measure_memory(m, args.quick) for m in ("tiled", "captum")]
    table = render(rows, memory, args.quick)
    print()
    print(table)
    if args.out != "-":
        raw = "\n".join(json.dumps(r) for r in rows + memory)
        with open(args.out, "w") as out:
            out.write(
                f"# Occlusion speed\n\nCommand: `PYTHONPATH=$PWD python -m "
                f"benchmarks.occlusion_speed {' '.join(argv or sys.argv[1:])}`\n\n"
                f"{table}\n\nRaw rows:\n\n```\n{raw}\n```\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
