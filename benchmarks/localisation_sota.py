"""TiledOcclusion next to the methods researchers choose today, on real photos (#28).

Run ``python -m benchmarks.localisation_sota --workers 2`` for the full run (64 composites, 74
minutes on two cores with ``--cheap-all --fusion 80 --fusion-ig 60``), ``--model lite1`` for the
second model, ``--quick`` for a smoke run of every method on two images (2.7 minutes wall on the
idle 2-core machine); needs ``pip install -e .[bench]``.

The composites, model, metrics and bootstrap intervals are those of
:mod:`benchmarks.localisation` (EfficientNet-Lite0 on real objects pasted onto real
backgrounds); the composites are a prefix of that benchmark's balanced order (the same kept
list, so the same images and targets). Every method explains the target's **raw logit**:

* ours: ``TiledOcclusion(56, k=2)`` and ``(56, k=4)`` to grey, ``(56, k=2)`` to a box-blurred
  copy of the image (SHAP's ``blur(128,128)`` masking), and drill-down ``(56, k=4,
  refine=0.25)``;
* the Grad-CAM family (``grad-cam``): GradCAM, GradCAM++, LayerCAM, EigenCAM, ScoreCAM and
  AblationCAM on the last convolutional stage (the output of ``_blocks[-1]``, its
  ``_bn2``: 320 channels at 7 x 7);
* RISE (``captum-rise``, the paper's 7 x 7 grid, p = 0.5) with as many masks as TiledOcclusion
  (56, k=2) and (56, k=4) evaluate, and the paper's 4000;
* SHAP's Partition explainer (``shap``) with ``shap.maskers.Image`` blur(128,128) and constant
  grey, ``max_evals`` matched likewise and 1000 (SHAP's image examples);
* Captum's ``Lime`` (its defaults) on SLIC superpixels, matched ``n_samples``, and Captum's
  ``FeatureAblation`` on the same superpixels;
* Saliency and Integrated Gradients alone and under SmoothGrad, NoiseGrad and FusionGrad (all
  through :class:`~extra_attrib.FusionGrad`) at equal evaluations.

Costs rise steeply, so methods come in three tiers: ``light`` on every image, ``mid`` (and the
deletion/insertion curves) on every ``mid_every``-th, ``heavy`` on every ``heavy_every``-th
(marked † and ‡ in the report). Per-image results are appended to ``<out>/part<worker>.jsonl``;
a stopped run leaves a report (``--report-only``) and resumes; ``--images`` may grow a finished
run (the images are a fixed order, the fingerprint leaves their number out).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from benchmarks import _localisation_data as data
from benchmarks import _sota_methods as sm
from benchmarks import localisation as base

TIERS = ("light", "mid", "heavy")


@dataclasses.dataclass(frozen=True)
class Settings:
    seed: int = 0
    # A prefix of benchmarks.localisation's 340 kept composites: 64 images (32 mid, 16 heavy)
    # are the full run, about 50 min for two workers on a quiet 2-core machine.
    n_images: int = 64
    window: int = 56
    ks: Tuple[int, int] = (2, 4)
    refine: float = 0.25
    blur: int = 128  # SHAP's blur(128,128); our blurred baseline is the same box blur
    rise_grid: int = 7
    rise_ref: int = 4000  # RISE paper, ImageNet
    shap_ref: int = 1000  # SHAP's image examples
    segments: int = 50  # SLIC n_segments (about 30 superpixels come out on these composites)
    grad_evals: int = 16  # Saliency / IG families, equal evaluations
    ig_inner: int = 4  # IG steps inside SmoothGrad / NoiseGrad / FusionGrad
    ig_ref: int = 50  # Captum's default n_steps
    sg_std: float = 0.2  # 10 % of the input range [-1, 1]
    ng_std: float = 0.02  # multiplicative weight noise (0.2 destroys the predictions)
    mid_every: int = 2
    heavy_every: int = 4
    curve_steps: int = 10
    rows: int = 4
    cam_batch: int = 32
    # "lite0", or "lite1": EfficientNet-Lite1 fed the same 224 px composites (its native size is
    # 240; the network pools globally), on the composites where its top-1 class is the target.
    model: str = "lite0"


QUICK = dataclasses.replace(
    Settings(), n_images=2, window=112, rise_ref=100, shap_ref=100, mid_every=1, heavy_every=2
)


def tiled_evals(side: int, window: int, k: int) -> int:
    """Model rows of TiledOcclusion(window, k) on a square image: windows plus the clean pass.

    Tiling places windows at every stride ``window / k`` from ``stride - window`` on, so that
    every element is covered ``k`` times, border ones included: ``side / stride + k - 1``
    windows per dimension (82 and 362 for 224 px, w = 56, k = 2 and 4).
    """
    stride = window // k
    per_dim = -(-side // stride) + k - 1
    return per_dim**2 + 1


MODELS = {"lite0": "EfficientNet-Lite0", "lite1": "EfficientNet-Lite1"}


def load_model(name: str) -> nn.Module:
    """The benchmark's model ``name`` (a key of :data:`MODELS`), ImageNet weights, eval mode."""
    from extra_attrib import imagenet

    if name == "lite0":
        return imagenet.load_efficientnet_lite0()
    if name != "lite1":
        raise ValueError(f"model={name!r} must be one of {sorted(MODELS)}")
    return imagenet._efficientnet_lite(1)


