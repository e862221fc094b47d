"""explain_dataset throughput: 1 and 2 processes, and the store's overhead over attribution alone.

One run, candidates interleaved and repeated (medians and spread reported):

- floor: N x P perturbations x the best per-row forward time over batch sizes 1-32 (the plain
  re-inference a perfect occlusion would cost);
- attribution alone: the same batches through a clean forward pass (targets) and
  ``TiledOcclusion.attribute``, results kept in memory, no store;
- explain_dataset, 1 process (in this process, a fresh store each time);
- explain_dataset, 1 process and 2 processes under ``torchrun --standalone`` (subprocesses with 1
  thread each): items/s inside the call (``summary.seconds`` of rank 0) and over the whole
  command, process start and imports included.

Store overhead (goal < 2 %): explain_dataset / attribution alone - 1 (a difference of two noisy
timings), and as an upper bound the time of explain_dataset around a method that returns at once
(store creation, fingerprint, reads, every write, loading: in a real run the writes overlap the
next batch's attribution in a background thread) over attribution alone.

Run from the repository root: ``PYTHONPATH=$PWD python -m benchmarks.dataset_speed`` (a few
minutes on 2 CPU cores) or ``--quick`` (a smoke run). Writes benchmarks/results/dataset_speed.md.

``--small`` measures the store's cost per item where it matters most, on many tiny items (issue
#19 item 9): 3,000 items of 4 floats through a small MLP and TiledOcclusion (window 1, 4
perturbations each), against a plain loop over the same batches with the results kept in
memory; files and bytes on disk per 100 items, ``open_attributions`` time. Writes
benchmarks/results/dataset_speed_small.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import torch
import torchvision
from torch import nn

from extra_attrib import TiledOcclusion, explain_dataset
from extra_attrib.dataset import ExplainSummary

SIZE = 64
WINDOW, K = 16, 2
PPE = 8
RESULTS = os.path.join("benchmarks", "results", "dataset_speed.md")


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small(num_classes=10).eval()


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.randn((n, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


class StoreOnly:
    """An attribution that costs (almost) nothing: what remains is explain_dataset's own work.

    Random values, not zeros: zarr skips chunks equal to the fill value.
    """

    def __init__(self) -> None:
        self.forward_func = _constant_logits

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.rand_like(inputs)


def _constant_logits(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[0], 10)


def store_only(data: Images, batch: int, store: str) -> float:
    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    summary = explain_dataset(
        StoreOnly(), data, store, batch_size=batch, show_progress=False, window=WINDOW, k=K
    )
    assert summary.complete
    return time.perf_counter() - start


def perturbations() -> int:
    positions = -(-SIZE // (WINDOW // K)) + K - 1
    return positions * positions


def floor_seconds(model: nn.Module, n: int) -> float:
    """N x P x the best per-row forward time over batch sizes."""
    x = torch.randn(32, 3, SIZE, SIZE)
    best = float("inf")
    with torch.no_grad():
        for rows in (1, 2, 4, 8, 16, 32):
            model(x[:rows])
            start = time.perf_counter()
            reps = max(1, 32 // rows)
            for _ in range(reps):
                model(x[:rows])
            best = min(best, (time.perf_counter() - start) / (reps * rows))
    return best * n * perturbations()


def attribution_alone(model: nn.Module, data: Images, batch: int) -> float:
    method = TiledOcclusion(model)
    start = time.perf_counter()
    kept = []
    for i in range(0, len(data), batch):
        x = torch.stack([data[j] for j in range(i, min(i + batch, len(data)))])
        with torch.no_grad():
            target = model(x).argmax(1)
        kept.append(
            method.attribute(
                x, target=target, window=WINDOW, k=K, perturbations_per_eval=PPE
            ).numpy()
        )
    return time.perf_counter() - start


def in_process(model: nn.Module, data: Images, batch: int, store: str) -> float:
    shutil.rmtree(store, ignore_errors=True)
    summary = explain(model, data, store, batch)
    assert summary.complete
    return summary.seconds


def explain(model: nn.Module, data: Images, store: str, batch: int) -> ExplainSummary:
    """The benchmark's settings: TiledOcclusion at WINDOW, K and PPE, no progress bar."""
    return explain_dataset(
        TiledOcclusion(model),
        data,
        store,
        batch_size=batch,
        show_progress=False,
        window=WINDOW,
        k=K,
        perturbations_per_eval=PPE,
    )


def subprocess_run(n: int, batch: int, store: str, procs: int) -> Dict[str, float]:
    shutil.rmtree(store, ignore_errors=True)
    worker = [
        "-m",
        "benchmarks.dataset_speed",
        "--worker",
        store,
        "--items",
        str(n),
        "--batch",
        str(batch),
    ]
    if procs == 1:
        command = [sys.executable, *worker]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            *worker,
        ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}")
    # the ranks' lines may interleave
    seconds = [float(v) for v in re.findall(r'"seconds": ([0-9.eE+-]+)', proc.stdout)]
    if len(seconds) != procs:
        raise RuntimeError(f"expected {procs} timings in:\n{proc.stdout}")
    return {"call": max(seconds), "wall": wall}


