"""The dataset store keeps its promises under real use (#29).

Ownership by a marker only, results within a few seconds of being computed, one writer at a
time (a lease, stale leases taken over), every setting of the method and of the function it
explains in the fingerprint, damaged side arrays repaired, odd file names and image modes.
"""

import json
import os
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

from extra_attrib import TiledOcclusion, _store, explain_dataset, open_attributions
from extra_attrib._store import StoreMismatchError
from tests._dataset_helpers import ATTRIBUTE_KWARGS, N_ITEMS, CountingMethod, ItemsDataset, TinyNet

zarr = pytest.importorskip("zarr")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = dict(ATTRIBUTE_KWARGS, batch_size=3, dtype=torch.float64, show_progress=False)


def run(out, method=None, dataset=None, **kwargs):
    method = CountingMethod(TiledOcclusion(TinyNet().eval())) if method is None else method
    options = dict(OPTIONS, **kwargs)
    dataset = ItemsDataset() if dataset is None else dataset
    return explain_dataset(method, dataset, str(out), **options), method


def snapshot(folder):
    found = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = (
                None if os.path.isdir(path) else open(path, "rb").read()
            )
    return found


def damage(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def chunk_files(out, array):
    folder = os.path.join(str(out), array, "c")
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs)


class Crash(BaseException):
    """Stands for a kill."""


# ------------------------------------------------------------------ 1. ownership by marker only


@pytest.mark.parametrize("resume", [True, False])
def test_a_folder_whose_entries_have_the_stores_names_is_refused_and_untouched(tmp_path, resume):
    folder = tmp_path / "results"
    (folder / "attributions").mkdir(parents=True)
    np.save(folder / "attributions" / "a.npy", np.arange(4.0))
    (folder / "errors").write_text("2026-12-01 something failed\n")
    (folder / "records").write_text("my records")
    before = snapshot(folder)
    with pytest.raises(ValueError, match="results'? is a folder holding other files"):
        run(folder, resume=resume)
    assert snapshot(folder) == before


@pytest.mark.parametrize("resume", [True, False])
def test_a_zarr_v2_group_with_an_attributions_array_is_refused_and_untouched(tmp_path, resume):
    folder = tmp_path / "v2.zarr"
    group = zarr.open_group(str(folder), mode="w", zarr_format=2)
    group.create_array("attributions", shape=(3,), dtype="float64")[:] = [1.0, 2.0, 3.0]
    before = snapshot(folder)
    with pytest.raises(ValueError, match="refusing"):
        run(folder, resume=resume)
    assert snapshot(folder) == before


def test_a_store_made_without_the_marker_file_by_an_earlier_version_resumes(tmp_path):
    out = tmp_path / "s.zarr"
    run(out)
    marker = out / getattr(_store, "MARKER_NAME", "no-marker")
    if marker.exists():
        marker.unlink()  # what an earlier version left: zarr.json with our attribute only
    summary, method = run(out)
    assert summary.skipped == N_ITEMS and method.items == 0


# ------------------------------------------------------------------ 2. results within the delay


class SlowSecondBatch(CountingMethod):
    """On its second batch, waits (up to 8 s) for the first batch's item to be done in the
    store, then crashes."""

    def __init__(self, out):
        super().__init__(TiledOcclusion(TinyNet().eval()))
        self.out, self.calls, self.seen_done = str(out), 0, None

    def attribute(self, inputs, **kwargs):
        self.calls += 1
        if self.calls == 2:
            deadline = time.monotonic() + 8.0
            while time.monotonic() < deadline:
                if open_attributions(self.out, verify=False).done[0]:
                    self.seen_done = time.monotonic() - (deadline - 8.0)
                    break
                time.sleep(0.1)
            raise Crash()
        return super().attribute(inputs, **kwargs)


def test_results_reach_the_store_while_a_slow_batch_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(_store, "FLUSH_SECONDS", 0.5, raising=False)
    out = tmp_path / "s.zarr"
    method = SlowSecondBatch(out)
    with pytest.raises(Crash):
        run(out, method=method, batch_size=1)  # block 0 (items 0, 1) waits for item 1
    assert method.seen_done is not None and method.seen_done < 5.0
    assert open_attributions(out).done.tolist()[:2] == [True, False]


# ------------------------------------------------------------------ 3. one writer at a time


class SecondRunInside(CountingMethod):
    """While the first run is in its first batch, another run on the same store."""

    def __init__(self, out, **second):
        super().__init__(TiledOcclusion(TinyNet().eval()))
        self.out, self.second, self.error = str(out), second, None

    def attribute(self, inputs, **kwargs):
        if self.error is None:
            self.error = "no error"
            try:
                run(self.out, **self.second)
            except Exception as err:
                self.error = err
        return super().attribute(inputs, **kwargs)


