"""``extra-attrib explain`` and ``extra-attrib show`` end to end on small PNGs."""

import os
import time

import numpy as np
import pytest
import torch

from extra_attrib import TiledOcclusion, open_attributions
from extra_attrib.__main__ import main
from extra_attrib._explain_cli import image_files
from tests._dataset_helpers import factory

pytest.importorskip("zarr")
Image = pytest.importorskip("PIL.Image")
MODEL = "tests._dataset_helpers:factory"


@pytest.fixture
def images(tmp_path):
    """Four good PNGs (one in a sub-folder, one not 16 x 16) and a corrupt one."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name, size in [("b.png", (16, 16)), ("a.png", (20, 24)), ("sub/c.png", (16, 16))]:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / "grey.jpg")
    (folder / "notes.txt").write_text("not an image, not listed")
    (folder / "sub" / "broken.png").write_bytes(b"not a png at all")
    return folder


def explain(capsys, *args):
    code = main(["explain", *map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def test_folders_are_searched_recursively_in_sorted_order(images):
    files = image_files([str(images), str(images / "b.png")])
    names = [os.path.relpath(f, images) for f in files]
    assert names == ["a.png", "b.png", "grey.jpg", "sub/broken.png", "sub/c.png", "b.png"]


def test_explain_end_to_end_with_a_corrupt_image(images, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    command = (images, "--out", out, "--model", MODEL, "--window", 8, "--k", 2)
    command += ("--score", "raw", "--batch-size", 2)
    code, stdout, err = explain(capsys, *command)
    assert code == 1, err
    assert "Traceback" not in stdout + err
    lines = stdout.strip().splitlines()
    assert lines[-1].startswith("extra-attrib explain: 4 done, 1 failed of 5 (0 already done)")
    assert any("broken.png: UnidentifiedImageError" in line for line in lines)
    store = open_attributions(out)
    assert [os.path.relpath(p, images) for p in store.paths] == [
        "a.png",
        "b.png",
        "grey.jpg",
        "sub/broken.png",
        "sub/c.png",
    ]
    assert store.done.tolist() == [True, True, True, False, True]
    assert store.metadata["info"]["preprocess"] == "custom"
    # the stored maps are TiledOcclusion's of the transformed images, for the predicted class
    model, transform = factory()
    for i in (0, 2, 4):
        with Image.open(store.paths[i]) as image:
            x = transform(image)[None]
        target = int(model(x).argmax())
        expected = TiledOcclusion(model).attribute(x, target=target, window=8, k=2, baselines=0.0)[
            0
        ]
        assert store.targets[i] == target
        torch.testing.assert_close(store.item(i), expected, rtol=1e-5, atol=1e-5)

    # same command again: nothing recomputed, same exit status
    code, stdout, _ = explain(capsys, *command)
    assert code == 1 and "4 done, 1 failed of 5 (4 already done)" in stdout

    # other settings on the same store: refused, exit 2, store untouched
    code, _, err = explain(
        capsys, images, "--out", out, "--model", MODEL, "--window", 8, "--k", 4, "--score", "raw"
    )
    assert code == 2 and "other settings" in err and "Traceback" not in err
    assert open_attributions(out).done.sum() == 4

    # show: the 3-panel figure of a done item; a failed item or a bad index is an error
    fig = tmp_path / "fig.png"
    assert main(["show", str(out), "--index", "4", "--out", str(fig)]) == 0
    assert fig.stat().st_size > 0
    assert main(["show", str(out), "--index", "3", "--out", str(fig)]) == 1
    assert main(["show", str(out), "--index", "5", "--out", str(fig)]) == 2
    assert main(["show", str(tmp_path / "none.zarr"), "--index", "0", "--out", str(fig)]) == 2
    _, err = capsys.readouterr()
    assert "item 3 is not done: UnidentifiedImageError" in err


@pytest.mark.parametrize("method", ["tiled", "occlusion", "fusiongrad-saliency"])
def test_every_method_completes_with_exit_status_0(images, tmp_path, capsys, method):
    code, stdout, err = explain(
        capsys,
        images / "sub" / "c.png",
        images / "b.png",
        "--out",
        tmp_path / "s.zarr",
        "--model",
        MODEL,
        "--method",
        method,
        "--window",
        8,
        "--k",
        2,
        "--target",
        1,
        "--perturbations-per-eval",
        4,
    )
    assert code == 0, err
    assert stdout.strip().splitlines()[-1].startswith("extra-attrib explain: 2 done, 0 failed of 2")
    store = open_attributions(tmp_path / "s.zarr")
    assert store.targets.tolist() == [1, 1]
    assert store.metadata["info"]["method"] == method
    assert np.abs(store.attributions[:]).sum() > 0


def test_memory_budget_reaches_tiled_occlusion_and_a_resume_may_change_it(
    images, tmp_path, capsys, monkeypatch
):
    from extra_attrib import TiledOcclusion

    seen = []
    original = TiledOcclusion.attribute

    def spy(self, inputs, *args, **kwargs):
        seen.append(kwargs.get("memory_budget"))
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(TiledOcclusion, "attribute", spy)
    out = tmp_path / "s.zarr"
    paths = (images / "b.png", images / "sub" / "c.png")
    common = ("--out", out, "--model", MODEL, "--window", 8, "--k", 2, "--batch-size", 1)
    assert explain(capsys, *paths, *common, "--memory-budget", 3)[0] == 0
    assert seen == [3 * 2**20] * 2
    # How the work is batched is not what is computed: a resume may change it.
    code, stdout, err = explain(capsys, *paths, *common, "--memory-budget", 512)
    assert code == 0 and "2 done, 0 failed of 2" in stdout, err


def test_show_without_the_image_draws_the_map(images, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    copy = tmp_path / "copy.png"
    copy.write_bytes((images / "b.png").read_bytes())
    assert explain(capsys, copy, "--out", out, "--model", MODEL, "--window", 8, "--k", 2)[0] == 0
    copy.unlink()
    fig = tmp_path / "fig.png"
    assert main(["show", str(out), "--index", "0", "--out", str(fig)]) == 0 and fig.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--window", "8", "--k", "3"], "--window 8 must be divisible by --k 3"),
        (["--model", "tests._dataset_helpers"], "must be MODULE:FACTORY"),
        (["--model", "tests._dataset_helpers:nothing"], "has no attribute 'nothing'"),
        (["--model", "no_such_module_xyz:f"], "No module named"),
        (
            ["--method", "occlusion", "--memory-budget", "64"],
            "--memory-budget 64 applies to --method tiled only, not --method occlusion",
        ),
        (["--memory-budget", "0"], "--memory-budget"),
    ],
)
def test_bad_options_exit_2_without_traceback(images, tmp_path, capsys, args, message):
    code, stdout, err = explain(
        capsys,
        images,
        "--out",
        tmp_path / "s.zarr",
        *(["--model", MODEL] if "--model" not in args else []),
        *args,
    )
    assert code == 2 and message in err and "Traceback" not in err


def test_missing_path_and_bad_target_exit_2(tmp_path, capsys):
    code, _, err = explain(capsys, tmp_path / "nothing", "--out", tmp_path / "s.zarr")
    assert code == 2 and "neither a file nor a folder" in err
    code, _, err = explain(capsys, tmp_path, "--out", tmp_path / "s.zarr", "--target", "best")
    assert code == 2 and "'best' must be 'predicted' or a class index" in err


# ----------------------------------------------------------- outputs checked first (#19, #21)


def one_line_exit_2(code, err):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture
def no_model(monkeypatch):
    """Nothing may be loaded or computed when an output is bad."""
    from extra_attrib import imagenet
    from tests import _dataset_helpers

    def fail(*args, **kwargs):
        raise AssertionError("work started before the outputs were checked")

    monkeypatch.setattr(imagenet, "load_efficientnet_lite0", fail)
    monkeypatch.setattr(_dataset_helpers, "factory", fail)


def files_under(folder):
    return {
        os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
        for r, _, fs in os.walk(folder)
        for f in fs
    }


def test_the_input_folder_as_out_is_refused_and_untouched(images, capsys, no_model):
    before = files_under(images)
    code, _, err = explain(capsys, images, "--out", images, "--model", MODEL)
    one_line_exit_2(code, err)
    assert "is a folder holding other files" in err and str(images) in err
    code, _, err = explain(capsys, images, "--out", images, "--model", MODEL, "--no-resume")
    one_line_exit_2(code, err)
    assert files_under(images) == before


@pytest.mark.parametrize(
    "out, message",
    [
        ("plain.txt", "is an existing file"),
        ("plain.txt/s.zarr", "is a file, not a directory"),
        ("/proc/forbidden/s.zarr", "cannot be made"),
    ],
)
def test_explain_bad_out_exits_2_before_any_work(images, tmp_path, capsys, no_model, out, message):
    (tmp_path / "plain.txt").write_text("my notes")
    code, _, err = explain(capsys, images, "--out", tmp_path / out, "--model", MODEL)
    one_line_exit_2(code, err)
    assert "--out" in err or "out=" in err
    assert message in err
    assert (tmp_path / "plain.txt").read_text() == "my notes"


@pytest.mark.parametrize(
    "out, message",
    [
        ("fig.xyz", "unknown extension '.xyz'"),
        ("plain.txt/fig.png", "is a file, not a directory"),
        ("/proc/forbidden/fig.png", "cannot be made"),
    ],
)
def test_show_bad_out_exits_2_before_reading(tmp_path, capsys, out, message):
    (tmp_path / "plain.txt").write_text("my notes")
    code = main(["show", str(tmp_path / "none.zarr"), "--index", "0", "--out", str(tmp_path / out)])
    _, err = capsys.readouterr()
    one_line_exit_2(code, err)
    assert "--out" in err and message in err


def test_demo_out_that_cannot_be_made_exits_2_before_any_work(capsys, no_model):
    code = main(["demo", "--out", "/proc/forbidden/x.png", "--no-progress"])
    _, err = capsys.readouterr()
    one_line_exit_2(code, err)
    assert "--out '/proc/forbidden/x.png'" in err and "cannot be made" in err


def test_a_replaced_file_is_refused_not_shifted(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / name)
    (folder / "b.png").write_bytes(b"corrupt")
    out = tmp_path / "s.zarr"
    command = (folder, "--out", out, "--model", MODEL, "--window", 8, "--k", 2, "--score", "raw")
    assert explain(capsys, *command)[0] == 1  # b.png failed
    before = open_attributions(out)
    (folder / "b.png").unlink()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "d.png")
    code, _, err = explain(capsys, *command)
    one_line_exit_2(code, err.replace("\n  ", " "))
    assert "another item list" in err and "b.png" in err and "d.png" in err
    after = open_attributions(out)
    assert after.paths == before.paths and after.done.tolist() == before.done.tolist()
    # --no-resume starts again with the new list
    code, stdout, _ = explain(capsys, *command, "--no-resume")
    assert code == 0 and "3 done, 0 failed of 3" in stdout
    store = open_attributions(out)
    assert [os.path.basename(p) for p in store.paths] == ["a.png", "c.png", "d.png"]
    model, transform = factory()
    for i, path in enumerate(store.paths):
        with Image.open(path) as image:
            x = transform(image)[None]
        target = int(model(x).argmax())
        expected = TiledOcclusion(model).attribute(x, target=target, window=8, k=2, baselines=0.0)
        torch.testing.assert_close(store.item(i), expected[0], rtol=1e-5, atol=1e-5)


def test_another_score_on_resume_is_refused(images, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    command = (images / "b.png", "--out", out, "--model", MODEL, "--window", 8, "--k", 2)
    assert explain(capsys, *command, "--score", "softmax")[0] == 0
    code, _, err = explain(capsys, *command, "--score", "log_softmax")
    assert code == 2 and "other settings" in err and "model" in err


class Killed(BaseException):
    """Stands for a kill during the store's creation (the API tests use real SIGKILLs)."""


