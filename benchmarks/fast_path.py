"""The incremental engine's speed-up in the calls users make (#30).

Rows (1 thread; each row's engines interleaved, round after round; whole calls timed):

- ``batch``: ResNet-50, a batch of 16 images at 224², window 56, k = 1, a fresh
  ``TiledOcclusion`` per call: ``auto`` against ``engine="dense"`` (the batch's clean
  activations exceed the 256 MiB budget: incremental runs it in groups).
- ``groups``: the same batch with ``auto`` at several ``memory_budget`` values (``--budgets``,
  MiB): how the size of the groups it runs in changes the speed (is a larger default budget
  worth it where memory allows?).
- ``nt``: ``NoiseTunnel(TiledOcclusion(resnet50))``, 4 noisy samples of one 224² image, window
  56 with k = 1 and window 32 with k = 2; each call in a **fresh process** (imports, the first
  trace and every fixed cost included; the time is the call's, imports of the script excluded).
- ``volume``: the light 96³ volume (AvgPool3d, Linear; window 16, k = 2), the first
  ``attribute`` call of a fresh process over its forward floor (perturbations x the best
  per-example forward time over batch sizes 1-64, timed in the same process after the call).
- ``dataset``: ``explain_dataset`` items per second with ``engine`` auto, dense and
  incremental on ResNet-50 and EfficientNet-Lite0 at 224² (window 56, k = 1), batch sizes 1, 8
  and 32, a fresh ``TiledOcclusion`` per run.
- ``demo``: the demo's ``NoiseTunnel(TiledOcclusion)`` row on EfficientNet-Lite0 (3 samples,
  window 64, k = 4, ``nt_samples_batch_size`` 1 as the demo runs it, and all 3 at once).

Random weights; the machine's load average is recorded beside every row (the 2-core VM is
shared). Run from the repository root: ``PYTHONPATH=$PWD python -m benchmarks.fast_path``
(``--sections``, ``--repeats``, ``--items`` and ``--batches`` cut it down to fit the time).
Appends a dated section to benchmarks/results/fast_path.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

RESULTS = os.path.join("benchmarks", "results", "fast_path.md")


def load() -> str:
    """The 1-, 5- and 15-minute load averages."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def resnet50() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50().eval()


def lite0() -> nn.Module:
    from extra_attrib.imagenet import load_efficientnet_lite0

    return load_efficientnet_lite0().eval()


def volume_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AvgPool3d(4), nn.Flatten(), nn.Linear(24**3, 10)).eval()


