"""The ``extra-attrib demo`` command: classify photos offline and compare attribution maps.

Pipeline: load EfficientNet-Lite0 (:mod:`extra_attrib.imagenet`), classify each photo and print
its top-3 classes, explain the chosen class with Occlusion (at TiledOcclusion's window and, for
``k > 1``, at its stride), TiledOcclusion, NoiseTunnel(TiledOcclusion) and FusionGrad(Saliency),
print the time and the number of model evaluations of each method, and save one figure (rows:
photos, columns: methods).

The model comes from ``imagenet.load_efficientnet_lite0`` looked up at call time (or the
``load_model`` argument of :func:`run`), so tests can substitute a tiny model.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, TextIO, Tuple, cast

import numpy as np
import torch
from torch import Tensor, nn

from extra_attrib import imagenet
from extra_attrib._options import MAX_DPI, MIN_DPI, check_output_file
from extra_attrib._targets import score_function

DEFAULT_PHOTOS = ("chelsea", "coffee")
DEFAULT_OUT = "extra_attrib_demo.png"
SCORES = ("log_softmax", "softmax", "raw")
ROWS_PER_PASS = 2
_SCORE_NAMES = {"log_softmax": "log-probability", "softmax": "probability", "raw": "logit"}


class DemoUsageError(ValueError):
    """A bad image, target or setting given to the demo (reported without a traceback)."""


@dataclass(frozen=True)
class DemoSettings:
    """Knobs of the demo; the defaults take 1-2.5 minutes for two photos on 2 CPU cores."""

    window: int = 64
    k: int = 4
    nt_samples: int = 3
    nt_stdev: float = 0.2  # in model-input units (inputs span about [-1, 1])
    fg_n: int = 6
    fg_m: int = 6
    # Multiplicative weight noise. The paper's 0.2 wrecks EfficientNet-Lite0 (no photo keeps its
    # class); at 0.02 most noisy copies keep their top-1 class.
    fg_std: float = 0.02
    score: str = "log_softmax"
    seed: int = 0
    progress: bool = True
    dpi: float = 100.0

    def check(self, size: int) -> None:
        """Raise ValueError for settings the methods would reject, with the CLI's option names."""
        for name, value in (
            ("--window", self.window),
            ("--k", self.k),
            ("--nt-samples", self.nt_samples),
            ("--fg-n", self.fg_n),
            ("--fg-m", self.fg_m),
        ):
            if value < 1:
                raise ValueError(f"{name} {value} must be a positive integer")
        if self.window > size:
            raise ValueError(f"--window {self.window} must be at most the image size {size}")
        if self.window % self.k:
            raise ValueError(
                f"--window {self.window} must be divisible by --k {self.k} (the stride is "
                f"window / k)"
            )
        if not 0.0 <= self.fg_std < float("inf"):
            raise ValueError(f"--fg-std {self.fg_std} must be a non-negative number")
        if self.score not in SCORES:
            raise ValueError(f"--score {self.score!r} must be one of {', '.join(SCORES)}")
        if not MIN_DPI <= self.dpi <= MAX_DPI:
            raise ValueError(f"--dpi {self.dpi:g} must be in [{MIN_DPI:g}, {MAX_DPI:g}]")


@dataclass
class MethodResult:
    """One attribution method's maps for all photos, with its cost."""

    name: str
    detail: str
    attributions: Tensor
    seconds: float
    evaluations: int


@dataclass
class Photo:
    name: str
    model_input: Tensor  # (1, 3, S, S)
    display: np.ndarray  # (S, S, 3) in [0, 1]


@contextlib.contextmanager
def count_evaluations(model: nn.Module) -> Iterator[List[int]]:
    """Count the examples (batch rows) the model evaluates inside the block."""
    counter = [0]

    def hook(_module: nn.Module, args: Tuple[object, ...]) -> None:
        if args and isinstance(args[0], Tensor) and args[0].dim() > 0:
            counter[0] += int(args[0].shape[0])

    handle = model.register_forward_pre_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


class _Scored(nn.Module):
    """``score(model(x))`` as a module, so that FusionGrad finds the model's weights in it."""

    def __init__(self, model: nn.Module, score: str) -> None:
        super().__init__()
        self.model = model
        self.score = score_function(score)
        self._op = torch.log_softmax if score == "log_softmax" else torch.softmax

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if isinstance(out, torch.fx.Proxy):
            # Traced by the incremental engine: the operation alone, as the score's checks
            # (a tensor of real numbers with a class dimension) cannot look at a proxy. The
            # engine's self-check compares the traced program with this module run for real.
            return self._op(cast(Any, out), dim=1)
        return self.score(out)