@pytest.mark.parametrize("again", [[], ["--no-resume"]])
def test_a_store_killed_while_created_is_made_again(images, tmp_path, capsys, monkeypatch, again):
    from extra_attrib import _store

    def step(name):
        if name == "array:records":
            raise Killed()

    out = tmp_path / "s.zarr"
    command = (images / "b.png", "--out", out, "--model", MODEL, "--window", 8, "--k", 2)
    monkeypatch.setattr(_store, "_creation_step", step)
    with pytest.raises(Killed):
        explain(capsys, *command)
    monkeypatch.undo()
    code, stdout, err = explain(capsys, *command, *again)
    assert code == 0 and "Traceback" not in err
    assert "1 done, 0 failed of 1" in stdout


# ----------------------------------------------------------- the store's promises (#29)


def png(path, rng, size=(16, 16)):
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def test_a_16_bit_png_is_converted_not_explained_as_white():
    from extra_attrib._explain_cli import efficientnet_transform

    rng = np.random.default_rng(3)
    eight = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    sixteen = Image.fromarray(eight.astype(np.uint16) * 257)  # mode I;16, the same picture
    assert sixteen.mode == "I;16"
    expected = efficientnet_transform(Image.fromarray(eight))
    torch.testing.assert_close(efficientnet_transform(sixteen), expected, atol=1e-6, rtol=0)
    as_int = Image.fromarray(eight.astype(np.int32) * 257)  # mode I (older Pillow's 16-bit PNG)
    torch.testing.assert_close(efficientnet_transform(as_int), expected, atol=1e-6, rtol=0)
    floats = Image.fromarray(eight.astype(np.float32) / 255.0)  # mode F in [0, 1]
    torch.testing.assert_close(efficientnet_transform(floats), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mode F"):  # a range that says nothing: refused
        efficientnet_transform(Image.fromarray(eight.astype(np.float32) * 1000.0 - 7.0))


def test_exif_orientation_is_applied():
    from extra_attrib._explain_cli import efficientnet_transform

    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 3  # rotated by 180 degrees
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=100)
    with Image.open(buffer) as tagged:
        tagged.load()
        got = efficientnet_transform(tagged)
    upright = Image.fromarray(np.asarray(Image.open(buffer).convert("RGB"))[::-1, ::-1].copy())
    torch.testing.assert_close(got, efficientnet_transform(upright), atol=1e-6, rtol=0)


