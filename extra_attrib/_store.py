"""The zarr store of :func:`extra_attrib.explain_dataset`: layout, ownership, fingerprint, resume.

Layout of a store for ``N`` items of shape ``S`` (a zarr v3 group, format 2). Items are grouped
in *blocks* of ``block`` consecutive items (group attribute; 1 for large items, up to
:data:`MAX_BLOCK_ITEMS` for small ones): every array below keeps one block in one file, so
3,000 small items make a few dozen files, not 12,000.

- ``attributions`` ``(N, *S)``, the requested dtype, fill NaN (no result is all NaN:
  ``explain_dataset`` records such a result as a failure), so a chunk that went missing reads
  as NaN, never as zeros. One *shard* file per block whose inner chunks are single items (a
  reader fetches one item without the rest); an item larger than :data:`MAX_CHUNK_BYTES` is a
  shard of its own with smaller inner chunks.
- ``records`` ``(N, 3)`` float64, one chunk per block: ``[state, target, score]`` of each
  item, state 0 (or NaN) pending, 1 done, 2 failed; score is the target's output on the clean
  input.
- ``errors`` ``(N,)`` str, one chunk per block: ``"ExceptionType: message"`` of failed items.
- ``paths`` ``(N,)`` str, only when the dataset has a ``paths`` attribute: readable text,
  and in the array's attribute ``raw`` the exact bytes of names that are not UTF-8.
- ``identity`` ``(N, 2)`` int64 with ``paths``: each file's size and modification time (ns)
  when the store was made or the item last recomputed (-1 for entries that are not files).
- Group attribute ``extra_attrib``: ``format``, ``state`` (``"creating"`` until the store is
  complete, then ``"ready"``), ``fingerprint`` (what must match to resume), ``block``,
  ``probe`` (one item's index and the model's clean output on it, compared on resume),
  ``versions``, ``created`` and free-form ``info``.
- ``extra_attrib-store.json`` (:data:`MARKER_NAME`): the ownership marker.
- ``extra_attrib-lease.json`` (:data:`LEASE_NAME`): the writer lease, while a run writes.

Design note.

*What makes a path ours.* Only a mark this package wrote: the marker file, whose JSON holds
the key :data:`MARKER_KEY` (written before anything else, atomically, and never removed while
the store exists), or, for stores of earlier versions that have no marker file, the group
attribute ``extra_attrib`` in ``zarr.json``. Names prove nothing: a folder whose entries are
called ``attributions``, ``records``, ``errors`` or ``paths``, or a zarr group (v2 or v3)
holding such arrays, without one of those marks, is refused with an error naming it and
nothing there is written or deleted. A missing path or an empty folder (files an operating
system drops, such as ``.DS_Store``, do not count) is used. Replacing a store of ours
(``resume=False``, or one whose creation was killed) removes only :data:`OWN_ENTRIES`; the
marker, the lease and files a user put into the folder stay, so a kill at any step leaves a
store the next run recognises. A run that fails before any item is done removes the store it
made (and the folder, if it made it and nothing else is there).

*The lease.* One run writes a store at a time; all processes of one ``torchrun`` are one run
(rank 0 holds the lease, the others check its token). :class:`Lease`: a JSON file with host,
pid and the process's start time, the run's start time, a random token and a heartbeat
refreshed every :data:`HEARTBEAT_SECONDS`; created exclusively (a hard link, or ``O_EXCL``)
after the marker and before any other write. A second run is refused
(:class:`StoreBusyError`) naming the holder. A lease is stale when its process is gone (same
host; the start time tells a reused pid apart) or, for a holder on another host, when its
heartbeat is older than :data:`LEASE_TIMEOUT`; a stale lease is replaced atomically and read
back after a moment, so of two runs taking over at once one goes on and the other is refused.
Every block write first checks that the lease still holds the run's token
(:class:`LeaseCheck`): a run presumed dead and taken over stops before it writes again. The
lease is removed at the end of the run; readers (``open_attributions``, ``show``) need none.
On object stores (``s3://``) exclusive creation is a check then a PUT, so two runs started in
the same second can both start; the token check before each write stops the one whose token
was overwritten.

*Order of the writes.* Within a run every block is written by exactly one process (the
blocks, not the items, are shared out), so writers never share a file; zarr writes each file
atomically (a temporary file renamed into place). A batch's items are written attributions
first, then error messages, then their ``records`` (state, target and score in one write), so
an item whose state is "done" has its attribution written. Results wait in a
:class:`BlockBuffer` until their block is complete or for at most :data:`FLUSH_SECONDS`; a
timer thread enforces the limit while the next batch runs, so a kill loses at most the batch
in flight and the last :data:`FLUSH_SECONDS` of results.

*What is checked on resume.* Every array: ``records`` block by block (an unreadable block is
removed and its items computed again); ``attributions`` of every done item (missing, i.e. all
NaN, or unreadable: computed again, the damaged file removed first); ``errors`` block by block
(an unreadable block is removed and its failed items are tried again); ``paths`` chunk by
chunk (an unreadable chunk is written again from the dataset's paths, whose digest matched the
fingerprint); ``identity`` (an item whose file's size or modification time changed, or whose
identity block is unreadable, is computed again). :func:`extra_attrib.open_attributions`
reports the same damage (``damaged`` items, ``damaged_chunks`` of the side arrays).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import inspect
import json
import math
import os
import platform
import shutil
import socket
import threading
import time
import types
import uuid
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import numpy as np
import torch
from torch import nn

FORMAT = 2
ATTR_KEY = "extra_attrib"
MAX_CHUNK_BYTES = 64 * 2**20
#: Blocks of small items hold at most this many bytes of attributions and this many items, and
#: a store has at least :data:`MIN_BLOCKS` blocks when it has that many items (so that the
#: processes of a ``torchrun`` can share them out).
BLOCK_BYTES = 8 * 2**20
MAX_BLOCK_ITEMS = 256
INNER_CHUNK_BYTES = 256 * 2**10
MIN_BLOCKS = 8
PENDING, DONE, FAILED = 0.0, 1.0, 2.0
#: The entries of a store's folder that this package writes (and may remove when it replaces
#: a store that is its own, as shown by :data:`MARKER_NAME`); anything else in the folder is the
#: user's and is never touched. Names alone never make a folder ours.
OWN_ENTRIES = ("zarr.json", "attributions", "records", "errors", "paths", "identity")
#: The ownership marker: written before anything else in a new store, never removed while the
#: store exists. Its JSON holds :data:`MARKER_KEY`; a file of that name without it is not ours.
MARKER_NAME = "extra_attrib-store.json"
MARKER_KEY = "extra_attrib_store"
#: The writer lease (see :class:`Lease`).
LEASE_NAME = "extra_attrib-lease.json"
LEASE_KEY = "extra_attrib_lease"
#: Seconds between heartbeats of a held lease, and the age after which the lease of a holder on
#: another host (whose process cannot be looked up) counts as abandoned.
HEARTBEAT_SECONDS = 10.0
LEASE_TIMEOUT = 120.0
#: A computed result reaches the store at most this many seconds later, even while the next
#: batch is still running (a timer thread writes the waiting blocks).
FLUSH_SECONDS = 10.0
#: Files an operating system drops into folders: a folder holding only these counts as empty
#: (they are never removed).
SYSTEM_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", ".directory"})
#: Items whose digest stands for the item list of a dataset without ``paths``.
SAMPLE_ITEMS = 8
# Arguments that only change how the work is batched or shown, or which engine computes the
# same numbers, not what is computed: a resumed run may change them (another GPU, another batch
# size). They are recorded under "info", not compared.
BATCHING_ARGUMENTS = frozenset(
    {
        "show_progress",
        "perturbations_per_eval",
        "internal_batch_size",
        "nt_samples_batch_size",
        "engine",
        "memory_budget",
    }
)


class StoreMismatchError(ValueError):
    """An existing store was made with other settings; it is never mixed with new results."""


class NotAStoreError(StoreMismatchError):
    """The path holds something this package did not make; it is never written to."""


class StoreBusyError(StoreMismatchError):
    """Another run holds the store's writer lease; nothing was written."""


