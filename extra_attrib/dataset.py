"""Explain a whole dataset into a resumable zarr store, in one or several processes.

:func:`explain_dataset` runs any Captum attribution method over a map-style dataset and writes one
attribution per item into a zarr group (layout in :mod:`extra_attrib._store`);
:func:`open_attributions` reads it back. Under ``torchrun`` every process takes a disjoint share
of the items that are not done yet and writes its own chunks of the same store.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from extra_attrib import _store
from extra_attrib._run_hint import expected_calls

TargetSpec = Union[str, int, Callable[[Tensor, Optional[Tensor]], Any]]
TARGET_WORDS = ("predicted", "label")

__all__ = ["AttributionStore", "ExplainSummary", "explain_dataset", "open_attributions"]


@dataclass(frozen=True)
class ExplainSummary:
    """What :func:`explain_dataset` did; every process of a run returns the same counts.

    Attributes:
        done (int): Items whose attribution is in the store (from this run or earlier ones).
        failed (int): Items recorded as failed and not done (see ``open_attributions(...).errors``).
        skipped (int): Items already done when the run started, not recomputed.
        total (int): Items in the dataset.
        seconds (float): Wall-clock time of this call.
        path (str): The store.
        damaged (int): Items marked done by an earlier run whose attribution was missing or
            unreadable when this run checked them; they were computed again. Default: 0
    """

    done: int
    failed: int
    skipped: int
    total: int
    seconds: float
    path: str
    damaged: int = 0

    @property
    def complete(self) -> bool:
        """True when every item is done."""
        return self.done == self.total

    def __str__(self) -> str:
        """One line: counts, time and store path."""
        repaired = f", {self.damaged} damaged and computed again" if self.damaged else ""
        return (
            f"{self.done}/{self.total} done, {self.failed} failed, {self.skipped} already done "
            f"before this run{repaired}; {self.seconds:.1f} s; {self.path}"
        )


@dataclass
class AttributionStore:
    """A store written by :func:`explain_dataset`, opened by :func:`open_attributions`.

    Attributes:
        attributions (zarr.Array): ``(N, *S)``, read lazily: ``store.attributions[i]`` reads item
            ``i`` only. Items not done read as NaN (never as zeros); :meth:`item` checks.
        targets (numpy.ndarray): ``(N,)`` int64, the explained class (-1 where not done).
        scores (numpy.ndarray): ``(N,)`` float64, the target's score on the clean input (NaN where
            not done).
        done (numpy.ndarray): ``(N,)`` bool.
        failed (numpy.ndarray): ``(N,)`` bool, items whose loading or attribution raised.
        errors (dict): ``{index: "ExceptionType: message"}`` for the failed items.
        paths (list of str or None): The item's files when the dataset had a ``paths`` attribute
            (the command line's image datasets do).
        metadata (dict): Method, arguments, model, target, versions, creation time.
        damaged (dict): ``{index: reason}`` of items marked done whose attribution is missing
            or unreadable (found when opened with ``verify=True``); they count as not done.
        damaged_chunks (dict): ``{chunk key: reason}`` of unreadable chunks of the side arrays
            (``errors``, ``paths``, ``identity``): their messages read as "unreadable", their
            paths as None; ``explain_dataset`` with the same settings repairs them.
    """

    attributions: Any
    targets: np.ndarray
    scores: np.ndarray
    done: np.ndarray
    failed: np.ndarray
    errors: Dict[int, str]
    paths: Optional[List[Optional[str]]]
    metadata: Dict[str, Any] = field(repr=False)
    damaged: Dict[int, str] = field(default_factory=dict)
    damaged_chunks: Dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        """Number of items in the store."""
        return int(self.done.shape[0])

    def item(self, index: int) -> Tensor:
        """The attribution of item ``index`` as a tensor; ValueError if it is not done."""
        if not 0 <= index < len(self):
            raise ValueError(f"index={index} must be in [0, {len(self)})")
        if not self.done[index]:
            why = f" (failed: {self.errors[index]})" if index in self.errors else ""
            if index in self.damaged:
                why = f" (marked done, but {self.damaged[index]})"
            raise ValueError(f"item {index} is not done{why}")
        again = "the store is damaged: explain_dataset with the same settings computes it again"
        try:
            data = np.asarray(self.attributions[index])
        except Exception as err:
            raise ValueError(
                f"item {index} is marked done but its attribution is unreadable "
                f"({type(err).__name__}: {err}); {again}"
            ) from err
        if np.isnan(data).all():
            raise ValueError(
                f"item {index} is marked done but its attribution is missing (its chunk is "
                f"gone); {again}"
            )
        return torch.from_numpy(data)


def open_attributions(
    path: Any, storage_options: Optional[Dict[str, Any]] = None, verify: bool = True
) -> AttributionStore:
    """Open a store written by :func:`explain_dataset` for reading.

    Args:
        path (str or os.PathLike): Local path or fsspec URL of the store.
        storage_options (dict, optional): Passed to fsspec for remote stores. Default: None
        verify (bool, optional): Read every done item once to find those whose data is missing
            (a deleted chunk reads as NaN) or unreadable (a truncated file); they are listed in
            ``damaged``, count as not done, and a warning names them. This reads the whole
            store; with False only :meth:`AttributionStore.item` checks the item it reads.
            Default: True

    Returns:
        AttributionStore: lazy attributions plus the small per-item arrays in memory.

    Raises:
        FileNotFoundError: no store at ``path``.
        ValueError: ``path`` holds something else, or a store whose creation did not finish.

    Example::

        >>> store = extra_attrib.open_attributions("val.zarr")
        >>> store.done.sum(), store.targets[:5], store.paths[:2]
        >>> first = store.item(0)            # torch.Tensor of the item's shape
    """
    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    meta = _store.check_place(path, storage_options)
    if meta is None:
        raise FileNotFoundError(f"path={path!r}: no store written by explain_dataset there")
    if meta.get("state") != "ready":
        raise ValueError(
            f"path={path!r}: the store's creation did not finish (the run stopped while making "
            f"it); run explain_dataset again to make it"
        )
    if meta.get("format") != _store.FORMAT:
        raise ValueError(
            f"path={path!r} has store format {meta.get('format')!r}; this version reads "
            f"{_store.FORMAT}"
        )
    group = _store.open_group(path, mode="r", storage_options=storage_options)
    block = _store.block_of(meta)
    records, damaged = _store.read_records(group, block)
    state = records[:, 0]
    done = state == _store.DONE
    failed = state == _store.FAILED
    if verify:
        n = len(done)
        bad = _store.verify_done(group, done, block, range(-(-n // block)))
        done[list(bad)] = False
        damaged.update(bad)
    if damaged:
        first = min(damaged)
        _store.warn(
            f"{path}: {len(damaged)} items marked done are missing or unreadable (item {first}: "
            f"{damaged[first]}); they count as not done, and explain_dataset with the same "
            f"settings computes them again"
        )
    errors, chunks = _store.read_errors(group, np.flatnonzero(failed), block)
    paths, more = _store.read_paths(group)
    chunks.update(more)
    identity = _store.check_blocks(group, "identity", block)
    chunks.update({key: why for key, (_, _, why) in identity.items()})
    if chunks:
        _store.warn(
            f"{path}: {len(chunks)} chunks of the store's side arrays are unreadable "
            f"({', '.join(sorted(chunks)[:3])}): their messages or paths are unknown; "
            f"explain_dataset with the same settings repairs them"
        )
    targets = np.where(done, np.nan_to_num(records[:, 1], nan=-1.0), -1.0).astype(np.int64)
    scores = np.where(done, records[:, 2], np.nan)
    return AttributionStore(
        attributions=group["attributions"],
        targets=targets,
        scores=scores,
        done=done,
        failed=failed,
        errors=errors,
        paths=paths,
        metadata=meta,
        damaged=damaged,
        damaged_chunks=chunks,
    )


# --------------------------------------------------------------------------------------------
# Processes: torchrun's environment, a gloo group for the few synchronisation points
# --------------------------------------------------------------------------------------------


class _Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.owned = False
        env = os.environ
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        elif dist.is_available() and "WORLD_SIZE" in env and int(env["WORLD_SIZE"]) > 1:
            # Only barriers and one small broadcast go through it: gloo works with and without
            # GPUs. A long timeout because ranks wait for each other at the end.
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
            self.owned = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1
        self.local_rank = int(env.get("LOCAL_RANK", 0)) if self.world > 1 else 0

    def broadcast(self, value: Any) -> Any:
        if self.world == 1:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Items: loading never raises; failures travel as messages
# --------------------------------------------------------------------------------------------


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _split_item(item: Any, index: int) -> Tuple[Tensor, Any]:
    if isinstance(item, Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], Tensor):
        return item[0], item[1]
    raise TypeError(
        f"dataset[{index}] must be a tensor or a (tensor, label) pair, got {type(item).__name__}"
    )


class _Items(Dataset):
    """``dataset`` restricted to ``indices``, yielding ``(index, tensor, label, error)``."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Tuple[int, Optional[Tensor], Any, Optional[str]]:
        index = self.indices[position]
        try:
            x, label = _split_item(self.dataset[index], index)
            return index, x, label, None
        except Exception as err:  # a corrupt file, a bad item: recorded, not fatal
            return index, None, None, _error_text(err)


def _as_list(batch: List[Any]) -> List[Any]:
    return batch


def _probe(dataset: Any, n: int) -> Tuple[torch.Size, bool]:
    """Shape of the first item that loads, and whether it has a label."""
    _, x, label = _probe_item(dataset, n)
    return x.shape, label is not None


def _probe_item(dataset: Any, n: int, index: Optional[int] = None) -> Tuple[int, Tensor, Any]:
    """``(index, tensor, label)`` of the first item that loads, or of item ``index``."""
    if index is not None:
        if not 0 <= index < n:
            raise _store.StoreMismatchError(
                f"dataset: item {index}, checked when the store was made, does not exist in a "
                f"dataset of {n} items"
            )
        _, x, label, error = _Items(dataset, [index])[0]
        if x is None:
            raise _store.StoreMismatchError(
                f"dataset: item {index}, checked when the store was made, cannot be loaded now "
                f"({error}): is this the same dataset?"
            )
        return index, x, label
    last = "no items"
    for i in range(n):
        _, x, label, error = _Items(dataset, [i])[0]
        if x is not None:  # x is None exactly when loading failed (error is then its message)
            return i, x, label
        last = str(error)
    raise ValueError(f"dataset: none of its {n} items could be loaded; the last error: {last}")


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _plain_target(target: Any) -> Any:
    """A numpy or 0-d tensor integer target as a Python int (the same setting as the int)."""
    if isinstance(target, np.integer):
        return int(target)
    if isinstance(target, (Tensor, np.ndarray)) and target.ndim == 0:
        dtype = target.dtype
        integer = (
            not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
            if isinstance(target, Tensor)
            else np.issubdtype(cast(Any, dtype), np.integer)
        )
        if integer:
            return int(target.item())
    return target


def _check_target(target: Any) -> None:
    if isinstance(target, str):
        if target not in TARGET_WORDS:
            raise ValueError(
                f"target={target!r} must be 'predicted', 'label', an int or a callable"
            )
        return
    if isinstance(target, bool) or not (isinstance(target, int) or callable(target)):
        raise TypeError(
            f"target={target!r} must be 'predicted', 'label', an int or a callable "
            f"(outputs, labels) -> targets"
        )
    if isinstance(target, int) and target < 0:
        raise ValueError(f"target={target} must be a non-negative class index")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int")
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    return value


def _resolve_device(model: Any, device: Any, ranks: _Ranks) -> torch.device:
    chosen = None if device is None else torch.device(device)
    if chosen is not None and not (
        chosen.type == "cuda" and chosen.index is None and ranks.world > 1
    ):
        return chosen
    if (chosen is not None or ranks.world > 1) and torch.cuda.is_available():
        # under torchrun, "cuda" (or no device) means this process's GPU
        index = ranks.local_rank % torch.cuda.device_count() if ranks.world > 1 else 0
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if chosen is not None:
        return chosen
    if isinstance(model, nn.Module):
        for tensor in list(model.parameters()) + list(model.buffers()):
            return tensor.device
    return torch.device("cpu")


def _count(value: Any) -> int:
    return int(value.numel()) if isinstance(value, Tensor) else int(value.size)


def _labels_tensor(labels: Sequence[Any], device: torch.device, target: Any) -> Optional[Tensor]:
    """The labels as a tensor, as they are (a float stays a float), or None without labels."""
    if any(label is None for label in labels):
        return None
    values = [
        label.item() if isinstance(label, (Tensor, np.ndarray)) and _count(label) == 1 else label
        for label in labels
    ]
    try:
        array = np.asarray(values)  # Python floats stay float64, ints int64
        if array.dtype.kind not in "biuf":
            raise TypeError(f"labels of dtype {array.dtype}")
        return torch.as_tensor(array, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        if target == "label":
            raise _SettingError(
                f"target='label': the dataset's labels ({values[:3]}) are not class indices"
            ) from err
        return None


def _targets(target: TargetSpec, outputs: Tensor, labels: Optional[Tensor]) -> Tensor:
    rows, classes = outputs.shape
    if target == "predicted":
        chosen = outputs.argmax(dim=1)
    elif target == "label":
        if labels is None:
            raise ValueError("target='label' needs a dataset yielding (tensor, label) pairs")
        chosen = labels
        if chosen.is_floating_point():
            whole = chosen == chosen.round()
            if not bool(whole.all()):
                raise ValueError(
                    f"target='label': label {float(chosen[~whole][0])} is not a whole number; "
                    f"labels must be integer class indices (a float label is never truncated)"
                )
            chosen = chosen.long()
    elif isinstance(target, int):
        chosen = torch.full((rows,), target, dtype=torch.long, device=outputs.device)
    else:  # a callable: explain_dataset refuses every other target before this runs
        chosen = torch.as_tensor(
            cast(Callable[..., Any], target)(outputs, labels), device=outputs.device
        )
        if chosen.dim() == 0:
            chosen = chosen.expand(rows)
    if chosen.shape != (rows,) or chosen.is_floating_point() or chosen.is_complex():
        raise ValueError(
            f"target gave {tuple(chosen.shape)} {chosen.dtype} targets for a batch "
            f"of {rows}: expected {rows} integer class indices"
        )
    chosen = chosen.long()
    bad = (chosen < 0) | (chosen >= classes)
    if bool(bad.any()):
        raise ValueError(
            f"target gave class {int(chosen[bad][0])}, outside the model's {classes} outputs"
        )
    return chosen


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def explain_dataset(
    method: Any,
    dataset: Any,
    out: Any,
    *,
    target: TargetSpec = "predicted",
    batch_size: int = 8,
    num_workers: int = 0,
    resume: bool = True,
    dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
    device: Any = None,
    storage_options: Optional[Dict[str, Any]] = None,
    metadata: Optional[Dict[str, Any]] = None,
    **attribute_kwargs: Any,
) -> ExplainSummary:
    r"""Attribute every item of ``dataset`` with ``method`` into the zarr store ``out``.

    The store holds ``attributions`` ``(N, *S)`` (fill NaN), per-item ``records`` (state,
    target, the target's output on the clean input) and ``errors``, plus the settings as group
    attributes (layout in :mod:`extra_attrib._store`). It owns only what carries its marker
    (``extra_attrib-store.json``, or the group attribute of stores of earlier versions): a path
    holding a file, a folder of other files (whatever their names) or a zarr group made by
    something else is refused and left untouched, whatever ``resume`` says. A run that fails
    before any item is done removes the store it made. Calling again with the same settings
    continues where a previous run stopped, even one killed with ``kill -9`` (also during the
    store's creation): an item's record says done only after its attribution is written, and
    results reach the store within 10 s of being computed (a timer, also while a slow batch
    runs), so at most the batch in flight and the last 10 s of results are lost; a done item
    is never recomputed unless its data is found missing or unreadable, or its file changed
    (size or modification time). A store made with other settings (resolved as the method
    reads them: method classes and their non-default constructor settings, arguments with
    defaults filled in, the model's class, weights or what a wrapping function reaches, globals
    included, its output on one item, the target, the item list, N, item shape, dtype) is
    refused with the differences.

    One run writes a store at a time: a run holds the store's lease (host, pid, start time, a
    heartbeat), and a second run is refused with :class:`~extra_attrib._store.StoreBusyError`
    naming the holder; the lease of a killed run is taken over by the next run (on the same
    host at once, from another host after 120 s without a heartbeat). Readers need no lease.

    Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) each process takes every
    ``WORLD_SIZE``-th block of items not done yet, runs on ``cuda:LOCAL_RANK`` when GPUs exist
    and writes its own blocks (files); rank 0 takes the lease and creates or checks the store
    first, and the others wait for it (a gloo process group, made here unless one exists). The
    processes of one torchrun are one run. The result equals a single process.

    Args:
        method (captum.attr.Attribution): Any Captum attribution method (TiledOcclusion,
            FusionGrad, NoiseTunnel(...) included) whose ``attribute(inputs, target=...,
            **attribute_kwargs)`` takes a batch of items.
        dataset (torch.utils.data.Dataset): Map-style; ``dataset[i]`` is a tensor of shape ``S``
            or a ``(tensor, label)`` pair. An item that raises when loaded, or whose shape differs
            from the first item's, is recorded as failed and the run goes on. A ``paths``
            attribute (one string per item), if present, is stored.
        out (str or os.PathLike): Local path or fsspec URL (``s3://...``) of the zarr group.
        target (str, int or callable, optional): ``"predicted"`` (argmax of the clean forward
            pass), ``"label"`` (the dataset's labels), a class index, or a function
            ``(outputs, labels) -> targets`` of the clean outputs ``(B, C)`` and the labels
            (``(B,)`` tensor, or None when the dataset has none). Default: ``"predicted"``
        batch_size (int, optional): Items per ``attribute`` call. Default: 8
        num_workers (int, optional): DataLoader worker processes for loading. Default: 0
        resume (bool, optional): Continue an existing store (True) or replace it (False); only
            a store this package made is ever replaced. Default: True
        dtype (torch.dtype, optional): Dtype of the stored attributions. Default: torch.float32
        show_progress (bool, optional): A progress bar (items, ETA) on rank 0. Default: True
        device (str or torch.device, optional): Where items go and the model is moved to.
            None: ``cuda:LOCAL_RANK`` under torchrun with GPUs, else the model's device;
            ``"cuda"`` under torchrun also means ``cuda:LOCAL_RANK``. Default: None
        storage_options (dict, optional): fsspec options for remote stores. Default: None
        metadata (dict, optional): Free-form notes kept in the store's attributes (under
            ``info``) when it is created; not compared on resume. Default: None
        **attribute_kwargs: Passed to ``method.attribute`` (e.g. ``window=32, k=4``); they are
            part of the settings a resumed run must repeat, except those that only batch the
            work (``perturbations_per_eval``, ``internal_batch_size``,
            ``nt_samples_batch_size``). ``show_progress`` is taken by ``explain_dataset`` for
            its own bar, so the method's per-batch bar stays off.

    Returns:
        ExplainSummary: done, failed, skipped (already done before), total, seconds and path.

    Example::

        >>> from extra_attrib import TiledOcclusion, explain_dataset, open_attributions
        >>> summary = explain_dataset(TiledOcclusion(model.eval()), val_set, "val.zarr",
        ...                           target="label", window=32, k=4, batch_size=4)
        >>> print(summary)          # run it again after a crash: it continues
        >>> store = open_attributions("val.zarr")
    """
    start = time.perf_counter()
    _check_int("batch_size", batch_size, 1)
    _check_int("num_workers", num_workers, 0)
    target = _plain_target(target)
    _check_target(target)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype={dtype!r} must be a floating torch.dtype")
    if dtype == torch.bfloat16:
        raise ValueError("dtype=torch.bfloat16 cannot be stored by zarr; use float16 or float32")
    if not hasattr(method, "attribute"):
        raise TypeError(f"method={method!r} must be a Captum attribution (with .attribute)")
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(f"dataset={dataset!r} must be a map-style Dataset (__getitem__, __len__)")
    n = len(dataset)
    if n < 1:
        raise ValueError("dataset is empty")
    paths = getattr(dataset, "paths", None)
    if paths is not None and len(paths) != n:
        raise ValueError(f"dataset.paths has {len(paths)} entries for {n} items")
    out = os.fspath(out) if isinstance(out, os.PathLike) else out
    if not isinstance(out, str):
        raise TypeError(f"out={out!r} must be a path or URL string")
    model = _store.find_model(method)
    ranks = _Ranks()
    lease: Optional[_store.Lease] = None
    made = {"store": False, "folder": False}
    try:
        run_device = _resolve_device(model, device, ranks)
        # rank 0 takes the lease and creates or checks (and repairs) the store; the others
        # learn the outcome and the lease's token, which every write checks
        problem, damaged, token = None, 0, ""
        if ranks.rank == 0:
            try:
                lease = _store.Lease(out, storage_options)
                damaged = _prepare_store(
                    method,
                    model,
                    dataset,
                    n,
                    out,
                    paths,
                    target,
                    dtype,
                    resume,
                    run_device,
                    storage_options,
                    dict(metadata or {}, batch_size=batch_size),
                    attribute_kwargs,
                    lease,
                    made,
                )
                token = lease.token
            except Exception as err:
                problem = err
        shared = ranks.broadcast(
            (damaged, token, None if problem is None else (type(problem), str(problem)))
        )
        if problem is not None:
            raise problem
        damaged, token, failure = shared
        if failure is not None:
            raise _rebuilt(*failure)
        if isinstance(model, nn.Module):  # only once the store is known to be usable
            model.to(run_device)
        group = _store.open_group(out, "r+", storage_options)
        block = _store.block_of(dict(group.attrs[_store.ATTR_KEY]))
        item_shape = tuple(group["attributions"].shape[1:])
        records, _ = _store.read_records(group, block)
        done = records[:, 0] == _store.DONE
        was_failed = records[:, 0] == _store.FAILED
        ranks.barrier()  # everyone has read the records before anyone writes them
        # whole blocks are shared out, so that no two processes ever write one file
        blocks = [b for b in range(-(-n // block)) if not done[b * block : (b + 1) * block].all()]
        mine = [
            i
            for b in blocks[ranks.rank :: ranks.world]
            for i in range(b * block, min(n, (b + 1) * block))
            if not done[i]
        ]
        guard = _store.LeaseCheck(out, token, storage_options)
        writer = _store.BlockBuffer(
            _store.BackgroundWriter(_store.ItemWriter(group, guard)), block, mine
        )
        try:
            _run(
                method,
                model,
                dataset,
                mine,
                writer,
                was_failed,
                item_shape,
                target,
                batch_size,
                num_workers,
                dtype,
                run_device,
                show_progress and ranks.rank == 0,
                ranks.world,
                attribute_kwargs,
            )
        finally:
            writer.close()  # items already computed are written even if the run stops
        ranks.barrier()
        final, _ = _store.read_records(group, block)
        final_done = final[:, 0] == _store.DONE
        final_failed = final[:, 0] == _store.FAILED
        return ExplainSummary(
            done=int(final_done.sum()),
            failed=int(final_failed.sum()),
            skipped=int(done.sum()),
            total=n,
            seconds=time.perf_counter() - start,
            path=str(out),
            damaged=int(damaged),
        )
    except Exception:
        # a store this run made and that has no result yet is not left behind
        # (only while this run still holds the lease: a run taken over leaves the store alone)
        if lease is not None and made["store"] and ranks.world == 1 and lease.holds():
            lease.stop()
            _discard_if_empty(out, made["folder"], storage_options)
        raise
    finally:
        if lease is not None:
            lease.release()
        ranks.close()


def _discard_if_empty(out: str, made_folder: bool, storage_options: Any) -> None:
    """Remove a store this run created if no item of it is done (the run failed first)."""
    try:
        meta = _store.check_place(out, storage_options)
        if meta is not None and meta.get("state") == "ready":
            group = _store.open_group(out, "r", storage_options)
            records, _ = _store.read_records(group, _store.block_of(meta))
            if (records[:, 0] == _store.DONE).any():
                return
        _store.discard(out, made_folder, storage_options)
    except Exception:  # never hide the run's own error behind a clean-up problem
        pass


def _probe_output(model: Any, x: Tensor, run_device: torch.device) -> Optional[Dict[str, Any]]:
    """The model's clean output on one item, described for the store (None if it raises)."""
    if model is None:
        return None
    device = run_device
    if isinstance(model, nn.Module):
        tensors = list(model.parameters()) + list(model.buffers())
        device = tensors[0].device if tensors else run_device
    try:
        with torch.no_grad():
            return _store.describe_output(model(x[None].to(device)))
    except Exception:  # the item's own failure is recorded by the run
        return None


def _sample(dataset: Any, n: int) -> Dict[str, str]:
    """:func:`_store.sample_digest` of the items of :func:`_store.sample_indices`."""
    items = []
    for i in _store.sample_indices(n):
        _, x, _, error = _Items(dataset, [i])[0]
        items.append((i, x if x is not None else error))
    return _store.sample_digest(items)


def _prepare_store(
    method: Any,
    model: Any,
    dataset: Any,
    n: int,
    out: str,
    paths: Optional[Sequence[str]],
    target: Any,
    dtype: torch.dtype,
    resume: bool,
    run_device: torch.device,
    storage_options: Optional[Dict[str, Any]],
    info: Dict[str, Any],
    attribute_kwargs: Dict[str, Any],
    lease: _store.Lease,
    made: Dict[str, bool],
) -> int:
    """Take the lease, then create the store, or check that it may be resumed and repair it.

    Rank 0 only. Nothing is written before the dataset and the model have been tried on one
    item (a run that cannot start leaves nothing); then ``out`` is marked as ours (the marker
    file) and the lease taken, and the place is looked at again under the lease. ``made`` is
    told whether this run made the store (and its folder).

    Returns the number of done items found damaged (missing or unreadable); they are marked
    pending again, to be computed by this run.
    """
    meta = _store.check_place(out, storage_options)  # refuses what is not ours
    for attempt in range(2):
        resuming = resume and meta is not None and meta.get("state") == "ready"
        if resuming and meta is not None and meta.get("format") != _store.FORMAT:
            _store.check_compatible(out, meta, {})  # raises: another format
        stored_probe = (meta or {}).get("probe") if resuming else None
        probe_index = None if not stored_probe else int(stored_probe["index"])
        index, x, _ = _probe_item(dataset, n, probe_index)
        sample = _sample(dataset, n) if paths is None else None
        fp = _store.fingerprint(
            method, attribute_kwargs, target, n, x.shape, dtype, paths, (index, x), sample
        )
        output = _probe_output(model, x, run_device)
        if attempt == 0:
            folder_made = _store.claim(out, storage_options)
            _store._creation_step("claimed")
            lease.acquire()  # from here on this run may remove what it made
            _store._creation_step("leased")
            made["folder"] = folder_made
            again = _store.check_place(out, storage_options)
            if _store._canonical(again) == _store._canonical(meta):
                break
            meta = again  # another run changed it meanwhile: look again, under the lease
    made["store"] = meta is None
    if not resuming:
        batching = {k: v for k, v in attribute_kwargs.items() if k in _store.BATCHING_ARGUMENTS}
        _, _, opaque = _store.method_digest(method)
        notes = []
        if opaque:
            notes.append(
                f"the explained function reaches {', '.join(sorted(set(opaque))[:5])}, whose "
                f"state cannot be fingerprinted; a resume compares the model's clean output on "
                f"item {index} instead"
            )
            _store.warn(f"out={out!r}: {notes[-1]}")
        made["store"] = True
        _store.create(
            out,
            fp,
            None if paths is None else [_store.as_path(p) for p in paths],
            dict(info, **batching),
            storage_options,
            probe={"index": index, "output": output},
            notes=notes,
        )
        return 0
    assert meta is not None
    group = _store.open_group(out, "r+", storage_options)
    _store.check_paths(out, group, paths)
    _store.check_compatible(out, meta, fp)
    stored_output = (stored_probe or {}).get("output")
    if stored_output is not None:
        why = _store.output_difference(stored_output, output)
        changed = _store.changed_file(group, paths, index) if why is not None else None
        if changed is not None:
            raise _store.StoreMismatchError(
                f"out={out!r}: item {index}'s file {changed} changed since the store was made "
                f"(its size or modification time), and the model's clean output on it differs "
                f"from the one recorded then ({why}). The model's state cannot be "
                f"fingerprinted, so that output is how a resume checks it: with its file "
                f"changed, other weights cannot be ruled out; refusing to mix results (restore "
                f"the file, or pass resume=False to start again, or another out)"
            )
        if why is not None:
            raise _store.StoreMismatchError(
                f"out={out!r}: the model's clean output on item {index} differs from the one "
                f"recorded when the store was made ({why}): other weights, or a model that is "
                f"not deterministic (dropout in training mode?); refusing to mix results (pass "
                f"resume=False to overwrite it, or another out)"
            )
    return _repair(out, group, meta, n, paths, storage_options)


def _repair(
    out: str,
    group: Any,
    meta: Dict[str, Any],
    n: int,
    paths: Optional[Sequence[str]],
    storage_options: Optional[Dict[str, Any]],
) -> int:
    """Check every array of a store about to be resumed; repair what is damaged.

    ``records`` and ``attributions``: an unreadable block is removed and its items computed
    again, as is a done item whose attribution is missing. ``errors``: an unreadable block is
    removed and its failed items are tried again (their messages are lost). ``paths``: an
    unreadable chunk is written again from the dataset's paths (the item list's digest matched).
    ``identity``: an item whose file changed since its map was made (size or modification
    time), or whose identity block is unreadable, is computed again.

    Returns the number of done items whose attribution was missing or unreadable.
    """
    block = _store.block_of(meta)
    place = _store.Place(out, storage_options)
    records, lost = _store.read_records(group, block, repair=place.remove)
    done = records[:, 0] == _store.DONE
    bad = _store.verify_done(group, done, block, range(-(-n // block)), repair=place.remove)
    pending = dict(bad)
    errors = _store.check_blocks(group, "errors", block, repair=place.remove)
    for lo, hi, why in errors.values():
        for i in np.flatnonzero(records[lo:hi, 0] == _store.FAILED) + lo:
            pending[int(i)] = f"its error message is {why}"
    if errors:
        _store.warn(
            f"out={out!r}: {len(errors)} chunks of 'errors' were unreadable "
            f"({', '.join(sorted(errors)[:3])}); removed, and their failed items are tried again"
        )
    if paths is not None and "paths" in group:
        _, damaged_paths = _store.read_paths(group)
        if damaged_paths:
            array = group["paths"]
            step = array.chunks[0]
            listed = [_store.as_path(p) for p in paths]
            for key in damaged_paths:
                place.remove(key)
                lo = int(key.rsplit("/", 1)[1]) * step
                _store.write_paths(array, listed, lo, min(n, lo + step))
            _store.warn(
                f"out={out!r}: {len(damaged_paths)} chunks of 'paths' were unreadable "
                f"({', '.join(sorted(damaged_paths)[:3])}); written again from the dataset's "
                f"paths"
            )
    if paths is not None and "identity" in group:
        unreadable = _store.check_blocks(group, "identity", block, repair=place.remove)
        listed = [_store.as_path(p) for p in paths]
        now = _store.identities(listed)
        stored = np.asarray(group["identity"][:], dtype=np.int64)
        changed = np.flatnonzero((stored != now).any(axis=1))
        for _, (lo, hi, _) in unreadable.items():
            changed = np.union1d(changed, np.arange(lo, hi))
        redo = [int(i) for i in changed if done[i] and int(i) not in bad]
        for row in redo:
            pending[row] = "its file changed since its map was made"
        if redo:
            shown = ", ".join(_store.shown_path(listed[i]) for i in redo[:3])
            _store.warn(
                f"out={out!r}: {len(redo)} files changed since their maps were made (size or "
                f"modification time; {shown}); computing them again"
            )
    if pending:  # first the records (pending), then what marks the items as current
        rows = np.asarray(sorted(pending), dtype=np.int64)
        for j, k in _store.runs(rows):
            group["records"][rows[j] : rows[j] + k - j] = np.nan
    if paths is not None and "identity" in group:
        rows = np.flatnonzero((np.asarray(group["identity"][:]) != now).any(axis=1))
        for j, k in _store.runs(rows):
            group["identity"][rows[j] : rows[j] + k - j] = now[rows[j] : rows[j] + k - j]
    if bad:
        first = min(bad)
        _store.warn(
            f"out={out!r}: {len(bad)} items marked done had a missing or unreadable attribution "
            f"(item {first}: {bad[first]}); computing them again"
        )
    if lost:
        _store.warn(
            f"out={out!r}: the records of items {min(lost)}..{max(lost)} were unreadable; those "
            f"items are computed again"
        )
    return len(bad)


def _rebuilt(kind: Any, text: str) -> Exception:
    """Rank 0's exception, raised again on the other ranks."""
    try:
        return kind(f"rank 0: {text}")
    except Exception:
        return RuntimeError(f"rank 0: {text}")


def _run(
    method: Any,
    model: Any,
    dataset: Any,
    indices: List[int],
    writer: Any,
    was_failed: np.ndarray,
    item_shape: Tuple[int, ...],
    target: TargetSpec,
    batch_size: int,
    num_workers: int,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool,
    world: int,
    attribute_kwargs: Dict[str, Any],
) -> None:
    from tqdm.auto import tqdm

    loader = DataLoader(
        _Items(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_list,
    )
    desc = "explain" if world == 1 else f"explain (rank 0 of {world})"
    bar = tqdm(total=len(indices), desc=desc, unit="item", disable=not progress)
    state = {"succeeded": 0}
    seen = 0
    try:
        for batch in loader:
            # The batches still to come share this one's engine decision (#30).
            ahead = expected_calls((len(indices) - seen) / max(len(batch), 1))
            seen += len(batch)
            good = []
            for index, x, label, error in batch:
                if error is None and tuple(x.shape) != item_shape:
                    error = (
                        f"ValueError: item has shape {tuple(x.shape)}, the store's items "
                        f"have {item_shape}"
                    )
                if error is not None:
                    writer.failure(index, error)
                else:
                    good.append((index, x, label))
            if good:
                with ahead:
                    _attribute_batch(
                        method,
                        model,
                        good,
                        writer,
                        was_failed,
                        target,
                        dtype,
                        device,
                        state,
                        attribute_kwargs,
                    )
            bar.update(len(batch))
    finally:
        bar.close()


class _SettingError(ValueError):
    """A wrong setting (targets, model outputs, method results): fatal, not an item's failure."""


def _attempt(
    method: Any,
    model: Any,
    items: List[Tuple[int, Tensor, Any]],
    target: TargetSpec,
    dtype: torch.dtype,
    device: torch.device,
    attribute_kwargs: Dict[str, Any],
) -> Tuple[np.ndarray, Tensor, np.ndarray]:
    """Clean forward pass, targets, scores and attributions of a batch of items."""
    x = torch.stack([item[1] for item in items]).to(device)
    labels = _labels_tensor([item[2] for item in items], device, target)
    with torch.no_grad():
        outputs = model(x)
    if not isinstance(outputs, Tensor) or outputs.dim() != 2:
        raise _SettingError(
            f"the model must return a (batch, classes) tensor to pick targets, got "
            f"{tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__}"
        )
    try:
        targets = _targets(target, outputs, labels)
    except ValueError as err:
        raise _SettingError(str(err)) from err
    scores = outputs.gather(1, targets[:, None])[:, 0].double().cpu().numpy()
    attr = method.attribute(x, target=targets, **attribute_kwargs)
    if not isinstance(attr, Tensor) or attr.shape != x.shape:
        raise _SettingError(
            f"method.attribute returned {getattr(attr, 'shape', type(attr).__name__)} for inputs "
            f"of shape {tuple(x.shape)}: one attribution of the input's shape per item expected"
        )
    return attr.detach().to("cpu", dtype).numpy(), targets.cpu(), scores


def _attribute_batch(
    method: Any,
    model: Any,
    items: List[Tuple[int, Tensor, Any]],
    writer: Any,
    was_failed: np.ndarray,
    target: TargetSpec,
    dtype: torch.dtype,
    device: torch.device,
    state: Dict[str, int],
    attribute_kwargs: Dict[str, Any],
) -> None:
    """Attribute and write a batch; if it raises, retry item by item and record the failures.

    If the first batch of a process fails on every one of its (two or more) items with the same
    message, that is a wrong setting (a misspelt argument, say), not bad items: it is raised.
    """

    def write(
        group: List[Tuple[int, Tensor, Any]], result: Tuple[np.ndarray, Tensor, np.ndarray]
    ) -> None:
        values, targets, scores = result
        # an all-NaN map would read as a missing chunk: it is the item's failure instead
        empty = np.isnan(values.reshape(len(group), -1)).all(axis=1)
        for j in np.flatnonzero(empty):
            writer.failure(
                group[j][0], "ValueError: the method returned NaN for every element of this item"
            )
        keep = np.flatnonzero(~empty)
        if keep.size:
            indices = [group[j][0] for j in keep]
            writer.success(
                indices,
                values[keep],
                targets[keep].tolist(),
                scores[keep].tolist(),
                was_failed[indices].tolist(),
            )
        state["succeeded"] += int(keep.size)

    try:
        write(items, _attempt(method, model, items, target, dtype, device, attribute_kwargs))
        return
    except _SettingError:
        raise
    except Exception as err:
        failures = [(items[0][0], err)] if len(items) == 1 else []
        first_error = err
    if len(items) > 1:
        for one in items:
            try:
                write(
                    [one], _attempt(method, model, [one], target, dtype, device, attribute_kwargs)
                )
            except _SettingError:
                raise
            except Exception as err:
                failures.append((one[0], err))
    texts = [_error_text(err) for _, err in failures]
    if (
        state["succeeded"] == 0
        and len(items) > 1
        and len(failures) == len(items)
        and len(set(texts)) == 1
    ):
        raise RuntimeError(
            f"every item of the first batch failed with the same error, so a setting is "
            f"probably wrong (nothing was recorded): {texts[0]}"
        ) from first_error
    for (index, _), text in zip(failures, texts):
        writer.failure(index, text)