def test_an_image_mode_that_cannot_be_converted_is_a_failure_not_a_wrong_image(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(5)
    png(folder / "a.png", rng)
    Image.fromarray(rng.normal(size=(16, 16)).astype(np.float32) * 50).save(folder / "f.tiff")
    out = tmp_path / "s.zarr"
    from extra_attrib import _explain_cli

    dataset = _explain_cli.ImageFiles(
        [str(folder / "a.png"), str(folder / "f.tiff")], _explain_cli.efficientnet_transform
    )
    assert dataset[0].shape == (3, 224, 224)
    with pytest.raises(ValueError, match="mode F"):
        dataset[1]
    del out


def only_bad_images(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    return folder


@pytest.mark.parametrize(
    "case, message",
    [
        ("unreadable", "none of its 2 items could be loaded"),
        ("target", "--target 999"),
        ("bogus-device", "--device 'bogus'"),
        ("cuda", "--device 'cuda'"),
        ("factory-raises", "raised RuntimeError: no weights here"),
        ("factory-needs-argument", "missing 1 required positional argument"),
    ],
)
def test_failures_before_the_first_item_are_one_line_and_leave_no_store(
    images, tmp_path, capsys, case, message
):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "s.zarr"
    paths = [only_bad_images(tmp_path)] if case == "unreadable" else [images]
    args = ["--model", MODEL, "--window", "8", "--k", "2"]
    if case == "target":
        args += ["--target", "999"]
    if case == "bogus-device":
        args += ["--device", "bogus"]
    if case == "cuda":
        args += ["--device", "cuda"]
    if case == "factory-raises":
        args[1] = "tests._dataset_helpers:factory_that_raises"
    if case == "factory-needs-argument":
        args[1] = "tests._dataset_helpers:factory_with_argument"
    code, _, err = explain(capsys, *paths, "--out", out, *args)
    one_line_exit_2(code, err)
    assert message in err
    assert not out.exists()


def test_show_of_an_item_whose_chunk_is_gone_is_one_line(images, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    command = (images / "b.png", "--out", out, "--model", MODEL, "--window", 8, "--k", 2)
    assert explain(capsys, *command)[0] == 0
    for root, _, names in os.walk(out / "attributions" / "c"):
        for name in names:
            os.remove(os.path.join(root, name))
    code = main(["show", str(out), "--index", "0", "--out", str(tmp_path / "f.png")])
    _, err = capsys.readouterr()
    one_line_exit_2(code, err)
    assert "missing" in err


def test_disk_full_during_explain_is_one_line(images, tmp_path, capsys, monkeypatch):
    import errno

    from extra_attrib import _store

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_store.ItemWriter, "write", full)
    out = tmp_path / "s.zarr"
    code, _, err = explain(capsys, images, "--out", out, "--model", MODEL, "--window", 8, "--k", 2)
    one_line_exit_2(code, err)
    assert "No space left on device" in err


def test_a_file_name_that_is_not_utf8_is_kept_and_shown(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(6)
    png(folder / "a.png", rng)
    odd = os.path.join(os.fsencode(str(folder)), b"caf\xe9.png")
    png(os.fsdecode(odd), rng)
    out = tmp_path / "s.zarr"
    command = (folder, "--out", out, "--model", MODEL, "--window", 8, "--k", 2)
    code, stdout, err = explain(capsys, *command)
    assert code == 0, err
    store = open_attributions(out)
    assert [os.fsencode(p) for p in store.paths] == [
        os.fsencode(str(folder / "a.png")),
        odd,
    ]
    assert explain(capsys, *command)[0] == 0  # resumes
    code = main(["show", str(out), "--index", "1", "--out", str(tmp_path / "f.png")])
    assert code == 0


def test_a_changed_image_under_the_same_name_is_computed_again(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for name in ("a.png", "b.png"):
        png(folder / name, rng)
    out = tmp_path / "s.zarr"
    command = (folder, "--out", out, "--model", MODEL, "--window", 8, "--k", 2, "--score", "raw")
    assert explain(capsys, *command)[0] == 0
    png(folder / "b.png", rng)
    later = time.time() + 5
    os.utime(folder / "b.png", (later, later))
    code, stdout, err = explain(capsys, *command)
    assert code == 0 and "(1 already done)" in stdout, stdout + err
    assert "changed" in err
    model, transform = factory()
    store = open_attributions(out)
    with Image.open(folder / "b.png") as image:
        x = transform(image)[None]
    target = int(model(x).argmax())
    expected = TiledOcclusion(model).attribute(x, target=target, window=8, k=2, baselines=0.0)
    torch.testing.assert_close(store.item(1), expected[0], rtol=1e-5, atol=1e-5)


def test_symlinked_subfolders_are_followed_once(tmp_path):
    rng = np.random.default_rng(8)
    real = tmp_path / "elsewhere"
    real.mkdir()
    png(real / "x.png", rng)
    folder = tmp_path / "photos"
    folder.mkdir()
    png(folder / "a.png", rng)
    os.symlink(real, folder / "linked")
    os.symlink(folder, folder / "loop")  # a cycle must not hang or repeat
    names = [os.path.relpath(f, folder) for f in image_files([str(folder)])]
    assert names == ["a.png", os.path.join("linked", "x.png")]
