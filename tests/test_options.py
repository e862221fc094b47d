"""Tests of extra_attrib._options, the command-line validators shared by the subcommands."""

import argparse
import os

import pytest

from extra_attrib._options import (
    bounded_float,
    check_output_file,
    check_output_folder,
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


def test_check_output_file_tries_the_write(tmp_path):
    """Permission bits say nothing to root; /proc accepts no new folder (#21 item 3)."""
    with pytest.raises(ValueError, match="--out '/proc/forbidden/x.png': the folder .* cannot be"):
        check_output_file("/proc/forbidden/x.png")
    target = tmp_path / "new" / "deeper" / "f.png"
    check_output_file(str(target))
    assert not (tmp_path / "new").exists()  # the rehearsal leaves nothing behind
    existing = tmp_path / "kept.png"
    existing.write_bytes(b"the user's figure")
    check_output_file(str(existing))
    assert existing.read_bytes() == b"the user's figure"  # opened for appending, not truncated


def test_check_output_folder(tmp_path):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ValueError, match="is an existing file"):
        check_output_folder(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="is a file, not a directory"):
        check_output_folder(str(tmp_path / "plain" / "s.zarr"))
    with pytest.raises(ValueError, match="cannot be made"):
        check_output_folder("/proc/forbidden/s.zarr")
    assert check_output_folder(str(tmp_path / "a" / "s.zarr"))
    assert not (tmp_path / "a").exists()
    (tmp_path / "full").mkdir()
    assert check_output_folder(str(tmp_path / "full")) and os.listdir(tmp_path / "full") == []
    assert check_output_folder("s3://bucket/s.zarr") == "s3://bucket/s.zarr"