def _creation_step(name: str) -> None:
    """Called after each step of :func:`create` and of claiming the place; does nothing.

    The claiming steps are ``"claimed"`` (marker written) and ``"leased"`` (lease taken). The
    tests replace it in a child process to SIGKILL it at a chosen step.
    """


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

    Numbers, strings, booleans and None stay as they are (numpy and 0-d tensor scalars become
    numbers); sequences and dicts recurse; a tensor or array becomes its shape, dtype and a
    SHA-256 digest of its values; a function or class its qualified name; any other object its
    class name.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and not value.is_complex():
            return describe_value(value.item())
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


def _method_chain(method: Any) -> List[Any]:
    """The method and the methods it wraps (``attribution_method``), outermost first."""
    chain = [method]
    while len(chain) < 8:
        inner = getattr(chain[-1], "attribution_method", None)
        if inner is None or any(inner is m for m in chain):
            break
        chain.append(inner)
    return chain


def explained_functions(method: Any) -> List[Any]:
    """Every distinct function the method chain evaluates, outermost first.

    Each level's ``model`` (an ``nn.Module``, e.g. FusionGrad's network) and ``forward_func``.
    """
    found: List[Any] = []
    for level in _method_chain(method):
        for candidate in (getattr(level, "model", None), getattr(level, "forward_func", None)):
            if candidate is None or isinstance(candidate, (bool, int, float, str)):
                continue
            if not (isinstance(candidate, nn.Module) or callable(candidate)):
                continue
            if not any(candidate is f for f in found):
                found.append(candidate)
    return found


_MISSING = object()


def _constructor_value(method: Any, name: str) -> Any:
    """The value a method keeps for its constructor argument ``name``.

    The attribute ``name`` or ``_name`` of the method, or of an attribution it holds
    (GuidedGradCam's ``grad_cam``).
    """
    places = [method] + [
        v
        for v in vars(method).values()
        if hasattr(v, "attribute") and not isinstance(v, (nn.Module, type))
    ]
    for place in places:
        attributes = vars(place) if hasattr(place, "__dict__") else {}
        for key in (name, f"_{name}"):
            if key in attributes:
                return attributes[key]
    return _MISSING


def _constructor_settings(method: Any, skip: Sequence[Any], reach: _Reach) -> Dict[str, Any]:
    """The constructor arguments of ``method`` whose value differs from the default.

    A method's constructor arguments are its settings (``multiply_by_inputs=False``, a
    ``layer``, Lime's ``similarity_func``); an argument left at its default is omitted, so that
    an explicit default equals an omitted one (and stores of earlier versions, which recorded
    none, resume when nothing differs). Values in ``skip`` (the explained functions, the wrapped
    method) are described elsewhere. An argument whose value cannot be found on the object is
    listed in ``reach.opaque``.
    """
    from captum.attr import Attribution

    if not isinstance(method, Attribution):  # a user's wrapper: its class name is recorded
        return {}
    try:
        parameters = list(inspect.signature(type(method).__init__).parameters.items())[1:]
    except (TypeError, ValueError):
        return {}
    settings: Dict[str, Any] = {}
    for name, parameter in parameters:
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        value = _constructor_value(method, name)
        if value is _MISSING:
            reach.opaque.append(f"{_qualname(method)}'s constructor argument {name!r}")
            continue
        if any(value is other for other in skip):
            continue
        described = reach(value)
        if parameter.default is not inspect.Parameter.empty:
            if _canonical(described) == _canonical(_Reach(value)(parameter.default)):
                continue
        settings[name] = described
    return settings


def describe_method(method: Any, opaque: Optional[List[str]] = None) -> Any:
    """Class name of an attribution method, the methods it wraps and its non-default settings.

    Wrapped methods (NoiseTunnel, FusionGrad) under ``wraps``; constructor settings that differ
    from their defaults under ``settings``.

    ``opaque``, if given, receives what could not be described.
    """
    chain = _method_chain(method)
    skip = explained_functions(method) + chain
    description: Dict[str, Any] = {"class": _qualname(chain[-1])}
    for level in reversed(chain):
        reach = _Reach(level)
        settings = _constructor_settings(level, skip, reach)
        if opaque is not None:
            opaque += reach.opaque
        this: Dict[str, Any] = {"class": _qualname(level)}
        if level is not chain[-1]:
            this["wraps"] = description
        if settings:
            this["settings"] = settings
        description = this
    return description


def _module_digest(model: nn.Module) -> Dict[str, Any]:
    """Class, parameters and buffers (names, shapes, values), and the modules' str/bool settings.

    The settings are the public ``str`` and ``bool`` attributes of every submodule (``training``
    among them, and a wrapper's ``score="softmax"``) and its public function attributes (a
    wrapper's score function); numbers are left out, since models keep counters there.
    """
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(_tensor_digest(tensor).encode())
    for name, module in model.named_modules():
        flags: Dict[str, Any] = {}
        for key, value in vars(module).items():
            if key.startswith("_"):
                continue
            if isinstance(value, (bool, str)):
                flags[key] = value
            elif inspect.isroutine(value) or isinstance(value, functools.partial):
                flags[key] = _Reach(value)(value)  # e.g. a wrapper's score function
        text = json.dumps(flags, sort_keys=True, default=str)
        h.update(f"{name}:{_qualname(module)}:{text}".encode())
    return {"class": _qualname(model), "state_sha256": h.hexdigest()[:16]}


def _code_names(code: types.CodeType) -> List[str]:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _code_names(const)
    return names


