"""Attribution quality: does tiling pay off, and does FusionGrad help?

Three measurements, each method at a fixed seed, every ranking with random tie breaking:

1. **Ground-truth localisation** on a synthetic task (``_quality_data.make_synthetic``): the label
   is the orientation of a small stripe patch placed at random among clutter and distractor
   patches; a small CNN learns it (test accuracy reported). The patch's square is the ground
   truth. Quantus ``PointingGame``, ``RelevanceMassAccuracy``, ``RelevanceRankAccuracy``, computed
   on the positive part of each map (the evidence *for* the label).
2. **Faithfulness on a real model**: ImageNet EfficientNet-Lite0 (the demo's model) on the colour
   photos that scikit-image ships, explaining the predicted class. RISE deletion and insertion
   AUC (``extra_attrib.evaluation.perturbation_curve``), Quantus ``RegionPerturbation`` (patches
   of 20 px, not aligned to any occlusion grid used here) and ``FaithfulnessCorrelation``.
3. **Robustness / sanity** on the synthetic task: Quantus ``MaxSensitivity``, ``MPRT`` (last
   layer, i.e. fully randomised model) and ``RandomLogit``.

Methods, with ``w`` the occlusion window (the object's size on the synthetic task, a quarter of
the image on the photos): Occlusion(w, stride w); for k in {2, 4}: Occlusion(w/k, stride w/k)
(same output resolution as tiled, 0.7-0.8x its model evaluations), Occlusion(w, stride w/k)
(Captum's overlapping windows) and TiledOcclusion(w, k); NoiseTunnel(TiledOcclusion(w, 2)) with 4
samples (about the budget of TiledOcclusion(w, 4)); Saliency and IntegratedGradients, each plain,
inside SmoothGrad (FusionGrad with weight noise off, same number of samples) and inside FusionGrad
(its default weight noise std 0.2, and 0.02).

Usage (needs ``pip install -e ".[eval,demo]"``)::

    OMP_NUM_THREADS=1 python -m benchmarks.quality           # about 17 min on a busy 2-core CPU
    OMP_NUM_THREADS=1 python -m benchmarks.quality --quick   # smoke run, about 1.5 min

On a machine shared with other jobs, ``OMP_NUM_THREADS=1`` gives steadier (and often shorter)
times: torch's worker threads otherwise wait on each other while the other jobs hold the cores.

Writes ``benchmarks/results/quality.md`` (``quality_quick.md`` with ``--quick``) and the figures
``media/quality.png`` and ``media/quality_examples.png`` (``*_quick.png``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Occlusion, Saliency
from torch import nn

from benchmarks import _quality_data as data
from benchmarks._quality_report import fmt_time, plot, write_report
from extra_attrib import FusionGrad, TiledOcclusion, imagenet
from extra_attrib.evaluation import (
    break_ties,
    quantus_explain_func,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    seed: int = 0
    # Synthetic task.
    n_train: int = 6000
    p_empty: float = 0.2  # training images without an object (the "no object" class)
    epochs: int = 6
    n_test: int = 1000
    n_loc: int = 128  # images for the localisation metrics
    n_rob: int = 16  # images for the robustness / randomisation metrics
    syn_window: int = 12
    syn_chunk: int = 16  # images per attribution call
    max_sens_samples: int = 3
    max_sens_noise: float = 0.05  # uniform noise bound, inputs in [0, 1]
    # Real photos.
    photos: Tuple[str, ...] = data.PHOTOS
    real_window: int = 56
    real_rows: int = 4  # rows per forward pass: on these CPUs 1-4 rows run ~1.5x faster than 16
    curve_steps: int = 12
    rp_patch: int = 20
    rp_regions: int = 12
    fc_runs: int = 16
    fc_subset: int = 3 * 224 * 224 // 16
    # Methods.
    ks: Tuple[int, ...] = (2, 4)
    nt_samples: int = 4
    syn_ig_steps: int = 16
    real_ig_steps: int = 8
    fg_sal: Tuple[int, int] = (4, 4)  # FusionGrad(Saliency) n, m
    fg_ig: Tuple[int, int] = (4, 2)  # FusionGrad(IntegratedGradients) n, m
    fg_std_small: float = 0.02  # a second, weaker FusionGrad weight noise (default: 0.2)
    noise_samples: int = 8  # weight-noise samples for the "class kept" diagnostic


# Smoke run: every code path, small numbers (and a coarse window on the photo to save time).
QUICK = dataclasses.replace(
    Settings(),
    n_test=300,
    n_loc=16,
    n_rob=4,
    photos=("chelsea",),
    real_window=112,
    curve_steps=8,
    rp_regions=8,
    fc_runs=8,
    syn_ig_steps=8,
    real_ig_steps=4,
    fg_sal=(2, 2),
    fg_ig=(2, 1),
)


# ------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    label: str  # with this part's sizes
    key: str  # the same for both parts
    short: str  # size-free label, for the figure
    factory: Callable[[nn.Module], Any]
    kwargs: Dict[str, Any]
    gradient: bool = False


def make_methods(
    s: Settings,
    window: int,
    nt_stdev: float,
    images: int,
    rows: int,
    grad_rows: Optional[int],
    ig_steps: int,
) -> List[Method]:
    """The compared methods for images with 3 channels.

    ``images``: images per attribution call; ``rows``: rows per forward pass of the occlusion
    methods (the same for Captum's and ours); ``grad_rows``: most rows per forward/backward pass
    of the gradient methods (None: no limit).
    """
    ppe = max(1, rows // images)
    ppe_nt = max(1, rows // (images * s.nt_samples))

    def occ(win: int, stride: int, key: str, short: str) -> Method:
        label = f"Occlusion(w={win}, stride {stride})"
        kwargs = dict(
            sliding_window_shapes=(3, win, win),
            strides=(3, stride, stride),
            baselines=0.0,
            perturbations_per_eval=ppe,
        )
        return Method(label, key, short, Occlusion, kwargs)

    # TiledOcclusion runs densely here: every perturbed copy then passes through Counted, as
    # Occlusion's do. The incremental engine runs the model's layers itself, so Counted would see
    # only the unperturbed pass (the maps are the same either way).
    def tiled(k: int) -> Method:
        kwargs = dict(
            window=(3, window, window),
            k=(1, k, k),
            baselines=0.0,
            perturbations_per_eval=ppe,
            engine="dense",
        )
        label = f"TiledOcclusion(w={window}, k={k})"
        return Method(label, f"tiled_{k}", f"TiledOcclusion(w, k={k})", TiledOcclusion, kwargs)

    methods = [occ(window, window, "occ_w", "Occlusion(w)")]
    for k in s.ks:
        t = window // k
        methods += [
            occ(t, t, f"occ_small_{k}", f"Occlusion(w/{k})"),
            occ(window, t, f"occ_ovl_{k}", f"Occlusion(w, stride w/{k})"),
            tiled(k),
        ]
    k_nt = s.ks[0]
    methods.append(
        Method(
            f"NoiseTunnel(TiledOcclusion(w={window}, k={k_nt})), {s.nt_samples} samples",
            "nt_tiled",
            f"NoiseTunnel(Tiled(w, k={k_nt}))",
            lambda m: NoiseTunnel(TiledOcclusion(m)),
            dict(
                window=(3, window, window),
                k=(1, k_nt, k_nt),
                baselines=0.0,
                perturbations_per_eval=ppe_nt,
                engine="dense",
                nt_type="smoothgrad",
                nt_samples=s.nt_samples,
                stdevs=nt_stdev,
            ),
        )
    )
    ig_kw = dict(n_steps=ig_steps, internal_batch_size=grad_rows)
    for base, base_cls, extra, (n, m) in (
        ("Saliency", Saliency, {}, s.fg_sal),
        ("IntegratedGradients", IntegratedGradients, ig_kw, s.fg_ig),
    ):
        key = base.lower()[:3]
        methods.append(Method(base, key, base, base_cls, dict(extra), gradient=True))
        fg = dict(extra, batch_size=grad_rows)
        methods.append(
            Method(
                f"SmoothGrad({base}), {n * m} samples",
                f"sg_{key}",
                f"SmoothGrad({base[:3]}.)",
                lambda model, c=base_cls: FusionGrad(c(model), model=model),
                dict(fg, n=1, m=n * m, std=0.0),
                gradient=True,
            )
        )
        methods.append(
            Method(
                f"FusionGrad({base}), n={n}, m={m}",
                f"fg_{key}",
                f"FusionGrad({base[:3]}.)",
                lambda model, c=base_cls: FusionGrad(c(model), model=model),
                dict(fg, n=n, m=m),
                gradient=True,
            )
        )
        methods.append(
            Method(
                f"FusionGrad({base}), n={n}, m={m}, weight noise std {s.fg_std_small}",
                f"fgs_{key}",
                f"FusionGrad({base[:3]}.), std {s.fg_std_small}",
                lambda model, c=base_cls: FusionGrad(c(model), model=model),
                dict(fg, n=n, m=m, std=s.fg_std_small),
                gradient=True,
            )
        )
    return methods


# Pairs compared directly (paired differences over images): (better-hoped, reference).
def comparison_pairs(s: Settings) -> List[Tuple[str, str, str]]:
    pairs = []
    for k in s.ks:
        pairs.append(
            (f"tiled_{k}", f"occ_small_{k}", f"Tiled k={k} - Occlusion(w/{k}) [same resolution]")
        )
        pairs.append((f"tiled_{k}", f"occ_ovl_{k}", f"Tiled k={k} - Occlusion(w, stride w/{k})"))
        pairs.append((f"tiled_{k}", "occ_w", f"Tiled k={k} - Occlusion(w)"))
    pairs.append(
        ("nt_tiled", f"tiled_{s.ks[-1]}", f"NoiseTunnel(Tiled k={s.ks[0]}) - Tiled k={s.ks[-1]}")
    )
    for key, name in (("sal", "Saliency"), ("int", "IntegratedGradients")):
        pairs.append((f"fg_{key}", key, f"FusionGrad({name}) - {name}"))
        pairs.append((f"fg_{key}", f"sg_{key}", f"FusionGrad({name}) - SmoothGrad({name})"))
        pairs.append(
            (
                f"fgs_{key}",
                f"sg_{key}",
                f"FusionGrad({name}, std {s.fg_std_small}) - SmoothGrad({name})",
            )
        )
    return pairs


# ------------------------------------------------------------------------------------------------
# Running methods
# ------------------------------------------------------------------------------------------------


class Counted(nn.Module):
    """Counts the rows (examples) that pass through the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.model(x)


@torch.no_grad()
def weight_noise_agreement(
    model: nn.Module, x: torch.Tensor, pred: torch.Tensor, std: float, samples: int, seed: int
) -> float:
    """Share of (image, noise sample) pairs where the model with multiplicative weight noise
    ``N(1, std^2)`` on every parameter (as FusionGrad draws it) still predicts ``pred``."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    agree = 0
    for _ in range(samples):
        noisy = {
            k: v * (1 + std * torch.randn(v.shape, generator=gen, dtype=v.dtype))
            for k, v in params.items()
        }
        out = torch.func.functional_call(model, noisy, (x,))
        agree += int((out.argmax(dim=1) == pred).sum())
    return agree / (samples * len(x))


def explainer(method: Method, seed: int) -> Callable[..., np.ndarray]:
    return quantus_explain_func(method.factory, seed=seed, **method.kwargs)


def attribute(
    method: Method, model: nn.Module, x: np.ndarray, y: np.ndarray, chunk: int, seed: int
) -> Tuple[np.ndarray, float, float, float]:
    """Maps ``(N, 1, H, W)``, model evaluations, wall seconds and CPU seconds, per image.

    CPU time (of this process, all threads) is less sensitive than wall time to other programs
    sharing the machine.
    """
    counted = Counted(model).eval()
    explain = explainer(method, seed)
    parts = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(x), chunk):
        parts.append(explain(model=counted, inputs=x[i : i + chunk], targets=y[i : i + chunk]))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(x)
    return np.concatenate(parts), counted.rows / n, wall / n, cpu / n


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# Part 1 + 3: synthetic localisation and robustness
# ------------------------------------------------------------------------------------------------


def run_synthetic(s: Settings) -> Dict[str, Any]:
    import quantus

    log("== Synthetic localisation task")
    t0 = time.perf_counter()
    x_train, y_train, _, _ = data.make_synthetic(s.n_train, seed=s.seed, p_empty=s.p_empty)
    x_test, y_test, m_test, x_removed = data.make_synthetic(s.n_test, seed=s.seed + 1)
    model = data.train_small_cnn(x_train, y_train, s.epochs, seed=s.seed, log=log)
    acc = data.accuracy(model, x_test, y_test)
    with torch.no_grad():
        removed = model(x_removed).argmax(dim=1)
    # Does the label come from the object? Without it, the network should answer "no object".
    removed_none = float((removed == data.NO_OBJECT).float().mean())
    agreement = {
        std: weight_noise_agreement(
            model, x_test[: s.n_loc], y_test[: s.n_loc], std, s.noise_samples, s.seed
        )
        for std in (0.2, s.fg_std_small)
    }
    train_time = time.perf_counter() - t0
    log(
        f"  test accuracy {acc:.3f} on {s.n_test} images; object removed -> 'no object' "
        f"{removed_none:.3f}; label kept under weight noise {agreement}; "
        f"data + training {train_time:.0f} s"
    )
    for p in model.parameters():
        p.requires_grad_(False)

    x = x_test[: s.n_loc].numpy()
    y = y_test[: s.n_loc].numpy()
    masks = m_test[: s.n_loc].numpy()
    methods = make_methods(
        s,
        s.syn_window,
        nt_stdev=0.1,
        images=s.syn_chunk,
        rows=s.syn_chunk,
        grad_rows=None,
        ig_steps=s.syn_ig_steps,
    )
    results: Dict[str, Dict[str, Any]] = {}
    examples: Dict[str, np.ndarray] = {}
    for i, method in enumerate(methods):
        tm = time.perf_counter()
        a, evals, sec, cpu = attribute(method, model, x, y, s.syn_chunk, s.seed)
        examples[method.key] = a[0, 0]
        pos = break_ties(np.maximum(a, 0.0), seed=s.seed)
        common = dict(model=model, x_batch=x, y_batch=y, a_batch=pos, s_batch=masks)
        kw = dict(disable_warnings=True, display_progressbar=False)
        r: Dict[str, Any] = {"evals": evals, "sec": sec, "cpu": cpu}
        r["pointing"] = np.asarray(quantus.PointingGame(**kw)(**common), dtype=float)
        r["rma"] = np.asarray(quantus.RelevanceMassAccuracy(**kw)(**common), dtype=float)
        r["rra"] = np.asarray(quantus.RelevanceRankAccuracy(**kw)(**common), dtype=float)

        xr, yr, ar = x[: s.n_rob], y[: s.n_rob], a[: s.n_rob]
        explain = explainer(method, s.seed)
        rob = dict(
            model=model,
            x_batch=xr,
            y_batch=yr,
            a_batch=ar,
            explain_func=explain,
            batch_size=s.syn_chunk,
        )
        np.random.seed(s.seed)
        r["maxsens"] = np.asarray(
            quantus.MaxSensitivity(
                nr_samples=s.max_sens_samples, lower_bound=s.max_sens_noise, **kw
            )(**rob),
            dtype=float,
        )
        r["mprt"] = np.asarray(
            quantus.MPRT(skip_layers=True, return_last_correlation=True, seed=s.seed, **kw)(**rob),
            dtype=float,
        )
        np.random.seed(s.seed)
        r["randlogit"] = np.asarray(
            quantus.RandomLogit(num_classes=data.N_CLASSES, seed=s.seed, **kw)(**rob),
            dtype=float,
        )
        results[method.key] = r
        log(
            f"  [{i + 1}/{len(methods)}] {method.label}: {evals:.0f} evals/img, "
            f"{fmt_time(sec)}/img, pointing {r['pointing'].mean():.2f}, "
            f"mass {r['rma'].mean():.3f}, rank {r['rra'].mean():.3f}, "
            f"maxsens {np.nanmean(r['maxsens']):.3f}, mprt {np.nanmean(r['mprt']):.3f}, "
            f"randlogit {np.nanmean(r['randlogit']):.3f} ({time.perf_counter() - tm:.0f} s)"
        )
    return dict(
        methods=methods,
        results=results,
        accuracy=acc,
        removed_none=removed_none,
        agreement=agreement,
        train_time=train_time,
        example=(x[0], masks[0, 0], examples),
        window=s.syn_window,
    )


# ------------------------------------------------------------------------------------------------
# Part 2: faithfulness on EfficientNet-Lite0 and real photos
# ------------------------------------------------------------------------------------------------


def run_real(s: Settings) -> Dict[str, Any]:
    import quantus

    log("== EfficientNet-Lite0 on scikit-image photos")
    model = imagenet.load_efficientnet_lite0()
    for p in model.parameters():
        p.requires_grad_(False)
    categories = imagenet.imagenet_categories()
    x_t, names, shown = data.load_photos(s.photos)
    with torch.no_grad():
        probs = torch.softmax(model(x_t), dim=1)
    conf, pred = probs.max(dim=1)
    predictions = [(name, categories[int(c)], float(p)) for name, c, p in zip(names, pred, conf)]
    for name, cls, p in predictions:
        log(f"  {name}: {cls} ({p:.2f})")
    agreement = {
        std: weight_noise_agreement(model, x_t, pred, std, s.noise_samples, s.seed)
        for std in (0.2, s.fg_std_small)
    }
    log(f"  class kept under weight noise (std: share): {agreement}")
    x, y = x_t.numpy(), pred.numpy()
    methods = make_methods(
        s,
        s.real_window,
        nt_stdev=0.2,
        images=1,
        rows=s.real_rows,
        grad_rows=s.real_rows,
        ig_steps=s.real_ig_steps,
    )
    results: Dict[str, Dict[str, Any]] = {}
    examples: Dict[str, np.ndarray] = {}
    for i, method in enumerate(methods):
        tm = time.perf_counter()
        a, evals, sec, cpu = attribute(method, model, x, y, 1, s.seed)
        examples[method.key] = a[0, 0]
        r: Dict[str, Any] = {"evals": evals, "sec": sec, "cpu": cpu}
        a_t = torch.from_numpy(a)
        r.update(data.deletion_insertion(model, x_t, a_t, pred, s.curve_steps, s.real_rows, s.seed))
        kw = dict(disable_warnings=True, display_progressbar=False)
        a_tb = break_ties(a, seed=s.seed)
        np.random.seed(s.seed)
        rp = quantus.RegionPerturbation(
            patch_size=s.rp_patch, regions_evaluation=s.rp_regions, order="morf", **kw
        )(model=model, x_batch=x, y_batch=y, a_batch=a_tb, batch_size=s.real_rows)
        r["region"] = np.asarray([np.mean(c) for c in rp], dtype=float)
        np.random.seed(s.seed)
        r["faithcorr"] = np.asarray(
            quantus.FaithfulnessCorrelation(
                nr_runs=s.fc_runs, subset_size=s.fc_subset, return_aggregate=False, **kw
            )(model=model, x_batch=x, y_batch=y, a_batch=a_tb, batch_size=s.real_rows),
            dtype=float,
        )
        results[method.key] = r
        log(
            f"  [{i + 1}/{len(methods)}] {method.label}: {evals:.0f} evals/img, "
            f"{fmt_time(sec)}/img, deletion {r['deletion'].mean():.3f}, "
            f"insertion {r['insertion'].mean():.3f}, region {r['region'].mean():.3f}, "
            f"faithcorr {np.nanmean(r['faithcorr']):.3f} ({time.perf_counter() - tm:.0f} s)"
        )
    return dict(
        methods=methods,
        results=results,
        predictions=predictions,
        agreement=agreement,
        example=(shown[0], None, examples),
        window=s.real_window,
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (about 3 min)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="markdown output path")
    args = parser.parse_args(argv)
    s = dataclasses.replace(QUICK if args.quick else Settings(), seed=args.seed)
    suffix = "_quick" if args.quick else ""
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"quality{suffix}.md")
    fig = os.path.join(REPO, "media", f"quality{suffix}.png")
    fig_ex = os.path.join(REPO, "media", f"quality_examples{suffix}.png")
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    syn = run_synthetic(s)
    real = run_real(s)
    total = time.perf_counter() - t0
    plot(syn, real, fig, fig_ex)
    log(f"wrote {fig} and {fig_ex}")
    write_report(s, comparison_pairs(s), args.quick, syn, real, out, fig, fig_ex, total)
    log(f"wrote {out}")
    log(f"total {total / 60:.1f} min")


if __name__ == "__main__":
    main()
