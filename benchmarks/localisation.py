"""Does tiling localise better than Occlusion on a real network, and when? (#22)

Run ``python -m benchmarks.localisation`` (``--quick`` for a smoke run of about 2 minutes).

EfficientNet-Lite0 (ImageNet weights, offline) explains composites: a real object cut from a real
photo (cat, espresso, tripod, moped, palace, daisy, space shuttle) pasted at a random position and
at one of four sizes (1/8 to 1/2 of the image side) onto a real texture or scene (see
:mod:`benchmarks._localisation_data`). A composite is kept only if the model predicts one of the
object's classes (a set only where the classes name the same object); that class is the target.
Each method explains it with two scores (raw logit and log-probability); the maps (channels
summed) are scored by the pointing game, relevance mass and relevance rank inside the pasted box,
and, on every ``heavy_every``-th image, by deletion and insertion AUC. Paired differences against
the best Occlusion at no more model evaluations come with percentile-bootstrap 95 % intervals.

Per-image results are appended to ``<out>/part<worker>.jsonl`` as they come, so a run that is
stopped still leaves a report (``--report-only`` rebuilds it) and a rerun resumes where it
stopped (only under the same objects and settings: ``kept.json`` holds their fingerprint).
Occlusion at window ``v`` and stride ``v`` is computed as ``TiledOcclusion(window=v, k=1)``, which
equals Captum's ``Occlusion`` (``tests/test_localisation_bench.py`` checks it on a small model, and
the package's own tests on many); Captum's overlapping Occlusion is Captum's own class.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from captum.attr import Occlusion, Saliency
from torch import Tensor, nn

from benchmarks import _localisation_data as data
from extra_attrib import FusionGrad, TiledOcclusion
from extra_attrib.evaluation import area_under_curve, perturbation_curve

SCORES = ("raw", "logprob")


@dataclasses.dataclass(frozen=True)
class Settings:
    seed: int = 0
    n_images: int = 340  # kept composites to explain (at most 40 % of them at one scale)
    # Composites generated (and classified) at most per scale, 28/56/84/112 px: more where the
    # model recognises few objects (28 and 56 px), fewer where the scale's share fills fast.
    candidates: Tuple[int, ...] = (200, 1600, 800, 500)
    window: int = 56
    ks: Tuple[int, ...] = (2, 4)
    refine: float = 0.25  # drill-down fraction (with the largest k)
    nt_samples: int = 4
    nt_stdev: float = 0.2  # 10 % of the input range [-1, 1]
    nt_k: int = 2
    fg: Tuple[int, int] = (4, 4)  # FusionGrad(Saliency) n, m
    fg_std: float = 0.02  # weight noise; 0.2 destroys EfficientNet-Lite0's predictions
    # The expensive methods and deletion/insertion on every n-th image: 8 gives 43 of 340 images
    # (the previous run had 45), and keeps the full run near 50 min on two cores.
    heavy_every: int = 8
    # TiledOcclusion's engine per method, fixed by measurement (benchmarks/results/localisation.md)
    # rather than "auto", whose self-check and timed race cost every call: dense for these
    # methods, incremental for the other TiledOcclusion methods.
    dense_methods: Tuple[str, ...] = ("occ_w", "nt_tiled")
    curve_steps: int = 10
    rows: int = 4  # rows per forward pass of the deletion/insertion curves
    captum_rows: int = 8  # perturbations per forward pass of Captum's Occlusion
    n_examples: int = 4  # composites whose maps are kept for the example figure


QUICK = dataclasses.replace(
    Settings(),
    n_images=4,
    candidates=(8, 8, 8, 8),
    window=112,
    heavy_every=2,
    nt_samples=2,
    fg=(2, 2),
)


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


class LogProb(nn.Module):
    """The model's log-probabilities (for the gradient methods)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return torch.log_softmax(self.model(x), dim=1)


def both_scores(out: Tensor) -> Tensor:
    """Raw outputs and log-probabilities side by side: ``(N, 2C)``, one sweep for both."""
    return torch.cat([out, torch.log_softmax(out, dim=1)], dim=1)


