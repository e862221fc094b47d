"""The command line (`python -m extra_attrib demo`) with a tiny model: no demo extra, no network."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from extra_attrib import _demo, imagenet
from extra_attrib.__main__ import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = [
    "--window",
    "56",
    "--k",
    "2",
    "--nt-samples",
    "2",
    "--fg-n",
    "2",
    "--fg-m",
    "2",
    "--no-progress",
    "--dpi",
    "40",
]


class TinyClassifier(nn.Module):
    """224 x 224 RGB -> 1000 logits in well under a millisecond."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=16, stride=16)
        self.fc = nn.Linear(4 * 14 * 14, 1000)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


@pytest.fixture
def tiny_model(monkeypatch):
    torch.manual_seed(0)
    model = TinyClassifier().eval()
    monkeypatch.setattr(imagenet, "load_efficientnet_lite0", lambda: model)
    return model


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    rgb = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_demo_writes_figure_and_reports(tiny_model, photo, tmp_path, capsys):
    out = tmp_path / "figs" / "demo.png"  # a missing folder is created
    assert main(["demo", "--image", str(photo), "--out", str(out), *FAST]) == 0
    assert_png(out)
    stdout = capsys.readouterr().out
    assert "Top-3 classes:" in stdout
    top3 = next(line for line in stdout.splitlines() if line.strip().startswith("photo "))
    assert top3.count("%") == 3
    for name in (
        "Occlusion",
        "TiledOcclusion",
        "NoiseTunnel(TiledOcclusion)",
        "FusionGrad(Saliency)",
    ):
        assert name in stdout
    # Captum's Occlusion: the unperturbed input plus 4 x 4 windows of 56 px.
    assert "window 56, stride 56" in stdout and " 17 forward evaluations" in stdout
    assert "Wrote" in stdout and "Total" in stdout


