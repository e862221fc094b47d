"""Tests of extra_attrib._options, the command-line validators shared by the subcommands."""

import argparse

import pytest

from extra_attrib._options import (
    bounded_float,
    check_output_file,
    nonnegative_int,
    positive_int,
)


def test_argparse_types():
    assert positive_int("3") == 3 and nonnegative_int("0") == 0
    for parse, text in (
        (positive_int, "0"),
        (positive_int, "x"),
        (nonnegative_int, "-1"),
        (nonnegative_int, str(2**63)),
    ):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    dpi = bounded_float(10, 600)
    assert dpi("72") == 72.0
    for text in ("5000", "nan", "-inf", "abc"):
        with pytest.raises(argparse.ArgumentTypeError):
            dpi(text)


def test_check_output_file(tmp_path):
    assert check_output_file(str(tmp_path / "new" / "deeper" / "f.PNG")).endswith("f.PNG")
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*is a file, not a directory"):
        check_output_file(str(tmp_path / "plain" / "sub" / "f.png"))
    with pytest.raises(ValueError, match="unknown extension '.zarr'"):
        check_output_file(str(tmp_path / "f.zarr"))
    assert check_output_file(str(tmp_path / "f.zarr"), "--store", extensions=None)
    with pytest.raises(ValueError, match="--store .* is a directory"):
        check_output_file(str(tmp_path), "--store", extensions=None)
    with pytest.raises(ValueError, match="must not be empty"):
        check_output_file("")
