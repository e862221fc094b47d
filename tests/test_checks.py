"""Tests of extra_attrib._checks, the argument checks every public entry point uses."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from extra_attrib._checks import (
    check_bool,
    check_choice,
    check_int,
    check_nonnegative,
    check_optional_int,
    check_real,
    is_int,
    is_real,
)


@pytest.mark.parametrize(
    "value, expected",
    [
        (3, True),
        (-2, True),
        (np.int64(3), True),
        (torch.tensor(3), True),
        (torch.tensor(3, dtype=torch.uint8), True),
        (True, False),
        (np.bool_(True), False),
        (torch.tensor(True), False),
        (3.0, False),
        (torch.tensor(3.0), False),
        (torch.tensor([3]), False),
        ("3", False),
        (None, False),
    ],
)
def test_is_int(value, expected):
    assert is_int(value) is expected


@pytest.mark.parametrize(
    "value, expected",
    [
        (0.5, True),
        (2, True),
        (np.float32(1), True),
        (torch.tensor(0.5), True),
        (True, False),
        ("1", False),
        (1j, False),
        (torch.tensor([0.5]), False),
    ],
)
def test_is_real(value, expected):
    assert is_real(value) is expected


@given(st.integers(-(10**30), 10**30))
def test_check_int_accepts_every_python_int(value):
    assert check_int(value, "v") == value


def test_check_int_messages_name_argument_value_and_rule():
    with pytest.raises(TypeError, match=r"n=True must be an int >= 1 \(bools are refused\)"):
        check_int(True, "n", minimum=1)
    with pytest.raises(ValueError, match="n=0 must be >= 1"):
        check_int(0, "n", minimum=1)
    assert check_int(torch.tensor(4), "n") == 4 and type(check_int(np.int8(4), "n")) is int
    assert check_optional_int(None, "n", minimum=1) is None


def test_check_real_and_nonnegative():
    assert check_real(torch.tensor(0.25), "x") == 0.25
    with pytest.raises(ValueError, match="x=nan must be finite"):
        check_real(math.nan, "x")
    assert check_real(math.inf, "x", finite=False) == math.inf
    with pytest.raises(TypeError, match="x=False"):
        check_real(False, "x")
    with pytest.raises(ValueError, match="std=-1.0 must be >= 0"):
        check_nonnegative(-1, "std")
    with pytest.raises(ValueError, match="scale=0.0 must be > 0"):
        check_nonnegative(0, "scale", strict=True)


def test_check_bool_and_choice():
    assert check_bool(False, "flag") is False
    for bad in (1, "yes", None, np.bool_(True)):
        with pytest.raises(TypeError, match="flag=.* must be a bool"):
            check_bool(bad, "flag")
    assert check_choice("raw", "score", ("raw", "softmax")) == "raw"
    with pytest.raises(ValueError, match=r"score='log' is not supported: use one of \('raw',"):
        check_choice("log", "score", ("raw", "softmax"))