class _Reach:
    """Describes what a forward function reaches: modules, tensors, closure cells, settings."""

    MAX_DEPTH = 6

    def __init__(self, root: Any) -> None:
        self.root_module = getattr(root, "__module__", None)
        self.opaque: List[str] = []
        self.seen: set = set()

    def __call__(self, obj: Any, depth: int = 0) -> Any:
        if isinstance(obj, nn.Module):
            return _module_digest(obj)
        if obj is None or isinstance(
            obj, (bool, int, float, str, torch.dtype, torch.Tensor, np.ndarray, np.generic)
        ):
            return describe_value(obj)
        if isinstance(obj, types.ModuleType) or inspect.isclass(obj) or inspect.isbuiltin(obj):
            return {
                "name": _qualname(obj) if not isinstance(obj, types.ModuleType) else obj.__name__
            }
        if id(obj) in self.seen:
            return {"again": _qualname(obj)}
        if depth > self.MAX_DEPTH:
            self.opaque.append(_qualname(obj))
            return {"opaque": _qualname(obj)}
        self.seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            return [self(v, depth + 1) for v in obj]
        if isinstance(obj, dict):
            return {
                str(k): self(v, depth + 1)
                for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))
            }
        if inspect.ismethod(obj):
            return {"method": obj.__func__.__qualname__, "self": self(obj.__self__, depth + 1)}
        if isinstance(obj, functools.partial):
            return {
                "partial": self(obj.func, depth + 1),
                "args": self(list(obj.args), depth + 1),
                "keywords": self(dict(obj.keywords), depth + 1),
            }
        if inspect.isfunction(obj):
            return self._function(obj, depth)
        if hasattr(obj, "__dict__"):  # a callable object, or an object a function holds
            return {"object": _qualname(obj), "attributes": self(dict(vars(obj)), depth + 1)}
        self.opaque.append(_qualname(obj))
        return {"opaque": _qualname(obj)}

    def _function(self, fn: types.FunctionType, depth: int) -> Any:
        code = fn.__code__
        out: Dict[str, Any] = {"function": _qualname(fn), "code": _code_digest(code)}
        cells = {}
        for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
            try:
                cells[name] = self(cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                cells[name] = None
        out["closure"] = cells
        if fn.__defaults__:
            out["defaults"] = self(list(fn.__defaults__), depth + 1)
        if fn.__kwdefaults__:
            out["kwdefaults"] = self(dict(fn.__kwdefaults__), depth + 1)
        used: Dict[str, Any] = {}
        for name in sorted(set(_code_names(code))):
            if name not in fn.__globals__:
                continue
            value = fn.__globals__[name]
            # user code: what it reaches counts (also through dicts, lists, namespaces and
            # objects); modules, classes and library functions are named, not walked
            if isinstance(value, (bool, int, float, str)) or value is None:
                used[name] = value
            elif isinstance(value, types.ModuleType) or inspect.isclass(value):
                continue
            elif inspect.isroutine(value) and not inspect.isfunction(value):
                continue  # a builtin such as len
            elif inspect.isfunction(value) and value.__module__ != self.root_module:
                continue  # a library function: named by the code that calls it
            elif isinstance(value, _FOLLOWED) or inspect.isroutine(value):
                used[name] = self(value, depth + 1)
            elif type(value).__module__ == self.root_module:
                used[name] = self(value, depth + 1)  # an object of the user's own class
            else:
                # a library's object (a logger, a client): its attributes may change by
                # themselves, so it is announced rather than walked
                self.opaque.append(f"the global {name!r} ({_qualname(value)})")
                used[name] = {"opaque": _qualname(value)}
        out["globals"] = used
        return out


#: Globals a forward function reads that are followed whatever module they come from.
_FOLLOWED = (
    dict,
    list,
    tuple,
    types.SimpleNamespace,
    functools.partial,
    nn.Module,
    torch.Tensor,
    np.ndarray,
    np.generic,
    torch.dtype,
)


def _code_digest(code: types.CodeType) -> str:
    h = hashlib.sha256(code.co_code)
    h.update(repr((code.co_names, code.co_varnames)).encode())
    for const in code.co_consts:
        h.update(
            (_code_digest(const) if isinstance(const, types.CodeType) else repr(const)).encode()
        )
    return h.hexdigest()[:16]


def model_digest(model: Any) -> Tuple[Dict[str, Any], List[str]]:
    """What the explained function is: ``(description, what could not be fingerprinted)``.

    A module: its class and a digest of its parameters, buffers and str/bool settings. A
    function (``lambda x: m(x).softmax(1)``), bound method, ``functools.partial`` or callable
    object: the modules, tensors and values it reaches through closure cells, defaults, the
    globals of its own module, ``__self__`` and attributes, recursively. The second element
    names the objects on the way that could not be described (resume then relies on the model's
    output on one item, stored in the store's ``probe``).
    """
    if model is None:
        return {"function": None}, []
    if isinstance(model, nn.Module):
        return _module_digest(model), []
    reach = _Reach(model)
    return {"function": reach(model)}, reach.opaque


def method_digest(method: Any) -> Tuple[Any, Any, List[str]]:
    """``(method description, model description, what could not be fingerprinted)``.

    The model is every function the method chain evaluates (:func:`explained_functions`): one
    is described as by :func:`model_digest`, several (FusionGrad's network and the wrapped
    method's forward function) as ``{"functions": [...]}``.
    """
    opaque: List[str] = []
    described = describe_method(method, opaque)
    functions = explained_functions(method)
    if len(functions) <= 1:
        model, more = model_digest(functions[0] if functions else None)
        return described, model, opaque + more
    parts = []
    for function in functions:
        part, more = model_digest(function)
        parts.append(part)
        opaque += more
    return described, {"functions": parts}, opaque


def resolved_arguments(
    method: Any, attribute_kwargs: Dict[str, Any], item_shape: Sequence[int]
) -> Dict[str, Any]:
    """``attribute_kwargs`` as the method will read them, so that equal settings compare equal.

    The defaults of ``method.attribute`` (and, through ``**kwargs``, of the methods it wraps)
    are filled in, so an explicit default (``score="raw"``) equals an omitted one; for
    :class:`~extra_attrib.TiledOcclusion`, ``window`` and ``k`` become per-dimension tuples
    (``window=4, k=2`` equals ``window=(3, 4, 4), k=(1, 2, 2)`` on 3 x H x W items).
    Arguments in :data:`BATCHING_ARGUMENTS` are left out.
    """
    full = dict(attribute_kwargs)
    current, depth = method, 0
    while current is not None and depth < 8:
        try:
            parameters = inspect.signature(current.attribute).parameters
        except (TypeError, ValueError, AttributeError):
            break
        for name, parameter in list(parameters.items())[1:]:  # the first one is the inputs
            if name == "target" or parameter.kind in (
                inspect.Parameter.VAR_KEYWORD,
                inspect.Parameter.VAR_POSITIONAL,
            ):
                continue
            if name not in full and parameter.default is not inspect.Parameter.empty:
                full[name] = parameter.default
        passes_on = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        inner = getattr(current, "attribution_method", None)
        if not passes_on or inner is None or inner is current:
            break
        current, depth = inner, depth + 1
    from extra_attrib.tiled_occlusion import TiledOcclusion, resolve_tiling

    if isinstance(current, TiledOcclusion) and "window" in full:
        try:
            geometry = resolve_tiling(
                [tuple(int(s) for s in item_shape)], full["window"], full["k"]
            )
        except (TypeError, ValueError):
            pass  # the run raises the method's own error
        else:
            full["window"] = list(geometry[0].window)
            full["k"] = list(geometry[0].k)
    return {key: value for key, value in full.items() if key not in BATCHING_ARGUMENTS}


def describe_target(target: Any) -> Any:
    if isinstance(target, str) or (isinstance(target, int) and not isinstance(target, bool)):
        return target
    reach = _Reach(target)
    return {"callable": reach(target)}


def as_path(path: Any) -> str:
    """A dataset's path entry as a str, losslessly.

    Bytes and path-likes go through :func:`os.fsdecode` (a name that is not UTF-8 keeps its
    bytes as surrogate escapes).
    """
    if isinstance(path, (bytes, os.PathLike)):
        return os.fsdecode(path)
    return str(path)


def path_bytes(path: str) -> bytes:
    """The file name's bytes (:func:`os.fsencode`; equal to UTF-8 for a UTF-8 name)."""
    try:
        return os.fsencode(path)
    except UnicodeError:
        return path.encode("utf-8", "surrogatepass")


def shown_path(path: Optional[str]) -> str:
    r"""A path for messages: bytes that are not UTF-8 as ``\xe9`` escapes (always printable)."""
    if path is None:
        return "(unknown: its paths chunk is damaged)"
    return path_bytes(path).decode("utf-8", "backslashreplace")


def items_digest(paths: Optional[Sequence[str]]) -> Optional[str]:
    """SHA-256 of the item list (the dataset's ``paths``, as bytes), or None without paths."""
    if paths is None:
        return None
    h = hashlib.sha256()
    for path in paths:
        h.update(path_bytes(as_path(path)))
        h.update(b"\0")
    return h.hexdigest()


def sample_indices(n: int) -> List[int]:
    """The items whose digest stands for a dataset without paths.

    Up to :data:`SAMPLE_ITEMS`, spread evenly from the first to the last.
    """
    return sorted({int(round(float(i))) for i in np.linspace(0, n - 1, min(n, SAMPLE_ITEMS))})


def sample_digest(items: Sequence[Tuple[int, Any]]) -> Dict[str, str]:
    """``{index: digest}`` of the items of :func:`sample_indices` that load (a tensor).

    An item that fails to load is left out (it may load next time: its failure is retried).
    """
    out = {}
    for index, item in items:
        if isinstance(item, torch.Tensor):
            out[str(index)] = f"{tuple(item.shape)}{item.dtype}:{_tensor_digest(item)}"
    return out


def fingerprint(
    method: Any,
    attribute_kwargs: Dict[str, Any],
    target: Any,
    n_items: int,
    item_shape: Sequence[int],
    dtype: torch.dtype,
    paths: Optional[Sequence[str]] = None,
    probe: Optional[Tuple[int, torch.Tensor]] = None,
    sample: Optional[Dict[str, str]] = None,
) -> Dict[str, Any]:
    """Everything that must be equal for a resumed run to add to an existing store.

    ``paths`` (the item list) is compared through a digest; without paths, ``probe`` (an item's
    index and tensor) and ``sample`` (:func:`sample_digest` of several items, so that items
    reordered around an unchanged first one differ) stand for the items.
    """
    described, model, _ = method_digest(method)
    items: Dict[str, Any] = {"paths_sha256": items_digest(paths)}
    if paths is None and probe is not None:
        items["probe"] = {"index": int(probe[0]), "sha256": _tensor_digest(probe[1])}
    if paths is None and sample is not None:
        items["sample"] = sample
    return {
        "method": described,
        "arguments": describe_value(resolved_arguments(method, attribute_kwargs, item_shape)),
        "model": model,
        "target": describe_target(target),
        "N": int(n_items),
        "item_shape": [int(s) for s in item_shape],
        "dtype": str(dtype),
        "items": items,
    }


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def differences(stored: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """Keys whose values differ, as ``"key: stored -> new"`` lines (long values shortened)."""
    stored, new = _canonical(stored), _canonical(new)
    lines = []
    for key in sorted(set(stored) | set(new)):
        if stored.get(key) != new.get(key):
            a, b = json.dumps(stored.get(key)), json.dumps(new.get(key))
            if len(a) + len(b) > 400:
                a, b = a[:200] + "...", b[:200] + "..."
            lines.append(f"{key}: {a} -> {b}")
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


def describe_output(output: Any) -> Optional[Dict[str, Any]]:
    """The clean output of the probe item: shape, a sample of values and sums (or None)."""
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        return None
    flat = output.detach().to("cpu", torch.float64).flatten()
    return {
        "shape": list(output.shape),
        "values": [float(v) for v in flat[:256]],
        "sum": float(flat.sum()),
        "abs_sum": float(flat.abs().sum()),
    }


def output_difference(stored: Dict[str, Any], new: Optional[Dict[str, Any]]) -> Optional[str]:
    """Why two :func:`describe_output` results differ beyond rounding, or None if they agree.

    The tolerance (1e-3 of the largest value) admits another device or thread count, not other
    weights.
    """
    if new is None or stored.get("shape") != new.get("shape"):
        return f"output shape {stored.get('shape')} -> {None if new is None else new['shape']}"
    a, b = np.asarray(stored["values"]), np.asarray(new["values"])
    scale = max(float(np.abs(a).max(initial=0.0)), 1e-12)
    sums = np.asarray([stored["sum"], stored["abs_sum"]]) - np.asarray([new["sum"], new["abs_sum"]])
    worst = max(
        float(np.abs(a - b).max(initial=0.0)) / scale,
        float(np.abs(sums).max()) / (max(stored["abs_sum"], 1e-12)),
    )
    if not math.isfinite(worst) or worst > 1e-3:
        return f"largest relative difference {worst:.3g}"
    return None


# --------------------------------------------------------------------------------------------
# Where the store lives: a local folder or a URL; what is there
# --------------------------------------------------------------------------------------------


class Place:
    """The store's location: a local folder (``os``) or a URL (``fsspec``)."""

    def __init__(self, out: str, storage_options: Optional[Dict[str, Any]] = None) -> None:
        self.out = out
        self.fs: Any = None
        if "://" in out and not out.startswith("file://"):
            import fsspec  # type: ignore[import-untyped]

            self.fs, self.root = fsspec.core.url_to_fs(out, **(storage_options or {}))
        else:
            self.root = os.path.abspath(out[len("file://") :] if out.startswith("file://") else out)

    def _join(self, name: str) -> str:
        return (
            f"{self.root.rstrip('/')}/{name}"
            if self.fs is not None
            else os.path.join(self.root, name)
        )

    def kind(self) -> str:
        """``"missing"``, ``"file"`` or ``"folder"``."""
        if self.fs is None:
            if not os.path.lexists(self.root):
                return "missing"
            return (
                "folder" if os.path.isdir(self.root) and not os.path.islink(self.root) else "file"
            )
        if self.fs.isfile(self.root):
            return "file"
        return "folder" if self.fs.exists(self.root) else "missing"

    def names(self) -> List[str]:
        if self.fs is None:
            return sorted(os.listdir(self.root))
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    def exists(self, name: str) -> bool:
        path = self._join(name)
        return os.path.lexists(path) if self.fs is None else bool(self.fs.exists(path))

    def read(self, name: str) -> bytes:
        if self.fs is None:
            with open(self._join(name), "rb") as f:
                return f.read()
        return bytes(self.fs.cat_file(self._join(name)))

    def make_folder(self) -> bool:
        """Make the store's folder (and its parents); True if this call made it."""
        if self.fs is not None:
            return False  # object stores have no folders; a file makes its "folder"
        if os.path.isdir(self.root):
            return False
        os.makedirs(self.root, exist_ok=True)
        return True

    def write(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically: a temporary file renamed into place (one PUT on URLs)."""
        if self.fs is not None:
            self.fs.pipe_file(self._join(name), data)
            return
        temporary = self._join(f"{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
        try:
            with open(temporary, "wb") as f:
                f.write(data)
            os.replace(temporary, self._join(name))
        finally:
            if os.path.lexists(temporary):
                os.remove(temporary)

    def create(self, name: str, data: bytes) -> bool:
        """Write ``name`` only if it does not exist; True if this call wrote it.

        Local: exclusive (a hard link of a complete temporary file, or ``O_EXCL``). URLs: a
        check then a PUT, which two runs starting within the same moment can both pass; the
        caller reads the file back to see whose it is.
        """
        path = self._join(name)
        if self.fs is not None:
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
            return True
        temporary = self._join(f"{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
        try:
            with open(temporary, "wb") as f:
                f.write(data)
            try:
                os.link(temporary, path)
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links
                try:
                    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(descriptor, "wb") as f:
                    f.write(data)
            return True
        finally:
            if os.path.lexists(temporary):
                os.remove(temporary)

    def remove(self, name: str) -> None:
        path = self._join(name)
        if self.fs is not None:
            self.fs.rm(path, recursive=True)
        elif os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)

    def remove_folder_if_empty(self) -> None:
        if self.fs is None:
            try:
                os.rmdir(self.root)
            except OSError:
                pass


def _is_own(name: str) -> bool:
    """An entry a store of ours writes, removed when the store is replaced.

    Never the marker, the lease or anything else.
    """
    # zarr writes every file as NAME.<uuid>.partial first, and so do the marker and the lease
    # (Place.write): a kill can leave one behind
    return name in OWN_ENTRIES or _is_own_partial(name)


def _is_own_partial(name: str) -> bool:
    return name.endswith(".partial") and name.startswith(
        ("zarr.", f"{MARKER_NAME}.", f"{LEASE_NAME}.")
    )


def _is_system_file(name: str) -> bool:
    return name in SYSTEM_FILES or name.startswith("._")


def _json_of(place: Place, name: str) -> Any:
    try:
        return json.loads(place.read(name))
    except (OSError, ValueError):
        return None


def has_marker(place: Place) -> bool:
    """Whether the ownership marker of this package is at ``place``."""
    document = _json_of(place, MARKER_NAME) if place.exists(MARKER_NAME) else None
    return isinstance(document, dict) and MARKER_KEY in document


def write_marker(place: Place) -> None:
    """Write the ownership marker (first thing in a new store; added to older stores)."""
    document = {
        MARKER_KEY: FORMAT,
        "note": "this folder is a store of extra_attrib.explain_dataset; the package replaces "
        "only its own entries here (zarr.json, attributions, records, errors, paths, identity)",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    place.write(MARKER_NAME, json.dumps(document, indent=1).encode())


def check_place(
    out: Any, storage_options: Optional[Dict[str, Any]] = None
) -> Optional[Dict[str, Any]]:
    """What is at ``out``: None (nothing, or an empty folder) or this package's store metadata.

    A path is ours only through a mark this package wrote: the marker file
    (:data:`MARKER_NAME`) or, for stores of earlier versions, the group attribute
    :data:`ATTR_KEY` in ``zarr.json``. Entries that merely have the names of a store's arrays
    prove nothing. The metadata of a store whose creation did not finish (a marker and no
    complete group file) has ``state`` ``"creating"``.

    Raises:
        NotAStoreError: ``out`` is a file, a folder holding other files (and no mark of ours),
            or a zarr group this package did not make. Nothing is written there.
    """
    place = Place(out, storage_options)
    kind = place.kind()
    if kind == "missing":
        return None
    if kind == "file":
        raise NotAStoreError(
            f"out={out!r} is an existing file, not a store of explain_dataset; refusing to touch "
            f"it (give a new or empty folder)"
        )
    names = [name for name in place.names() if not _is_system_file(name)]
    if not names or all(_is_own_partial(name) for name in names):
        return None  # empty, or what a kill left while the marker was written
    marked = MARKER_NAME in names and has_marker(place)
    meta = None
    if "zarr.json" in names:
        document = _json_of(place, "zarr.json")
        attributes = document.get("attributes", {}) if isinstance(document, dict) else {}
        meta = attributes.get(ATTR_KEY) if isinstance(attributes, dict) else None
        is_group = isinstance(document, dict) and document.get("node_type") == "group"
        if not (is_group and isinstance(meta, dict)):
            if not marked:
                kind_shown = document.get("node_type", "node") if isinstance(document, dict) else ""
                raise NotAStoreError(
                    f"out={out!r} is a zarr {kind_shown or 'node'} that explain_dataset did not "
                    f"make (no {MARKER_NAME} marker, no {ATTR_KEY!r} attribute); refusing to "
                    f"write into it or delete it"
                )
            meta = None  # our marker, a group file killed while written: unfinished
    if meta is not None:
        meta = dict(meta)
        meta.setdefault("state", "ready")  # format 1 stores had no state
        return meta
    if marked:
        return {"format": FORMAT, "state": "creating"}
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise NotAStoreError(
        f"out={out!r} is a folder holding other files ({shown}) and no store of "
        f"explain_dataset (no {MARKER_NAME} marker); refusing to write into it or delete "
        f"anything (give a new or empty folder)"
    )


def claim(out: Any, storage_options: Optional[Dict[str, Any]] = None) -> bool:
    """Mark ``out`` as ours before anything else is written: the folder, then the marker.

    ``out`` must have passed :func:`check_place` (nothing, an empty folder, or ours). Returns
    True if this call made the folder (a run that fails before its first item removes it again).
    """
    place = Place(out, storage_options)
    made = place.make_folder()
    if not has_marker(place):
        write_marker(place)
    return made


def discard(out: Any, made_folder: bool, storage_options: Optional[Dict[str, Any]] = None) -> None:
    """Remove a store this run made and that holds no result.

    Its own entries, then the marker and the lease, then the folder if this run made it and
    nothing else is in it.
    """
    place = Place(out, storage_options)
    if place.kind() != "folder":
        return
    for name in place.names():
        if _is_own(name):
            place.remove(name)
    for name in (MARKER_NAME, LEASE_NAME):
        if place.exists(name):
            place.remove(name)
    if made_folder:
        place.remove_folder_if_empty()


# --------------------------------------------------------------------------------------------
# One writer at a time: the lease
# --------------------------------------------------------------------------------------------


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (Linux ``/proc``), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def describe_holder(lease: Dict[str, Any]) -> str:
    beat = lease.get("heartbeat")
    age = f", last heartbeat {time.time() - float(beat):.0f} s ago" if beat else ""
    return (
        f"host {lease.get('host')!s}, pid {lease.get('pid')!s}, started "
        f"{lease.get('started')!s}{age}"
    )


def lease_is_stale(lease: Any) -> Optional[str]:
    """Why a lease no longer protects a live run, or None while its holder may be alive.

    On this host: its process is gone (or its pid now belongs to another process). On another
    host, where the process cannot be looked up: no heartbeat for :data:`LEASE_TIMEOUT` s.
    """
    if not isinstance(lease, dict) or LEASE_KEY not in lease:
        return "the lease file is unreadable"
    if lease.get("host") == socket.gethostname():
        pid = lease.get("pid")
        if not isinstance(pid, int) or not _process_exists(pid):
            return f"its process {pid} no longer exists"
        start = lease.get("pid_start")
        if start is not None and _process_start(pid) not in (None, start):
            return f"its process {pid} no longer exists (the pid now belongs to another)"
        return None
    try:
        age = time.time() - float(lease.get("heartbeat", 0.0))
    except (TypeError, ValueError):
        return "its heartbeat is unreadable"
    if age > LEASE_TIMEOUT:
        return f"no heartbeat for {age:.0f} s (more than {LEASE_TIMEOUT:.0f} s)"
    return None


class Lease:
    """The store's writer lease: one run (all processes of one ``torchrun``) writes at a time.

    The lease is the JSON file :data:`LEASE_NAME` in the store: host, pid (and the process's
    start time), the run's start time, a random token, and a heartbeat that a background
    thread refreshes every :data:`HEARTBEAT_SECONDS`. :meth:`acquire` creates it exclusively;
    an existing lease of a live holder is refused with :class:`StoreBusyError` naming the
    holder, a stale one (:func:`lease_is_stale`) is replaced atomically and read back after a
    moment (of two runs taking over at once, the one whose token is in the file goes on, the
    other is refused). Every block write first checks that the token in the file is still the
    run's (:meth:`check`), so a run presumed dead and taken over stops before writing again.
    :meth:`release` removes the file if it is still the run's.
    """

    def __init__(self, out: Any, storage_options: Optional[Dict[str, Any]] = None) -> None:
        self.out = out
        self.place = Place(out, storage_options)
        self.token = uuid.uuid4().hex
        self.record: Dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lost: Optional[str] = None

    def _document(self) -> bytes:
        self.record["heartbeat"] = time.time()
        return json.dumps(self.record).encode()

    def acquire(self) -> Optional[str]:
        """Take the lease; returns why a stale lease was taken over (None if there was none).

        Raises:
            StoreBusyError: a live run holds it.
        """
        pid = os.getpid()
        self.record = {
            LEASE_KEY: 1,
            "host": socket.gethostname(),
            "pid": pid,
            "pid_start": _process_start(pid),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "token": self.token,
        }
        taken_over = None
        for _ in range(3):
            if self.place.create(LEASE_NAME, self._document()):
                if self._mine():
                    break
                continue
            current = _json_of(self.place, LEASE_NAME) if self.place.exists(LEASE_NAME) else {}
            if current == {}:
                continue  # released in the meantime
            why = lease_is_stale(current)
            if why is None:
                raise StoreBusyError(
                    f"out={self.out!r} is being written by another run, which holds its lease "
                    f"({describe_holder(current)}); refusing to write at the same time. Wait "
                    f"for it to finish, or stop it; a lease left by a killed run is taken over "
                    f"automatically (on another host after {LEASE_TIMEOUT:.0f} s without a "
                    f"heartbeat)"
                )
            self.place.write(LEASE_NAME, self._document())
            time.sleep(0.2)  # a run that took it over at the same moment has written by now
            if self._mine():
                shown = describe_holder(current) if isinstance(current, dict) else "unknown"
                taken_over = f"{why} ({shown})"
                break
        else:
            current = _json_of(self.place, LEASE_NAME)
            holder = describe_holder(current) if isinstance(current, dict) else "unknown"
            raise StoreBusyError(
                f"out={self.out!r}: another run took the store's lease at the same moment "
                f"({holder}); refusing to write at the same time"
            )
        self._thread = threading.Thread(target=self._beat, name="extra_attrib-lease", daemon=True)
        self._thread.start()
        return taken_over

    def holds(self) -> bool:
        """Whether the lease file still holds this run's token."""
        try:
            return self._mine()
        except OSError:
            return False

    def _mine(self) -> bool:
        current = _json_of(self.place, LEASE_NAME) if self.place.exists(LEASE_NAME) else None
        return isinstance(current, dict) and current.get("token") == self.token

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if not self._mine():
                    current = _json_of(self.place, LEASE_NAME)
                    holder = describe_holder(current) if isinstance(current, dict) else "none"
                    self.lost = f"the lease is no longer this run's (holder now: {holder})"
                    return
                self.place.write(LEASE_NAME, self._document())
            except OSError:
                pass  # a passing file-system error: the next beat tries again

    def stop(self) -> None:
        """Stop the heartbeat (the lease file stays)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this run's."""
        self.stop()
        try:
            if self._mine():
                self.place.remove(LEASE_NAME)
        except OSError:
            pass


class LeaseCheck:
    """Called before each block write: is the store's lease still the run's?

    Raises :class:`StoreBusyError` unless the lease holds ``token`` (the run's; under
    torchrun rank 0's, shared with every rank).
    """

    def __init__(self, out: Any, token: str, storage_options: Optional[Dict[str, Any]] = None):
        self.out, self.token = out, token
        self.place = Place(out, storage_options)

    def __call__(self) -> None:
        current = _json_of(self.place, LEASE_NAME) if self.place.exists(LEASE_NAME) else None
        if not (isinstance(current, dict) and current.get("token") == self.token):
            holder = describe_holder(current) if isinstance(current, dict) else "none"
            raise StoreBusyError(
                f"out={self.out!r}: this run's lease was taken over or removed (holder now: "
                f"{holder}), so it stops writing; nothing it wrote before is lost"
            )


# --------------------------------------------------------------------------------------------
# Creating
# --------------------------------------------------------------------------------------------


def block_items(n: int, item_shape: Sequence[int], itemsize: int) -> int:
    """Items per block of a store of ``n`` items.

    As many as fit in :data:`BLOCK_BYTES`, at most :data:`MAX_BLOCK_ITEMS`, and few enough for
    ``n`` items to make :data:`MIN_BLOCKS` blocks.
    """
    item_bytes = max(1, math.prod(int(s) for s in item_shape) * itemsize)
    return max(1, min(BLOCK_BYTES // item_bytes, MAX_BLOCK_ITEMS, -(-n // MIN_BLOCKS)))


def attribution_chunks(
    item_shape: Sequence[int], itemsize: int, block: int = 1
) -> Tuple[Tuple[int, ...], Optional[Tuple[int, ...]]]:
    """``(chunks, shards)`` of the attributions array: one file per block of items.

    An item of at most :data:`MAX_CHUNK_BYTES`: a block is one chunk when it holds at most
    :data:`INNER_CHUNK_BYTES`, else one shard whose inner chunks hold as many items as fit in
    :data:`INNER_CHUNK_BYTES` (at least one; a divisor of ``block``), so that reading one item
    reads little more than the item. A larger item is
    one shard whose inner chunks halve the largest dimension (to a divisor of the item's size)
    until they fit, e.g. a ``(1, 512, 512, 512)`` float32 volume (512 MiB) is one shard of
    ``(1, 256, 256, 256)`` chunks (64 MiB).
    """
    item = (1, *[int(s) for s in item_shape])
    inner = list(item)
    while math.prod(inner) * itemsize > MAX_CHUNK_BYTES:
        dim = max(range(1, len(inner)), key=lambda i: inner[i])
        if inner[dim] == 1:
            break
        # the largest divisor of the item's size at most half the current chunk: a shard must
        # hold a whole number of chunks
        half = -(-inner[dim] // 2)
        inner[dim] = max(d for d in range(1, half + 1) if item[dim] % d == 0)
    if tuple(inner) != item:
        return tuple(inner), item
    # inner chunks of several tiny items: decoding a chunk costs about as much as reading 100 kB
    per_inner = max(1, INNER_CHUNK_BYTES // max(1, math.prod(item) * itemsize))
    rows = max(d for d in range(1, block + 1) if block % d == 0 and d <= per_inner)
    if rows == block:
        return (block, *item[1:]), None
    return (rows, *item[1:]), (block, *item[1:])


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


def file_identity(path: str) -> Tuple[int, int]:
    """``(size, modification time in ns)`` of a local file, or ``(-1, -1)`` (not a file)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return (-1, -1)
    if not os.path.isfile(path):
        return (-1, -1)
    return (int(st.st_size), int(st.st_mtime_ns))


def changed_file(group: Any, paths: Optional[Sequence[Any]], index: int) -> Optional[str]:
    """Item ``index``'s path, shown, where its file's identity differs from the stored one.

    None where the dataset has no paths, the store no identities, or the identity of that item
    cannot be read (a damaged block: the resume repairs it, and says so).
    """
    if paths is None or "identity" not in group or not 0 <= index < len(paths):
        return None
    path = as_path(paths[index])
    try:
        stored = tuple(int(v) for v in np.asarray(group["identity"][index], dtype=np.int64))
    except Exception:
        return None
    return shown_path(path) if stored != file_identity(path) else None


def identities(paths: Sequence[str]) -> np.ndarray:
    """``(N, 2)`` int64 :func:`file_identity` of every path (local files only; -1 otherwise)."""
    return np.asarray([file_identity(p) for p in paths], dtype=np.int64).reshape(len(paths), 2)


def write_paths(array: Any, paths: Sequence[str], lo: int = 0, hi: Optional[int] = None) -> None:
    r"""Write ``paths[lo:hi]`` into the ``paths`` array, losslessly.

    Readable text (bytes that are not UTF-8 as ``\xe9`` escapes), and the exact bytes of such
    names in the array's attribute ``raw`` (``{index: hex}``), so that no name is lost or
    altered.
    """
    hi = len(paths) if hi is None else hi
    raw = dict(array.attrs.get("raw", {}))
    texts = []
    for i in range(lo, hi):
        data = path_bytes(paths[i])
        text = data.decode("utf-8", "backslashreplace")
        raw.pop(str(i), None)
        if text.encode("utf-8") != data:
            raw[str(i)] = data.hex()
        texts.append(text)
    if raw != dict(array.attrs.get("raw", {})):
        array.attrs["raw"] = raw
    array[lo:hi] = np.asarray(texts, dtype=object)


def read_paths(group: Any) -> Tuple[Optional[List[Optional[str]]], Dict[str, str]]:
    """The stored paths, and ``{chunk key: reason}`` of the damaged chunks.

    Read chunk by chunk: a damaged chunk's entries are None. Names that are not UTF-8 come
    back exactly (as :func:`os.fsdecode` gives them).
    """
    if "paths" not in group:
        return None, {}
    array = group["paths"]
    n, step = array.shape[0], array.chunks[0]
    try:
        raw = dict(array.attrs.get("raw", {}))
    except Exception:
        raw = {}
    out: List[Optional[str]] = [None] * n
    damaged: Dict[str, str] = {}
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        try:
            values = array[lo:hi]
        except Exception as err:
            damaged[chunk_key(array, (lo // step,))] = f"unreadable ({type(err).__name__})"
            continue
        for i, value in zip(range(lo, hi), values):
            code = raw.get(str(i))
            out[i] = os.fsdecode(bytes.fromhex(code)) if code else str(value)
    return out, damaged


def create(
    out: Any,
    fp: Dict[str, Any],
    paths: Optional[Sequence[str]],
    info: Dict[str, Any],
    storage_options: Optional[Dict[str, Any]] = None,
    probe: Optional[Dict[str, Any]] = None,
    notes: Sequence[str] = (),
) -> None:
    """Create the store at ``out`` for the fingerprint ``fp``, replacing only a store of ours.

    The caller has claimed ``out`` (:func:`claim`: the marker is there) and holds its lease.
    Steps (each followed by :func:`_creation_step`): remove the entries of an earlier store of
    ours (``"cleared"``; the marker and the lease stay), write the group file marked ``state:
    "creating"`` (``"marker"``), create each array (``"array:NAME"``), write the paths and the
    files' identities (``"paths"``), mark the store ``"ready"`` with its fingerprint
    (``"ready"``). A kill between any two steps leaves the marker and a store not "ready",
    which the next run makes again.

    Raises:
        NotAStoreError: something this package did not make is at ``out``.
    """
    zarr = _zarr()
    existing = check_place(out, storage_options)
    place = Place(out, storage_options)
    if existing is not None:
        for name in place.names():
            if _is_own(name):
                place.remove(name)
    _creation_step("cleared")
    marker = {"format": FORMAT, "state": "creating"}
    group = zarr.create_group(out, storage_options=storage_options, attributes={ATTR_KEY: marker})
    _creation_step("marker")
    n, shape = fp["N"], tuple(fp["item_shape"])
    dtype = np.dtype(str(fp["dtype"]).replace("torch.", ""))
    block = block_items(n, shape, dtype.itemsize)
    chunks, shards = attribution_chunks(shape, dtype.itemsize, block)
    group.create_array(
        "attributions",
        shape=(n, *shape),
        chunks=chunks,
        shards=shards,
        dtype=dtype,
        fill_value=np.nan,
    )
    _creation_step("array:attributions")
    group.create_array(
        "records", shape=(n, 3), chunks=(block, 3), dtype="float64", fill_value=np.nan
    )
    _creation_step("array:records")
    group.create_array("errors", shape=(n,), chunks=(block,), dtype=str, fill_value="")
    _creation_step("array:errors")
    if paths is not None:
        array = group.create_array(
            "paths", shape=(n,), chunks=(max(1, min(n, 65536)),), dtype=str, fill_value=""
        )
        identity = group.create_array(
            "identity", shape=(n, 2), chunks=(block, 2), dtype="int64", fill_value=-1
        )
        _creation_step("array:paths")
        write_paths(array, paths)
        identity[:] = identities(paths)
        _creation_step("paths")
    # ready last: until then the store is recognisably ours and unfinished
    group.attrs[ATTR_KEY] = {
        "format": FORMAT,
        "state": "ready",
        "fingerprint": _canonical(fp),
        "block": block,
        "probe": _canonical(probe),
        "notes": list(notes),
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "info": _canonical(describe_value(info)),
    }
    _creation_step("ready")


def check_compatible(out: Any, meta: Dict[str, Any], fp: Dict[str, Any]) -> None:
    """Raise :class:`StoreMismatchError` unless the stored fingerprint equals ``fp``."""
    if meta.get("format") != FORMAT:
        raise StoreMismatchError(
            f"out={out!r} has store format {meta.get('format')!r}, this version writes {FORMAT} "
            f"(pass resume=False to replace it, or another out)"
        )
    stored = meta.get("fingerprint", {})
    stored, fp = _canonical(stored), _canonical(fp)
    old = stored["items"].pop("sample", None) if isinstance(stored.get("items"), dict) else None
    new = fp["items"].pop("sample", None) if isinstance(fp.get("items"), dict) else None
    diff = differences(stored, fp)
    if isinstance(old, dict) and isinstance(new, dict):  # items that loaded both times
        other = sorted((k for k in set(old) & set(new) if old[k] != new[k]), key=int)
        if other:
            diff.append(f"items: items {', '.join(other[:5])} differ from those of the store")
    if diff:
        keys = {line.split(":", 1)[0] for line in diff}
        hints = []
        if "items" in keys:
            hints.append(
                "items: another item list, or a dataset whose items differ from one loading to "
                "the next (random augmentation?)"
            )
        if "model" in keys:
            hints.append("model: other weights, settings, or another wrapping function")
        raise StoreMismatchError(
            f"out={out!r} was made with other settings, refusing to mix results (pass "
            f"resume=False to overwrite it, or another out):\n  "
            + "\n  ".join(diff + [f"({hint})" for hint in hints])
        )


def check_paths(out: Any, group: Any, paths: Optional[Sequence[str]]) -> None:
    """Name the paths that changed when the item list differs (a readable refusal).

    A damaged ``paths`` chunk is skipped here: the item list's digest in the fingerprint still
    decides, and the chunk is rewritten once the store is known to match.
    """
    if paths is None or "paths" not in group:
        return
    stored, damaged = read_paths(group)
    if damaged or stored is None:
        return
    old = [str(p) for p in stored]
    new = [as_path(p) for p in paths]
    if old == new:
        return
    import collections

    old_count, new_count = collections.Counter(old), collections.Counter(new)
    gone = [shown_path(p) for p in old_count if p not in new_count]
    added = [shown_path(p) for p in new_count if p not in old_count]
    fewer = [
        f"{shown_path(p)} listed {old_count[p]} times, now {new_count[p]}"
        for p in old_count
        if 0 < new_count[p] < old_count[p]
    ]
    more = [
        f"{shown_path(p)} listed {old_count[p]} times, now {new_count[p]}"
        for p in new_count
        if 0 < old_count[p] < new_count[p]
    ]
    parts = []
    if gone:
        parts.append(f"{len(gone)} no longer listed {gone[:3]}")
    if added:
        parts.append(f"{len(added)} new {added[:3]}")
    if fewer:
        parts.append(f"{len(fewer)} duplicate entries removed ({'; '.join(fewer[:3])})")
    if more:
        parts.append(f"{len(more)} entries now duplicated ({'; '.join(more[:3])})")
    if not parts:
        parts.append("the same files in another order")
    raise StoreMismatchError(
        f"out={out!r} was made for another item list, refusing to attach maps to other files "
        f"(pass resume=False to start again, or another out): " + ", ".join(parts)
    )


def open_group(out: Any, mode: str = "r+", storage_options: Optional[Dict[str, Any]] = None) -> Any:
    return _zarr().open_group(out, mode=mode, storage_options=storage_options)


# --------------------------------------------------------------------------------------------
# Reading back: records, and the check of done items
# --------------------------------------------------------------------------------------------


def block_of(meta: Dict[str, Any]) -> int:
    return int(meta.get("block", 1))


def chunk_key(array: Any, coords: Tuple[int, ...]) -> str:
    """The key (path from the store's root) of the file holding chunk or shard ``coords``."""
    return f"{array.path}/{array.metadata.encode_chunk_key(coords)}"


def read_records(
    group: Any, block: int, repair: Optional[Callable[[str], None]] = None
) -> Tuple[np.ndarray, Dict[int, str]]:
    """``records`` ``(N, 3)`` read block by block; an unreadable block reads as pending.

    Returns the records and ``{index: reason}`` for the done items lost with an unreadable
    block (their index is known, their state is not: every item of the block is listed).
    ``repair(key)``, if given, removes an unreadable block's file (zarr cannot write into a
    damaged file; a missing one reads as pending).
    """
    array = group["records"]
    n = array.shape[0]
    records = np.full((n, 3), np.nan)
    lost: Dict[int, str] = {}
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        try:
            records[lo:hi] = array[lo:hi]
        except Exception as err:
            for i in range(lo, hi):
                lost[i] = f"its record is unreadable ({type(err).__name__}: {err})"
            if repair is not None:
                repair(chunk_key(array, (lo // block, 0)))
    return records, lost


def verify_done(
    group: Any,
    done: np.ndarray,
    block: int,
    blocks: Sequence[int],
    repair: Optional[Callable[[str], None]] = None,
) -> Dict[int, str]:
    """Items marked done in ``blocks`` whose attribution is missing or unreadable.

    Missing: all NaN (its chunk is gone). Unreadable: a damaged file. ``repair(key)``, if
    given, removes the damaged file (it then reads as missing and can be written again).

    Returns:
        dict: ``{index: reason}``.
    """
    array = group["attributions"]
    n = array.shape[0]
    bad: Dict[int, str] = {}
    for b in blocks:
        lo, hi = b * block, min(n, (b + 1) * block)
        rows = np.flatnonzero(done[lo:hi]) + lo
        if not rows.size:
            continue
        try:
            data = array[lo:hi] if block > 1 else None
            for i in rows:
                item = data[i - lo] if data is not None else array[int(i)]
                if np.isnan(item).all():
                    bad[int(i)] = "its attribution is missing (its chunk is gone)"
        except Exception as err:
            for i in rows:
                bad[int(i)] = f"its attribution is unreadable ({type(err).__name__}: {err})"
            if repair is not None:
                repair(chunk_key(array, (b,) + (0,) * (array.ndim - 1)))
    return bad


def check_blocks(
    group: Any, name: str, block: int, repair: Optional[Callable[[str], None]] = None
) -> Dict[str, Tuple[int, int, str]]:
    """Read the array ``name`` (``errors`` or ``identity``) block by block.

    Returns ``{chunk key: (lo, hi, reason)}`` of the unreadable blocks; ``repair(key)``, if
    given, removes each such file (it then reads as the fill value and can be written again).
    """
    if name not in group:
        return {}
    array = group[name]
    n = array.shape[0]
    bad: Dict[str, Tuple[int, int, str]] = {}
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        try:
            array[lo:hi]
        except Exception as err:
            key = chunk_key(array, (lo // block,) + (0,) * (array.ndim - 1))
            bad[key] = (lo, hi, f"unreadable ({type(err).__name__}: {err})")
            if repair is not None:
                repair(key)
    return bad


def read_errors(group: Any, rows: np.ndarray, block: int) -> Tuple[Dict[int, str], Dict[str, str]]:
    """Messages of the failed items ``rows``, and ``{chunk key: reason}`` of damaged blocks."""
    damaged = check_blocks(group, "errors", block)
    messages: Dict[int, str] = {}
    if not rows.size:
        return messages, {key: why for key, (_, _, why) in damaged.items()}
    lost = np.zeros(group["errors"].shape[0], dtype=bool)
    for lo, hi, _ in damaged.values():
        lost[lo:hi] = True
    readable = rows[~lost[rows]]
    values = group["errors"].oindex[readable] if readable.size else []
    messages.update({int(i): str(m) for i, m in zip(readable, values)})
    for i in rows[lost[rows]]:
        messages[int(i)] = "(message unreadable: its errors chunk is damaged)"
    return messages, {key: why for key, (_, _, why) in damaged.items()}


# --------------------------------------------------------------------------------------------
# Writing items
# --------------------------------------------------------------------------------------------


def runs(rows: np.ndarray) -> List[Tuple[int, int]]:
    """``[(j, k), ...]``: ``rows[j:k]`` are consecutive integers (written as one slice)."""
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    edges = [0, *breaks.tolist(), int(rows.size)]
    return list(zip(edges[:-1], edges[1:]))


class ItemWriter:
    """Writes the results of items in the order that makes a "done" state trustworthy."""

    def __init__(self, group: Any, guard: Optional[Callable[[], None]] = None) -> None:
        self.attributions = group["attributions"]
        self.records = group["records"]
        self.errors = group["errors"]
        self.guard = guard

    def write(
        self,
        rows: Sequence[int],
        attributions: Optional[np.ndarray],
        targets: Sequence[int],
        scores: Sequence[float],
        was_failed: Sequence[bool],
        failed_rows: Sequence[int] = (),
        messages: Sequence[str] = (),
    ) -> None:
        """Write successes and failures: attributions, then error messages, then the records.

        ``attributions[j]`` is item ``rows[j]``'s (rows ascending); ``messages[j]`` is the
        failure of item ``failed_rows[j]``. Each array is written with one slice per run of
        consecutive items: zarr writes the files of several blocks concurrently, each
        atomically. ``guard()`` (the lease check) runs first.
        """
        if self.guard is not None:
            self.guard()
        ok = np.asarray(rows, dtype=np.int64)
        for j, k in runs(ok):
            self.attributions[ok[j] : ok[j] + k - j] = cast(np.ndarray, attributions)[j:k]
        bad = np.asarray(failed_rows, dtype=np.int64)
        repaired = ok[np.asarray(was_failed, dtype=bool)] if ok.size else ok
        text = {int(i): "" for i in repaired}
        # a message may quote a file name that is not UTF-8 (surrogate escapes): kept readable
        text.update(
            {
                int(i): str(m).encode("utf-8", "backslashreplace").decode("utf-8")
                for i, m in zip(bad, messages)
            }
        )
        if text:
            where = np.asarray(sorted(text), dtype=np.int64)
            values = np.asarray([text[int(i)] for i in where], dtype=object)
            for j, k in runs(where):
                self.errors[where[j] : where[j] + k - j] = values[j:k]
        records = {int(i): (DONE, float(t), float(v)) for i, t, v in zip(ok, targets, scores)}
        records.update({int(i): (FAILED, np.nan, np.nan) for i in bad})
        if records:
            where = np.asarray(sorted(records), dtype=np.int64)
            values = np.asarray([records[int(i)] for i in where], dtype=np.float64)
            for j, k in runs(where):  # last: state, target and score in one write per block
                self.records[where[j] : where[j] + k - j] = values[j:k]

    def success(
        self,
        indices: Sequence[int],
        attributions: np.ndarray,
        targets: Sequence[int],
        scores: Sequence[float],
        was_failed: Sequence[bool],
    ) -> None:
        order = np.argsort(np.asarray(indices, dtype=np.int64), kind="stable")
        self.write(
            [indices[j] for j in order],
            attributions[order],
            [targets[j] for j in order],
            [scores[j] for j in order],
            [was_failed[j] for j in order],
        )

    def failure(self, index: int, message: str) -> None:
        self.write([], None, [], [], [], [index], [message])

    def close(self) -> None:
        """Nothing to wait for: every write is done when its call returns."""


class BlockBuffer:
    """Collects a process's results block by block, and writes a block when it is complete.

    A block is handed to ``sink`` (an :class:`ItemWriter` or :class:`BackgroundWriter`) once
    every item of it that this process computes has a result, or once the oldest waiting
    result is ``max_delay`` seconds old (default :data:`FLUSH_SECONDS`; then every waiting
    block is written): each file is rewritten about once per block instead of once per batch.
    A timer thread watches the age, so results reach the store within ``max_delay`` seconds
    even while a slow batch runs, and a kill loses at most the batch in flight and the results
    of the last ``max_delay`` seconds. :meth:`close` writes what is left (also when the run
    stops on an exception).
    """

    def __init__(
        self, sink: Any, block: int, indices: Sequence[int], max_delay: Optional[float] = None
    ) -> None:
        import collections

        self.sink, self.block = sink, block
        self.max_delay = FLUSH_SECONDS if max_delay is None else float(max_delay)
        self.expected = collections.Counter(int(i) // block for i in indices)
        self.pending: Dict[int, Dict[int, Tuple[Any, ...]]] = {}
        self.oldest: Optional[float] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._timer = threading.Thread(target=self._watch, name="extra_attrib-flush", daemon=True)
        self._timer.start()

    def _watch(self) -> None:
        tick = max(0.05, min(1.0, self.max_delay / 4))
        while not self._stop.wait(tick):
            with self._lock:
                if self._error is not None:
                    return
                try:
                    self._write_ready()
                except BaseException as err:  # handed to the main thread
                    self._error = err
                    return

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def success(
        self,
        indices: Sequence[int],
        attributions: np.ndarray,
        targets: Sequence[int],
        scores: Sequence[float],
        was_failed: Sequence[bool],
    ) -> None:
        with self._lock:
            self._raise()
            for j, index in enumerate(indices):
                entry = (True, attributions[j], targets[j], scores[j], was_failed[j])
                self._add(int(index), entry)
            self._write_ready()

    def failure(self, index: int, message: str) -> None:
        with self._lock:
            self._raise()
            self._add(int(index), (False, message))
            self._write_ready()

    def _add(self, index: int, entry: Tuple[Any, ...]) -> None:
        self.pending.setdefault(index // self.block, {})[index] = entry
        if self.oldest is None:
            self.oldest = time.monotonic()

    def _write_ready(self) -> None:
        stale = self.oldest is not None and time.monotonic() - self.oldest >= self.max_delay
        for b in sorted(self.pending):
            if stale or len(self.pending[b]) >= self.expected[b]:
                self._write(b)
        if not self.pending:
            self.oldest = None

    def _write(self, b: int) -> None:
        entries = self.pending.pop(b)
        self.expected[b] -= len(entries)
        ok = sorted(i for i, e in entries.items() if e[0])
        bad = sorted(i for i, e in entries.items() if not e[0])
        self.sink.write(
            ok,
            np.stack([entries[i][1] for i in ok]) if ok else None,
            [entries[i][2] for i in ok],
            [entries[i][3] for i in ok],
            [entries[i][4] for i in ok],
            bad,
            [entries[i][1] for i in bad],
        )

    def close(self) -> None:
        """Stop the timer, write every waiting block, then close ``sink``."""
        self._stop.set()
        self._timer.join()
        try:
            with self._lock:
                error, self._error = self._error, None
                if error is None:
                    for b in sorted(self.pending):
                        self._write(b)
                self.oldest = None
        finally:
            self.sink.close()
        if error is not None:
            raise error


class BackgroundWriter:
    """An :class:`ItemWriter` whose writes run in one background thread, in submission order.

    Writing a chunk is file-system (or network) latency more than work: done in the foreground
    it cost 5-35 ms per array and batch on a loaded 2-core VM. In one thread, first in first out,
    every item's record still comes after its values; a killed process loses the queued items,
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

    def write(self, *args: Any) -> None:
        self._submit(self._writer.write, *args)

    def success(self, *args: Any) -> None:
        self._submit(self._writer.success, *args)

    def failure(self, *args: Any) -> None:
        self._submit(self._writer.failure, *args)

    def close(self) -> None:
        """Wait for every queued write; raise the thread's error if one occurred."""
        self._queue.put(None)
        self._thread.join()
        self._raise()


def warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)
