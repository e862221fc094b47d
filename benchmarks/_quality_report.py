"""The report of ``benchmarks/quality.py``: statistics, markdown tables and figures.

Everything here formats results that :mod:`benchmarks.quality` measured; nothing is measured here.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

import extra_attrib

if TYPE_CHECKING:
    from benchmarks.quality import Settings

# (result key, column title, which direction is better)
SYN_METRICS = [
    ("pointing", "Pointing game", "↑"),
    ("rma", "Relevance mass acc.", "↑"),
    ("rra", "Relevance rank acc.", "↑"),
    ("maxsens", "Max-sensitivity", "↓"),
    ("mprt", "MPRT corr. (rand. model)", "↓"),
    ("randlogit", "Random-logit SSIM", "↓"),
]

REAL_METRICS = [
    ("deletion", "Deletion AUC", "↓"),
    ("insertion", "Insertion AUC", "↑"),
    ("region", "Region perturbation AOPC", "↑"),
    ("faithcorr", "Faithfulness corr.", "↑"),
]


# ------------------------------------------------------------------------------------------------
# Statistics and formatting
# ------------------------------------------------------------------------------------------------


def mean_ci(values: Sequence[float]) -> Tuple[float, float, int]:
    """Mean, half-width of the 95% t-interval, and n (NaNs dropped)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    if n == 1:
        return float(v[0]), float("nan"), 1
    half = stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / math.sqrt(n)
    return float(v.mean()), float(half), n


def fmt(values: Sequence[float], digits: int = 3) -> str:
    m, h, n = mean_ci(values)
    if n == 0:
        return "n/a"
    if not np.isfinite(h):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {h:.{digits}f}"


def fmt_diff(values: Sequence[float], better: str, digits: int = 3) -> str:
    m, h, n = mean_ci(values)
    if n < 2:
        return "n/a"
    text = f"{m:+.{digits}f} ± {h:.{digits}f}"
    if abs(m) > h:  # 95% CI excludes 0
        good = (m > 0) == (better == "↑")
        text = f"**{text}** {'✓' if good else '✗'}"
    return text


