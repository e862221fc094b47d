"""Argument checks shared by every public entry point.

Each check raises ``TypeError`` for a value of the wrong kind and ``ValueError`` for a value of
the right kind outside its range; the message names the argument, the value and the rule. Bools
are never numbers here (``True`` is refused where an int or a float is expected), although Python
treats them as ints.

Integer tensors: a 0-dimensional integer tensor (``torch.tensor(3)``) counts as an int, as a
numpy integer does; a tensor with dimensions (even one element, ``torch.tensor([3])``) does not,
since it is a sequence. Floating-point values are never ints, even ``3.0``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_nonnegative",
    "check_optional_int",
    "check_real",
    "is_int",
    "is_real",
]


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer: an int, a numpy integer or a 0-d integer tensor; no bool.

    Args:
        value (Any): The value to test.

    Returns:
        bool: True for ``3``, ``np.int64(3)``, ``torch.tensor(3)``; False for ``True``, ``3.0``,
        ``torch.tensor([3])``, ``torch.tensor(True)``.

    Example::

        >>> is_int(4), is_int(True), is_int(torch.tensor(4))
        (True, False, True)
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return (
            value.dim() == 0
            and not value.dtype.is_floating_point
            and not value.is_complex()
            and value.dtype != torch.bool
        )
    if type(value).__name__ == "bool_":  # numpy.bool_ is not an Integral, but be explicit
        return False
    return isinstance(value, numbers.Integral)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number (int, float, numpy scalar, 0-d real tensor); no bool.

    Args:
        value (Any): The value to test.

    Returns:
        bool: True for ``0.5``, ``2``, ``np.float32(1)``, ``torch.tensor(0.5)``; False for
        ``True``, ``"1"``, ``1j``.
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool
    if type(value).__name__ == "bool_":
        return False
    return isinstance(value, numbers.Real)


def check_int(value: Any, name: str, minimum: Optional[int] = None) -> int:
    """Return ``value`` as an int, or raise naming ``name``.

    Args:
        value (Any): The argument's value.
        name (str): The argument's name, used in the message.
        minimum (int, optional): Smallest allowed value. Default: None (no bound).

    Returns:
        int: ``int(value)``.

    Example::

        >>> check_int(3, "n", minimum=1)
        3
    """
    if not is_int(value):
        rule = "an int" if minimum is None else f"an int >= {minimum}"
        raise TypeError(
            f"{name}={value!r} must be {rule} (bools are refused), got {type(value).__name__}"
        )
    result = int(value)
    if minimum is not None and result < minimum:
        raise ValueError(f"{name}={result!r} must be >= {minimum}")
    return result


def check_optional_int(value: Any, name: str, minimum: Optional[int] = None) -> Optional[int]:
    """:func:`check_int`, with ``None`` passed through.

    Args:
        value (Any): The argument's value.
        name (str): The argument's name.
        minimum (int, optional): Smallest allowed value. Default: None.

    Returns:
        int or None: The checked value.
    """
    return None if value is None else check_int(value, name, minimum)


def check_real(value: Any, name: str, finite: bool = True) -> float:
    """Return ``value`` as a float, or raise naming ``name``.

    Args:
        value (Any): The argument's value.
        name (str): The argument's name.
        finite (bool, optional): Refuse NaN and infinities. Default: True.

    Returns:
        float: ``float(value)``.
    """
    if not is_real(value):
        raise TypeError(
            f"{name}={value!r} must be a real number (bools are refused), got "
            f"{type(value).__name__}"
        )
    result = float(value)
    if finite and not math.isfinite(result):
        raise ValueError(f"{name}={result!r} must be finite")
    return result


def check_nonnegative(value: Any, name: str, strict: bool = False) -> float:
    """A finite real number ``>= 0`` (``> 0`` with ``strict``), e.g. a standard deviation.

    Args:
        value (Any): The argument's value.
        name (str): The argument's name.
        strict (bool, optional): Require ``> 0``. Default: False.

    Returns:
        float: ``float(value)``.
    """
    result = check_real(value, name)
    if result < 0 or (strict and result == 0):
        raise ValueError(f"{name}={result!r} must be {'> 0' if strict else '>= 0'}")
    return result


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` if it is a bool (``True``/``False``, not ``1``, ``"yes"``), else raise.

    Args:
        value (Any): The argument's value.
        name (str): The argument's name.

    Returns:
        bool: ``value``.
    """
    if not isinstance(value, bool):
        raise TypeError(
            f"{name}={value!r} must be a bool (True or False), got {type(value).__name__}"
        )
    return value


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of the strings ``choices``, else raise.

    Args:
        value (Any): The argument's value.
        name (str): The argument's name.
        choices (sequence of str): The allowed values.

    Returns:
        str: ``value``.
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not supported: use one of {tuple(choices)}")
    return value
