"""The ``extra-attrib explain`` and ``extra-attrib show`` commands.

``explain`` runs :func:`extra_attrib.explain_dataset` over image files and folders with the
embedded EfficientNet-Lite0 or a model of your own (``--model module:factory``); it works the
same under ``torchrun --nproc_per_node=N -m extra_attrib explain ...``. ``show`` draws the
three-panel figure (image, attribution, overlay) of one item of a store.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from extra_attrib._options import check_output_file, check_output_folder, positive_int

METHODS = ("tiled", "occlusion", "fusiongrad-saliency")
SCORES = ("log_softmax", "softmax", "raw")
DEFAULT_WINDOW = 64
DEFAULT_K = 4
MAX_LISTED_FAILURES = 10
DEFAULT_PREPROCESS = "efficientnet-lite"  # imagenet.preprocess: centre crop, 224 x 224

Transform = Callable[[Any], Tensor]


class UsageError(ValueError):
    """A bad path, model or option: reported in one line, exit status 2."""


def _target(text: str) -> Any:
    if text == "predicted":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be 'predicted' or a class index") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be a non-negative class index")
    return value


def add_commands(commands: Any) -> None:
    """Register ``explain`` and ``show`` on the ``extra-attrib`` subparsers."""
    explain = commands.add_parser(
        "explain",
        help="explain every image of files/folders into a resumable zarr store",
        description="Explain every image under PATH... (files, and folders searched recursively "
        "in sorted order) into a zarr store. Running the same command again "
        "continues an interrupted run. Under torchrun every process takes a share "
        'of the images. Needs zarr (pip install "extra_attrib[scale]"); the default '
        "model needs the 'demo' extra.",
    )
    explain.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    explain.add_argument(
        "--out",
        required=True,
        metavar="STORE.zarr",
        help="the zarr store (local path or fsspec URL)",
    )
    explain.add_argument(
        "--model",
        default=None,
        metavar="MODULE:FACTORY",
        help="a function returning a model in eval mode, or (model, transform) where transform "
        "maps a PIL image to the model's input tensor; default: EfficientNet-Lite0 with "
        "its preprocessing (also used when the factory gives no transform)",
    )
    explain.add_argument(
        "--method",
        choices=METHODS,
        default="tiled",
        help="tiled: TiledOcclusion; occlusion: Captum Occlusion with stride "
        "window/k; fusiongrad-saliency: FusionGrad(Saliency); default: "
        "tiled",
    )
    explain.add_argument(
        "--window",
        type=positive_int,
        default=DEFAULT_WINDOW,
        metavar="W",
        help=f"occlusion window side in pixels; default: {DEFAULT_WINDOW}",
    )
    explain.add_argument(
        "--k",
        type=positive_int,
        default=DEFAULT_K,
        help=f"windows per pixel along each side (stride W/k); must divide W; default: {DEFAULT_K}",
    )
    explain.add_argument(
        "--score",
        choices=SCORES,
        default="log_softmax",
        help="what is explained: log-probability, probability or raw logit; default: log_softmax",
    )
    explain.add_argument(
        "--target",
        type=_target,
        default="predicted",
        metavar="predicted|N",
        help="the predicted class of each image, or one class index; default: predicted",
    )
    explain.add_argument(
        "--batch-size",
        type=positive_int,
        default=4,
        metavar="B",
        help="images per attribution call; default: 4",
    )
    explain.add_argument(
        "--perturbations-per-eval",
        type=positive_int,
        default=None,
        metavar="P",
        help="occluded copies per forward pass; default: chosen automatically (Occlusion: 1)",
    )
    explain.add_argument(
        "--memory-budget",
        type=positive_int,
        default=None,
        metavar="MIB",
        help="MiB that TiledOcclusion's perturbed copies and kept activations may take per call "
        "(larger batches run in groups that fit); --method tiled only; default: 256",
    )
    explain.add_argument(
        "--num-workers",
        type=int,
        default=0,
        metavar="N",
        help="image-loading worker processes; default: 0",
    )
    explain.add_argument(
        "--device",
        default=None,
        help="e.g. cpu, cuda, cuda:1; default: cuda:LOCAL_RANK under torchrun "
        "with GPUs, else cuda if available, else cpu",
    )
    explain.add_argument(
        "--no-resume", action="store_true", help="overwrite STORE instead of continuing it"
    )
    explain.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    show = commands.add_parser(
        "show",
        help="draw one item of a store: image, attribution, overlay",
        description="Save the three-panel figure (image, attribution, overlay) of one item of a "
        "store written by 'explain' or extra_attrib.explain_dataset.",
    )
    show.add_argument("store", metavar="STORE.zarr")
    show.add_argument("--index", type=int, required=True, metavar="I", help="item index")
    show.add_argument("--out", required=True, metavar="FIG.png", help="where to save the figure")


# --------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------


def image_files(paths: Sequence[str]) -> List[str]:
    """Files as given, and the image files under folders (recursive, sorted).

    Symbolic links to folders are followed, each real folder once (a link that leads back
    into a folder already searched is skipped), so a cycle cannot repeat or hang the search.
    """
    from PIL import Image

    extensions = {ext.lower() for ext in Image.registered_extensions()}
    files: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            visited = set()
            for root, dirs, names in os.walk(path, followlinks=True):
                real = os.path.realpath(root)
                if real in visited:
                    dirs[:] = []
                    continue
                visited.add(real)
                dirs[:] = sorted(
                    d for d in dirs if os.path.realpath(os.path.join(root, d)) not in visited
                )
                found += [
                    os.path.join(root, name)
                    for name in names
                    if os.path.splitext(name)[1].lower() in extensions
                ]
            files += sorted(found, key=os.fsencode)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UsageError(f"PATH {path!r} is neither a file nor a folder")
    if not files:
        raise UsageError(f"no image files under {' '.join(paths)}")
    return files


class ImageFiles(torch.utils.data.Dataset):
    """Image files through a transform; a file Pillow cannot read raises (recorded as failed)."""

    def __init__(self, paths: Sequence[str], transform: Transform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            image.load()
            return self.transform(image)


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def rgb_pixels(image: Any) -> np.ndarray:
    """A PIL image as ``(H, W, 3)`` uint8 RGB, upright, whatever its mode; or ValueError.

    The EXIF orientation is applied. 16-bit greyscale (``I;16*``, and ``I``, as which some
    Pillow versions open 16-bit PNGs) is scaled from 0..65535 (values outside raise);
    float greyscale (``F``) must lie in [0, 1]; every other mode goes through Pillow's
    conversion (palette, LA, CMYK, YCbCr, ...). What cannot be converted raises ValueError
    naming the mode, so the item is recorded as failed instead of explained as a wrong image.
    """
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if mode == "F":
            if not (np.isfinite(values).all() and low >= 0.0 and high <= 1.0):
                raise ValueError(
                    f"image of mode F with values in [{low:g}, {high:g}]: only [0, 1] is "
                    f"understood; give a --model factory whose transform reads such images"
                )
            grey = np.round(values * 255.0)
        else:
            if low < 0 or high > 65535:
                raise ValueError(
                    f"image of mode {mode} with values in [{low:g}, {high:g}]: not 16-bit "
                    f"greyscale; give a --model factory whose transform reads such images"
                )
            grey = np.round(values / 257.0)
        return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    try:
        return np.array(image.convert("RGB"))  # a writable copy (torch warns about read-only)
    except (ValueError, OSError) as err:
        raise ValueError(f"image of mode {mode} cannot be converted to RGB: {err}") from None


def efficientnet_transform(image: Any) -> Tensor:
    """PIL image -> ``(3, 224, 224)`` EfficientNet-Lite input (centre crop, (x - 127) / 128).

    The image is read by :func:`rgb_pixels` (EXIF orientation, 16-bit and float modes).
    """
    from extra_attrib import imagenet

    return imagenet.preprocess(rgb_pixels(image))[0][0]


def load_model(spec: Optional[str]) -> Tuple[nn.Module, Transform, str]:
    """``--model`` -> (model in eval mode, transform, name of the preprocessing)."""
    if spec is None:
        from extra_attrib import imagenet

        return imagenet.load_efficientnet_lite0(), efficientnet_transform, DEFAULT_PREPROCESS
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--model {spec!r} must be MODULE:FACTORY, e.g. mypkg.models:build")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UsageError(f"--model {spec!r}: {err}") from None
    try:
        made = factory()
    except Exception as err:
        raise UsageError(
            f"--model {spec!r}: calling {attr}() raised {type(err).__name__}: {err}"
        ) from None
    model, transform, preprocess = made, efficientnet_transform, DEFAULT_PREPROCESS
    if isinstance(made, tuple):
        if len(made) != 2 or not callable(made[1]):
            raise UsageError(f"--model {spec!r} must return a model or (model, transform)")
        model, transform, preprocess = made[0], made[1], "custom"
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec!r} returned {type(model).__name__}, not a torch module")
    return model.eval(), transform, preprocess


def build_method(args: argparse.Namespace, model: nn.Module, channels: int) -> Tuple[Any, dict]:
    """The attribution method and its ``attribute`` arguments for the options."""
    from captum.attr import Occlusion, Saliency

    from extra_attrib._demo import DemoSettings, scored_model
    from extra_attrib.fusion_grad import FusionGrad
    from extra_attrib.tiled_occlusion import TiledOcclusion

    f = scored_model(model, args.score)
    if args.method != "fusiongrad-saliency" and args.window % args.k:
        raise UsageError(
            f"--window {args.window} must be divisible by --k {args.k} (the stride is window / k)"
        )
    per_eval = (
        {}
        if args.perturbations_per_eval is None
        else {"perturbations_per_eval": args.perturbations_per_eval}
    )
    budget = getattr(args, "memory_budget", None)
    if budget is not None and args.method != "tiled":
        raise UsageError(
            f"--memory-budget {budget} applies to --method tiled only, not --method {args.method}"
        )
    if args.method == "tiled":
        if budget is not None:
            per_eval["memory_budget"] = budget * 2**20
        return TiledOcclusion(f), dict(window=args.window, k=args.k, baselines=0.0, **per_eval)
    if args.method == "occlusion":
        stride = args.window // args.k
        return Occlusion(f), dict(
            sliding_window_shapes=(channels, args.window, args.window),
            strides=(channels, stride, stride),
            baselines=0.0,
            **per_eval,
        )
    demo = DemoSettings()
    return FusionGrad(Saliency(f), f), dict(n=demo.fg_n, m=demo.fg_m, std=demo.fg_std)


def check_out(out: str) -> None:
    """Before any work: ``--out`` is a new or empty folder, or a store this package made.

    Raises:
        UsageError: ``--out`` is a plain file, a folder of other files (the input photos, say),
            a zarr group made by something else, or cannot be made or written.
    """
    from extra_attrib import _store

    try:
        check_output_folder(out, "--out")
        _store.check_place(out, None)
    except ValueError as err:
        raise UsageError(str(err)) from None


def check_device(device: Optional[str]) -> None:
    """``--device`` names a device torch knows and this machine has (before any work)."""
    if device is None:
        return
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {device!r} is not a device torch knows ({err})") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {device!r}: this machine has no CUDA GPU (use --device cpu)"
            )
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device!r}: this machine has {torch.cuda.device_count()} GPUs"
            )
        return
    if chosen.type != "cpu":
        try:
            torch.empty(1, device=chosen)
        except Exception as err:
            raise UsageError(f"--device {device!r} cannot be used here ({err})") from None


class _OneLineWarnings:
    """While active, warnings are printed as one line each on stderr (no source line)."""

    def __init__(self, prog: str) -> None:
        import warnings

        self.prog = prog
        self.context = warnings.catch_warnings()

    def __enter__(self) -> _OneLineWarnings:
        import warnings

        self.context.__enter__()

        def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            text = " ".join(str(message).split())
            print(f"{self.prog}: warning: {text}", file=sys.stderr, flush=True)

        warnings.showwarning = show
        return self

    def __exit__(self, *exc: Any) -> None:
        self.context.__exit__(*exc)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def run_explain(args: argparse.Namespace) -> int:
    """``explain``: exit 0 (all done), 1 (some items failed), 2 (an error: one line)."""
    with _OneLineWarnings("extra-attrib explain"):
        return _run_explain(args)


def _run_explain(args: argparse.Namespace) -> int:
    from extra_attrib import dataset as ds
    from extra_attrib._store import StoreMismatchError, shown_path
    from extra_attrib.imagenet import MissingDemoExtraError

    rank = int(os.environ.get("RANK", "0"))
    prog = "extra-attrib explain"
    try:
        if args.num_workers < 0:
            raise UsageError(f"--num-workers {args.num_workers} must be at least 0")
        check_device(args.device)
        check_out(args.out)
        files = image_files(args.paths)
        model, transform, preprocess = load_model(args.model)
        images = ImageFiles(files, transform)
        try:
            shape, _ = ds._probe(images, len(images))
        except ValueError as err:
            raise UsageError(str(err).replace("dataset:", "PATH:", 1)) from None
        if len(shape) != 3:
            raise UsageError(
                f"the transform gives inputs of shape {tuple(shape)}; expected "
                f"(channels, height, width)"
            )
        method, kwargs = build_method(args, model, int(shape[0]))
        device = args.device
        if device is None and "WORLD_SIZE" not in os.environ and torch.cuda.is_available():
            device = "cuda"
        summary = ds.explain_dataset(
            method,
            images,
            args.out,
            target=args.target,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            resume=not args.no_resume,
            device=device,
            show_progress=not args.no_progress,
            metadata={
                "command": "explain",
                "model": args.model or "efficientnet-lite0",
                "preprocess": preprocess,
                "method": args.method,
                "score": args.score,
            },
            **kwargs,
        )
    except MissingDemoExtraError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    except (UsageError, StoreMismatchError) as err:
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except ImportError as err:  # zarr missing
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    except ds._SettingError as err:  # a setting that fits no item (--target 999, say)
        hint = f" (--target {args.target})" if "target" in str(err) else ""
        print(f"{prog}: error{hint}: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permissions, a vanished file system
        print(
            f"{prog}: error: {type(err).__name__}: {_one_line(err)} (what was written is kept; "
            f"run the same command again to continue)",
            file=sys.stderr,
        )
        return 2
    except Exception as err:
        if os.environ.get("EXTRA_ATTRIB_TRACEBACK"):
            raise
        print(
            f"{prog}: error: {type(err).__name__}: {_one_line(err)} (set "
            f"EXTRA_ATTRIB_TRACEBACK=1 for the traceback)",
            file=sys.stderr,
        )
        return 2
    if rank != 0:
        # Rank 0 reports for everyone; a non-zero status here would make torchrun stop rank 0
        # before it prints the final line.
        return 0
    if summary.failed:
        from extra_attrib.dataset import open_attributions

        store = open_attributions(summary.path)
        for index, message in list(store.errors.items())[:MAX_LISTED_FAILURES]:
            where = shown_path(store.paths[index]) if store.paths else f"item {index}"
            print(f"  failed: {where}: {message}", flush=True)
        if summary.failed > MAX_LISTED_FAILURES:
            print("  ... all failures: extra_attrib.open_attributions(STORE).errors", flush=True)
    print(
        f"{prog}: {summary.done} done, {summary.failed} failed of "
        f"{summary.total} ({summary.skipped} already done) in {summary.seconds:.1f} s "
        f"-> {summary.path}",
        flush=True,
    )
    return 0 if summary.complete else 1


# --------------------------------------------------------------------------------------------
# show
# --------------------------------------------------------------------------------------------


def _display_image(path: str, preprocess: str, height: int, width: int) -> Optional[np.ndarray]:
    """The image as the model saw it (default preprocessing) or resized to the map (custom)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = rgb_pixels(image) if preprocess == DEFAULT_PREPROCESS else None
            if rgb is None:
                rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError):
        return None
    if preprocess == DEFAULT_PREPROCESS and height == width:
        from extra_attrib import imagenet

        return imagenet.preprocess(rgb, size=height)[1]
    return np.asarray(Image.fromarray(rgb).resize((width, height)), dtype=np.float64) / 255.0


