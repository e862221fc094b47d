"""explain_dataset / open_attributions: results, targets, failures, resume, processes."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from extra_attrib import TiledOcclusion, _store, explain_dataset, open_attributions
from extra_attrib._store import StoreMismatchError
from tests._dataset_helpers import (
    ATTRIBUTE_KWARGS,
    CLASSES,
    N_ITEMS,
    CountingMethod,
    ItemsDataset,
    TinyNet,
)

pytest.importorskip("zarr")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(out, dataset=None, model=None, **kwargs):
    model = TinyNet().eval() if model is None else model
    method = CountingMethod(TiledOcclusion(model))
    options = dict(ATTRIBUTE_KWARGS, batch_size=3, dtype=torch.float64, show_progress=False)
    options.update(kwargs)
    summary = explain_dataset(
        method, ItemsDataset() if dataset is None else dataset, str(out), **options
    )
    return summary, method


def reference(dataset, target_of):
    """Each item attributed on its own with TiledOcclusion, straight from the definition's code."""
    model = TinyNet().eval()
    rows = []
    for i in range(len(dataset)):
        x, label = dataset[i]
        with torch.no_grad():
            outputs = model(x[None])
        t = target_of(outputs, label)
        attr = TiledOcclusion(model).attribute(x[None], target=t, **ATTRIBUTE_KWARGS)[0]
        rows.append((attr, t, float(outputs[0, t])))
    return rows


def assert_store_equals(path, rows, done=None):
    store = open_attributions(path)
    for i, (attr, t, score) in enumerate(rows):
        if done is not None and i not in done:
            continue
        assert store.done[i], i
        torch.testing.assert_close(store.item(i), attr, rtol=1e-10, atol=1e-12)
        assert store.targets[i] == t
        assert store.scores[i] == pytest.approx(score, rel=1e-12)


def test_uninterrupted_run_equals_each_item_attributed_alone(tmp_path):
    summary, method = run(tmp_path / "s.zarr")
    assert (summary.done, summary.failed, summary.skipped, summary.total) == (
        N_ITEMS,
        0,
        0,
        N_ITEMS,
    )
    assert summary.complete and method.items == N_ITEMS
    rows = reference(ItemsDataset(), lambda out, label: int(out.argmax()))
    assert_store_equals(tmp_path / "s.zarr", rows)
    store = open_attributions(tmp_path / "s.zarr")
    assert store.attributions.shape == (N_ITEMS, 2, 8, 8)
    # blocks of ceil(10 / MIN_BLOCKS) items, one chunk each (a shard if the block were large)
    assert store.attributions.chunks == (2, 2, 8, 8) and store.metadata["block"] == 2
    assert store.attributions.dtype == np.float64
    assert store.paths is None and store.errors == {}
    fp = store.metadata["fingerprint"]
    assert fp["N"] == N_ITEMS and fp["target"] == "predicted"
    assert fp["arguments"]["k"] == [1, 2, 2] and fp["arguments"]["window"] == [2, 4, 4]
    assert fp["model"]["class"].endswith("TinyNet")
    assert set(store.metadata["versions"]) >= {"torch", "captum", "zarr", "extra_attrib"}


@pytest.mark.parametrize("form", ["predicted", "label", "int", "callable"])
def test_every_target_form(tmp_path, form):
    seen = {}

    def lowest(outputs, labels):
        seen["labels"] = labels
        return outputs.argmin(dim=1)

    target, target_of = {
        "predicted": ("predicted", lambda out, label: int(out.argmax())),
        "label": ("label", lambda out, label: label),
        "int": (2, lambda out, label: 2),
        "callable": (lowest, lambda out, label: int(out.argmin())),
    }[form]
    summary, _ = run(tmp_path / "s.zarr", target=target)
    assert summary.complete
    assert_store_equals(tmp_path / "s.zarr", reference(ItemsDataset(), target_of))
    if form == "callable":
        assert seen["labels"].tolist() == [i % CLASSES for i in range(9, 10)]  # last batch


