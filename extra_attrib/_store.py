"""The zarr store of :func:`extra_attrib.explain_dataset`: layout, settings fingerprint, resume.

Layout of a store for ``N`` items of shape ``S`` (a zarr v3 group):

- ``attributions`` ``(N, *S)``, the requested dtype, fill 0. One item per chunk (so writers never
  share a chunk); an item larger than :data:`MAX_CHUNK_BYTES` is one *shard* split into inner
  chunks of at most that size, so a reader can still fetch a slice of a large volume.
- ``targets`` ``(N,)`` int64 (fill -1), ``scores`` ``(N,)`` float64 (fill NaN: the target's score
  on the clean input), ``done`` ``(N,)`` bool, ``failed`` ``(N,)`` bool and ``errors`` ``(N,)``
  str (``"ExceptionType: message"`` of an item that failed). All have one element per chunk:
  several processes write different items of the same array at once without locks, and zarr
  writes every chunk atomically (a temporary file renamed into place; one PUT on object stores).
- ``paths`` ``(N,)`` str, only when the dataset has a ``paths`` attribute; written once by the
  process that creates the store.
- Group attribute ``extra_attrib``: ``format``, ``fingerprint`` (what must match to resume),
  ``versions`` (package versions; recorded, not compared), ``created`` and free-form ``info``.

Order of the writes of one item: attribution, target, score, ``failed``/``errors``, and ``done``
last. A process killed at any moment leaves the items it was working on with ``done`` False, so
they are computed again on resume; an item whose ``done`` is True has all its values written.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import json
import math
import platform
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

FORMAT = 1
ATTR_KEY = "extra_attrib"
MAX_CHUNK_BYTES = 64 * 2**20
PER_ITEM_ARRAYS = ("targets", "scores", "done", "failed", "errors")
# Arguments of Captum methods (and ours) that only change how the work is batched or shown, not
# what is computed: a resumed run may change them (another GPU, another batch size). They are
# recorded under "info", not compared.
BATCHING_ARGUMENTS = frozenset(
    {
        "show_progress",
        "perturbations_per_eval",
        "internal_batch_size",
        "nt_samples_batch_size",
    }
)


class StoreMismatchError(ValueError):
    """An existing store was made with other settings; it is never mixed with new results."""


# --------------------------------------------------------------------------------------------
# Fingerprint: a JSON description of everything that determines the numbers
# --------------------------------------------------------------------------------------------


def _qualname(obj: Any) -> str:
    cls = obj if inspect.isclass(obj) or inspect.isroutine(obj) else type(obj)
    module = getattr(cls, "__module__", None) or "?"
    return f"{module}.{getattr(cls, '__qualname__', repr(cls))}"


def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().to("cpu").contiguous()
    if data.dtype == torch.bfloat16:
        data = data.float()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]


def describe_value(value: Any) -> Any:
    """A JSON-able, address-free description of an argument value, stable across runs.

    Numbers, strings, booleans and None stay as they are; sequences and dicts recurse; a tensor
    or array becomes its shape, dtype and a SHA-256 digest of its values; a function or class its
    qualified name; any other object its class name.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.Tensor):
        return {
            "tensor": list(value.shape),
            "dtype": str(value.dtype),
            "sha256": _tensor_digest(value),
        }
    if isinstance(value, np.ndarray):
        return describe_value(torch.from_numpy(np.ascontiguousarray(value)))
    if isinstance(value, (list, tuple)):
        return [describe_value(v) for v in value]
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: str(kv[0]))
        return {str(k): describe_value(v) for k, v in items}
    if isinstance(value, np.generic):
        return describe_value(value.item())
    return {"object": _qualname(value)}


def find_model(method: Any) -> Any:
    """The function a Captum attribution explains (through wrappers such as NoiseTunnel)."""
    seen = 0
    while seen < 8:
        if isinstance(getattr(method, "model", None), nn.Module):
            return method.model
        if getattr(method, "forward_func", None) is not None:
            return method.forward_func
        inner = getattr(method, "attribution_method", None)
        if inner is None:
            return None
        method, seen = inner, seen + 1
    return None


def describe_method(method: Any) -> Any:
    """Class name of an attribution method, with the methods it wraps (NoiseTunnel, FusionGrad)."""
    inner = getattr(method, "attribution_method", None)
    if inner is not None and inner is not method:
        return {"class": _qualname(method), "wraps": describe_method(inner)}
    return {"class": _qualname(method)}


def model_digest(model: Any) -> Dict[str, Any]:
    """The model's class and a digest of its parameters and buffers (names, shapes and values)."""
    if not isinstance(model, nn.Module):
        return {"function": _qualname(model) if model is not None else None}
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(_tensor_digest(tensor).encode())
    return {"class": _qualname(model), "state_sha256": h.hexdigest()[:16]}


