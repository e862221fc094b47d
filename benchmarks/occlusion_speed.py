"""Occlusion speed and memory, side by side with Captum and the plain forward-pass floor.

For each case, in one process and one run:

- floor: P perturbations x the best per-example forward time over batch sizes 1-64;
- TiledOcclusion with its default settings;
- Captum ``Occlusion`` with the same window at stride ``window / k`` (no border windows, so fewer
  perturbations), at its best ``perturbations_per_eval``;
- ``attribute_multi`` with 3 targets against 1 target;
- peak memory of the volume case, each method in a fresh subprocess.

Ratios, not seconds, are what to compare: ``time / floor`` and Captum's time per perturbation over
ours. Run ``python benchmarks/occlusion_speed.py`` (about 5 minutes on 2 CPU cores) or with
``--quick`` (about 1 minute). Timings on a shared machine are noisy: every figure is a best of
several runs, and the ratios, not the seconds, are what to compare.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from typing import Callable, Dict, List, Sequence

import torch
import torchvision
from captum.attr import Occlusion
from torch import nn

from extra_attrib import TiledOcclusion


def volume_model() -> nn.Module:
    """A light 3D model: the cost of writing perturbed copies matters most here."""
    return nn.Sequential(nn.AvgPool3d(4), nn.Flatten(), nn.Linear(24**3, 10))


def build_case(name: str, quick: bool):
    torch.manual_seed(0)
    if name == "mobilenet_v3_small":
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


def best_of(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
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


def run_case(name: str, quick: bool) -> dict:
    model, x, window, k = build_case(name, quick)
    stride = tuple(w // kk for w, kk in zip(window, k))
    sizes = [1, 4, 16] if quick else [1, 2, 4, 8, 16, 32, 64]
    per_ex = per_example_forward(model, x, sizes)
    best_batch = min(per_ex, key=per_ex.get)
    t_floor = per_ex[best_batch]

    tiled = TiledOcclusion(model)
    # The model is warm from the floor measurement. Every method gets the best of `repeats`
    # timed runs (Captum: per setting), so no side profits from picking the luckiest sample.
    repeats = 1 if quick else 3
    t_tiled = best_of(lambda: tiled.attribute(x, target=0, window=window, k=k), repeats, False)
    p_tiled = tiled.last_perturbations
    t_multi = best_of(
        lambda: tiled.attribute_multi(x, [0, 1, 2], window=window, k=k), repeats, False
    )

    occ = Occlusion(model)
    captum_settings = [1, 16] if quick else [1, 8, 16, 32]
    if name == "volume96":  # ppe=1 would take minutes here
        captum_settings = [16] if quick else [16, 64]
    p_captum = math.prod(
        (s - w) // t + 1 for s, w, t in zip(x.shape[1:], window, stride)
    )
    t_captum = {}
    for ppe in captum_settings:
        t_captum[ppe] = best_of(
            lambda ppe=ppe: occ.attribute(
                x, target=0, sliding_window_shapes=window, strides=stride,
                perturbations_per_eval=ppe,
            ),
            1 if name == "volume96" else repeats,
            False,
        )
    best_ppe = min(t_captum, key=t_captum.get)
    row = {
        "case": name,
        "input": "x".join(map(str, x.shape)),
        "window": window,
        "k": k,
        "best_batch": best_batch,
        "P_tiled": p_tiled,
        "P_captum": p_captum,
        "tiled_over_floor": t_tiled / (p_tiled * t_floor),
        "captum_over_floor": t_captum[best_ppe] / (p_captum * t_floor),
        "captum_best_ppe": best_ppe,
        "captum_ppe1_over_floor": t_captum[1] / (p_captum * t_floor) if 1 in t_captum else None,
        "speedup_per_perturbation": (t_captum[best_ppe] / p_captum) / (t_tiled / p_tiled),
        "multi3_over_single": t_multi / t_tiled,
    }
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
    cmd = [sys.executable, __file__, "--memory-probe", method] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render(rows: List[dict], memory: List[dict], quick: bool) -> str:
    lines = [
        f"Occlusion speed, {datetime.date.today().isoformat()}, "
        f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{'quick' if quick else 'full'} run",
        "",
        "| case | input | window, k | P ours / Captum | best batch | ours / floor "
        "| Captum / floor (best ppe) | Captum default ppe=1 / floor "
        "| speed-up per perturbation vs Captum's best | 3 targets / 1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['input']} | {r['window']}, {r['k']} | {r['P_tiled']} / "
            f"{r['P_captum']} | {r['best_batch']} | {r['tiled_over_floor']:.2f}x | "
            f"{r['captum_over_floor']:.2f}x ({r['captum_best_ppe']}) | "
            f"{_ratio(r['captum_ppe1_over_floor'])} | "
            f"{r['speedup_per_perturbation']:.2f}x | {r['multi3_over_single']:.2f}x |"
        )
    if memory:
        lines += ["", "| volume96 peak RSS | start (MiB) | peak (MiB) | extra (MiB) |",
                  "|---|---|---|---|"]
        for m in memory:
            lines.append(
                f"| {m['method']} | {m['start_mib']:.0f} | {m['peak_mib']:.0f} | "
                f"{m['peak_mib'] - m['start_mib']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller windows, fewer settings")
    parser.add_argument("--cases", nargs="+",
                        default=["mobilenet_v3_small", "resnet18", "volume96"])
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on shared 2-core VMs, 2-thread "
                             "timings swing by +-30%% between runs, 1-thread ones are stable)")
    parser.add_argument("--memory-probe", choices=["tiled", "captum"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.quick)))
        return 0
    rows = []
    for case in args.cases:
        row = run_case(case, args.quick)
        print(json.dumps(row), flush=True)
        rows.append(row)
    memory = []
    if not args.no_memory and "volume96" in args.cases:
        memory = [measure_memory(m, args.quick) for m in ("tiled", "captum")]
    print()
    print(render(rows, memory, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
