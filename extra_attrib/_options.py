"""Validators of command-line options, shared by every ``extra-attrib`` subcommand.

Two kinds: ``argparse`` ``type=`` callables (:func:`positive_int`, :func:`nonnegative_int`), which
turn a bad value into argparse's usage error (exit code 2), and checks that need more than the
text (:func:`check_output_file`), which raise ``ValueError`` naming the option and the value, for
the subcommand to report as a usage error *before* any computation.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Optional, Sequence

__all__ = [
    "FIGURE_EXTENSIONS",
    "MAX_DPI",
    "MIN_DPI",
    "bounded_float",
    "check_output_file",
    "nonnegative_int",
    "positive_int",
]

#: Bounds of every ``--dpi`` option: the demo's figure is about 12 x 2.5 inches per photo, so
#: 600 dpi is already 7000 x 1500 pixels per photo row (5000 dpi wrote a 678-megapixel PNG).
MIN_DPI, MAX_DPI = 10.0, 600.0

#: Extensions matplotlib's ``savefig`` writes without extra packages.
FIGURE_EXTENSIONS = (
    ".eps",
    ".jpeg",
    ".jpg",
    ".pdf",
    ".pgf",
    ".png",
    ".ps",
    ".raw",
    ".rgba",
    ".svg",
    ".svgz",
    ".tif",
    ".tiff",
    ".webp",
)


def positive_int(text: str) -> int:
    """``argparse`` type: an integer ``>= 1``.

    Args:
        text (str): The option's text.

    Returns:
        int: The value.
    """
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def nonnegative_int(text: str) -> int:
    """``argparse`` type: an integer in ``[0, 2**63)`` (e.g. a seed).

    Args:
        text (str): The option's text.

    Returns:
        int: The value.
    """
    value = _int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value} must be an integer in [0, 2**63)")
    return value


def bounded_float(low: float, high: float) -> Callable[[str], float]:
    """``argparse`` type factory: a number in ``[low, high]`` (NaN refused).

    Args:
        low (float): Smallest allowed value.
        high (float): Largest allowed value.

    Returns:
        callable: The ``type=`` function.
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} must be a number in [{low:g}, {high:g}]")
        return value

    return parse


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def check_output_file(
    path: str, option: str = "--out", extensions: Optional[Sequence[str]] = FIGURE_EXTENSIONS
) -> str:
    """Check that a file can be written at ``path``, before any work is done.

    The extension must be one of ``extensions`` (case-insensitive); ``path`` must not be a
    directory; the nearest existing folder on its way must be a writable directory (missing
    folders below it are created when the file is written), and no component of the folder
    part may be a plain file.

    Args:
        path (str): The option's value.
        option (str, optional): The option's name, for the message. Default: ``"--out"``
        extensions (sequence of str or None, optional): Allowed extensions with their dot;
            None allows any. Default: :data:`FIGURE_EXTENSIONS`

    Returns:
        str: ``path``.

    Example::

        >>> check_output_file("figs/demo.png")
        'figs/demo.png'
    """
    shown = f"{option} {path!r}"
    if not path:
        raise ValueError(f"{option} must not be empty")
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise ValueError(f"{shown} is a directory; give a file name")
    if extensions is not None:
        ext = os.path.splitext(path)[1].lower()
        if ext not in extensions:
            raise ValueError(
                f"{shown}: unknown extension {ext or '(none)'!r}; use one of "
                f"{', '.join(extensions)}"
            )
    if os.path.exists(full):
        if not os.access(full, os.W_OK):
            raise ValueError(f"{shown} exists and is not writable")
        return path
    folder = os.path.dirname(full)
    while not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    if not os.path.isdir(folder):
        raise ValueError(f"{shown}: {folder!r} is a file, not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{shown}: the directory {folder!r} is not writable")
    return path