@pytest.mark.parametrize("second", [{"resume": False, "other": True}, {"resume": True}])
def test_a_second_run_is_refused_while_the_first_writes(tmp_path, second):
    from tests.test_dataset import assert_store_equals, reference

    out = tmp_path / "s.zarr"
    kwargs = dict(second)
    if kwargs.pop("other", False):
        kwargs["method"] = CountingMethod(TiledOcclusion(TinyNet(seed=3).eval()))
    method = SecondRunInside(out, **kwargs)
    summary, _ = run(out, method=method)
    assert isinstance(method.error, StoreMismatchError), method.error
    message = str(method.error)
    assert "lease" in message and f"pid {os.getpid()}" in message
    assert socket.gethostname() in message
    assert summary.complete
    assert_store_equals(out, reference(ItemsDataset(), lambda o, label: int(o.argmax())))
    assert not (out / _store.LEASE_NAME).exists()  # released at the end


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lease(out, **fields):
    lease = {
        "extra_attrib_lease": 1,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": None,
        "started": "2026-12-06T00:00:00+00:00",
        "heartbeat": time.time(),
        "token": "someone-else",
    }
    lease.update(fields)
    (out / _store.LEASE_NAME).write_text(json.dumps(lease))


@pytest.mark.parametrize(
    "holder, taken",
    [
        ({"pid": "dead"}, True),  # killed on this host
        ({"host": "elsewhere.example", "heartbeat": time.time() - 3600}, True),
        ({"host": "elsewhere.example"}, False),  # alive elsewhere (fresh heartbeat)
        ({}, False),  # this very process, another run
    ],
)
def test_a_stale_lease_is_taken_over_and_a_live_one_refused(tmp_path, holder, taken):
    out = tmp_path / "s.zarr"
    run(out, dataset=ItemsDataset(corrupt={4}))
    fields = dict(holder)
    if fields.get("pid") == "dead":
        fields["pid"] = dead_pid()
    write_lease(out, **fields)
    if taken:
        summary, method = run(out)
        assert summary.complete and method.items == 1
        assert not (out / _store.LEASE_NAME).exists()
    else:
        with pytest.raises(StoreMismatchError, match="lease"):
            run(out, resume=False)
        assert open_attributions(out).failed[4]  # untouched


def test_sigkill_leaves_a_stale_lease_that_the_next_run_takes_over(tmp_path):
    from tests.test_dataset import assert_store_equals, reference

    out = str(tmp_path / "s.zarr")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tests._dataset_helpers", out, "--kill-after", "16"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr
    assert os.path.exists(os.path.join(out, _store.LEASE_NAME))
    summary, _ = run(out)
    assert summary.complete
    assert_store_equals(out, reference(ItemsDataset(), lambda o, label: int(o.argmax())))


# ------------------------------------------------------------------ 4, 5, 6. the fingerprint


def test_method_constructor_settings_are_compared(tmp_path):
    from captum.attr import IntegratedGradients

    out = tmp_path / "s.zarr"
    net = TinyNet().eval()
    options = dict(batch_size=5, dtype=torch.float64, show_progress=False, n_steps=4)
    explain_dataset(IntegratedGradients(net), ItemsDataset(), str(out), **options)
    same = explain_dataset(
        IntegratedGradients(net, multiply_by_inputs=True), ItemsDataset(), str(out), **options
    )
    assert same.skipped == N_ITEMS  # the explicit default equals the omitted one
    with pytest.raises(StoreMismatchError, match="method"):
        explain_dataset(
            IntegratedGradients(net, multiply_by_inputs=False), ItemsDataset(), str(out), **options
        )


def test_fusiongrad_forward_function_is_compared(tmp_path):
    from captum.attr import Saliency

    from extra_attrib import FusionGrad

    net = TinyNet().eval()

    def make(score):
        f = (lambda x: net(x).softmax(1)) if score == "softmax" else lambda x: net(x).log_softmax(1)
        return FusionGrad(Saliency(f), net)

    out = tmp_path / "s.zarr"
    options = dict(batch_size=5, dtype=torch.float64, show_progress=False, n=2, m=1, std=0.1)
    explain_dataset(make("softmax"), ItemsDataset(), str(out), **options)
    with pytest.raises(StoreMismatchError, match="model"):
        explain_dataset(make("log_softmax"), ItemsDataset(), str(out), **options)


MODELS = {}
SETTINGS = types.SimpleNamespace(scale=1.0)


def forward_through_a_global(x):
    return MODELS["net"](x) * SETTINGS.scale


def test_a_model_reached_through_a_global_dict_is_fingerprinted(tmp_path):
    out = tmp_path / "s.zarr"
    MODELS["net"] = TinyNet().eval()
    try:
        run(out, method=CountingMethod(TiledOcclusion(forward_through_a_global)))
        with torch.no_grad():
            for p in MODELS["net"].parameters():
                p.mul_(1.0002)
        with pytest.raises(StoreMismatchError, match="model"):
            run(out, method=CountingMethod(TiledOcclusion(forward_through_a_global)))
        MODELS["net"] = TinyNet().eval()
        SETTINGS.scale = 2.0
        with pytest.raises(StoreMismatchError, match="model"):
            run(out, method=CountingMethod(TiledOcclusion(forward_through_a_global)))
    finally:
        MODELS.clear()
        SETTINGS.scale = 1.0


