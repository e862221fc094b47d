"""Validators of command-line options, shared by every ``extra-attrib`` subcommand.

Two kinds: ``argparse`` ``type=`` callables (:func:`positive_int`, :func:`nonnegative_int`), which
turn a bad value into argparse's usage error (exit code 2), and checks that need more than the
text (:func:`check_output_file`, :func:`check_output_folder`, which try the write), raising
``ValueError`` naming the option and the value, for the subcommand to report as a usage error
*before* any computation.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, List, Optional, Sequence

__all__ = [
    "FIGURE_EXTENSIONS",
    "MAX_DPI",
    "MIN_DPI",
    "bounded_float",
    "check_output_file",
    "check_output_folder",
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
    """Check that a file can be written at ``path``, before any work is done, by trying it.

    The extension must be one of ``extensions`` (case-insensitive) and ``path`` must not be a
    directory. Then the save is rehearsed: the missing folders are made and the file is opened
    for writing, as the real save will do; the file (if it did not exist) and the folders made
    here are removed again. An existing file is opened for appending, so it is never truncated.
    Running as root makes permission bits meaningless; trying the write does not (``/proc``
    accepts no new folder, a read-only mount no file).

    Args:
        path (str): The option's value.
        option (str, optional): The option's name, for the message. Default: ``"--out"``
        extensions (sequence of str or None, optional): Allowed extensions with their dot;
            None allows any. Default: :data:`FIGURE_EXTENSIONS`

    Returns:
        str: ``path``.

    Raises:
        ValueError: naming the option, the path and what is wrong.

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
    folder = os.path.dirname(full)
    _check_no_file_on_the_way(folder, shown)
    made = _make_folders(folder, shown)
    try:
        existed = os.path.exists(full)
        try:
            with open(full, "ab"):
                pass
        except OSError as err:
            raise ValueError(f"{shown} is not writable: {err.strerror or err}") from None
        if not existed:
            os.remove(full)
    finally:
        _remove_folders(made)
    return path


def check_output_folder(path: str, option: str = "--out") -> str:
    """Check that a folder (a zarr store) can be made and written at ``path``, by trying it.

    A local ``path`` must not be a plain file (nor lie under one); the missing folders are made
    and a small temporary file is written in the folder and removed again; the folders made here
    are removed too. URLs (``scheme://...``) are left to the store, which checks them when it
    opens them.

    Args:
        path (str): The option's value.
        option (str, optional): The option's name, for the message. Default: ``"--out"``

    Returns:
        str: ``path``.

    Raises:
        ValueError: naming the option, the path and what is wrong.

    Example::

        >>> check_output_folder("photos.zarr")
        'photos.zarr'
    """
    shown = f"{option} {path!r}"
    if not path:
        raise ValueError(f"{option} must not be empty")
    if "://" in path:
        return path
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise ValueError(f"{shown} is an existing file, not a folder; give a new or empty folder")
    _check_no_file_on_the_way(full, shown)
    made = _make_folders(full, shown)
    try:
        probe = os.path.join(full, f".extra_attrib-write-test-{os.getpid()}")
        try:
            with open(probe, "xb"):
                pass
            os.remove(probe)
        except OSError as err:
            raise ValueError(f"{shown} is not writable: {err.strerror or err}") from None
    finally:
        _remove_folders(made)
    return path


def _check_no_file_on_the_way(folder: str, shown: str) -> None:
    """The nearest existing folder on the way to ``folder`` must be a directory."""
    existing = folder
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise ValueError(f"{shown}: {existing!r} is a file, not a directory")


def _make_folders(folder: str, shown: str) -> List[str]:
    """Make ``folder`` and its missing parents; the folders made, deepest first."""
    missing = []
    current = folder
    while not os.path.exists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    made: List[str] = []
    try:
        for item in reversed(missing):
            os.mkdir(item)
            made.insert(0, item)
    except OSError as err:
        _remove_folders(made)
        raise ValueError(
            f"{shown}: the folder {item!r} cannot be made: {err.strerror or err}"
        ) from None
    return made


def _remove_folders(made: Sequence[str]) -> None:
    for item in made:  # deepest first; only folders made here, and only if still empty
        try:
            os.rmdir(item)
        except OSError:
            pass