def run_show(args: argparse.Namespace) -> int:
    from extra_attrib.dataset import open_attributions
    from extra_attrib.visualization import (
        plot_attribution,
        plot_image_attribution,
        plot_volume_slices,
    )

    try:
        check_output_file(args.out, "--out")
    except ValueError as err:
        print(f"extra-attrib show: error: {err}", file=sys.stderr)
        return 2
    try:
        with _OneLineWarnings("extra-attrib show"):
            store = open_attributions(args.store, verify=False)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"extra-attrib show: error: {_one_line(err)}", file=sys.stderr)
        return 2
    i = args.index
    if not 0 <= i < len(store):
        print(
            f"extra-attrib show: error: --index {i} must be in [0, {len(store)})", file=sys.stderr
        )
        return 2
    if not store.done[i]:
        why = f": {store.errors[i]}" if i in store.errors else " yet"
        print(f"extra-attrib show: error: item {i} is not done{why}", file=sys.stderr)
        return 1
    try:
        attr = store.item(i)
    except ValueError as err:  # marked done, but its chunk is missing or damaged
        print(f"extra-attrib show: error: {_one_line(err)}", file=sys.stderr)
        return 2
    from extra_attrib._store import shown_path

    path = store.paths[i] if store.paths else None
    name = os.path.basename(shown_path(path)) if path else f"item {i}"
    title = f"{name}: target {int(store.targets[i])}, score {float(store.scores[i]):.3g}"
    info = store.metadata.get("info", {})
    image = None
    if attr.dim() == 3 and attr.shape[0] in (1, 3, 4) and path:
        image = _display_image(
            path, info.get("preprocess", "custom"), int(attr.shape[1]), int(attr.shape[2])
        )
    if image is not None:
        fig = plot_image_attribution(image, attr, title=title)
    elif attr.dim() == 4:
        fig = plot_volume_slices(None, attr, title=title)
    else:  # no image to show: the map alone, channels summed
        fig = plot_attribution(
            attr if attr.dim() <= 2 else attr.sum(0), method="heat_map", title=title
        )
    directory = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(args.out, dpi=100, bbox_inches="tight")
    print(f"extra-attrib show: wrote {args.out}")
    return 0