@dataclasses.dataclass(frozen=True)
class Method:
    key: str
    label: str
    tier: str  # light / mid / heavy
    family: str  # for the figure: ours, cam, rise, shap, superpixel, gradient
    run: sm.Runner


def make_methods(s: Settings) -> List[Method]:
    w, (k1, k2) = s.window, s.ks
    b1, b2 = (tiled_evals(data.SIDE, w, k) for k in s.ks)
    layer = lambda model: model._blocks[-1]._bn2  # noqa: E731 (the last block's output)
    g, gi = s.grad_evals, s.ig_inner
    sal_n = math.isqrt(g)  # FusionGrad(Saliency): n x m = g, as square as it goes
    ig_n = math.isqrt(g // gi)  # FusionGrad(IG): n x m x steps = g
    out = [
        Method("tiled2", f"TiledOcclusion({w}, k={k1})", "light", "ours", sm.tiled(w, k1)),
        Method("tiled4", f"TiledOcclusion({w}, k={k2})", "light", "ours", sm.tiled(w, k2)),
        Method(
            "tiled2_blur",
            f"TiledOcclusion({w}, k={k1}), blurred baseline",
            "light",
            "ours",
            sm.tiled(w, k1, blur=s.blur),
        ),
        Method(
            "drill",
            f"TiledOcclusion({w}, k={k2}, refine={s.refine})",
            "light",
            "ours",
            sm.tiled(w, k2, refine=s.refine),
        ),
    ]
    for name, label in (
        ("GradCAM", "GradCAM"),
        ("GradCAMPlusPlus", "GradCAM++"),
        ("LayerCAM", "LayerCAM"),
        ("EigenCAM", "EigenCAM"),
    ):
        out.append(Method(name.lower(), label, "light", "cam", sm.cam(name, layer)))
    for name, label in (("ScoreCAM", "ScoreCAM"), ("AblationCAM", "AblationCAM")):
        out.append(Method(name.lower(), label, "heavy", "cam", sm.cam(name, layer, s.cam_batch)))
    for tier, n in (("light", b1), ("mid", b2), ("heavy", s.rise_ref)):
        out.append(Method(f"rise{n}", f"RISE, {n} masks", tier, "rise", sm.rise(n, s.rise_grid)))
    for tier, n in (("light", b1), ("mid", b2), ("heavy", s.shap_ref)):
        out.append(
            Method(
                f"shap_blur{n}",
                f"SHAP Partition, blur, {n} evals",
                tier,
                "shap",
                sm.shap_partition(n, s.blur),
            )
        )
        out.append(
            Method(
                f"shap_grey{n}",
                f"SHAP Partition, grey, {n} evals",
                tier,
                "shap",
                sm.shap_partition(n, None),
            )
        )
    for tier, n in (("light", b1), ("mid", b2)):
        out.append(
            Method(
                f"lime{n}", f"LIME, SLIC, {n} samples", tier, "superpixel", sm.lime(n, s.segments)
            )
        )
    out.append(
        Method(
            "fa_slic",
            "FeatureAblation, SLIC",
            "light",
            "superpixel",
            sm.feature_ablation(s.segments),
        )
    )
    out += [
        Method("saliency", "Saliency", "light", "gradient", sm.gradient("saliency")),
        Method(
            "sg",
            f"SmoothGrad(Saliency), m={g}",
            "light",
            "gradient",
            sm.gradient("saliency", m=g, sg_std=s.sg_std),
        ),
        Method(
            "ng",
            f"NoiseGrad(Saliency), n={g}",
            "light",
            "gradient",
            sm.gradient("saliency", n=g, std=s.ng_std),
        ),
        Method(
            "fg",
            f"FusionGrad(Saliency), n={sal_n}, m={g // sal_n}",
            "light",
            "gradient",
            sm.gradient("saliency", n=sal_n, m=g // sal_n, std=s.ng_std, sg_std=s.sg_std),
        ),
        Method("ig", f"IG, {g} steps", "light", "gradient", sm.gradient("ig", steps=g)),
        Method(
            "sg_ig",
            f"SmoothGrad(IG {gi} steps), m={g // gi}",
            "light",
            "gradient",
            sm.gradient("ig", steps=gi, m=g // gi, sg_std=s.sg_std),
        ),
        Method(
            "ng_ig",
            f"NoiseGrad(IG {gi} steps), n={g // gi}",
            "light",
            "gradient",
            sm.gradient("ig", steps=gi, n=g // gi, std=s.ng_std),
        ),
        Method(
            "fg_ig",
            f"FusionGrad(IG {gi} steps), n={ig_n}, m={g // gi // ig_n}",
            "light",
            "gradient",
            sm.gradient("ig", steps=gi, n=ig_n, m=g // gi // ig_n, std=s.ng_std, sg_std=s.sg_std),
        ),
        Method(
            f"ig{s.ig_ref}",
            f"IG, {s.ig_ref} steps",
            "mid",
            "gradient",
            sm.gradient("ig", steps=s.ig_ref),
        ),
    ]
    return out


def tier_of(position: int, s: Settings) -> str:
    if position % s.heavy_every == 0:
        return "heavy"
    return "mid" if position % s.mid_every == 0 else "light"


def runs_tier(method_tier: str, image_tier: str) -> bool:
    return TIERS.index(method_tier) <= TIERS.index(image_tier)


# --------------------------------------------------------------------------------------------
# One image, workers
# --------------------------------------------------------------------------------------------


def explain_one(
    model: nn.Module,
    methods: Sequence[Method],
    sources: data.Sources,
    item: Dict[str, Any],
    position: int,
    s: Settings,
) -> Dict[str, Any]:
    lay = data.make_layout(item["index"], sources, s.seed)
    unit, box = data.render(lay, sources)
    x = data.to_model_input(unit)[None]
    target = int(item["target"])
    tier = tier_of(position, s)
    row: Dict[str, Any] = {
        "index": lay.index,
        "position": position,
        "obj": lay.obj,
        "scale": lay.scale,
        "background": lay.background,
        "target": target,
        "area": float(box.float().mean()),
        "tier": tier,
        "load": os.getloadavg()[0],
        "methods": {},
    }
    maps: Dict[str, Tensor] = {}
    for method in methods:
        if not runs_tier(method.tier, tier):
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        a, evals = method.run(model, x, target, s.seed + lay.index)
        entry: Dict[str, Any] = {
            "evals": int(evals),
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
        }
        a = a.double()
        entry.update({name: fn(a, box) for name, fn in data.METRICS.items()})
        row["methods"][method.key] = entry
        maps[method.key] = a
    if tier != "light":
        c0 = time.process_time()
        keys = list(maps)
        stacked = torch.stack([maps[k] for k in keys])[:, None].float()
        areas = base.curves(model, x, stacked, target, s)  # type: ignore[arg-type]
        for j, key in enumerate(keys):
            row["methods"][key]["deletion"] = float(areas["deletion"][j])
            row["methods"][key]["insertion"] = float(areas["insertion"][j])
        row["curves_cpu_seconds"] = time.process_time() - c0
    return row


def _done(out_dir: str) -> set:
    done = set()
    for name in os.listdir(out_dir):
        if name.startswith("part") and name.endswith(".jsonl"):
            with open(os.path.join(out_dir, name)) as f:
                done |= {json.loads(line)["index"] for line in f if line.strip()}
    return done


def assign_workers(n: int, s: Settings, workers: int) -> List[int]:
    """The least loaded worker for each position (a mid image costs ~3 light, a heavy ~10)."""
    cost = {"light": 1.0, "mid": 3.0, "heavy": 10.0}
    load = [0.0] * workers
    out = []
    for position in range(n):
        rank = min(range(workers), key=lambda r: (load[r], r))
        load[rank] += cost[tier_of(position, s)]
        out.append(rank)
    return out


def select_methods(s: Settings, only: Optional[Sequence[str]] = None) -> List[Method]:
    """The methods of :func:`make_methods`, or those named in ``only`` (keys, checked)."""
    methods = make_methods(s)
    if only is None:
        return methods
    unknown = sorted(set(only) - {m.key for m in methods})
    if unknown:
        raise ValueError(
            f"--methods names {unknown}, which are not method keys; the keys are "
            f"{[m.key for m in methods]}"
        )
    return [m for m in methods if m.key in only]


def worker(
    rank: int, workers: int, s: Settings, out_dir: str, only: Optional[Sequence[str]] = None
) -> None:
    torch.set_num_threads(1)
    model = load_model(s.model)
    sources = data.load_sources()
    with open(os.path.join(out_dir, "kept.json")) as f:
        kept = json.load(f)["kept"][: s.n_images]
    done = _done(out_dir)
    methods = select_methods(s, only)
    share = assign_workers(len(kept), s, workers)
    path = os.path.join(out_dir, f"part{rank}.jsonl")
    for position, item in enumerate(kept):
        if share[position] != rank or item["index"] in done:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        row = explain_one(model, methods, sources, item, position, s)
        row["seconds"] = time.perf_counter() - t0
        row["cpu_seconds"] = time.process_time() - c0
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        base.log(
            f"worker {rank}: image {position + 1}/{len(kept)} ({item['obj']}, {item['scale']} px, "
            f"{row['tier']}) in {row['seconds']:.0f} s ({row['cpu_seconds']:.0f} CPU s)"
        )


# The one-evaluation methods are cheap enough for all 340 composites of benchmarks.localisation;
# they are paired there with that run's TiledOcclusion(56, k=2) raw-logit results.
# The gradient family (about 4 CPU s an image for all four) can run on more images than the
# tiers give it, for the question whether FusionGrad beats its halves.
EXTRA_GROUPS: Dict[str, Tuple[str, ...]] = {
    "cheap": ("gradcam", "gradcamplusplus", "layercam", "eigencam", "saliency"),
    "fusion": ("saliency", "sg", "ng", "fg"),
    "fusion_ig": ("ig", "sg_ig", "ng_ig", "fg_ig"),
}


def explain_cheap(
    s: Settings, out_dir: str, limit: Optional[int] = None, group: str = "cheap"
) -> None:
    """The methods of ``EXTRA_GROUPS[group]`` on the first ``limit`` kept composites (all when
    None), appended to ``<out>/<group>.jsonl`` (resumes)."""
    torch.set_num_threads(1)
    model = load_model(s.model)
    sources = data.load_sources()
    with open(os.path.join(out_dir, "kept.json")) as f:
        kept = json.load(f)["kept"][:limit]
    path = os.path.join(out_dir, f"{group}.jsonl")
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            done = {json.loads(line)["index"] for line in f if line.strip()}
    methods = [m for m in make_methods(s) if m.key in EXTRA_GROUPS[group]]
    for position, item in enumerate(kept):
        if item["index"] in done:
            continue
        lay = data.make_layout(item["index"], sources, s.seed)
        unit, box = data.render(lay, sources)
        x = data.to_model_input(unit)[None]
        row: Dict[str, Any] = {
            "index": lay.index,
            "position": position,
            "obj": lay.obj,
            "scale": lay.scale,
            "target": int(item["target"]),
            "load": os.getloadavg()[0],
            "methods": {},
        }
        for m in methods:
            c0 = time.process_time()
            a, evals = m.run(model, x, int(item["target"]), s.seed + lay.index)
            entry: Dict[str, Any] = {"evals": evals, "cpu_seconds": time.process_time() - c0}
            entry.update({name: fn(a.double(), box) for name, fn in data.METRICS.items()})
            row["methods"][m.key] = entry
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if position % 20 == 0:
            base.log(f"{group} methods: image {position + 1}/{len(kept)}")


def fingerprint(s: Settings) -> str:
    """The composites and every setting but the number of images (a run may grow); the model
    only when it is not EfficientNet-Lite0, so that runs made before ``model`` existed resume."""
    settings = dataclasses.asdict(s)
    del settings["n_images"]
    if settings["model"] == "lite0":
        del settings["model"]
    what = {
        "objects": [dataclasses.asdict(o) for o in data.OBJECTS],
        "backgrounds": list(data.BACKGROUNDS),
        "scales": list(data.SCALES),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def kept_composites(s: Settings) -> Dict[str, Any]:
    """The kept composites of :mod:`benchmarks.localisation`'s full run, in its balanced order:
    read from its run folder when that run used the current objects and settings (read only),
    otherwise selected again the same way."""
    full = base.Settings()
    path = os.path.join("benchmarks", "results", "localisation_runs", "kept.json")
    found: Optional[Dict[str, Any]] = None
    if os.path.exists(path):
        with open(path) as f:
            found = json.load(f)
        if found.get("fingerprint") != base.run_fingerprint(full):
            found = None
    if found is None:
        from extra_attrib import imagenet

        found = base.select_composites(
            imagenet.load_efficientnet_lite0(), data.load_sources(), full, batch=16
        )
    if s.model == "lite0":
        return found
    return agreeing_composites(load_model(s.model), found, s.seed)


def agreeing_composites(model: nn.Module, found: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """The kept composites (in order) whose target is ``model``'s top-1 class too: the base
    selection's rule (the top-1 class names the object) holds for ``model`` on them."""
    sources = data.load_sources()
    kept = found["kept"]
    agree = []
    for start in range(0, len(kept), 16):
        items = kept[start : start + 16]
        units = [
            data.render(data.make_layout(it["index"], sources, seed), sources)[0] for it in items
        ]
        x = torch.stack([data.to_model_input(u) for u in units])
        with torch.no_grad():
            top = model(x).argmax(1).tolist()
        agree += [it for it, t in zip(items, top) if t == int(it["target"])]
    base.log(f"{len(agree)} of {len(kept)} composites: the model's top-1 class is the target")
    return {**found, "kept": agree, "of": len(kept)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: every method on 2 composites, about 2.5 CPU minutes",
    )
    parser.add_argument("--images", type=int, help="composites to explain (a prefix)")
    parser.add_argument("--workers", type=int, default=1, help="processes (1 thread each)")
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="lite0",
        help="lite1: EfficientNet-Lite1 on the composites where its top-1 class is the target",
    )
    parser.add_argument(
        "--methods", help="comma-separated method keys to run (default: all of their tiers)"
    )
    parser.add_argument(
        "--out", help="run folder (default benchmarks/results/localisation_sota_runs)"
    )
    parser.add_argument(
        "--report", help="markdown (default benchmarks/results/localisation_sota.md)"
    )
    parser.add_argument("--media", help="figure folder (default media/; --quick: --out)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report only")
    parser.add_argument("--note", default="", help="a line for the report")
    parser.add_argument(
        "--cheap-all",
        action="store_true",
        help="run the one-evaluation methods on every kept composite (after the tiers)",
    )
    parser.add_argument(
        "--fusion",
        type=int,
        help="run Saliency, SmoothGrad, NoiseGrad, FusionGrad on this many composites",
    )
    parser.add_argument(
        "--fusion-ig",
        type=int,
        help="the same over Integrated Gradients on this many composites",
    )
    args = parser.parse_args(argv)
    s = QUICK if args.quick else Settings()
    s = dataclasses.replace(s, model=args.model)
    only = args.methods.split(",") if args.methods else None
    select_methods(s, only)  # an unknown key fails before any work
    if args.images is not None:
        s = dataclasses.replace(s, n_images=args.images)
    if args.workers < 1:
        raise ValueError(f"--workers={args.workers} must be at least 1")
    out_dir, report, media = base.run_paths(args, "localisation_sota")
    from benchmarks import _localisation_report as lrep
    from benchmarks import _sota_report as rep

    if not args.report_only:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        kept_path = os.path.join(out_dir, "kept.json")
        fp = fingerprint(s)
        if not base.refuse_other_run(parser, kept_path, fp):
            selection = kept_composites(s)
            with open(kept_path, "w") as f:
                json.dump(
                    {"kept": selection["kept"], "fingerprint": fp, "of": selection.get("of")}, f
                )
        settings_path = os.path.join(out_dir, "settings.json")
        previous: Dict[str, Any] = {}
        if os.path.exists(settings_path):
            with open(settings_path) as f:
                previous = json.load(f)
        starts = previous.get("starts", []) + [
            {
                "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "workers": args.workers,
                "machine": lrep.machine_line(),
                "methods": only,
            }
        ]
        with open(settings_path, "w") as f:
            json.dump({**dataclasses.asdict(s), "starts": starts}, f)
        base.run_workers(worker, args.workers, s, out_dir, only)
        base.log(f"explained in {time.perf_counter() - t0:.0f} s")
    if args.cheap_all:
        explain_cheap(s, out_dir, limit=s.n_images if args.quick else None)
    if args.fusion:
        explain_cheap(s, out_dir, limit=args.fusion, group="fusion")
    if args.fusion_ig:
        explain_cheap(s, out_dir, limit=args.fusion_ig, group="fusion_ig")
    rep.write_report(
        out_dir,
        report,
        media,
        quick=args.quick,
        note=args.note,
        command=" ".join(["python -m benchmarks.localisation_sota", *sys.argv[1:]]),
    )
    base.log(f"wrote {report}")


if __name__ == "__main__":
    main()