@dataclasses.dataclass(frozen=True)
class Method:
    key: str
    label: str
    heavy: bool  # only on every heavy_every-th image
    kind: str  # "occlusion" (an Occlusion reference), "tiled", "captum", "gradient"
    run: Callable[[nn.Module, Tensor, int, int], Tuple[Dict[str, Tensor], int]]


def _tiled_runner(
    window: int, k: int, refine: Optional[float] = None, engine: str = "auto"
) -> Callable:
    # One object per model (per worker): it keeps its tuned chunk size and engine choice.
    cache: Dict[int, TiledOcclusion] = {}

    def run(model: nn.Module, x: Tensor, target: int, seed: int) -> Tuple[Dict[str, Tensor], int]:
        tiled = cache.setdefault(id(model), TiledOcclusion(model))
        classes = model_classes(model, x)
        maps = tiled.attribute_multi(
            x,
            [target, classes + target],
            window=(3, window, window),
            k=(1, k, k),
            score=both_scores,
            refine=refine,
            engine=engine,
        )
        return {"raw": maps[0, 0], "logprob": maps[1, 0]}, tiled.last_perturbations + 1

    return run


def _captum_runner(window: int, stride: int, rows: int) -> Callable:
    def run(model: nn.Module, x: Tensor, target: int, seed: int) -> Tuple[Dict[str, Tensor], int]:
        def two(z: Tensor) -> Tensor:  # (B, 2): raw and log-prob of the target, one sweep
            out = model(z)
            return torch.stack([out[:, target], torch.log_softmax(out, 1)[:, target]], 1)

        maps = Occlusion(two).attribute(
            x,
            sliding_window_shapes=(3, window, window),
            strides=(3, stride, stride),
            baselines=0.0,
            perturbations_per_eval=rows,
        )
        side = x.shape[-1]
        per_dim = (side - window) // stride + 1
        return {"raw": maps[0], "logprob": maps[1]}, per_dim**2 + 1

    return run


def _saliency(model: nn.Module, x: Tensor, target: int, seed: int) -> Tuple[Dict[str, Tensor], int]:
    maps = {
        "raw": Saliency(model).attribute(x, target=target)[0],
        "logprob": Saliency(LogProb(model)).attribute(x, target=target)[0],
    }
    return maps, 1


def smoothgrad_inputs(x: Tensor, samples: int, stdev: float) -> Tensor:
    """``samples`` noisy copies of each row of ``x``, drawn as Captum's ``NoiseTunnel`` draws them.

    The same calls on the global generator as ``NoiseTunnel._add_noise_to_input`` (one partition
    of ``samples``), so after the same ``torch.manual_seed`` the copies are the same.
    """
    size = (x.shape[0] * samples,) + tuple(x.shape[1:])
    noise = torch.normal(0, torch.tensor(stdev, device=x.device).repeat(size))
    return x.repeat_interleave(samples, dim=0) + noise


def _noise_tunnel(
    window: int, k: int, samples: int, stdev: float, engine: str = "dense"
) -> Callable:
    """NoiseTunnel (SmoothGrad) over TiledOcclusion, both scores from one sweep.

    Captum's ``NoiseTunnel(TiledOcclusion(model)).attribute(..., nt_type="smoothgrad")`` averages
    the maps of noisy copies of the input; it takes one score per call. Here the same noisy copies
    are explained once for both scores (``attribute_multi``) and averaged, which halves the cost
    and equals ``NoiseTunnel`` for each score (``tests/test_localisation_bench.py``).
    """
    cache: Dict[int, TiledOcclusion] = {}  # as in _tiled_runner

    def run(model: nn.Module, x: Tensor, target: int, seed: int) -> Tuple[Dict[str, Tensor], int]:
        tiled = cache.setdefault(id(model), TiledOcclusion(model))
        classes = model_classes(model, x)
        torch.manual_seed(seed)
        noisy = smoothgrad_inputs(x, samples, stdev)
        maps = tiled.attribute_multi(
            noisy,
            [target, classes + target],
            window=(3, window, window),
            k=(1, k, k),
            score=both_scores,
            engine=engine,
        )
        # One call explains the noisy copies as one batch: rows = samples x passes.
        evals = samples * (tiled.last_perturbations + 1)
        return {"raw": maps[0].mean(0), "logprob": maps[1].mean(0)}, evals

    return run