class Sealed:
    __slots__ = ("net",)

    def __init__(self, net):
        self.net = net


SEALED = Sealed(None)


def forward_through_a_sealed_global(x):
    return SEALED.net(x)


def test_a_global_that_cannot_be_followed_is_announced(tmp_path):
    SEALED.net = TinyNet().eval()
    try:
        with pytest.warns(UserWarning, match="cannot be fingerprinted"):
            run(tmp_path / "s.zarr", method=TiledOcclusion(forward_through_a_sealed_global))
    finally:
        SEALED.net = None


# ------------------------------------------------------------------ 8. damaged side arrays


def test_a_damaged_errors_chunk_is_repaired_on_resume_and_reported(tmp_path):
    out = tmp_path / "s.zarr"
    run(out, dataset=ItemsDataset(corrupt={4}))
    damage(os.path.join(str(out), "errors", "c", "2"))  # block 2: items 4 and 5
    with pytest.warns(UserWarning, match="errors"):
        store = open_attributions(out)
    assert store.failed[4] and "unreadable" in store.errors[4]
    assert [key.split("/")[0] for key in store.damaged_chunks] == ["errors"]
    with pytest.warns(UserWarning, match="errors"):
        summary, method = run(out)
    assert summary.complete and method.items == 1
    assert open_attributions(out).errors == {}


def test_a_damaged_paths_chunk_is_repaired_on_resume_and_reported(tmp_path):
    from tests._dataset_helpers import item_paths

    dataset = ItemsDataset()
    dataset.paths = item_paths()
    out = tmp_path / "s.zarr"
    run(out, dataset=dataset)
    damage(chunk_files(out, "paths")[0])
    with pytest.warns(UserWarning, match="paths"):
        store = open_attributions(out)
    assert store.paths == [None] * N_ITEMS and store.done.all()
    assert [key.split("/")[0] for key in store.damaged_chunks] == ["paths"]
    with pytest.warns(UserWarning, match="paths"):
        summary, method = run(out, dataset=dataset)
    assert summary.skipped == N_ITEMS and method.items == 0
    assert open_attributions(out).paths == item_paths()


# ------------------------------------------------------------------ 11. a duplicate removed


def test_a_removed_duplicate_is_named(tmp_path):
    a = ItemsDataset(n=3)
    a.paths = ["x.png", "y.png", "x.png"]
    run(tmp_path / "s.zarr", dataset=a)
    b = ItemsDataset(n=2)
    b.paths = ["x.png", "y.png"]
    with pytest.raises(StoreMismatchError, match=r"duplicate(.|\n)*x\.png"):
        run(tmp_path / "s.zarr", dataset=b)


# ------------------------------------------------------------------ also: reordered items


def test_items_reordered_around_an_unchanged_first_item_are_refused(tmp_path):
    run(tmp_path / "s.zarr")
    shuffled = ItemsDataset()
    order = [0, 2, 1, 4, 3, 6, 5, 8, 7, 9]
    shuffled.x = shuffled.x[order]
    with pytest.raises(StoreMismatchError, match="items"):
        run(tmp_path / "s.zarr", dataset=shuffled)


class TakenOver(CountingMethod):
    """Another run takes the lease over while this one computes its first batch."""

    def __init__(self, out):
        super().__init__(TiledOcclusion(TinyNet().eval()))
        self.out = out

    def attribute(self, inputs, **kwargs):
        if self.items == 0:
            write_lease(self.out, token="the-new-holder", host="elsewhere.example")
        return super().attribute(inputs, **kwargs)


def test_a_run_whose_lease_was_taken_over_stops_and_leaves_the_store_alone(tmp_path):
    out = tmp_path / "s.zarr"
    with pytest.raises(StoreMismatchError, match="taken over or removed.*elsewhere.example"):
        run(out, method=TakenOver(out))
    # the new holder's store and lease are left as they are: nothing discarded, nothing written
    lease = json.loads((out / _store.LEASE_NAME).read_text())
    assert lease["token"] == "the-new-holder"
    assert not open_attributions(out).done.any()


LOG = __import__("logging").getLogger("tests.test_store_promises")
NETS = {}


def forward_that_logs(x):
    LOG.debug("forward of %s items", len(x))
    return NETS["net"](x)


def test_a_library_object_read_as_a_global_is_announced_not_walked(tmp_path):
    NETS["net"] = TinyNet().eval()
    try:
        with pytest.warns(UserWarning, match="global 'LOG'"):
            run(tmp_path / "s.zarr", method=TiledOcclusion(forward_that_logs))
        LOG.isEnabledFor(10)  # fills the logger's cache: its state changed by itself
        summary, _ = run(tmp_path / "s.zarr", method=TiledOcclusion(forward_that_logs))
        assert summary.skipped == N_ITEMS
    finally:
        NETS.clear()