def scored_model(model: nn.Module, score: str) -> nn.Module:
    """The function every method explains: the model's logits, probabilities or log-probs.

    It applies the scores of :func:`extra_attrib._targets.score_function` (those of
    ``TiledOcclusion`` and ``perturbation_curve``).
    """
    if score not in SCORES:
        raise ValueError(f"--score {score!r} must be one of {', '.join(SCORES)}")
    return model if score == "raw" else _Scored(model, score)


def explain(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    settings: DemoSettings,
    report: Callable[[str], None] = print,
) -> List[MethodResult]:
    """Run the methods on the batch ``x`` (``(N, 3, S, S)``) for the per-row ``target``.

    Columns: Occlusion with TiledOcclusion's window (same window, stride = window), Occlusion
    with TiledOcclusion's stride (same resolution, comparable cost; only if ``k > 1``),
    TiledOcclusion,
    NoiseTunnel(TiledOcclusion) and FusionGrad(Saliency). Occluded windows take the value 0,
    which is mid-grey for EfficientNet-Lite's input scaling.
    """
    from captum.attr import NoiseTunnel, Occlusion, Saliency

    from extra_attrib.fusion_grad import FusionGrad
    from extra_attrib.tiled_occlusion import TiledOcclusion

    f = scored_model(model, settings.score)
    w, k, t = settings.window, settings.k, settings.window // settings.k
    progress = settings.progress
    # Small forward batches for Captum's Occlusion: on CPU, EfficientNet-Lite0 at 224 x 224 ran
    # about twice as fast per image with 2 rows per pass as with 16 (larger activations are fresh
    # memory-mapped allocations every pass, and the page faults cost as much as the arithmetic).
    # TiledOcclusion picks its chunk sizes by measurement, as users' default calls do: one window
    # per pass made its incremental engine 1.8x slower here.
    per_pass = max(1, ROWS_PER_PASS // x.shape[0])

    def occlusion(size: int) -> Callable[[], Tensor]:
        return lambda: Occlusion(f).attribute(
            x,
            target=target,
            sliding_window_shapes=(3, size, size),
            strides=(3, size, size),
            baselines=0.0,
            perturbations_per_eval=per_pass,
            show_progress=progress,
        )

    # A forward hook would keep TiledOcclusion on its dense engine (a traced graph bypasses
    # hooks), so TiledOcclusion counts its own evaluations: its windows plus the clean pass,
    # per example and per NoiseTunnel sample (each sample has the same tiling).
    own_count: List[int] = []

    def tiled() -> Tensor:
        method = TiledOcclusion(f)
        out = method.attribute(
            x,
            target=target,
            window=w,
            k=k,
            baselines=0.0,
            show_progress=progress,
        )
        own_count.append((method.last_perturbations + 1) * x.shape[0])
        return out

    def tunnel() -> Tensor:
        method = TiledOcclusion(f)
        out = NoiseTunnel(method).attribute(
            x,
            nt_type="smoothgrad",
            nt_samples=settings.nt_samples,
            nt_samples_batch_size=1,
            stdevs=settings.nt_stdev,
            target=target,
            window=w,
            k=k,
            baselines=0.0,
            show_progress=progress,
        )
        own_count.append((method.last_perturbations + 1) * x.shape[0] * settings.nt_samples)
        return out

    def fusion() -> Tensor:
        return FusionGrad(Saliency(f), f).attribute(
            x,
            target=target,
            n=settings.fg_n,
            m=settings.fg_m,
            std=settings.fg_std,
            show_progress=progress,
        )

    plan = [("Occlusion", f"window {w}, stride {w}", occlusion(w))]
    if k > 1:
        plan.append(("Occlusion", f"window {t}, stride {t}", occlusion(t)))
    plan += [
        ("TiledOcclusion", f"window {w}, k={k} (stride {t})", tiled),
        ("NoiseTunnel(TiledOcclusion)", f"{settings.nt_samples} noisy copies, same tiling", tunnel),
        ("FusionGrad(Saliency)", f"{settings.fg_n} noisy models x {settings.fg_m} inputs", fusion),
    ]
    results = []
    for name, detail, run_method in plan:
        torch.manual_seed(settings.seed)
        own_count.clear()
        counting = contextlib.nullcontext([0]) if "Tiled" in name else count_evaluations(model)
        with counting as counter:
            start = time.perf_counter()
            attr = run_method()
            seconds = time.perf_counter() - start
        if own_count:
            counter[0] = own_count[0]
        results.append(MethodResult(name, detail, attr.detach(), seconds, counter[0]))
        kind = "forward+backward" if name.startswith("FusionGrad") else "forward"
        report(f"  {name:<28} {detail:<30} {seconds:6.1f} s  {counter[0]:5d} {kind} evaluations")
    return results


def load_photos(sources: Sequence[str]) -> List[Photo]:
    """Image files or names of scikit-image's bundled photos -> preprocessed photos."""
    photos = []
    for source in sources:
        if os.path.isfile(source):
            try:
                rgb = imagenet.load_image(source)
            except ValueError as err:
                raise ValueError(f"--image {source!r}: {err}") from None
            name = os.path.splitext(os.path.basename(source))[0]
        elif source in imagenet.BUNDLED_PHOTOS:
            rgb = imagenet.bundled_photo(source)
            name = source
        else:
            raise ValueError(
                f"--image {source!r} is neither an image file nor one of scikit-image's bundled "
                f"photos ({', '.join(imagenet.BUNDLED_PHOTOS)})"
            )
        model_input, display = imagenet.preprocess(rgb)
        photos.append(Photo(name, model_input, display))
    return photos


def run(
    images: Optional[Sequence[str]] = None,
    out: str = DEFAULT_OUT,
    target: Optional[str] = None,
    settings: DemoSettings = DemoSettings(),
    load_model: Optional[Callable[[], nn.Module]] = None,
    stream: Optional[TextIO] = None,
) -> List[MethodResult]:
    """Run the whole demo; see the module docstring.

    Raises:
        MissingDemoExtraError: the optional packages are missing (before any slow work).
        DemoUsageError: bad images, target or settings.
    """

    def report(line: str) -> None:
        print(line, file=stream, flush=True)

    total_start = time.perf_counter()
    try:  # every usage error before the slow work
        settings.check(imagenet.INPUT_SIZE)
        check_output_file(out, "--out")
        photos = load_photos(list(images) if images else list(DEFAULT_PHOTOS))
    except (ValueError, FileNotFoundError) as err:
        raise DemoUsageError(str(err)) from None
    start = time.perf_counter()
    model = (load_model or imagenet.load_efficientnet_lite0)()
    model.eval()
    categories = imagenet.imagenet_categories()
    try:
        target_index = imagenet.resolve_target(target, categories)
    except ValueError as err:
        raise DemoUsageError(str(err)) from None
    model_name = "EfficientNet-Lite0 (ImageNet weights)" if load_model is None else "the model"
    report(
        f"Loaded {model_name} in {time.perf_counter() - start:.1f} s; "
        f"{torch.get_num_threads()} CPU threads"
    )

    x = torch.cat([p.model_input for p in photos])
    with torch.no_grad():
        probs = model(x).softmax(dim=1)
    report("Top-3 classes:")
    labels = []
    for photo, p in zip(photos, probs):
        values, indices = p.topk(min(3, p.numel()))
        ranked = ", ".join(
            f"{imagenet.class_name(int(i), categories)} {float(v):.1%}"
            for v, i in zip(values, indices)
        )
        report(f"  {photo.name:<12} {ranked}")
        chosen = int(indices[0]) if target_index is None else target_index
        labels.append((chosen, float(p[chosen])))
    targets = torch.tensor([c for c, _ in labels])
    explained = ", ".join(
        f"{p.name} -> {imagenet.class_name(c, categories)} ({c})"
        for p, (c, _) in zip(photos, labels)
    )
    report(f"Explaining the {_SCORE_NAMES[settings.score]} of {explained}:")

    results = explain(model, x, targets, settings, report)
    save_figure(photos, labels, categories, results, out, settings.dpi, settings.score)
    report(f"Wrote {out}")
    report(f"Total {time.perf_counter() - total_start:.1f} s")
    return results


def save_figure(
    photos: Sequence[Photo],
    labels: Sequence[Tuple[int, float]],
    categories: Sequence[str],
    results: Sequence[MethodResult],
    out: str,
    dpi: float,
    score: str = "log_softmax",
) -> None:
    from extra_attrib.visualization import plot_attribution_grid

    per_image = [round(r.evaluations / len(photos)) for r in results]
    columns = {
        f"{r.name}\n{r.detail}\n{count} evaluations per image": r.attributions
        for r, count in zip(results, per_image)
    }
    rows = [
        f"{p.name}: {imagenet.class_name(c, categories)} ({prob:.0%})"
        for p, (c, prob) in zip(photos, labels)
    ]
    fig = plot_attribution_grid(
        [p.display for p in photos], columns, row_titles=rows, panel_size=2.3
    )
    fig.supxlabel(
        f"Occlusion maps: red where occluding lowers the class's {_SCORE_NAMES[score]} (evidence "
        f"for the class), blue where it raises it. Saliency: gradient magnitude. Each panel is "
        f"scaled to its own 99th percentile.",
        fontsize=8,
    )
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