def worker(store: str, n: int, batch: int) -> None:
    torch.set_num_threads(1)
    summary = explain(build_model(), Images(n), store, batch)
    assert summary.complete, summary
    print(json.dumps({"seconds": summary.seconds, "rank": os.environ.get("RANK", "0")}), flush=True)


SMALL_N, SMALL_FEATURES, SMALL_BATCH = 3000, 4, 64


class SmallItems(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x = torch.randn((SMALL_N, SMALL_FEATURES), generator=torch.Generator().manual_seed(2))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(SMALL_FEATURES, 16), nn.Tanh(), nn.Linear(16, 3)).eval()


def small_plain(model: nn.Module, data: SmallItems) -> float:
    """The same batches, targets and attributions as explain_dataset, kept in memory."""
    method = TiledOcclusion(model)
    start = time.perf_counter()
    kept = []
    for i in range(0, len(data), SMALL_BATCH):
        x = torch.stack([data[j] for j in range(i, min(i + SMALL_BATCH, len(data)))])
        with torch.no_grad():
            target = model(x).argmax(1)
        kept.append(method.attribute(x, target=target, window=1).numpy())
    return time.perf_counter() - start


def disk_usage(folder: str) -> Dict[str, float]:
    files, size = 0, 0
    for root, _, names in os.walk(folder):
        for name in names:
            files += 1
            size += os.path.getsize(os.path.join(root, name))
    return {"files": files, "bytes": size}


def small_store(model: nn.Module, data: SmallItems, store: str) -> Dict[str, float]:
    from extra_attrib import open_attributions

    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    summary = explain_dataset(
        TiledOcclusion(model), data, store, batch_size=SMALL_BATCH, show_progress=False, window=1
    )
    run = time.perf_counter() - start
    assert summary.complete, summary
    start = time.perf_counter()
    opened = open_attributions(store)
    assert opened.done.all()
    return {"run": run, "open": time.perf_counter() - start, **disk_usage(store)}


def small(repeats: int) -> None:
    torch.set_num_threads(1)
    model, data = small_model(), SmallItems()
    rows: Dict[str, List[float]] = {k: [] for k in ("plain", "run", "open", "files", "bytes")}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "small.zarr")
        small_plain(model, data)  # warm-up
        for _ in range(repeats):  # interleaved
            rows["plain"].append(small_plain(model, data))
            for key, value in small_store(model, data, store).items():
                rows[key].append(value)
    overhead = [r / p - 1 for r, p in zip(rows["run"], rows["plain"])]
    per_item = [1e6 * (r - p) / SMALL_N for r, p in zip(rows["run"], rows["plain"])]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# explain_dataset on many small items",
        "",
        f"Command: `PYTHONPATH=$PWD python -m benchmarks.dataset_speed --small` "
        f"({time.perf_counter() - began:.0f} s), {stamp}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared with "
        f"other jobs (timings are noisy), torch {torch.__version__}, 1 thread. {SMALL_N} items "
        f"of {SMALL_FEATURES} floats, an MLP {SMALL_FEATURES}-16-3, TiledOcclusion window 1 "
        f"(4 perturbations per item), {SMALL_BATCH} items per call, float32 maps; median "
        f"(min-max) of {repeats} interleaved repeats.",
        "",
        "| | value |",
        "|---|---|",
        f"| plain loop (same batches, results in memory) | {spread(rows['plain'])} s |",
        f"| explain_dataset (new store, whole call) | {spread(rows['run'])} s |",
        f"| overhead: explain_dataset / plain loop - 1 | {spread([100 * o for o in overhead])} % |",
        f"| overhead per item | {spread(per_item)} us |",
        f"| open_attributions (verify=True: reads every item back) | {spread(rows['open'])} s |",
        f"| files in the store | {spread(rows['files'])} "
        f"({statistics.median(rows['files']) * 100 / SMALL_N:.2f} per 100 items) |",
        f"| bytes on disk (maps: {SMALL_N * SMALL_FEATURES * 4 / 1000:.0f} kB) | "
        f"{statistics.median(rows['bytes']) / 1000:.0f} kB |",
        "",
        "Raw values per repeat:",
        "",
        "```",
        json.dumps({k: [round(v, 4) for v in vs] for k, vs in rows.items()}, indent=1),
        "```",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS.replace(".md", "_small.md"), "w") as f:
        f.write(text)


