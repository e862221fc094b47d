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
- ``paths`` ``(N,)`` str, only when the dataset has a ``paths`` attribute.
- Group attribute ``extra_attrib``: ``format``, ``state`` (``"creating"`` until the store is
  complete, then ``"ready"``), ``fingerprint`` (what must match to resume), ``block``,
  ``probe`` (one item's index and the model's clean output on it, compared on resume),
  ``versions``, ``created`` and free-form ``info``.

Ownership. The store's group file, with ``state: "creating"``, is the first thing written:
a store killed at any step of its creation is recognised as this package's and made again by
the next run. Nothing else is ever deleted or overwritten: a path holding a file, a folder with
other files, or a zarr group without that attribute is refused. Replacing a store
(``resume=False``, or an unfinished creation) removes only the entries this package writes
(:data:`OWN_ENTRIES`); files a user put into the store's folder stay.

Order of the writes. Within a run every block is written by exactly one process (the blocks,
not the items, are shared out), so writers never share a file; zarr writes each file
atomically (a temporary file renamed into place). A batch's items are written attributions
first, then their ``records`` (state, target and score in one write), so an item whose state
is "done" has its attribution written; a kill loses at most the batches not yet written. On
resume every done item is read back: one whose data is missing (all NaN) or unreadable is
computed again. Two separate runs (not processes of one ``torchrun``) must not write one store
at the same time: they would rewrite each other's blocks.
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
import types
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
#: the store); anything else in the folder is the user's and is never touched.
OWN_ENTRIES = ("zarr.json", "attributions", "records", "errors", "paths")
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


