"""Adaptive drill-down (``refine=``): how many model evaluations it saves and what it costs.

For ``refine`` in {0.1, 0.25, 0.5} at k = 4 against the full tiling (and the coarse map alone,
Occlusion(w, stride w), for scale), per image:

- model evaluations (rows through the model) relative to the full tiling;
- SSIM and Spearman correlation of the map (summed over channels) with the full map;
- synthetic task (``benchmarks/quality.py`` part 1, window 12 = the object's size): Quantus
  pointing game and relevance mass accuracy on the positive part, ties broken at random;
- photos (EfficientNet-Lite0, window 32 on 224², the issue's setting): RISE deletion / insertion
  AUC as in ``benchmarks/quality.py`` part 2;
- each metric as the paired difference ``refined - full`` with a 95% t-interval;
- a batch section: per-example window sets against the union of the batch's sets (rows, wall
  time, interleaved and repeated; medians and spread), beside the plain forward floor.

Usage, from the repository root::

    PYTHONPATH=$PWD python -m benchmarks.drilldown_quality           # a few minutes to ~10
    PYTHONPATH=$PWD python -m benchmarks.drilldown_quality --quick   # smoke run

Writes ``benchmarks/results/drilldown_quality.md`` (``drilldown_quality_quick.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from captum.attr import NoiseTunnel
from torch import nn

from benchmarks import _quality_data as data
from benchmarks import _quality_report as report
from benchmarks import quality as q
from extra_attrib import TiledOcclusion, imagenet
from extra_attrib._drilldown import drilldown_sweep
from extra_attrib.evaluation import break_ties
from extra_attrib.tiled_occlusion import resolve_tiling

REFINES = (0.1, 0.25, 0.5)
K = 4


@dataclasses.dataclass(frozen=True)
class Settings:
    seed: int = 0
    n_train: int = 6000
    epochs: int = 6
    n_loc: int = 128
    syn_window: int = 12
    syn_chunk: int = 16
    photos: Tuple[str, ...] = ("chelsea", "coffee", "astronaut", "rocket")
    real_window: int = 32
    real_rows: int = 4
    curve_steps: int = 12
    batch_repeats: int = 3
    batch_size_px: int = 32
    batch_window: int = 8


QUICK = Settings(
    n_train=1500, epochs=2, n_loc=16, photos=("chelsea",), real_window=112, batch_repeats=1
)


def log(msg: str) -> None:
    print(msg, flush=True)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two 2-D maps, data range from the reference ``b``."""
    from skimage.metrics import structural_similarity

    rng = float(b.max() - b.min())
    return float(structural_similarity(a, b, data_range=rng if rng > 0 else 1.0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def run_maps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, window: int, chunk: int, rows: Optional[int]
) -> Dict[str, Dict[str, Any]]:
    """Maps ``(N, C, H, W)``, rows per image and seconds per image of every variant."""
    variants: List[Tuple[str, Dict[str, Any]]] = [("full", dict(k=K)), ("coarse", dict(k=1))]
    variants += [(f"refine={r}", dict(k=K, refine=r)) for r in REFINES]
    out: Dict[str, Dict[str, Any]] = {
        name: {"maps": [], "rows": 0, "sec": 0.0} for name, _ in variants
    }
    counted = q.Counted(model).eval()
    tiled = TiledOcclusion(counted)
    for start in range(0, len(x), chunk):
        xb, yb = x[start : start + chunk], y[start : start + chunk]
        # Rotate the order per chunk so that a busy spell of the machine hits every variant.
        shift = (start // chunk) % len(variants)
        for name, kw in variants[shift:] + variants[:shift]:
            counted.rows = 0
            t0 = time.perf_counter()
            # Dense, so that every model row passes through Counted (the incremental engine
            # runs the layers itself and would show only the unperturbed pass); same maps.
            a = tiled.attribute(
                xb, target=yb, window=window, perturbations_per_eval=rows, engine="dense", **kw
            )
            out[name]["sec"] += time.perf_counter() - t0
            out[name]["rows"] += counted.rows
            out[name]["maps"].append(a)
    for r in out.values():
        r["maps"] = torch.cat(r["maps"]).numpy()
        r["rows"] /= len(x)
        r["sec"] /= len(x)
    return out


def similarity(res: Dict[str, Dict[str, Any]]) -> None:
    full = res["full"]["maps"].sum(axis=1)
    for r in res.values():
        maps = r["maps"].sum(axis=1)
        r["ssim"] = np.array([ssim(m, f) for m, f in zip(maps, full)])
        r["spearman"] = np.array([spearman(m, f) for m, f in zip(maps, full)])
        r["ratio"] = r["rows"] / res["full"]["rows"]


def run_synthetic(s: Settings) -> Dict[str, Any]:
    import quantus

    log("== Synthetic localisation task")
    x_train, y_train, _, _ = data.make_synthetic(s.n_train, seed=s.seed, p_empty=0.2)
    x_test, y_test, m_test, _ = data.make_synthetic(max(s.n_loc, 300), seed=s.seed + 1)
    model = data.train_small_cnn(x_train, y_train, s.epochs, seed=s.seed, log=log)
    acc = data.accuracy(model, x_test, y_test)
    log(f"  test accuracy {acc:.3f}")
    for p in model.parameters():
        p.requires_grad_(False)
    x, y, masks = x_test[: s.n_loc], y_test[: s.n_loc], m_test[: s.n_loc].numpy()
    res = run_maps(model, x, y, s.syn_window, s.syn_chunk, None)
    similarity(res)
    kw = dict(disable_warnings=True, display_progressbar=False)
    for name, r in res.items():
        # Channels summed, as quality.py's explainer (and Quantus's own) does.
        pos = break_ties(np.maximum(r["maps"].sum(1, keepdims=True), 0.0), seed=s.seed)
        common = dict(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=pos, s_batch=masks)
        r["pointing"] = np.asarray(quantus.PointingGame(**kw)(**common), dtype=float)
        r["rma"] = np.asarray(quantus.RelevanceMassAccuracy(**kw)(**common), dtype=float)
        log(
            f"  {name}: {r['rows']:.0f} rows/img ({r['ratio']:.2f} of full), "
            f"SSIM {r['ssim'].mean():.3f}, pointing {r['pointing'].mean():.3f}, "
            f"mass {r['rma'].mean():.3f}"
        )
    return dict(results=res, accuracy=acc, n=len(x), window=s.syn_window)


def run_real(s: Settings) -> Dict[str, Any]:
    log("== EfficientNet-Lite0 on scikit-image photos")
    model = imagenet.load_efficientnet_lite0()
    for p in model.parameters():
        p.requires_grad_(False)
    x, names, _ = data.load_photos(s.photos)
    with torch.no_grad():
        pred = model(x).argmax(dim=1)
    res = run_maps(model, x, pred, s.real_window, 1, s.real_rows)
    similarity(res)
    for name, r in res.items():
        a = torch.from_numpy(r["maps"])
        r.update(data.deletion_insertion(model, x, a, pred, s.curve_steps, s.real_rows, s.seed))
        log(
            f"  {name}: {r['rows']:.0f} rows/img ({r['ratio']:.2f} of full), "
            f"{r['sec']:.1f} s/img, SSIM {r['ssim'].mean():.3f}, "
            f"Spearman {r['spearman'].mean():.3f}, deletion {r['deletion'].mean():.3f}, "
            f"insertion {r['insertion'].mean():.3f}"
        )
    return dict(results=res, n=len(x), names=names, window=s.real_window)


def run_batch(s: Settings) -> List[Dict[str, Any]]:
    """Per-example window sets against their union, on two kinds of batch."""
    log("== Batch: per-example window sets vs the union")
    import torchvision

    size = s.batch_size_px
    x_syn, y_syn, _, _ = data.make_synthetic(8, seed=s.seed + 2)
    x_syn = nn.functional.interpolate(x_syn, size=(size, size), mode="bilinear")
    torch.manual_seed(s.seed)
    # Untrained ResNet-18 (random weights): only the cost is measured here.
    model = torchvision.models.resnet18(num_classes=data.N_CLASSES).eval()
    one = x_syn[:1]
    noisy = one.repeat(8, 1, 1, 1) + 0.1 * torch.randn(8, *one.shape[1:])
    cases = [
        ("8 different images", x_syn, y_syn),
        ("8 noisy copies of one image (NoiseTunnel)", noisy, y_syn[:1].repeat(8)),
    ]
    rows = []
    for label, xb, yb in cases:
        (geometry,) = resolve_tiling([tuple(xb.shape[1:])], s.batch_window, K)
        counted = q.Counted(model)
        times: Dict[str, List[float]] = {"per_example": [], "union": [], "floor": []}
        counts: Dict[str, int] = {}
        for rep in range(s.batch_repeats):
            order = ["per_example", "union"] if rep % 2 == 0 else ["union", "per_example"]
            for mode in order:
                counted.rows = 0
                t0 = time.perf_counter()
                drilldown_sweep(
                    counted,
                    (xb,),
                    (torch.tensor(0.0),),
                    [geometry],
                    [yb],
                    lambda o: o,
                    (),
                    0.25,
                    batch_mode=mode,
                )
                times[mode].append(time.perf_counter() - t0)
                counts[mode] = counted.rows
            # Floor: the same number of rows as plain forward passes in batches of 16.
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(math.ceil(counts["per_example"] / 16)):
                    model(xb[:1].expand(16, *xb.shape[1:]).contiguous())
            times["floor"].append(time.perf_counter() - t0)
        rows.append(dict(label=label, counts=counts, times=times))
        log(
            f"  {label}: rows per_example {counts['per_example']}, union {counts['union']}; "
            f"median s per_example {statistics.median(times['per_example']):.2f}, "
            f"union {statistics.median(times['union']):.2f}, "
            f"floor {statistics.median(times['floor']):.2f}"
        )
    # NoiseTunnel composes: a smoke check that it runs on the same batch.
    NoiseTunnel(TiledOcclusion(model)).attribute(
        one, nt_samples=2, stdevs=0.1, target=0, window=s.batch_window, k=K, refine=0.25
    )
    return rows


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _table(res: Dict[str, Dict[str, Any]], metrics: Sequence[Tuple[str, str, str]]) -> List[str]:
    head = [
        "Map",
        "Model rows / image",
        "vs full",
        "Time / image",
        "SSIM vs full",
        "Spearman vs full",
    ] + [f"{label} {arrow}" for _, label, arrow in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in res.items():
        cells = [
            name,
            f"{r['rows']:.0f}",
            f"{r['ratio']:.3f}",
            report.fmt_time(r["sec"]),
            report.fmt(r["ssim"]),
            report.fmt(r["spearman"]),
        ]
        cells += [report.fmt(r[key]) for key, _, _ in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired differences (map − full tiling), mean ± 95% CI over images; **bold**: "
        "the CI excludes 0 (✓ better, ✗ worse).",
        "",
    ]
    head = ["Map − full"] + [f"{label} {arrow}" for _, label, arrow in metrics]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in res.items():
        if name == "full":
            continue
        cells = [name] + [
            report.fmt_diff(r[key] - res["full"][key], arrow) for key, _, arrow in metrics
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(
    s: Settings, quick: bool, syn, real, batch, out: str, total: float, command: str
) -> None:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Adaptive drill-down (`refine=`): evaluations saved, map kept",
        "",
        f"Date: {when}. Command: `{command}` (total {total / 60:.1f} min).  ",
        f"Machine: {report.machine()}.",
        "",
        "Each cell: mean ± half-width of the 95% t-interval over images. Model rows count the "
        "examples passed through the model (the unperturbed passes included). SSIM and Spearman "
        f"compare each map (summed over channels) with the full TiledOcclusion map (k = {K}). "
        "`coarse` is the coarse pass alone (Occlusion with window and stride w). Times are wall "
        "clock on a machine shared with other jobs; the row counts are what to trust.",
        "",
        f"## Synthetic task ({syn['n']} images, 48², window {syn['window']}, k = {K})",
        "",
        f"Small CNN, test accuracy {syn['accuracy']:.3f}; explained class: the label. Pointing "
        "game and relevance mass (Quantus) on the positive part, ties broken at random.",
        "",
    ]
    lines += _table(
        syn["results"], [("pointing", "Pointing game", "↑"), ("rma", "Relevance mass", "↑")]
    )
    lines += [
        "",
        f"## Photos ({real['n']}: {', '.join(real['names'])}; 224², window {real['window']}, "
        f"k = {K})",
        "",
        "EfficientNet-Lite0, explained class = predicted class. RISE deletion (to black) and "
        f"insertion (from blur) AUC of the softmax probability, {s.curve_steps} steps.",
        "",
    ]
    lines += _table(
        real["results"], [("deletion", "Deletion AUC", "↓"), ("insertion", "Insertion AUC", "↑")]
    )
    lines += [
        "",
        "## Batches: per-example window sets or their union",
        "",
        "The engine perturbs whole copies of the batch, so a single refinement sweep over the "
        "union of the examples' window sets evaluates every example on every other example's "
        "windows; the per-example mode runs one sweep per example on its own set. ResNet-18 "
        f"(random weights), {s.batch_size_px}², window {s.batch_window}, k = {K}, refine = 0.25, "
        "batch of 8 synthetic-task images (resized), target = their label. Median "
        f"(min–max) of {s.batch_repeats} interleaved runs; floor = the per-example mode's row "
        "count as plain forward passes of 16 rows.",
        "",
        "| Batch | Rows per-example | Rows union | Per-example s | Union s | Floor s | "
        "Union / per-example time |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in batch:
        t = b["times"]

        def med(key: str, t=t) -> str:
            return f"{statistics.median(t[key]):.2f} ({min(t[key]):.2f}–{max(t[key]):.2f})"

        ratio = statistics.median(t["union"]) / statistics.median(t["per_example"])
        lines.append(
            f"| {b['label']} | {b['counts']['per_example']} | {b['counts']['union']} | "
            f"{med('per_example')} | {med('union')} | {med('floor')} | {ratio:.2f} |"
        )
    if quick:
        lines += ["", "*Quick smoke run: small numbers, a window of 112 on the photo.*"]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    log(f"wrote {out}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--photos", type=int, default=None, help="number of photos")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else Settings()
    if args.photos is not None:
        s = dataclasses.replace(s, photos=data.PHOTOS[: args.photos])
    command = "PYTHONPATH=$PWD python -m benchmarks.drilldown_quality" + " ".join(
        [""] + list(argv if argv is not None else __import__("sys").argv[1:])
    )
    out = os.path.join(
        q.REPO, "benchmarks", "results", f"drilldown_quality{'_quick' if args.quick else ''}.md"
    )
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    syn = run_synthetic(s)
    batch = run_batch(s)
    real = run_real(s)
    write_report(s, args.quick, syn, real, batch, out, time.perf_counter() - t0, command)
    log(f"total {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