def test_callable_target_without_labels_gets_none(tmp_path):
    got = []

    def first(outputs, labels):
        got.append(labels)
        return torch.zeros(outputs.shape[0], dtype=torch.long)

    summary, _ = run(tmp_path / "s.zarr", dataset=ItemsDataset(with_labels=False), target=first)
    assert summary.complete and got and all(labels is None for labels in got)
    assert (open_attributions(tmp_path / "s.zarr").targets == 0).all()


@pytest.mark.parametrize(
    "target, match",
    [
        ("label", "needs a dataset yielding"),
        (CLASSES, "outside the model's 3 outputs"),
        (lambda out, labels: out.argmax(1).float(), "integer class indices"),
    ],
)
def test_bad_targets_are_errors_not_item_failures(tmp_path, target, match):
    dataset = ItemsDataset(with_labels=False) if target == "label" else ItemsDataset()
    with pytest.raises(ValueError, match=match):
        run(tmp_path / "s.zarr", dataset=dataset, target=target)
    assert not (tmp_path / "s.zarr").exists()  # a run that fails before any item leaves none


def test_corrupt_and_failing_items_are_recorded_and_the_rest_completes(tmp_path):
    dataset = ItemsDataset(corrupt={3}, nan={7})
    summary, method = run(tmp_path / "s.zarr", dataset=dataset)
    assert (summary.done, summary.failed) == (N_ITEMS - 2, 2) and not summary.complete
    store = open_attributions(tmp_path / "s.zarr")
    assert store.errors == {
        3: "OSError: item 3 is corrupt",
        7: "ValueError: the model refuses NaN inputs",
    }
    assert store.failed.tolist() == [i in (3, 7) for i in range(N_ITEMS)]
    assert store.targets[3] == -1 and np.isnan(store.scores[3])
    with pytest.raises(ValueError, match="item 3 is not done.*corrupt"):
        store.item(3)
    rows = reference(ItemsDataset(), lambda out, label: int(out.argmax()))
    assert_store_equals(tmp_path / "s.zarr", rows, done=set(range(N_ITEMS)) - {3, 7})
    # the files are repaired: a resume computes only those two and clears their failures
    summary, method = run(tmp_path / "s.zarr")
    assert (summary.done, summary.failed, summary.skipped) == (N_ITEMS, 0, N_ITEMS - 2)
    assert method.items == 2
    store = open_attributions(tmp_path / "s.zarr")
    assert store.errors == {} and not store.failed.any()
    assert_store_equals(tmp_path / "s.zarr", rows)


def test_item_of_another_shape_is_a_failure(tmp_path):
    class Mixed(ItemsDataset):
        def __getitem__(self, index):
            x, label = super().__getitem__(index)
            return (x[:, :4], label) if index == 5 else (x, label)

    summary, _ = run(tmp_path / "s.zarr", dataset=Mixed())
    assert summary.failed == 1
    assert "shape (2, 4, 8)" in open_attributions(tmp_path / "s.zarr").errors[5]


def test_a_wrong_setting_raises_instead_of_failing_every_item(tmp_path):
    with pytest.raises(RuntimeError, match="setting is probably wrong.*windw"):
        run(tmp_path / "s.zarr", windw=3)
    assert not (tmp_path / "s.zarr").exists()  # a run that fails before any item leaves none


class Crash(BaseException):
    """Stands for a kill: not an Exception, so nothing records it as an item failure."""


@pytest.mark.parametrize("crash_at_call", [1, 8, 15, 27])
def test_crash_then_resume_equals_uninterrupted_without_recomputing(tmp_path, crash_at_call):
    model = TinyNet().eval()

    def crash(module, args):
        if module.calls + 1 == crash_at_call:
            raise Crash()

    model.register_forward_pre_hook(crash)
    with pytest.raises(Crash):
        run(tmp_path / "s.zarr", model=model)
    if crash_at_call == 1:  # the first call checks the model's output, before the store exists
        assert not (tmp_path / "s.zarr").exists()
        before = np.zeros(N_ITEMS, dtype=bool)
    else:
        before = open_attributions(tmp_path / "s.zarr").done
    assert before.sum() < N_ITEMS
    summary, method = run(tmp_path / "s.zarr")
    assert summary.complete and summary.skipped == before.sum()
    assert method.items == N_ITEMS - before.sum()  # done items are not recomputed
    _, plain = run(tmp_path / "plain.zarr")
    fresh, resumed = (
        open_attributions(tmp_path / "plain.zarr"),
        open_attributions(tmp_path / "s.zarr"),
    )
    np.testing.assert_allclose(
        resumed.attributions[:], fresh.attributions[:], rtol=1e-10, atol=1e-12
    )
    np.testing.assert_array_equal(resumed.targets, fresh.targets)
    np.testing.assert_allclose(resumed.scores, fresh.scores, rtol=1e-12)