def test_demo_default_settings_run_with_the_tiny_model(
    tiny_model, photo, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--image", str(photo), "--no-progress", "--dpi", "40"]) == 0
    assert_png(tmp_path / _demo.DEFAULT_OUT)
    stdout = capsys.readouterr().out
    assert "window 64, k=4 (stride 16)" in stdout and "window 16, stride 16" in stdout


def test_demo_run_returns_finite_maps_for_each_method(tiny_model, photo, tmp_path):
    settings = _demo.DemoSettings(
        window=56, k=2, nt_samples=2, fg_n=2, fg_m=2, progress=False, dpi=40
    )
    results = _demo.run(
        [str(photo), str(photo)],
        out=str(tmp_path / "r.png"),
        target="3",
        settings=settings,
        stream=None,
        load_model=lambda: tiny_model,
    )
    assert [r.name for r in results] == [
        "Occlusion",
        "Occlusion",
        "TiledOcclusion",
        "NoiseTunnel(TiledOcclusion)",
        "FusionGrad(Saliency)",
    ]
    for r in results:
        assert r.attributions.shape == (2, 3, 224, 224)
        assert torch.isfinite(r.attributions).all()
        assert r.evaluations > 0 and r.seconds >= 0
    # TiledOcclusion counts its own evaluations (a counting hook would keep it dense): its
    # windows (224 / 28 + 1 per side) plus the clean pass, per image and NoiseTunnel sample.
    tiled = {r.name: r.evaluations for r in results}
    assert tiled["TiledOcclusion"] == (9 * 9 + 1) * 2
    assert tiled["NoiseTunnel(TiledOcclusion)"] == (9 * 9 + 1) * 2 * 2
    # k = 1 adds no second Occlusion column
    settings_k1 = _demo.DemoSettings(
        window=56, k=1, nt_samples=1, fg_n=1, fg_m=1, progress=False, dpi=40
    )
    results = _demo.run(
        [str(photo)],
        out=str(tmp_path / "k1.png"),
        settings=settings_k1,
        load_model=lambda: tiny_model,
    )
    assert [r.name for r in results].count("Occlusion") == 1


def test_target_by_name_and_index(tiny_model, photo, tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                "--image",
                str(photo),
                "--out",
                str(tmp_path / "a.png"),
                "--target",
                "Tabby",
                *FAST,
            ]
        )
        == 0
    )
    assert "photo -> tabby (281)" in capsys.readouterr().out
    assert (
        main(
            [
                "demo",
                "--image",
                str(photo),
                "--out",
                str(tmp_path / "b.png"),
                "--target",
                "1",
                *FAST,
            ]
        )
        == 0
    )
    assert "photo -> goldfish (1)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "tabbby"], "did you mean 'tabby'"),
        (["--target", "1000"], "class index in [0, 1000)"),
        (["--window", "30", "--k", "4"], "--window 30 must be divisible by --k 4"),
        (["--window", "300"], "at most the image size 224"),
        (["--image", "no/such/file.png"], "neither an image file nor one of scikit-image's"),
        (["--fg-std", "-1"], "--fg-std -1.0 must be a non-negative number"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(tiny_model, photo, tmp_path, capsys, args, message):
    argv = ["demo", "--out", str(tmp_path / "x.png"), "--no-progress"]
    if "--image" not in args:
        argv += ["--image", str(photo)]
    assert main(argv + args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_not_an_image_file(tiny_model, tmp_path, capsys):
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    assert main(["demo", "--image", str(bogus), "--out", str(tmp_path / "x.png")]) == 2
    assert "is not an image file" in capsys.readouterr().err


def test_argparse_errors_and_help_return_codes(capsys):
    assert main(["demo", "--k", "0"]) == 2
    assert "must be a positive integer" in capsys.readouterr().err
    assert main(["demo", "--score", "logit"]) == 2
    assert main(["demo", "--help"]) == 0
    assert "--image" in capsys.readouterr().out
    assert main([]) == 2  # no command: usage
    assert "demo" in capsys.readouterr().out


def test_missing_demo_extra_names_the_install_command(monkeypatch, photo, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import fails
    assert main(["demo", "--image", str(photo), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "efficientnet-lite-pytorch" in err
    assert 'pip install -e ".[demo]"' in err
    assert 'pip install "extra_attrib[demo]"' in err
    assert not (tmp_path / "x.png").exists()


def test_missing_scikit_image_for_bundled_photos(monkeypatch, tiny_model, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    assert main(["demo", "--image", "coffee", "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "scikit-image" in err and 'pip install "extra_attrib[demo]"' in err


def test_bundled_photos_by_default(tiny_model, tmp_path, capsys):
    pytest.importorskip("skimage.data")
    assert main(["demo", "--out", str(tmp_path / "d.png"), *FAST]) == 0
    stdout = capsys.readouterr().out
    assert "chelsea ->" in stdout and "coffee ->" in stdout
    assert_png(tmp_path / "d.png")


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "extra_attrib", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("extra-attrib ")


# ------------------------------------------------------------------- usage errors before work (#9)


@pytest.fixture
def no_model(monkeypatch):
    """The model must not even be loaded when the arguments are bad."""

    def fail():
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(imagenet, "load_efficientnet_lite0", fail)


def run_usage_error(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_truncated_png_is_a_usage_error(no_model, photo, tmp_path, capsys):
    cut = tmp_path / "cut.png"
    cut.write_bytes(photo.read_bytes()[:400])
    err = run_usage_error(["demo", "--image", str(cut), "--out", str(tmp_path / "x.png")], capsys)
    assert f"--image {str(cut)!r}" in err and "truncated or corrupt" in err


@pytest.mark.parametrize("limit", [1000, 2000])  # above 2x the limit Pillow raises, else warns
def test_decompression_bomb_is_a_usage_error(no_model, photo, tmp_path, capsys, monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)  # the photo has 2400 pixels
    err = run_usage_error(["demo", "--image", str(photo), "--out", str(tmp_path / "x.png")], capsys)
    assert "decompression bomb" in err and "--image" in err


@pytest.mark.parametrize(
    "out, message",
    [
        ("file.txt/fig.png", "is a file, not a directory"),
        ("fig.xyz", "unknown extension '.xyz'"),
        ("fig", "unknown extension '(none)'"),
        (".", "is a directory"),
    ],
)
def test_bad_out_is_a_usage_error_before_any_work(no_model, photo, tmp_path, capsys, out, message):
    (tmp_path / "file.txt").write_text("a plain file")
    path = str(tmp_path / out)
    err = run_usage_error(["demo", "--image", str(photo), "--out", path], capsys)
    assert "--out" in err and message in err


def test_unwritable_out_is_a_usage_error(no_model, photo, tmp_path, capsys):
    import os

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as a user who can write anywhere (root)")
    err = run_usage_error(["demo", "--image", str(photo), "--out", str(locked / "f.png")], capsys)
    assert "not writable" in err


@pytest.mark.parametrize("dpi", ["5000", "0", "nan", "inf"])
def test_dpi_is_bounded(no_model, dpi, capsys):
    assert main(["demo", "--dpi", dpi]) == 2
    assert "--dpi" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--dpi"):
        _demo.DemoSettings(dpi=float(dpi)).check(224)


def test_sixteen_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    grey = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    path = tmp_path / "grey16.png"
    Image.fromarray(grey).save(path)
    rgb = imagenet.load_image(str(path))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    np.testing.assert_allclose(rgb[..., 0], grey / 65535 * 255, atol=0.51)
    assert (rgb == 255).mean() < 0.01


def test_float_and_wide_integer_arrays_are_scaled():
    unit = np.linspace(0, 1, 12).reshape(3, 4)
    np.testing.assert_array_equal(imagenet.as_rgb_uint8(unit)[..., 1], np.round(unit * 255))
    wide = unit * 1000 - 200  # floats outside [0, 1]: stretched from min to max
    np.testing.assert_array_equal(imagenet.as_rgb_uint8(wide)[..., 2], np.round(unit * 255))
    as_int = (unit * 65535).astype(np.int32)  # 16-bit data read by Pillow as int32
    np.testing.assert_allclose(imagenet.as_rgb_uint8(as_int)[..., 0], unit * 255, atol=0.51)
    with pytest.raises(ValueError, match="NaN"):
        imagenet.as_rgb_uint8(np.full((2, 2), np.nan))


def test_demo_scores_are_the_package_scores():
    from extra_attrib._targets import score_function

    model = TinyClassifier().eval()
    x = torch.rand(2, 3, 224, 224)
    for score in _demo.SCORES:
        torch.testing.assert_close(
            _demo.scored_model(model, score)(x), score_function(score)(model(x))
        )
    with pytest.raises(ValueError, match="--score"):
        _demo.scored_model(model, "logit")


@pytest.mark.parametrize("score", ["raw", "softmax", "log_softmax"])
def test_the_scored_model_of_the_demo_and_cli_runs_incrementally_and_exactly(score):
    # The function the demo and `extra-attrib explain` explain: until #30's second session its
    # score checks refused torch.fx's proxy, so every demo and CLI run was silently dense.
    from extra_attrib import TiledOcclusion

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).double()
    f = _demo.scored_model(model.eval(), score)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    tiled = TiledOcclusion(f)
    dense = tiled.attribute(x, target=[1, 3], window=8, k=2, engine="dense")
    fast = tiled.attribute(x, target=[1, 3], window=8, k=2, engine="incremental")
    assert tiled.last_engine == "incremental", tiled.last_engine_reason
    torch.testing.assert_close(fast, dense, rtol=0, atol=1e-12)
    # Outside tracing the score still checks what it is given.
    if score != "raw":

        class Dict(nn.Module):
            def forward(self, x):
                return {"out": x}

        with pytest.raises(TypeError, match=f"score='{score}' needs a tensor output"):
            _demo.scored_model(Dict(), score)(x)