def timed(call: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    began = time.perf_counter()
    call(*args, **kwargs)
    return time.perf_counter() - began


# -- children (fresh processes) ----------------------------------------------------------------


def child_nt(engine: str, window: int, k: int, samples: int) -> Dict[str, Any]:
    from captum.attr import NoiseTunnel

    from extra_attrib import TiledOcclusion

    model = resnet50()
    torch.manual_seed(1)
    x = torch.randn(1, 3, 224, 224)
    tiled = TiledOcclusion(model)
    seconds = timed(
        lambda: NoiseTunnel(tiled).attribute(
            x,
            nt_type="smoothgrad",
            nt_samples=samples,
            stdevs=0.1,
            target=0,
            window=window,
            k=k,
            engine=engine,
        )
    )
    return {"seconds": seconds, "engine": tiled.last_engine, "reason": tiled.last_engine_reason}


def child_volume(engine: str) -> Dict[str, Any]:
    from extra_attrib import TiledOcclusion

    model = volume_model()
    x = torch.randn(1, 1, 96, 96, 96)
    tiled = TiledOcclusion(model)
    window, k = (1, 16, 16, 16), (1, 2, 2, 2)
    first = timed(lambda: tiled.attribute(x, target=0, window=window, k=k, engine=engine))
    engine_first, perturbations = tiled.last_engine, tiled.last_perturbations
    later = min(
        timed(lambda: tiled.attribute(x, target=0, window=window, k=k, engine=engine))
        for _ in range(2)
    )
    best = float("inf")
    with torch.no_grad():
        for b in (1, 8, 32, 64):
            xs = x.expand(b, -1, -1, -1, -1).contiguous()
            best = min(best, min(timed(model, xs) for _ in range(3)) / b)
    floor = perturbations * best
    return {
        "first": first,
        "later": later,
        "floor": floor,
        "engine": engine_first,
        "perturbations": perturbations,
        "dynamo": "torch._dynamo" in sys.modules,
    }


def in_child(*args: str) -> Dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.fast_path", "--child", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- sections ----------------------------------------------------------------------------------


def batch_of_16() -> Tuple[nn.Module, torch.Tensor]:
    """ResNet-50 and its batch of 16 random 224² images, after a warm-up pass."""
    model = resnet50()
    torch.manual_seed(1)
    x = torch.randn(16, 3, 224, 224)
    with torch.no_grad():
        model(x[:2])
    return model, x


def section_batch(repeats: int) -> List[str]:
    from extra_attrib import TiledOcclusion

    model, x = batch_of_16()
    times: Dict[str, List[float]] = {"dense": [], "auto": []}
    notes: Dict[str, str] = {}
    loads = [load()]
    for r in range(repeats):
        for engine in rotated(list(times), r):
            tiled = TiledOcclusion(model)
            times[engine].append(timed(tiled.attribute, x, target=0, window=56, k=1, engine=engine))
            notes[engine] = f"{tiled.last_engine}: {tiled.last_engine_reason[:200]}"
        loads.append(load())
    dense, auto = min(times["dense"]), min(times["auto"])
    return [
        "| call | dense s | auto s | auto vs dense | auto ran | load averages |",
        "|---|---|---|---|---|---|",
        f"| ResNet-50, batch 16 at 224², window 56, k = 1 | {dense:.1f} | {auto:.1f} | "
        f"**{dense / auto:.2f}x** | {notes['auto']} | {' → '.join(loads)} |",
        "",
        f"All runs (s): dense {fmt(times['dense'])}, auto {fmt(times['auto'])}; fastest kept.",
    ]


def section_groups(repeats: int, budgets: List[int]) -> List[str]:
    """The batch of 16 with ``auto`` at several ``memory_budget`` values: group size vs speed."""
    from extra_attrib import TiledOcclusion

    model, x = batch_of_16()
    names = ["dense"] + [f"{b} MiB" for b in budgets]
    times: Dict[str, List[float]] = {name: [] for name in names}
    groups: Dict[str, str] = {}
    loads = [load()]
    for r in range(repeats):
        for name in rotated(names, r):
            tiled = TiledOcclusion(model)
            kwargs: Dict[str, Any] = dict(target=0, window=56, k=1)
            if name == "dense":
                kwargs["engine"] = "dense"
            else:
                kwargs["memory_budget"] = int(name.split()[0]) * 2**20
            times[name].append(timed(tiled.attribute, x, **kwargs))
            found = re.search(r"in (\d+) groups of at most (\d+)", tiled.last_engine_reason)
            groups[name] = (
                f"{found.group(1)} x {found.group(2)}" if found else f"1 x 16 ({tiled.last_engine})"
            )
        loads.append(load())
    dense = min(times["dense"])
    rows = [
        "| ResNet-50, batch 16 at 224², window 56, k = 1: `memory_budget` | groups x examples "
        "| s (fastest) | vs dense | all runs s |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        best = min(times[name])
        rows.append(
            f"| {name} | {groups[name] if name != 'dense' else '(dense)'} | {best:.1f} | "
            f"**{dense / best:.2f}x** | {fmt(times[name])} |"
        )
    rows += ["", f"Load averages: {' → '.join(loads)}."]
    return rows


def section_nt(repeats: int, settings: List[Tuple[int, int]]) -> List[str]:
    rows = [
        "| NoiseTunnel(TiledOcclusion(ResNet-50)), 4 samples, fresh process | dense s | auto s "
        "| auto vs dense | auto ran | load averages |",
        "|---|---|---|---|---|---|",
    ]
    for window, k in settings:
        times: Dict[str, List[float]] = {"dense": [], "auto": []}
        ran = ""
        loads = [load()]
        for r in range(repeats):
            for engine in rotated(list(times), r):
                result = in_child("nt", engine, str(window), str(k))
                times[engine].append(result["seconds"])
                if engine == "auto":
                    ran = f"{result['engine']}: {result['reason'][:160]}"
            loads.append(load())
        dense, auto = min(times["dense"]), min(times["auto"])
        rows.append(
            f"| window {window}, k = {k} | {dense:.1f} | {auto:.1f} | **{dense / auto:.2f}x** | "
            f"{ran} | {' → '.join(loads)} |"
        )
        rows.append(f"| (all runs, s) | {fmt(times['dense'])} | {fmt(times['auto'])} | | | |")
    return rows


def section_volume(repeats: int) -> List[str]:
    rows = [
        "| light 96³ volume, window 16, k = 2, fresh process | engine | first call s | floor s "
        "| first / floor | later / floor | torch._dynamo imported | load averages |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _ in range(repeats):
        for engine in ("auto", "dense"):
            before = load()
            r = in_child("volume", engine)
            rows.append(
                f"| {r['perturbations']} windows | {engine} (ran {r['engine']}) | "
                f"{r['first']:.2f} | {r['floor']:.2f} | **{r['first'] / r['floor']:.2f}x** | "
                f"{r['later'] / r['floor']:.2f}x | {r['dynamo']} | {before} → {load()} |"
            )
    return rows


class Images:
    """Random 3x224² images, the same for every run."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(3)
        self.data = torch.randn(n, 3, 224, 224, generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def section_dataset(repeats: int, items: int, batches: List[int], models: List[str]) -> List[str]:
    from extra_attrib import TiledOcclusion, explain_dataset

    rows = [
        "| model | batch size | items | auto items/s | dense items/s | incremental items/s | "
        "auto / better | auto ran | load averages |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in models:
        model = resnet50() if name == "ResNet-50" else lite0()
        with tempfile.TemporaryDirectory() as folder:  # warm-up: first-run costs of the process
            explain_dataset(
                TiledOcclusion(model),
                Images(1),
                os.path.join(folder, "warm.zarr"),
                show_progress=False,
                window=224,
                engine="dense",
            )
        for batch in batches:
            data = Images(max(items, batch))
            speed: Dict[str, List[float]] = {"auto": [], "dense": [], "incremental": []}
            ran = ""
            loads = [load()]
            for r in range(repeats):
                for engine in rotated(list(speed), r):
                    tiled = TiledOcclusion(model)
                    with tempfile.TemporaryDirectory() as folder:
                        store = os.path.join(folder, "run.zarr")
                        seconds = timed(
                            explain_dataset,
                            tiled,
                            data,
                            store,
                            batch_size=batch,
                            show_progress=False,
                            window=56,
                            k=1,
                            engine=engine,
                        )
                    speed[engine].append(len(data) / seconds)
                    if engine == "auto":
                        why = tiled.last_engine_reason
                        ran = f"{tiled.last_engine} ({why[:90]})"
                        trial = why.find("timed on whole calls")  # a close race settled (#30)
                        if trial >= 0:
                            ran += f"; {why[trial:].split(';')[0]}"
                loads.append(load())
            best = {e: max(v) for e, v in speed.items()}
            better = max(best["dense"], best["incremental"])
            rows.append(
                f"| {name} | {batch} | {len(data)} | {best['auto']:.3f} | {best['dense']:.3f} | "
                f"{best['incremental']:.3f} | **{best['auto'] / better:.2f}x** | {ran} | "
                f"{' → '.join(loads)} |"
            )
            print(rows[-1], flush=True)  # a long section: each row as soon as it is measured
    return rows


def section_demo(repeats: int) -> List[str]:
    from captum.attr import NoiseTunnel

    from extra_attrib import TiledOcclusion

    model = lite0()
    torch.manual_seed(4)
    x = torch.randn(1, 3, 224, 224)
    rows = [
        "| demo NoiseTunnel(TiledOcclusion(EfficientNet-Lite0)), 3 samples, window 64, k = 4 | "
        "dense s | auto s | auto vs dense | auto ran | load averages |",
        "|---|---|---|---|---|---|",
    ]
    with torch.no_grad():
        model(x)  # warm-up
    for per_call in (1, None):
        times: Dict[str, List[float]] = {"dense": [], "auto": []}
        ran = ""
        loads = [load()]
        for r in range(repeats):
            for engine in rotated(list(times), r):
                tiled = TiledOcclusion(model)
                times[engine].append(
                    timed(
                        NoiseTunnel(tiled).attribute,
                        x,
                        nt_type="smoothgrad",
                        nt_samples=3,
                        nt_samples_batch_size=per_call,
                        stdevs=0.2,
                        target=0,
                        window=64,
                        k=4,
                        baselines=0.0,
                        engine=engine,
                    )
                )
                if engine == "auto":
                    ran = f"{tiled.last_engine} ({tiled.last_engine_reason[:90]})"
            loads.append(load())
        dense, auto = min(times["dense"]), min(times["auto"])
        label = "one sample per call (the demo)" if per_call == 1 else "all 3 in one batch"
        rows.append(
            f"| {label} | {dense:.1f} | {auto:.1f} | **{dense / auto:.2f}x** | {ran} | "
            f"{' → '.join(loads)} |"
        )
    return rows


def rotated(names: List[str], r: int) -> List[str]:
    """The engines in round ``r``'s order: each goes first in turn."""
    return names[r % len(names) :] + names[: r % len(names)]


def fmt(values: List[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="batch,groups,nt,volume,dataset,demo")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--items", type=int, default=8, help="explain_dataset items per run")
    parser.add_argument("--batches", default="1,8,32", help="explain_dataset batch sizes")
    parser.add_argument("--models", default="ResNet-50,EfficientNet-Lite0")
    parser.add_argument("--nt", default="56x1,32x2", help="NoiseTunnel window x k settings")
    parser.add_argument("--budgets", default="64,128,256,512,1024", help="groups: MiB values")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        kind, *rest = args.child
        if kind == "nt":
            result = child_nt(rest[0], int(rest[1]), int(rest[2]), 4)
        else:
            result = child_volume(rest[0])
        print(json.dumps(result))
        return
    started = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"## {started:%Y-%m-%d %H:%M} UTC, commit {commit()}",
        "",
        f"`python -m benchmarks.fast_path {' '.join(sys.argv[1:])}`; torch "
        f"{torch.__version__}, {platform.machine()}, 1 thread, CPU, a 2-core VM: load "
        "averages (1, 5, 15 min) are beside each row (this run is about 1 of them; a load "
        "above 2 means other work shared the cores and slows every figure); ratios come from "
        "interleaved runs. No GPU was available to this run.",
        "",
    ]
    sections = args.sections.split(",")
    if "batch" in sections:
        lines += section_batch(args.repeats) + [""]
        print("\n".join(lines), flush=True)
    if "groups" in sections:
        budgets = [int(b) for b in args.budgets.split(",")]
        lines += section_groups(args.repeats, budgets) + [""]
        print("\n".join(lines[-12:]), flush=True)
    if "nt" in sections:
        settings = [tuple(int(v) for v in s.split("x")) for s in args.nt.split(",")]
        lines += section_nt(args.repeats, settings) + [""]  # type: ignore[arg-type]
        print("\n".join(lines[-8:]), flush=True)
    if "volume" in sections:
        lines += section_volume(args.repeats) + [""]
        print("\n".join(lines[-8:]), flush=True)
    if "dataset" in sections:
        batches = [int(b) for b in args.batches.split(",")]
        lines += section_dataset(args.repeats, args.items, batches, args.models.split(","))
        lines += [""]
        print("\n".join(lines[-10:]), flush=True)
    if "demo" in sections:
        lines += section_demo(args.repeats) + [""]
    ended = datetime.datetime.now(datetime.timezone.utc)
    lines.append(f"Ended {ended:%H:%M} UTC.")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    previous = (
        open(RESULTS).read() if os.path.exists(RESULTS) else "# Fast path in users' calls (#30)\n\n"
    )
    head, _, rest = previous.partition("\n\n")
    with open(RESULTS, "w") as f:
        f.write(f"{head}\n\n{text}\n{rest}")


if __name__ == "__main__":
    main()