def test_sigkill_half_way_then_resume(tmp_path):
    out = str(tmp_path / "s.zarr")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "tests._dataset_helpers", out, "--kill-after", "16"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr
    before = open_attributions(out).done
    assert 0 < before.sum() < N_ITEMS
    summary, method = run(out)
    assert summary.complete and method.items == N_ITEMS - before.sum()
    assert_store_equals(out, reference(ItemsDataset(), lambda out, label: int(out.argmax())))


def test_torchrun_two_processes_equal_one(tmp_path):
    one, two = str(tmp_path / "one.zarr"), str(tmp_path / "two.zarr")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    single = subprocess.run(
        [sys.executable, "-m", "tests._dataset_helpers", one],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "tests._dataset_helpers",
            two,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # blocks of 2 items are shared out: rank 0 has blocks 0, 2, 4 and rank 1 blocks 1, 3
    assert "rank 0 computed 6 items" in proc.stdout and "rank 1 computed 4 items" in proc.stdout
    assert proc.stdout.count(f"{N_ITEMS}/{N_ITEMS} done") == 2
    a, b = open_attributions(one), open_attributions(two)
    assert b.done.all()
    np.testing.assert_allclose(b.attributions[:], a.attributions[:], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(b.targets, a.targets)
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"k": 1}, "arguments"),
        ({"model": "other weights"}, "model"),
        ({"target": "label"}, "target"),
        ({"dataset": ItemsDataset(n=N_ITEMS + 1)}, "N"),
        ({"dtype": torch.float32}, "dtype"),
    ],
)
def test_mismatched_settings_are_refused(tmp_path, change, message):
    out = tmp_path / "s.zarr"
    run(out, dataset=ItemsDataset(corrupt={4}))
    before = open_attributions(out)
    kwargs = dict(change)
    if kwargs.pop("model", None):
        kwargs["model"] = TinyNet(seed=1).eval()
    with pytest.raises(StoreMismatchError, match=rf"other settings(.|\n)*{message}: "):
        run(out, **kwargs)
    after = open_attributions(out)  # untouched
    np.testing.assert_array_equal(after.done, before.done)
    assert after.errors == before.errors
    # resume=False starts again
    summary, method = run(out, resume=False, **kwargs)
    assert summary.skipped == 0 and method.items == summary.total