def _creation_step(name: str) -> None:
    """Called after each step of :func:`create`; does nothing.

    The tests replace it in a child process to SIGKILL it at a chosen step.
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


def describe_method(method: Any) -> Any:
    """Class name of an attribution method, with the methods it wraps (NoiseTunnel, FusionGrad)."""
    inner = getattr(method, "attribution_method", None)
    if inner is not None and inner is not method:
        return {"class": _qualname(method), "wraps": describe_method(inner)}
    return {"class": _qualname(method)}


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
        used = {}
        for name in sorted(set(_code_names(code))):
            if name not in fn.__globals__:
                continue
            value = fn.__globals__[name]
            # user code: what it reaches counts; library functions are named, not walked
            if isinstance(value, (nn.Module, torch.Tensor, np.ndarray)) or (
                inspect.isfunction(value) and value.__module__ == self.root_module
            ):
                used[name] = self(value, depth + 1)
            elif isinstance(value, (bool, int, float, str)):
                used[name] = value
        out["globals"] = used
        return out


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


def items_digest(paths: Optional[Sequence[str]]) -> Optional[str]:
    """SHA-256 of the item list (the dataset's ``paths``), or None without paths."""
    if paths is None:
        return None
    h = hashlib.sha256()
    for path in paths:
        h.update(str(path).encode())
        h.update(b"\0")
    return h.hexdigest()


def fingerprint(
    method: Any,
    attribute_kwargs: Dict[str, Any],
    target: Any,
    n_items: int,
    item_shape: Sequence[int],
    dtype: torch.dtype,
    paths: Optional[Sequence[str]] = None,
    probe: Optional[Tuple[int, torch.Tensor]] = None,
) -> Dict[str, Any]:
    """Everything that must be equal for a resumed run to add to an existing store.

    ``paths`` (the item list) is compared through a digest; without paths, ``probe`` (an item's
    index and tensor) stands for the items: its digest is compared.
    """
    model, _ = model_digest(find_model(method))
    items: Dict[str, Any] = {"paths_sha256": items_digest(paths)}
    if paths is None and probe is not None:
        items["probe"] = {"index": int(probe[0]), "sha256": _tensor_digest(probe[1])}
    return {
        "method": describe_method(method),
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

    def read(self, name: str) -> bytes:
        if self.fs is None:
            with open(self._join(name), "rb") as f:
                return f.read()
        return bytes(self.fs.cat_file(self._join(name)))

    def remove(self, name: str) -> None:
        path = self._join(name)
        if self.fs is not None:
            self.fs.rm(path, recursive=True)
        elif os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _is_own(name: str) -> bool:
    # zarr writes every file as NAME.<uuid>.partial first: a kill can leave one behind
    return name in OWN_ENTRIES or (name.startswith("zarr.") and name.endswith(".partial"))


def check_place(
    out: Any, storage_options: Optional[Dict[str, Any]] = None
) -> Optional[Dict[str, Any]]:
    """What is at ``out``: None (nothing, or an empty folder) or this package's store metadata.

    The metadata of a store whose creation did not finish has ``state`` ``"creating"``.

    Raises:
        NotAStoreError: ``out`` is a file, a folder holding other files (and no store), or a
            zarr group this package did not make. Nothing is written there.
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
    names = [name for name in place.names() if not name.startswith(".")]
    if not names:
        return None
    if "zarr.json" not in names:
        if all(_is_own(name) for name in names):
            # killed before the group file was written: nothing but our own beginnings
            return {"format": FORMAT, "state": "creating"}
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise NotAStoreError(
            f"out={out!r} is a folder holding other files ({shown}) and no store of "
            f"explain_dataset; refusing to write into it or delete anything (give a new or "
            f"empty folder)"
        )
    try:
        document = json.loads(place.read("zarr.json"))
    except (OSError, ValueError) as err:
        raise NotAStoreError(
            f"out={out!r}: its zarr.json cannot be read ({err}); refusing to touch it"
        ) from err
    meta = document.get("attributes", {}).get(ATTR_KEY) if isinstance(document, dict) else None
    if document.get("node_type") != "group" or not isinstance(meta, dict):
        raise NotAStoreError(
            f"out={out!r} is a zarr {document.get('node_type', 'node')} that explain_dataset "
            f"did not make (no {ATTR_KEY!r} attribute); refusing to write into it or delete it"
        )
    meta = dict(meta)
    meta.setdefault("state", "ready")  # format 1 stores had no state
    return meta


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

    Steps (each followed by :func:`_creation_step`): remove the entries of an earlier store of
    ours (``"cleared"``), write the group file marked ``state: "creating"`` (``"marker"``),
    create each array (``"array:NAME"``), write the paths (``"paths"``), mark the store
    ``"ready"`` with its fingerprint (``"ready"``). A kill between any two steps leaves either
    nothing of ours or a store marked "creating", which the next run makes again.

    Raises:
        NotAStoreError: something this package did not make is at ``out``.
    """
    zarr = _zarr()
    existing = check_place(out, storage_options)
    if existing is not None:
        place = Place(out, storage_options)
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
        _creation_step("array:paths")
        array[:] = np.asarray([str(p) for p in paths], dtype=object)
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
    diff = differences(stored, fp)
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
    """Name the paths that changed when the item list differs (a readable refusal)."""
    if paths is None or "paths" not in group:
        return
    old = [str(p) for p in group["paths"][:]]
    new = [str(p) for p in paths]
    if old == new:
        return
    gone = [p for p in old if p not in set(new)]
    added = [p for p in new if p not in set(old)]
    moved = "" if gone or added else "; the same files in another order"
    raise StoreMismatchError(
        f"out={out!r} was made for another item list, refusing to attach maps to other files "
        f"(pass resume=False to start again, or another out): {len(gone)} no longer listed "
        f"{gone[:3]}, {len(added)} new {added[:3]}{moved}"
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

    def __init__(self, group: Any) -> None:
        self.attributions = group["attributions"]
        self.records = group["records"]
        self.errors = group["errors"]

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
        atomically.
        """
        ok = np.asarray(rows, dtype=np.int64)
        for j, k in runs(ok):
            self.attributions[ok[j] : ok[j] + k - j] = cast(np.ndarray, attributions)[j:k]
        bad = np.asarray(failed_rows, dtype=np.int64)
        repaired = ok[np.asarray(was_failed, dtype=bool)] if ok.size else ok
        text = {int(i): "" for i in repaired}
        text.update({int(i): str(m) for i, m in zip(bad, messages)})
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
    result is ``max_delay`` seconds old (then every waiting block is written): each file is
    rewritten about once per block instead of once per batch, and a kill loses at most the
    results of the last ``max_delay`` seconds besides the batch in flight. :meth:`close`
    writes what is left (also when the run stops on an exception).
    """

    def __init__(
        self, sink: Any, block: int, indices: Sequence[int], max_delay: float = 10.0
    ) -> None:
        import collections

        self.sink, self.block, self.max_delay = sink, block, max_delay
        self.expected = collections.Counter(int(i) // block for i in indices)
        self.pending: Dict[int, Dict[int, Tuple[Any, ...]]] = {}
        self.oldest: Optional[float] = None

    def success(
        self,
        indices: Sequence[int],
        attributions: np.ndarray,
        targets: Sequence[int],
        scores: Sequence[float],
        was_failed: Sequence[bool],
    ) -> None:
        for j, index in enumerate(indices):
            entry = (True, attributions[j], targets[j], scores[j], was_failed[j])
            self._add(int(index), entry)
        self._write_ready()

    def failure(self, index: int, message: str) -> None:
        self._add(int(index), (False, message))
        self._write_ready()

    def _add(self, index: int, entry: Tuple[Any, ...]) -> None:
        import time

        self.pending.setdefault(index // self.block, {})[index] = entry
        if self.oldest is None:
            self.oldest = time.monotonic()

    def _write_ready(self) -> None:
        import time

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
        """Write every waiting block, then close ``sink``."""
        try:
            for b in sorted(self.pending):
                self._write(b)
            self.oldest = None
        finally:
            self.sink.close()


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