def fmt_count(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def fmt_time(sec: float) -> str:
    return f"{sec * 1e3:.0f} ms" if sec < 1 else f"{sec:.1f} s"


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def machine() -> str:
    cpu = cpu_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import captum
    import quantus

    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
        f"load average at start {load:.1f}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, captum {captum.__version__}, quantus {quantus.__version__}, "
        f"numpy {np.__version__}, extra_attrib {extra_attrib.__version__}"
    )


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def method_table(part: Dict[str, Any], metrics) -> List[str]:
    head = ["Method", "Model evals / image", "Time / image: wall, CPU"] + [
        f"{label} {d}" for _, label, d in metrics
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in part["methods"]:
        r = part["results"][method.key]
        evals = fmt_count(r["evals"]) + (" (+ backward)" if method.gradient else "")
        cells = [method.label, evals, f"{fmt_time(r['sec'])}, {fmt_time(r['cpu'])}"] + [
            fmt(r[k]) for k, _, _ in metrics
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pair_table(
    parts: List[Tuple[str, Dict[str, Any], list]], pairs: Sequence[Tuple[str, str, str]]
) -> List[str]:
    """Paired differences (first - second method) per metric, one table per part."""
    lines = []
    for title, part, metrics in parts:
        res = part["results"]
        head = ["Comparison"] + [f"{label} {d}" for _, label, d in metrics]
        lines += [f"*{title}*", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for a, b, label in pairs:
            if a not in res or b not in res:
                continue
            cells = [label]
            for key, _, d in metrics:
                diff = np.asarray(res[a][key], float) - np.asarray(res[b][key], float)
                cells.append(fmt_diff(diff, d))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _kept(agreement: Dict[float, float]) -> str:
    return ", ".join(f"{share:.0%} (std {std})" for std, share in agreement.items())


def write_report(
    s: Settings,
    pairs: Sequence[Tuple[str, str, str]],
    quick: bool,
    syn: Dict[str, Any],
    real: Dict[str, Any],
    path: str,
    fig: str,
    fig_ex: str,
    total: float,
) -> None:
    """Write the markdown report of both parts to ``path``."""
    date = datetime.date.today().isoformat()
    threads = os.environ.get("OMP_NUM_THREADS")
    cmd = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python -m benchmarks.quality"
    cmd += " --quick" if quick else ""

    def rel(p: str) -> str:
        return os.path.relpath(p, os.path.dirname(path))

    lines = [
        f"# Attribution quality{' (quick run)' if quick else ''}",
        "",
        f"Date: {date}. Command: `{cmd}` (total {total / 60:.1f} min).  ",
        f"Machine: {machine()}.",
        "",
        "Each cell: mean ± half-width of the 95% t-interval over images. ↑ / ↓: higher / lower is "
        "better. Every method and metric uses seed "
        f"{s.seed}; ties in every ranking are broken at random (seeded). Model evaluations count "
        "the examples passed through the model while attributing (gradient methods also run a "
        "backward pass for each); times are per image, wall-clock and CPU time of this process, on "
        "a machine shared with other jobs. Metric values do not depend on the machine; they can "
        "differ in the last digits with another number of threads (the small CNN's training is "
        "not bit-identical across thread counts).",
        "",
        f"![quality]({rel(fig)})",
        "",
        "Method settings: occlusion baselines 0; NoiseTunnel: SmoothGrad noise of 10% of the "
        f"input range, {s.nt_samples} samples; Saliency: Captum default (absolute gradient); "
        f"IntegratedGradients: zero baseline, {s.syn_ig_steps} steps (synthetic) / "
        f"{s.real_ig_steps} steps (photos); FusionGrad: multiplicative weight noise N(1, 0.2²) "
        "and additive input noise of 15% of each image's range (its defaults), and once more "
        f"with weight noise N(1, {s.fg_std_small}²); SmoothGrad = "
        "FusionGrad with the weight noise off (n = 1, std = 0) and the same number of samples, "
        "so FusionGrad − SmoothGrad isolates the weight noise.",
        "",
        "## 1. Localisation with ground truth, and robustness (synthetic task)",
        "",
        f"{s.n_loc} test images of 48 x 48 px: clutter, two distractor patches of random binary "
        "noise and one 12 x 12 stripe patch whose orientation (4 classes) is the label; the "
        "patch's square is the ground truth. Small CNN (3 conv layers, global max pool) trained "
        f"on {s.n_train} images ({s.p_empty:.0%} of them without object, a fifth class 'no "
        f"object') for {s.epochs} epochs: **test accuracy {syn['accuracy']:.3f}** on "
        f"{s.n_test} images; with the object removed from the same test images it answers "
        f"'no object' for {syn['removed_none']:.1%} of them, so the label comes from the object "
        f"(data + training {syn['train_time']:.0f} s). Under FusionGrad's weight noise "
        f"(every parameter times N(1, std²)) it keeps the label for "
        f"{_kept(syn['agreement'])} of (image, noise sample) pairs. Explained class: the "
        f"label. Occlusion window w = {syn['window']} (the object's size), baseline 0 (black).",
        "",
        "- Localisation metrics (Quantus defaults, normalised) on the positive part of each map "
        "(evidence for the label): pointing game = the map's maximum lies on the object; "
        "relevance mass = share of positive attribution on the object; relevance rank = share "
        "of the top-|object| pixels on the object.",
        f"- Robustness and randomisation on the first {s.n_rob} images: max-sensitivity "
        f"(Quantus, {s.max_sens_samples} samples of uniform noise ±{s.max_sens_noise}; relative "
        "change of the map), MPRT (Spearman correlation between |maps| of the trained and the "
        "fully randomised model, cascading top-down; lower = the map depends on the weights) and "
        "random-logit (SSIM between maps of the label and of a random other class; lower = "
        "class-specific).",
        "",
    ]
    lines += method_table(syn, SYN_METRICS)
    lines += [
        "",
        "## 2. Faithfulness on a real model (EfficientNet-Lite0, ImageNet)",
        "",
        f"{len(real['predictions'])} colour photos from `skimage.data` at 224 x 224 (the demo's "
        "preprocessing); explained class = predicted class: "
        + ", ".join(f"{n} → {c} ({p:.2f})" for n, c, p in real["predictions"])
        + ". Under FusionGrad's weight noise (every parameter times N(1, std²)) the model keeps "
        f"its predicted class for {_kept(real['agreement'])} of (photo, noise sample) pairs. "
        f"Occlusion window w = {real['window']}, baseline 0 (mid-grey).",
        "",
        f"- Deletion / insertion (RISE): pixels in order of attribution, {s.curve_steps} steps; "
        "deletion replaces them by black, insertion starts from a blurred copy; area under the "
        "softmax probability of the class.",
        f"- Region perturbation (Quantus, MoRF): the {s.rp_regions} most relevant "
        f"{s.rp_patch} x {s.rp_patch} patches (a grid not aligned with the occlusion windows) "
        "replaced by black one after another; AOPC = mean drop of the probability.",
        f"- Faithfulness correlation (Quantus): Pearson correlation, over {s.fc_runs} random "
        f"subsets of {s.fc_subset} input values set to black, between the attribution sum of the "
        "subset and the drop of the logit.",
        "",
    ]
    lines += method_table(real, REAL_METRICS)
    lines += [
        "",
        "## 3. Paired differences",
        "",
        "Mean over images of (first method − second method) ± 95% CI. **Bold**: the CI excludes "
        "0; ✓ the first method is better on that metric, ✗ worse.",
        "",
    ]
    lines += pair_table(
        [("Synthetic task", syn, SYN_METRICS), ("EfficientNet-Lite0 photos", real, REAL_METRICS)],
        pairs,
    )
    lines += [f"Example maps: ![examples]({rel(fig_ex)})", ""]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _colour(key: str) -> str:
    for prefix, colour in (
        ("occ_w", "#1b2f5c"),
        ("occ_small", "tab:blue"),
        ("occ_ovl", "#8fb8de"),
        ("tiled", "tab:orange"),
        ("nt_", "tab:red"),
        ("sg_", "tab:olive"),
        ("fg_", "tab:purple"),
        ("fgs_", "tab:pink"),
    ):
        if key.startswith(prefix):
            return colour
    return "tab:green"


def _save_png(fig, path: str, dpi: float) -> None:
    """Save a figure as a small PNG: rendered, then reduced to a 256-colour palette."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    with Image.open(buf) as img:
        img.convert("RGB").quantize(colors=256).save(path, optimize=True)


def plot(syn: Dict[str, Any], real: Dict[str, Any], fig_path: str, ex_path: str) -> None:
    """Draw the metric overview to ``fig_path`` and the example maps to ``ex_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (syn, k, f"{label} {d}", f"synthetic, w={syn['window']}") for k, label, d in SYN_METRICS
    ]
    panels += [
        (real, k, f"{label} {d}", f"photos, w={real['window']}") for k, label, d in REAL_METRICS
    ]
    ncol = 5
    nrow = math.ceil(len(panels) / ncol)
    labels = [m.short for m in syn["methods"]]
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(2.6 * ncol + 1.8, 0.2 * len(labels) * nrow + 1.2), sharey=True
    )
    for ax, (part, key, title, which) in zip(axes.flat, panels):
        for j, method in enumerate(part["methods"]):
            m, h, _ = mean_ci(part["results"][method.key][key])
            ax.errorbar(
                m,
                j,
                xerr=h if np.isfinite(h) else None,
                fmt="o",
                color=_colour(method.key),
                ms=4,
                capsize=2,
            )
        n_occ = sum(1 for m in part["methods"] if not m.gradient)
        ax.axhline(n_occ - 0.5, color="grey", lw=0.5)
        ax.set_title(f"{title}\n({which})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    axes[0, 0].set_yticks(range(len(labels)))
    axes[0, 0].set_yticklabels(labels, fontsize=7)
    axes[0, 0].invert_yaxis()  # shared by all panels: once
    fig.suptitle("Attribution quality: mean ± 95% CI over images", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(fig_path), exist_ok=True)
    _save_png(fig, fig_path, dpi=72)
    plt.close(fig)

    # Example maps: one synthetic image and one photo, every method.
    methods = syn["methods"]
    fig, axes = plt.subplots(2, len(methods) + 1, figsize=(1.25 * (len(methods) + 1), 2.9))
    for row, (part, name) in enumerate(((syn, "synthetic"), (real, "photo"))):
        img, mask, maps = part["example"]
        img = np.asarray(img)
        if img.shape[0] == 3:
            img = img.transpose(1, 2, 0)
        axes[row, 0].imshow(np.clip(img, 0, 1))
        if mask is not None:
            axes[row, 0].contour(mask, levels=[0.5], colors="yellow", linewidths=0.8)
        axes[row, 0].set_title(name, fontsize=6)
        for j, method in enumerate(part["methods"]):
            a = maps[method.key]
            lim = np.abs(a).max() or 1.0
            axes[row, j + 1].imshow(a, cmap="bwr", vmin=-lim, vmax=lim)
            if row == 0:
                axes[row, j + 1].set_title(method.short.replace("(", "(\n", 1), fontsize=5)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.3)
    _save_png(fig, ex_path, dpi=85)
    plt.close(fig)