def test_store_of_something_else_is_refused(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_array(
        "x", shape=(2,), dtype="int8"
    )
    with pytest.raises(ValueError, match="did not make"):
        run(tmp_path / "other.zarr")


def test_dataset_of_volumes(tmp_path):
    shape = (1, 6, 8, 4)
    dataset = ItemsDataset(n=4, shape=shape)
    model = TinyNet(shape=shape).eval()
    method = TiledOcclusion(model)
    summary = explain_dataset(
        method,
        dataset,
        str(tmp_path / "v.zarr"),
        batch_size=2,
        dtype=torch.float64,
        show_progress=False,
        window=(1, 2, 4, 2),
        k=(1, 2, 2, 1),
    )
    assert summary.complete
    store = open_attributions(tmp_path / "v.zarr")
    assert store.attributions.shape == (4, *shape) and store.attributions.chunks == (1, *shape)
    assert store.metadata["block"] == 1
    for i in range(4):
        x = dataset[i][0][None]
        t = int(model(x).argmax())
        expected = TiledOcclusion(model).attribute(
            x, target=t, window=(1, 2, 4, 2), k=(1, 2, 2, 1)
        )[0]
        torch.testing.assert_close(store.item(i), expected, rtol=1e-10, atol=1e-12)


def test_paths_attribute_is_stored(tmp_path):
    dataset = ItemsDataset(n=3)
    dataset.paths = [f"img_{i}.png" for i in range(3)]
    run(tmp_path / "s.zarr", dataset=dataset)
    assert open_attributions(tmp_path / "s.zarr").paths == ["img_0.png", "img_1.png", "img_2.png"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"batch_size": 0}, ValueError, "batch_size=0 must be at least 1"),
        ({"batch_size": 2.0}, TypeError, "batch_size=2.0 must be an int"),
        ({"num_workers": -1}, ValueError, "num_workers=-1"),
        ({"target": "best"}, ValueError, "target='best' must be"),
        ({"target": -1}, ValueError, "target=-1 must be a non-negative"),
        ({"target": 1.5}, TypeError, "target=1.5"),
        ({"dtype": torch.int32}, TypeError, "dtype=torch.int32 must be a floating"),
        ({"dataset": ItemsDataset(n=0)}, ValueError, "dataset is empty"),
        ({"dataset": ItemsDataset(n=2, corrupt={0, 1})}, ValueError, "none of its 2 items"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        run(tmp_path / "s.zarr", **kwargs)


def test_open_attributions_of_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no store"):
        open_attributions(tmp_path / "missing.zarr")


def test_fingerprint_is_stable_and_address_free():
    model = TinyNet().eval()
    a = _store.fingerprint(
        TiledOcclusion(model),
        {"window": 4, "baselines": torch.ones(2), "f": len, "o": object()},
        "predicted",
        5,
        (2, 8, 8),
        torch.float32,
    )
    b = _store.fingerprint(
        TiledOcclusion(TinyNet().eval()),
        {"window": 4, "baselines": torch.ones(2), "f": len, "o": object()},
        "predicted",
        5,
        (2, 8, 8),
        torch.float32,
    )
    assert _store.differences(a, b) == []
    c = _store.fingerprint(
        TiledOcclusion(model),
        {"window": 4, "baselines": torch.zeros(2), "f": len, "o": object()},
        "predicted",
        5,
        (2, 8, 8),
        torch.float32,
    )
    assert [line.split(":")[0] for line in _store.differences(a, c)] == ["arguments"]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(1, 600), min_size=1, max_size=4),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(1, 300),
)
def test_attribution_chunks_make_one_file_per_block(shape, itemsize, block):
    chunks, shards = _store.attribution_chunks(shape, itemsize, block)
    item_bytes = int(np.prod(shape)) * itemsize
    if item_bytes > _store.MAX_CHUNK_BYTES:  # a large item: a shard of its own, smaller chunks
        assert shards == (1, *shape)
        assert all(s % c == 0 for s, c in zip(shards, chunks))
        assert np.prod(chunks) * itemsize <= _store.MAX_CHUNK_BYTES or max(chunks[1:]) == 1
        return
    assert (shards or chunks) == (block, *shape)  # one file holds the block
    assert chunks[1:] == tuple(shape) and block % chunks[0] == 0
    assert chunks[0] == 1 or chunks[0] * item_bytes <= _store.INNER_CHUNK_BYTES


# ------------------------------------------------------------------ a store owns only what it made