def _fusion_grad(n: int, m: int, std: float) -> Callable:
    def run(model: nn.Module, x: Tensor, target: int, seed: int) -> Tuple[Dict[str, Tensor], int]:
        maps = {}
        for name, forward in (("raw", model), ("logprob", LogProb(model))):
            torch.manual_seed(seed)
            fg = FusionGrad(Saliency(forward), model=model)
            maps[name] = fg.attribute(x, target=target, n=n, m=m, std=std)[0]
        return maps, n * m

    return run


_CLASSES: Dict[int, int] = {}


def model_classes(model: nn.Module, x: Tensor) -> int:
    """Number of classes (ImageNet: 1000), from one forward pass per model."""
    if id(model) not in _CLASSES:
        with torch.no_grad():
            _CLASSES[id(model)] = int(model(x[:1]).shape[1])
    return _CLASSES[id(model)]


def engine_of(key: str, s: Settings) -> str:
    """TiledOcclusion's engine for method ``key`` (see ``Settings.dense_methods``)."""
    return "dense" if key in s.dense_methods else "incremental"


def make_methods(s: Settings) -> List[Method]:
    w = s.window

    def tiled(key: str, window: int, k: int, refine: Optional[float] = None) -> Callable:
        return _tiled_runner(window, k, refine, engine=engine_of(key, s))

    out = [
        Method("occ_w", f"Occlusion({w}, stride {w})", False, "occlusion", tiled("occ_w", w, 1)),
    ]
    for k in s.ks:
        v = w // k
        key = f"occ_w{k}"
        out.append(Method(key, f"Occlusion({v}, stride {v})", False, "occlusion", tiled(key, v, 1)))
    for k in s.ks:
        key = f"tiled{k}"
        out.append(Method(key, f"TiledOcclusion({w}, k={k})", False, "tiled", tiled(key, w, k)))
    out.append(Method("saliency", "Saliency", False, "gradient", _saliency))
    for k in s.ks:
        out.append(
            Method(
                f"captum{k}",
                f"Captum Occlusion({w}, stride {w // k})",
                True,
                "captum",
                _captum_runner(w, w // k, s.captum_rows),
            )
        )
    k_max = max(s.ks)
    out.append(
        Method(
            "drill",
            f"TiledOcclusion({w}, k={k_max}, refine={s.refine})",
            True,
            "tiled",
            tiled("drill", w, k_max, s.refine),
        )
    )
    out.append(
        Method(
            "nt_tiled",
            f"NoiseTunnel(TiledOcclusion({w}, k={s.nt_k})), {s.nt_samples} samples",
            True,
            "tiled",
            _noise_tunnel(w, s.nt_k, s.nt_samples, s.nt_stdev, engine=engine_of("nt_tiled", s)),
        )
    )
    n, m = s.fg
    out.append(
        Method(
            "fusiongrad",
            f"FusionGrad(Saliency), n={n}, m={m}, std={s.fg_std}",
            True,
            "gradient",
            _fusion_grad(n, m, s.fg_std),
        )
    )
    return out


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def scale_quota(n_images: int) -> int:
    """Most kept composites at one scale: 40 % of the total, so that no scale dominates."""
    return -(-2 * n_images // 5)


@torch.no_grad()
def select_composites(
    model: nn.Module,
    sources: data.Sources,
    s: Settings,
    batch: int = 8,
    objects: Sequence[data.ObjectSpec] = data.OBJECTS,
) -> Dict[str, Any]:
    """Generate composites per scale until ``n_images`` are kept or every scale is spent.

    Each scale's stream (indices ``j, j + 4, ...``) is generated in order, ``batch`` at a time
    and in turn with the other scales, until the scale has :func:`scale_quota` kept, or its
    ``candidates`` are generated, or ``n_images`` are kept in all. The model recognises few small
    objects, so the small scales get more candidates and the shares left by one scale go to the
    others. The kept ones come in round-robin order over the scales (see
    :func:`~benchmarks._localisation_data.balanced_order`).
    """
    n_scales = len(data.SCALES)
    if len(s.candidates) != n_scales:
        raise ValueError(f"candidates={s.candidates} must give one count per scale {data.SCALES}")
    quota = scale_quota(s.n_images)
    kept: List[Dict[str, Any]] = []
    candidates: List[Dict[str, Any]] = []
    made = [0] * n_scales
    got = [0] * n_scales
    while len(kept) < s.n_images:
        todo = [j for j in range(n_scales) if got[j] < quota and made[j] < s.candidates[j]]
        if not todo:
            break
        indices = []
        for j in todo:
            take = min(batch, s.candidates[j] - made[j])
            indices += [j + n_scales * (made[j] + i) for i in range(take)]
            made[j] += take
        layouts = [data.make_layout(i, sources, s.seed) for i in indices]
        x = data.to_model_input(torch.stack([data.render(lay, sources)[0] for lay in layouts]))
        predicted = model(x).argmax(1).tolist()
        for lay, p, t in zip(layouts, predicted, data.select_kept(predicted, layouts, objects)):
            row = {"index": lay.index, "obj": lay.obj, "scale": lay.scale, "predicted": p}
            candidates.append(row)
            j = data.SCALES.index(lay.scale)
            if t is not None and got[j] < quota and len(kept) < s.n_images:
                kept.append({**row, "target": t})
                got[j] += 1
    return {"kept": data.balanced_order(kept), "candidates": candidates}


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------


def explain_one(
    model: nn.Module,
    methods: Sequence[Method],
    sources: data.Sources,
    item: Dict[str, Any],
    position: int,
    s: Settings,
) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """All methods on one composite: its metrics (JSON-able) and its maps."""
    lay = data.make_layout(item["index"], sources, s.seed)
    unit, box = data.render(lay, sources)
    x = data.to_model_input(unit)[None]
    target = int(item["target"])
    heavy = position % s.heavy_every == 0
    row: Dict[str, Any] = {
        "index": lay.index,
        "position": position,
        "obj": lay.obj,
        "scale": lay.scale,
        "background": lay.background,
        "target": target,
        "area": float(box.float().mean()),
        "heavy": heavy,
        "methods": {},
    }
    maps_kept: Dict[str, np.ndarray] = {}
    raw_maps = {}
    for method in methods:
        if method.heavy and not heavy:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        maps, evals = method.run(model, x, target, s.seed + lay.index)
        seconds = time.perf_counter() - t0
        # CPU seconds of this single-threaded process: what the wall time would be on a machine
        # not shared with other jobs (the wall time grows with the machine's load).
        entry: Dict[str, Any] = {
            "evals": evals,
            "seconds": seconds,
            "cpu_seconds": time.process_time() - c0,
        }
        for score in SCORES:
            a = maps[score].double().sum(0)
            entry[score] = {name: fn(a, box) for name, fn in data.METRICS.items()}
            maps_kept[f"{method.key}/{score}"] = a.float().numpy()
        raw_maps[method.key] = maps["raw"].sum(0)
        row["methods"][method.key] = entry
    if heavy:
        c0 = time.process_time()
        keys = list(raw_maps)
        stacked = torch.stack([raw_maps[k] for k in keys])[:, None].float()
        areas = curves(model, x, stacked, target, s)
        for j, key in enumerate(keys):
            row["methods"][key]["deletion"] = float(areas["deletion"][j])
            row["methods"][key]["insertion"] = float(areas["insertion"][j])
        row["curves_cpu_seconds"] = time.process_time() - c0
    return row, maps_kept


def curves(model: nn.Module, x: Tensor, maps: Tensor, target: int, s: Settings) -> Dict[str, Any]:
    """Deletion (to the grey occlusion baseline) and insertion (from a blur) areas, raw logit.

    The raw logit rather than the probability: on composites the probability of the object's
    class is often small and falls to about 0 at the first deletion step for every map.
    """
    areas = {}
    for mode, baseline in (("deletion", 0.0), ("insertion", "blur")):
        curve = perturbation_curve(
            model,
            x.expand(len(maps), -1, -1, -1),
            maps,
            target=torch.full((len(maps),), target),
            mode=mode,
            n_steps=s.curve_steps,
            baseline=baseline,
            score="raw",
            batch_size=s.rows,
            generator=torch.Generator().manual_seed(s.seed),
        )
        areas[mode] = area_under_curve(curve).numpy()
    return areas


def _done(out_dir: str) -> set:
    done = set()
    for name in os.listdir(out_dir):
        if name.startswith("part") and name.endswith(".jsonl"):
            with open(os.path.join(out_dir, name)) as f:
                for line in f:
                    if line.strip():
                        done.add(json.loads(line)["index"])
    return done


def assign_workers(n: int, heavy_every: int, workers: int, heavy_cost: float = 4.0) -> List[int]:
    """Which worker explains each position: the least loaded so far (a heavy image costs more).

    Every worker advances through the positions in order, so a run stopped early has explained
    about a prefix of the balanced order.
    """
    load = [0.0] * workers
    out = []
    for position in range(n):
        rank = min(range(workers), key=lambda r: (load[r], r))
        load[rank] += heavy_cost if position % heavy_every == 0 else 1.0
        out.append(rank)
    return out


def worker(rank: int, workers: int, s: Settings, out_dir: str) -> None:
    """Explain this worker's share of the kept composites, appending one JSON line per image."""
    torch.set_num_threads(1)
    from extra_attrib import imagenet

    model = imagenet.load_efficientnet_lite0()
    sources = data.load_sources()
    with open(os.path.join(out_dir, "kept.json")) as f:
        kept = json.load(f)["kept"]
    done = _done(out_dir)
    methods = make_methods(s)
    path = os.path.join(out_dir, f"part{rank}.jsonl")
    share = assign_workers(len(kept), s.heavy_every, workers)
    for position, item in enumerate(kept):
        if share[position] != rank or item["index"] in done:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        row, maps = explain_one(model, methods, sources, item, position, s)
        row["seconds"] = time.perf_counter() - t0  # the whole image, wall and CPU
        row["cpu_seconds"] = time.process_time() - c0
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if position < s.n_examples:
            np.savez_compressed(os.path.join(out_dir, f"maps{item['index']}.npz"), **maps)
        log(
            f"worker {rank}: image {position + 1}/{len(kept)} ({item['obj']}, {item['scale']} px"
            f"{', heavy' if row['heavy'] else ''}) in {row['seconds']:.1f} s "
            f"({row['cpu_seconds']:.1f} CPU s)"
        )


def run_fingerprint(s: Settings) -> str:
    """A digest of what decides the composites and their results: objects, backgrounds, scales
    and every setting. A run folder resumes only under the same one."""
    what = {
        "objects": [dataclasses.asdict(o) for o in data.OBJECTS],
        "backgrounds": list(data.BACKGROUNDS),
        "scales": list(data.SCALES),
        "settings": dataclasses.asdict(s),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def run_paths(args: argparse.Namespace, stem: str) -> Tuple[str, str, str]:
    """The run folder, report and figure folder of a benchmark ``stem`` from its options.

    A ``--quick`` smoke run leaves nothing in the repository: its folder is a new temporary
    one, and its report and figures go there unless the options say otherwise.
    """
    if args.quick:
        out_dir = args.out or tempfile.mkdtemp(prefix=f"{stem}_quick_")
        report = args.report or os.path.join(out_dir, f"{stem}_quick.md")
    else:
        out_dir = args.out or os.path.join("benchmarks", "results", f"{stem}_runs")
        report = args.report or os.path.join("benchmarks", "results", f"{stem}.md")
    os.makedirs(out_dir, exist_ok=True)
    return out_dir, report, args.media or (out_dir if args.quick else "media")


def refuse_other_run(parser: argparse.ArgumentParser, kept_path: str, fingerprint: str) -> bool:
    """Whether ``kept_path`` exists (a run to resume); a parser error where it holds a run of
    other composites or settings, which resuming would mix with this one."""
    if not os.path.exists(kept_path):
        return False
    with open(kept_path) as f:
        found = json.load(f).get("fingerprint")
    if found != fingerprint:
        parser.error(
            f"--out {os.path.dirname(kept_path)!r} holds a run of other composites or settings "
            f"(fingerprint {found!r}, this run {fingerprint!r}); resuming would mix the two: "
            "choose another --out, or move that folder away"
        )
    return True


def run_workers(target: Any, workers: int, *args: Any) -> None:
    """``target(rank, workers, *args)`` in this process, or in ``workers`` spawned ones."""
    if workers == 1:
        target(0, 1, *args)
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, workers, *args)) for r in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, about 2 minutes")
    parser.add_argument("--images", type=int, help="kept composites to explain")
    parser.add_argument("--heavy-every", type=int, help="expensive methods on every n-th image")
    parser.add_argument("--workers", type=int, default=1, help="processes (1 thread each)")
    parser.add_argument(
        "--out",
        help="folder for the per-image results; a rerun resumes there (default: "
        "benchmarks/results/localisation_runs; --quick: a temporary folder)",
    )
    parser.add_argument(
        "--report",
        help="results markdown (default: benchmarks/results/localisation.md; --quick: in --out)",
    )
    parser.add_argument("--media", help="folder for the figures (default: media/; --quick: --out)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report only")
    parser.add_argument("--note", default="", help="a line for the report (e.g. machine load)")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else Settings()
    if args.images is not None:
        grow = max(1.0, args.images / s.n_images)  # more images need more candidates
        s = dataclasses.replace(
            s, n_images=args.images, candidates=tuple(int(c * grow) for c in s.candidates)
        )
    if args.heavy_every is not None:
        s = dataclasses.replace(s, heavy_every=args.heavy_every)
    if args.workers < 1:
        raise ValueError(f"--workers={args.workers} must be at least 1")
    out_dir, report, media = run_paths(args, "localisation")
    from benchmarks import _localisation_report as rep

    if not args.report_only:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        settings_path = os.path.join(out_dir, "settings.json")
        kept_path = os.path.join(out_dir, "kept.json")
        fingerprint = run_fingerprint(s)
        if not refuse_other_run(parser, kept_path, fingerprint):
            from extra_attrib import imagenet

            model = imagenet.load_efficientnet_lite0()
            sources = data.load_sources()
            torch.set_num_threads(args.workers)  # the workers' cores, before they start
            selection = select_composites(model, sources, s, batch=16)
            selection["fingerprint"] = fingerprint
            torch.set_num_threads(1)
            with open(kept_path, "w") as f:
                json.dump(selection, f)
            log(
                f"kept {len(selection['kept'])} of {len(selection['candidates'])} composites "
                f"({time.perf_counter() - t0:.0f} s)"
            )
        with open(settings_path, "w") as f:
            json.dump(
                {
                    **dataclasses.asdict(s),
                    "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "workers": args.workers,
                    "machine": rep.machine_line(),
                },
                f,
            )
        run_workers(worker, args.workers, s, out_dir)
        log(f"explained in {time.perf_counter() - t0:.0f} s")
    rep.write_report(
        out_dir,
        report,
        media,
        quick=args.quick,
        note=args.note,
        command=" ".join(["python -m benchmarks.localisation", *sys.argv[1:]]),
    )
    log(f"wrote {report}")


if __name__ == "__main__":
    main()