def spread(values: List[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (fewer items)")
    parser.add_argument("--small", action="store_true", help="many small items (#19 item 9)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.items, args.batch)
        return
    if args.small:
        small(args.repeats or 5)
        return
    torch.set_num_threads(args.threads)
    n = args.items or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    batch = args.batch
    model, data = build_model(), Images(n)
    began = time.perf_counter()
    rows: Dict[str, List[float]] = {
        k: []
        for k in (
            "floor",
            "alone",
            "store_only",
            "store_1",
            "sub1_call",
            "sub1_wall",
            "sub2_call",
            "sub2_wall",
        )
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "bench.zarr")
        for r in range(repeats):  # interleaved
            rows["floor"].append(floor_seconds(model, n))
            rows["alone"].append(attribution_alone(model, data, batch))
            rows["store_1"].append(in_process(model, data, batch, store))
            rows["store_only"].append(store_only(data, batch, store))
            one = subprocess_run(n, batch, store, 1)
            two = subprocess_run(n, batch, store, 2)
            rows["sub1_call"].append(one["call"])
            rows["sub1_wall"].append(one["wall"])
            rows["sub2_call"].append(two["call"])
            rows["sub2_wall"].append(two["wall"])
            print(
                f"repeat {r + 1}/{repeats}: "
                + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in rows.items()),
                flush=True,
            )
    total = time.perf_counter() - began
    overhead = [s / a - 1 for s, a in zip(rows["store_1"], rows["alone"])]
    store_share = [o / a for o, a in zip(rows["store_only"], rows["alone"])]
    speedup = [a / b for a, b in zip(rows["sub1_call"], rows["sub2_call"])]
    speedup_wall = [a / b for a, b in zip(rows["sub1_wall"], rows["sub2_wall"])]

    def ips(key: str) -> str:
        return spread([n / s for s in rows[key]])

    def ratio(key: str) -> str:
        return spread([s / f for s, f in zip(rows[key], rows["floor"])])

    cpu = platform.processor() or platform.machine()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# explain_dataset speed",
        "",
        f"Command: `PYTHONPATH=$PWD python -m benchmarks.dataset_speed"
        f"{' --quick' if args.quick else ''}` ({total / 60:.1f} min), {stamp}, {cpu}, "
        f"{os.cpu_count()} CPUs (shared with other jobs), torch {torch.__version__}, "
        f"{args.threads} thread(s) in this process and 1 per worker process. "
        f"{n} random 3x{SIZE}x{SIZE} images, random-init MobileNetV3-small (10 classes), "
        f"TiledOcclusion window {WINDOW}, k {K} ({perturbations()} perturbations per image), "
        f"perturbations_per_eval {PPE}, {batch} images per call; median (min-max) of "
        f"{repeats} interleaved repeats.",
        "",
        "| candidate | items/s | time / forward floor |",
        "|---|---|---|",
        f"| forward floor (N x P x best per-row forward) | {ips('floor')} | 1 |",
        f"| attribution alone, no store (in process) | {ips('alone')} | {ratio('alone')} |",
        f"| explain_dataset, 1 process (in process) | {ips('store_1')} | {ratio('store_1')} |",
        f"| explain_dataset, 1 process (subprocess, inside the call) | {ips('sub1_call')} | "
        f"{ratio('sub1_call')} |",
        f"| explain_dataset, 2 processes, torchrun (inside the call, slowest rank) | "
        f"{ips('sub2_call')} | {ratio('sub2_call')} |",
        f"| 1 process, whole command (start + imports) | {ips('sub1_wall')} | "
        f"{ratio('sub1_wall')} |",
        f"| 2 processes, whole torchrun command | {ips('sub2_wall')} | {ratio('sub2_wall')} |",
        "",
        f"- Store cost with nothing to hide it (explain_dataset around a method that costs "
        f"nothing: store creation, fingerprint, loading and every write, which in a real run "
        f"overlap the next batch's attribution in a background thread), over attribution "
        f"alone: "
        f"{spread([100 * v for v in store_share])} %, "
        f"{spread([1000 * v / n for v in rows['store_only']])} ms per item.",
        f"- Store overhead as a difference (explain_dataset / attribution alone - 1, same "
        f"process; within this VM's noise): "
        f"{spread([100 * o for o in overhead])} %, i.e. "
        f"{spread([1000 * (s - a) / n for s, a in zip(rows['store_1'], rows['alone'])])} ms per "
        f"item (store creation, fingerprint, reads and the per-batch writes, spread over {n} "
        f"items of about {1000 * statistics.median(rows['alone']) / n:.0f} ms each).",
        f"- 2 processes vs 1 (inside the call): {spread(speedup)}x; whole command: "
        f"{spread(speedup_wall)}x.",
        "",
        "Raw seconds per repeat:",
        "",
        "```",
        json.dumps({k: [round(v, 3) for v in vs] for k, vs in rows.items()}, indent=1),
        "```",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