def snapshot(folder):
    """Every file under ``folder`` with its bytes (what must stay untouched)."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


@pytest.mark.parametrize("resume", [True, False])
def test_a_folder_of_other_files_is_refused_and_left_alone(tmp_path, resume):
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.txt").write_text("four years of work")
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = snapshot(folder)
    with pytest.raises(ValueError, match=r"mine'? is a folder holding other files"):
        run(folder, resume=resume)
    assert snapshot(folder) == before


def test_a_plain_file_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "notes.zarr"
    out.write_text("not a store")
    with pytest.raises(ValueError, match="is an existing file"):
        run(out, resume=False)
    assert out.read_text() == "not a store"


def test_an_empty_folder_is_used_and_replacing_a_store_keeps_the_users_files(tmp_path):
    out = tmp_path / "s.zarr"
    out.mkdir()
    assert run(out)[0].complete
    (out / "README.txt").write_text("my notes about this run")
    summary, method = run(out, resume=False, dataset=ItemsDataset(corrupt={2}))
    assert summary.skipped == 0 and method.items == N_ITEMS - 1
    assert (out / "README.txt").read_text() == "my notes about this run"
    assert open_attributions(out).failed.tolist() == [i == 2 for i in range(N_ITEMS)]


CREATION_STEPS = [
    "claimed",
    "leased",
    "cleared",
    "marker",
    "array:attributions",
    "array:records",
    "array:errors",
    "array:paths",
    "paths",
]


def helper(out, *args):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "tests._dataset_helpers", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "step, again",
    [(step, again) for again in ("resume", "replace") for step in CREATION_STEPS]
    + [("marker", "no-resume"), ("array:records", "no-resume")],
)
def test_sigkill_at_each_step_of_creation_then_run_again(tmp_path, step, again):
    """A real SIGKILL right after each step of creating (or replacing) the store."""
    from tests._dataset_helpers import item_paths

    (tmp_path / "neighbour.txt").write_text("not the store's")
    out = tmp_path / "s.zarr"
    args = ["--paths", "--kill-at-step", step]
    if again == "replace":  # a complete store, then a --no-resume run killed while replacing it
        assert helper(out, "--paths").returncode == 0
        args.append("--no-resume")
    proc = helper(out, *args)
    assert proc.returncode == -9, proc.stderr
    assert set(os.listdir(tmp_path)) <= {"neighbour.txt", "s.zarr"}
    if step not in ("cleared", "claimed", "leased"):  # ours and unfinished, not a stranger's
        with pytest.raises(ValueError, match="creation did not finish"):
            open_attributions(out)
    dataset = ItemsDataset()
    dataset.paths = item_paths()
    summary, method = run(out, dataset=dataset, resume=again != "no-resume")
    # killed before it cleared anything, a replacing run left the complete store as it was
    kept = again == "replace" and step in ("claimed", "leased")
    assert summary.complete and summary.skipped == (N_ITEMS if kept else 0)
    assert method.items == (0 if kept else N_ITEMS)
    assert_store_equals(out, reference(ItemsDataset(), lambda o, label: int(o.argmax())))
    assert open_attributions(out).paths == item_paths()
    assert not (out / _store.LEASE_NAME).exists()  # the killed run's lease was taken over
    assert sorted(os.listdir(tmp_path)) == ["neighbour.txt", "s.zarr"]
    assert (tmp_path / "neighbour.txt").read_text() == "not the store's"


# ------------------------------------------------------------------ the item list is a setting


def test_a_changed_item_list_is_refused(tmp_path):
    from tests._dataset_helpers import item_paths

    dataset = ItemsDataset()
    dataset.paths = item_paths()
    run(tmp_path / "s.zarr", dataset=dataset)
    shifted = ItemsDataset()
    shifted.paths = item_paths()[:3] + item_paths()[4:] + ["new_item.pt"]
    with pytest.raises(StoreMismatchError, match=r"another item list(.|\n)*item_003.pt"):
        run(tmp_path / "s.zarr", dataset=shifted)
    assert open_attributions(tmp_path / "s.zarr").paths == item_paths()


def test_other_items_without_paths_are_refused(tmp_path):
    run(tmp_path / "s.zarr")
    with pytest.raises(StoreMismatchError, match="items"):
        run(tmp_path / "s.zarr", dataset=ItemsDataset(seed=5))


# ------------------------------------------------------------------ what a function reaches


def softmax_of(model):
    return lambda x: model(x).softmax(1)


def log_softmax_of(model):
    return lambda x: model(x).log_softmax(1)


class Hidden:
    """A forward function whose model cannot be reached (no __dict__): opaque."""

    __slots__ = ("_model",)

    def __init__(self, model):
        self._model = model

    def __call__(self, x):
        return self._model(x)


def run_function(out, forward, **kwargs):
    options = dict(ATTRIBUTE_KWARGS, batch_size=5, dtype=torch.float64, show_progress=False)
    options.update(kwargs)
    method = CountingMethod(TiledOcclusion(forward))
    return explain_dataset(method, ItemsDataset(), str(out), **options), method


def test_a_function_wrapped_model_with_other_weights_is_refused(tmp_path):
    out = tmp_path / "s.zarr"
    run_function(out, softmax_of(TinyNet().eval()))
    summary, method = run_function(out, softmax_of(TinyNet().eval()))  # same weights: resumes
    assert summary.skipped == N_ITEMS and method.items == 0
    with pytest.raises(StoreMismatchError, match="model"):
        run_function(out, softmax_of(TinyNet(seed=1).eval()))
    with pytest.raises(StoreMismatchError, match="model"):  # another function, same model
        run_function(out, log_softmax_of(TinyNet().eval()))


def test_an_opaque_function_is_announced_and_checked_by_its_output(tmp_path):
    out = tmp_path / "s.zarr"
    with pytest.warns(UserWarning, match="cannot be fingerprinted"):
        run_function(out, Hidden(TinyNet().eval()))
    assert "cannot be fingerprinted" in open_attributions(out).metadata["notes"][0]
    summary, _ = run_function(out, Hidden(TinyNet().eval()))
    assert summary.skipped == N_ITEMS
    with pytest.raises(StoreMismatchError, match="clean output on item 0 differs"):
        run_function(out, Hidden(TinyNet(seed=1).eval()))


class FileItems(torch.utils.data.Dataset):
    """Items read from ``.pt`` files, with ``paths``: a rewritten file is a changed item."""

    def __init__(self, folder):
        self.paths = sorted(str(p) for p in folder.glob("*.pt"))

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return torch.load(self.paths[index])


def test_a_rewritten_probe_item_is_named_not_blamed_on_the_model(tmp_path):
    # An opaque model is checked on resume by its clean output on item 0; where item 0's file
    # was rewritten, the refusal names that file instead of suggesting other weights.
    folder = tmp_path / "items"
    folder.mkdir()
    data = ItemsDataset(with_labels=False)
    for i in range(4):
        torch.save(data[i], folder / f"{i}.pt")
    out = tmp_path / "s.zarr"
    options = dict(ATTRIBUTE_KWARGS, batch_size=2, dtype=torch.float64, show_progress=False)
    with pytest.warns(UserWarning, match="cannot be fingerprinted"):
        explain_dataset(
            TiledOcclusion(Hidden(TinyNet().eval())), FileItems(folder), str(out), **options
        )
    torch.save(data[0] + 1.0, folder / "0.pt")
    later = time.time() + 5
    os.utime(folder / "0.pt", (later, later))
    with pytest.raises(StoreMismatchError, match=r"item 0's file .*0\.pt changed since") as error:
        explain_dataset(
            TiledOcclusion(Hidden(TinyNet().eval())), FileItems(folder), str(out), **options
        )
    assert "other weights cannot be ruled out" in str(error.value)


# ------------------------------------------------------------------ damage is found


def attribution_files(out):
    folder = os.path.join(str(out), "attributions", "c")
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs)


@pytest.mark.parametrize("damage", ["delete", "truncate", "records"])
def test_damaged_done_items_are_reported_and_computed_again(tmp_path, damage):
    out = tmp_path / "s.zarr"
    run(out)
    rows = reference(ItemsDataset(), lambda o, label: int(o.argmax()))
    if damage == "records":
        victim = sorted(
            os.path.join(r, f)
            for r, _, fs in os.walk(os.path.join(str(out), "records", "c"))
            for f in fs
        )[1]
    else:
        victim = attribution_files(out)[1]  # the shard of block 1: items 2 and 3
    if damage == "delete":
        os.remove(victim)
    else:
        data = open(victim, "rb").read()
        open(victim, "wb").write(data[: len(data) // 2])
    if damage != "records":
        with pytest.warns(UserWarning, match="2 items marked done are missing or unreadable"):
            store = open_attributions(out)
        assert sorted(store.damaged) == [2, 3] and not store.done[2] and store.done[4]
        with pytest.raises(ValueError, match="item 2 is not done .marked done, but"):
            store.item(2)
        quick = open_attributions(out, verify=False)
        with pytest.raises(ValueError, match="marked done but its attribution is"):
            quick.item(3)
    with pytest.warns(UserWarning, match="computing them again|computed again"):
        summary, method = run(out)
    assert summary.complete and method.items == 2
    assert summary.damaged == (0 if damage == "records" else 2)
    assert_store_equals(out, rows)
    store = open_attributions(out)
    assert store.damaged == {}


def test_a_result_that_is_all_nan_is_a_failure_not_a_missing_chunk(tmp_path):
    class NaNMethod(CountingMethod):
        def attribute(self, inputs, **kwargs):
            attr = super().attribute(inputs, **kwargs)
            attr[0] = float("nan")
            return attr

    method = NaNMethod(TiledOcclusion(TinyNet().eval()))
    options = dict(ATTRIBUTE_KWARGS, batch_size=5, dtype=torch.float64, show_progress=False)
    summary = explain_dataset(method, ItemsDataset(), str(tmp_path / "s.zarr"), **options)
    assert summary.failed == 2  # the first item of each batch of 5
    assert "NaN for every element" in open_attributions(tmp_path / "s.zarr").errors[0]


# ------------------------------------------------------------------ equal settings are equal


@pytest.mark.parametrize(
    "spelling",
    [
        {"window": (2, 4, 4), "k": (1, 2, 2)},
        {"window": (3, 4, 4), "k": (1, 2, 2)},  # 3 is clipped to the 2 channels
        {"score": "raw", "baselines": 0},
        {"baselines": 0.0, "engine": "dense"},
        {"target": np.int64(2)},
        {"target": torch.tensor(2)},
    ],
)
def test_equivalent_settings_resume(tmp_path, spelling):
    kwargs = dict(spelling)
    target = kwargs.pop("target", 2)
    out = tmp_path / "s.zarr"
    run(out, target=2)
    summary, method = run(out, target=target, **kwargs)
    assert summary.skipped == N_ITEMS and method.items == 0


# ------------------------------------------------------------------ labels


class FloatLabels(ItemsDataset):
    def __init__(self, label, **kwargs):
        super().__init__(**kwargs)
        self.label = label

    def __getitem__(self, index):
        x, _ = super().__getitem__(index)
        return x, self.label if index == 4 else 1.0


def test_a_float_label_is_an_error_not_a_truncated_class(tmp_path):
    with pytest.raises(ValueError, match=r"label 1.7 is not a whole number"):
        run(tmp_path / "a.zarr", dataset=FloatLabels(1.7), target="label")
    summary, _ = run(tmp_path / "b.zarr", dataset=FloatLabels(2.0), target="label")
    assert summary.complete
    assert open_attributions(tmp_path / "b.zarr").targets.tolist() == [
        2 if i == 4 else 1 for i in range(N_ITEMS)
    ]
    # float labels are not a problem when they are not the target
    assert run(tmp_path / "c.zarr", dataset=FloatLabels(1.7))[0].complete


# ------------------------------------------------------------------ small items share files


class Instant:
    """A method that costs nothing (random values: zarr skips chunks equal to the fill)."""

    def __init__(self):
        self.forward_func = lambda x: x[:, :3]

    def attribute(self, inputs, target, **kwargs):
        return torch.rand_like(inputs) + 1


def test_small_items_make_at_most_two_files_per_hundred(tmp_path):
    class Small(torch.utils.data.Dataset):
        def __len__(self):
            return 3000

        def __getitem__(self, i):
            return torch.full((4,), float(i))

    out = tmp_path / "s.zarr"
    summary = explain_dataset(Instant(), Small(), str(out), batch_size=64, show_progress=False)
    assert summary.complete
    files = [f for _, _, fs in os.walk(out) for f in fs]
    assert len(files) <= 2 * 3000 / 100, len(files)
    store = open_attributions(out)
    assert store.done.all() and not np.isnan(store.attributions[:]).any()


def test_a_url_store_owns_only_what_it_made():
    """fsspec URLs take the same path (memory:// stands for s3:// and friends)."""
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    memory.pipe("/theirs/thesis.txt", b"four years")
    with pytest.raises(ValueError, match="is a folder holding other files"):
        run("memory://theirs", resume=False)
    assert memory.cat_file("/theirs/thesis.txt") == b"four years"
    assert run("memory://ours/s.zarr")[0].complete
    summary, method = run("memory://ours/s.zarr")
    assert summary.skipped == N_ITEMS and method.items == 0
    summary, method = run("memory://ours/s.zarr", resume=False)
    assert summary.skipped == 0 and method.items == N_ITEMS
    assert open_attributions("memory://ours/s.zarr").done.all()