def fingerprint(
    method: Any,
    attribute_kwargs: Dict[str, Any],
    target: Any,
    n_items: int,
    item_shape: Sequence[int],
    dtype: torch.dtype,
) -> Dict[str, Any]:
    """Everything that must be equal for a resumed run to add to an existing store."""
    if isinstance(target, str) or (isinstance(target, int) and not isinstance(target, bool)):
        target_desc: Any = target
    else:
        target_desc = {"callable": _qualname(target)}
    return {
        "method": describe_method(method),
        "arguments": describe_value(
            {key: value for key, value in attribute_kwargs.items() if key not in BATCHING_ARGUMENTS}
        ),
        "model": model_digest(find_model(method)),
        "target": target_desc,
        "N": int(n_items),
        "item_shape": [int(s) for s in item_shape],
        "dtype": str(dtype),
    }


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def differences(stored: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """Keys whose values differ, as ``"key: stored -> new"`` lines."""
    stored, new = _canonical(stored), _canonical(new)
    lines = []
    for key in sorted(set(stored) | set(new)):
        if stored.get(key) != new.get(key):
            lines.append(f"{key}: {json.dumps(stored.get(key))} -> {json.dumps(new.get(key))}")
    return lines


def versions() -> Dict[str, str]:
    import captum
    import zarr

    from extra_attrib import __version__

    return {
        "extra_attrib": __version__,
        "torch": torch.__version__,
        "captum": captum.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------
# Creating and opening
# --------------------------------------------------------------------------------------------


def attribution_chunks(
    item_shape: Sequence[int], itemsize: int
) -> Tuple[Tuple[int, ...], Optional[Tuple[int, ...]]]:
    """``(chunks, shards)`` for the attributions array: one item per chunk, or per shard if big.

    An item of at most :data:`MAX_CHUNK_BYTES` is one chunk (``shards`` None). A larger one is one
    shard whose inner chunks halve the largest dimension (to a divisor of the item's size) until
    they fit, e.g. a ``(1, 512, 512, 512)`` float32 volume (512 MiB) is one shard of
    ``(1, 256, 256, 256)`` chunks (64 MiB).
    """
    shard = (1, *[int(s) for s in item_shape])
    inner = list(shard)
    while math.prod(inner) * itemsize > MAX_CHUNK_BYTES:
        dim = max(range(1, len(inner)), key=lambda i: inner[i])
        if inner[dim] == 1:
            break
        # the largest divisor of the item's size at most half the current chunk: a shard must
        # hold a whole number of chunks
        half = -(-inner[dim] // 2)
        inner[dim] = max(d for d in range(1, half + 1) if shard[dim] % d == 0)
    if tuple(inner) == shard:
        return shard, None
    return tuple(inner), shard


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as err:
        raise ImportError(
            'explain_dataset needs zarr >= 3: pip install "extra_attrib[scale]" (or pip install '
            "zarr)"
        ) from err
    if int(zarr.__version__.split(".")[0]) < 3:
        raise ImportError(f"explain_dataset needs zarr >= 3, found {zarr.__version__}")
    return zarr


def read_meta(
    out: Any, storage_options: Optional[Dict[str, Any]] = None
) -> Optional[Dict[str, Any]]:
    """The ``extra_attrib`` attribute of an existing group at ``out``, or None if there is none."""
    zarr = _zarr()
    try:
        group = zarr.open_group(out, mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return None
    except Exception as err:  # e.g. an array, not a group, at that path
        raise ValueError(f"out={out!r} exists but is not a zarr group: {err}") from err
    meta = group.attrs.get(ATTR_KEY)
    if meta is None:
        raise ValueError(
            f"out={out!r} is a zarr group that explain_dataset did not make (no {ATTR_KEY!r} "
            f"attribute); refusing to write into it"
        )
    return dict(meta)


def create(
    out: Any,
    fp: Dict[str, Any],
    paths: Optional[Sequence[str]],
    info: Dict[str, Any],
    storage_options: Optional[Dict[str, Any]] = None,
) -> None:
    """Create (or overwrite) the store at ``out`` for the fingerprint ``fp``."""
    zarr = _zarr()
    n, shape = fp["N"], tuple(fp["item_shape"])
    dtype = np.dtype(str(fp["dtype"]).replace("torch.", ""))
    group = zarr.open_group(out, mode="w", storage_options=storage_options)
    chunks, shards = attribution_chunks(shape, dtype.itemsize)
    group.create_array(
        "attributions", shape=(n, *shape), chunks=chunks, shards=shards, dtype=dtype, fill_value=0
    )
    one = (1,)
    group.create_array("targets", shape=(n,), chunks=one, dtype="int64", fill_value=-1)
    group.create_array("scores", shape=(n,), chunks=one, dtype="float64", fill_value=np.nan)
    group.create_array("done", shape=(n,), chunks=one, dtype=bool, fill_value=False)
    group.create_array("failed", shape=(n,), chunks=one, dtype=bool, fill_value=False)
    group.create_array("errors", shape=(n,), chunks=one, dtype=str, fill_value="")
    if paths is not None:
        array = group.create_array(
            "paths", shape=(n,), chunks=(max(1, min(n, 65536)),), dtype=str, fill_value=""
        )
        array[:] = np.asarray([str(p) for p in paths], dtype=object)
    # metadata last: a store without it is recognised as unfinished and made again
    group.attrs[ATTR_KEY] = {
        "format": FORMAT,
        "fingerprint": _canonical(fp),
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "info": _canonical(describe_value(info)),
    }


def check_compatible(out: Any, meta: Dict[str, Any], fp: Dict[str, Any]) -> None:
    """Raise :class:`StoreMismatchError` unless the stored fingerprint equals ``fp``."""
    if meta.get("format") != FORMAT:
        raise StoreMismatchError(
            f"out={out!r} has store format {meta.get('format')!r}, this version writes {FORMAT}"
        )
    diff = differences(meta.get("fingerprint", {}), fp)
    if diff:
        raise StoreMismatchError(
            f"out={out!r} was made with other settings, refusing to mix results (pass "
            f"resume=False to overwrite it, or another out):\n  " + "\n  ".join(diff)
        )


def open_group(out: Any, mode: str = "r+", storage_options: Optional[Dict[str, Any]] = None) -> Any:
    return _zarr().open_group(out, mode=mode, storage_options=storage_options)


class ItemWriter:
    """Writes the results of single items in the order that makes ``done`` trustworthy."""

    def __init__(self, group: Any) -> None:
        self.attributions = group["attributions"]
        self.targets = group["targets"]
        self.scores = group["scores"]
        self.done = group["done"]
        self.failed = group["failed"]
        self.errors = group["errors"]

    def success(
        self,
        indices: Sequence[int],
        attributions: np.ndarray,
        targets: Sequence[int],
        scores: Sequence[float],
        was_failed: Sequence[bool],
    ) -> None:
        """Write items ``indices`` (``attributions[j]`` is item ``indices[j]``'s), ``done`` last.

        Each array is written in one call for all the items (zarr writes their chunks
        concurrently): a call per item cost several milliseconds each.
        """
        rows = np.asarray(indices, dtype=np.int64)
        self.attributions.oindex[(rows,) + (slice(None),) * (attributions.ndim - 1)] = attributions
        self.targets.oindex[rows] = np.asarray(targets, dtype=np.int64)
        self.scores.oindex[rows] = np.asarray(scores, dtype=np.float64)
        repaired = rows[np.asarray(was_failed, dtype=bool)]
        if repaired.size:
            self.failed.oindex[repaired] = False
            self.errors.oindex[repaired] = np.asarray([""] * repaired.size, dtype=object)
        self.done.oindex[rows] = True  # last

    def failure(self, index: int, message: str) -> None:
        self.errors[index] = message
        self.failed[index] = True


class BackgroundWriter:
    """An :class:`ItemWriter` whose writes run in one background thread, in submission order.

    Writing a chunk is file-system (or network) latency more than work: done in the foreground
    it cost 5-35 ms per array and batch on a loaded 2-core VM. In one thread, first in first out,
    every item's ``done`` still comes after its values; a killed process loses the queued items,
    which are not done and so are computed again. At most ``depth`` batches wait; an error in
    the thread is raised at the next call or at :meth:`close`.
    """

    def __init__(self, writer: ItemWriter, depth: int = 2) -> None:
        import queue
        import threading

        self._writer = writer
        self._queue: Any = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._work, name="extra_attrib-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:
                try:
                    job[0](*job[1:])
                except BaseException as err:  # handed to the main thread
                    self._error = err

    def _submit(self, *job: Any) -> None:
        self._raise()
        self._queue.put(job)

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def success(self, *args: Any) -> None:
        self._submit(self._writer.success, *args)

    def failure(self, *args: Any) -> None:
        self._submit(self._writer.failure, *args)

    def close(self) -> None:
        """Wait for every queued write; raise the thread's error if one occurred."""
        self._queue.put(None)
        self._thread.join()
        self._raise()
