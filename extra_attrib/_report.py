"""``extra-attrib report``: one HTML page to browse every item of a store.

The page is self-contained and works offline in any browser (no script or style from the
network): a grid of every item, each drawn as image, map and overlay with its path, target,
score and state; failed items show their message. It sorts and filters by target, score, state
and path, pages through 100 items at a time, and a click shows an item large (arrow keys step
through the matching items). The view is kept in the address's ``#`` part, so a link or a
bookmark reopens it, e.g. ``report.html#sort=score&order=desc&state=done&target=3``.

Small stores are embedded in the page (one file to share); once the pictures would make it
larger than ``embed_limit`` they are written to a folder ``<page name>_files`` beside the page
and loaded as they scroll into view, which keeps a store of 10,000 items usable. Nothing is
written into the store, and an existing file or folder that a report did not make is never
overwritten: the page carries a ``<meta name="generator">`` mark and the folder a mark file.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

GENERATOR = "extra-attrib report"
FOLDER_MARK = ".extra-attrib-report"
EMBED_LIMIT = 24 * 2**20
THUMB_SIZE = 96
LARGE_SIZE = 320
EXTENSIONS = (".html", ".htm")
_PICTURE = re.compile(r"^\d+\.jpg$")


class ReportError(ValueError):
    """A bad store or output path: reported in one line, exit status 2."""


@dataclass
class ReportSummary:
    """What :func:`write_report` wrote.

    Attributes:
        path (str): The page.
        folder (str or None): The pictures' folder, or None when they are embedded in the page.
        items (int): Items in the store.
        done (int): Items drawn.
        failed (int): Items whose attribution failed (listed with their message).
        damaged (int): Items marked done whose attribution could not be read.
        bytes (int): Size of the page plus the pictures' folder.
        seconds (float): Time taken.
    """

    path: str
    folder: Optional[str]
    items: int
    done: int
    failed: int
    damaged: int
    bytes: int
    seconds: float


def folder_for(out: str) -> str:
    """The pictures' folder of the page ``out``: ``report.html`` -> ``report_files``."""
    return os.path.splitext(out)[0] + "_files"


def write_report(
    store_path: str,
    out: str,
    *,
    embed_limit: int = EMBED_LIMIT,
    thumb_size: int = THUMB_SIZE,
    large_size: int = LARGE_SIZE,
) -> ReportSummary:
    """Write the HTML report of the store at ``store_path`` to ``out``.

    Args:
        store_path (str): A store written by :func:`extra_attrib.explain_dataset` or
            ``extra-attrib explain`` (a local path or fsspec URL).
        out (str): The page, ending in ``.html`` or ``.htm``; a file there must be a report.
        embed_limit (int, optional): Bytes of pictures the page embeds; beyond, they go to the
            folder :func:`folder_for` ``(out)``. 0 always uses the folder. Default: 24 MiB
        thumb_size (int, optional): Height in pixels of the grid's pictures. Default: 96
        large_size (int, optional): Height in pixels of the large view's pictures, at most
            the map's own size. Default: 320

    Returns:
        ReportSummary: What was written.

    Raises:
        ReportError: ``out`` or its folder exists and was not made by a report, lies inside
            the store, or cannot be written; or there is no readable store at ``store_path``.
    """
    from extra_attrib._store import shown_path
    from extra_attrib.dataset import open_attributions

    start = time.perf_counter()
    out = os.path.abspath(out)
    folder = folder_for(out)
    _check_out(out, folder, store_path)
    try:
        store = open_attributions(store_path, verify=False)
    except (FileNotFoundError, ValueError) as err:
        raise ReportError(str(err)) from None
    info = store.metadata.get("info", {}) if isinstance(store.metadata, dict) else {}
    pictures = _Pictures(folder, embed_limit)
    records: List[Dict[str, Any]] = []
    damaged = 0
    for i in range(len(store)):
        path = store.paths[i] if store.paths else None  # None also where its chunk is damaged
        shown = shown_path(path) if path is not None else ""
        record: Dict[str, Any] = {"i": i, "p": shown, "t": None, "s": None, "m": ""}
        if store.done[i]:
            try:
                attr = store.item(i).numpy()
            except ValueError as err:
                record.update(st="damaged", m=str(err))
                damaged += 1
            else:
                record.update(st="done", t=int(store.targets[i]), s=_number(store.scores[i]))
                image = _image_for(attr, path or "", str(info.get("preprocess", "custom")))
                thumb, large, width = _strips(attr, image, thumb_size, large_size)
                record["th"], record["lg"] = pictures.add(i, thumb, large)
                record["w"], record["h"] = width, thumb_size
        elif store.failed[i]:
            record.update(st="failed", m=store.errors.get(i, ""))
        else:
            record["st"] = "pending"
        records.append(record)
    links = pictures.finish(records)
    page = _page(records, links, store_path, store.metadata)
    _write_atomically(out, page.encode("utf-8"))
    done = sum(r["st"] == "done" for r in records)
    size = len(page.encode("utf-8")) + pictures.bytes_written
    return ReportSummary(
        path=out,
        folder=folder if pictures.in_folder else None,
        items=len(records),
        done=done,
        failed=int(store.failed.sum()),
        damaged=damaged,
        bytes=size,
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------------------------
# where the report goes: never over what it did not make, never into the store
# --------------------------------------------------------------------------------------------


def _made_by_report(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return f'<meta name="generator" content="{GENERATOR}">'.encode() in head


def _check_out(out: str, folder: str, store_path: str) -> None:
    shown = f"--out {out!r}"
    if os.path.splitext(out)[1].lower() not in EXTENSIONS:
        raise ReportError(f"{shown} must end in .html or .htm")
    if os.path.isdir(out):
        raise ReportError(f"{shown} is a directory; give the page's file name")
    if os.path.lexists(out) and not _made_by_report(out):
        raise ReportError(
            f"{shown} exists and was not written by extra-attrib report; it is left untouched: "
            "choose another name"
        )
    if os.path.lexists(folder) and not (
        os.path.isdir(folder) and os.path.isfile(os.path.join(folder, FOLDER_MARK))
    ):
        raise ReportError(
            f"{shown} needs the folder {folder!r} for its pictures, which exists and was not "
            "made by extra-attrib report; it is left untouched: choose another name"
        )
    if "://" not in str(store_path):
        store = os.path.abspath(store_path)
        for path in (out, folder):
            if os.path.commonpath([store, path]) == store:
                raise ReportError(
                    f"{shown} would write {path!r} inside the store {store_path!r}: a report "
                    "is written beside a store, never into it"
                )
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".report-", suffix=".tmp"):
            pass
    except OSError as err:
        raise ReportError(f"{shown} cannot be written: {err.strerror or err}") from None


def _write_atomically(path: str, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".report-")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


class _Pictures:
    """Each item's two JPEG strips, embedded in the page or written to the folder."""

    def __init__(self, folder: str, embed_limit: int) -> None:
        self.folder = folder
        self.limit = embed_limit
        self.in_folder = embed_limit <= 0
        self.held: Dict[int, Tuple[bytes, bytes]] = {}
        self.held_bytes = 0
        self.written: set = set()
        self.bytes_written = 0
        if self.in_folder:
            self._open_folder()

    def add(self, i: int, thumb: bytes, large: bytes) -> Tuple[str, str]:
        if not self.in_folder:
            self.held[i] = (thumb, large)
            self.held_bytes += (len(thumb) + len(large)) * 4 // 3
            if self.held_bytes > self.limit:
                self._open_folder()
                for j, (t, g) in self.held.items():
                    self._write(j, t, g)
                self.held.clear()
        if self.in_folder:
            self._write(i, thumb, large)
        return self._links(i)

    def _links(self, i: int) -> Tuple[str, str]:
        name = os.path.basename(self.folder)
        return f"{name}/t/{i}.jpg", f"{name}/l/{i}.jpg"

    def _open_folder(self) -> None:
        self.in_folder = True
        for sub in ("t", "l"):
            os.makedirs(os.path.join(self.folder, sub), exist_ok=True)
        with open(os.path.join(self.folder, FOLDER_MARK), "w", encoding="utf-8") as f:
            f.write("Pictures of an extra-attrib report; rewritten by the next report here.\n")

    def _write(self, i: int, thumb: bytes, large: bytes) -> None:
        for sub, data in (("t", thumb), ("l", large)):
            with open(os.path.join(self.folder, sub, f"{i}.jpg"), "wb") as f:
                f.write(data)
            self.bytes_written += len(data)
        self.written.add(i)

    def finish(self, records: List[Dict[str, Any]]) -> Dict[int, Tuple[str, str]]:
        """Data URIs of embedded pictures; the folder cleared of an earlier report's leftovers."""
        if os.path.isdir(self.folder) and os.path.isfile(os.path.join(self.folder, FOLDER_MARK)):
            self._remove_stale()
        links: Dict[int, Tuple[str, str]] = {}
        for i, (thumb, large) in self.held.items():
            links[i] = (_data_uri(thumb), _data_uri(large))
        for record in records:
            if record["i"] in links:
                record["th"], record["lg"] = links[record["i"]]
        return links

    def _remove_stale(self) -> None:
        """Pictures of items this report did not draw: only the report's own files go."""
        for sub in ("t", "l"):
            where = os.path.join(self.folder, sub)
            if not os.path.isdir(where):
                continue
            for name in os.listdir(where):
                if _PICTURE.match(name) and int(name[:-4]) not in self.written:
                    os.remove(os.path.join(where, name))
            if not self.in_folder and not os.listdir(where):
                os.rmdir(where)
        if not self.in_folder and set(os.listdir(self.folder)) == {FOLDER_MARK}:
            shutil.rmtree(self.folder)  # only the mark is left: the folder was the report's


def _data_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------


def _number(value: Any) -> Optional[float]:
    value = float(value)
    return value if np.isfinite(value) else None


def _image_for(attr: np.ndarray, path: str, preprocess: str) -> Optional[np.ndarray]:
    """The item's image as the model saw it, where the map is an image's ``(C, H, W)``."""
    if not path or attr.ndim != 3 or attr.shape[0] not in (1, 3, 4):
        return None
    from extra_attrib._explain_cli import _display_image

    return _display_image(path, preprocess, int(attr.shape[1]), int(attr.shape[2]))


def _map_2d(attr: np.ndarray) -> np.ndarray:
    """A drawable ``(H, W)`` map: channels summed, a volume's middle slice, a signal as a band."""
    values = np.asarray(attr, dtype=np.float64)
    if values.ndim == 3:
        values = values.sum(0)
    elif values.ndim == 4:
        values = values.sum(0)[values.shape[1] // 2]
    elif values.ndim != 2:
        values = values.reshape(-1)[None, :]
    if values.shape[0] * 8 < values.shape[1]:  # a thin band: make it visible
        values = np.repeat(values, -(-values.shape[1] // (8 * values.shape[0])), axis=0)
    return values


def _strips(
    attr: np.ndarray, image: Optional[np.ndarray], thumb_size: int, large_size: int
) -> Tuple[bytes, bytes, int]:
    """JPEG strips image | map | overlay (the map alone without an image), small and large.

    Returns:
        tuple: The small strip, the large one, and the small one's width in pixels (the page
        reserves its place before it loads, so nothing moves as pictures arrive).
    """
    from extra_attrib.visualization import _gray, _Style

    values = _map_2d(attr)
    scale = _Style.from_args("all", 99.0, 0.7, None).scale(values)
    rgba = scale.rgba()
    heat = scale.cmap(scale.norm(np.nan_to_num(scale.values, nan=0.0)))[..., :3]
    panels = [heat]
    if image is not None:
        gray = _gray(np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0))[..., None]
        alpha = rgba[..., 3:]
        overlay = gray * (1.0 - alpha) + rgba[..., :3] * alpha
        rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
        panels = [rgb[..., :3], heat, overlay]
    height = values.shape[0]
    thumb, width = _jpeg(panels, thumb_size)
    large, _ = _jpeg(panels, min(large_size, max(height, thumb_size)))
    return thumb, large, width


def _jpeg(panels: List[np.ndarray], height: int) -> Tuple[bytes, int]:
    from PIL import Image

    gap = max(1, height // 48)
    pictures = []
    for panel in panels:
        h, w = panel.shape[:2]
        width = max(1, round(w * height / h))
        picture = Image.fromarray(np.clip(panel * 255.0 + 0.5, 0, 255).astype(np.uint8))
        resample = Image.Resampling.BILINEAR if h > height else Image.Resampling.NEAREST
        pictures.append(picture.resize((width, height), resample))
    strip = Image.new("RGB", (sum(p.width for p in pictures) + gap * (len(pictures) - 1), height))
    strip.paste((255, 255, 255), (0, 0, strip.width, strip.height))
    x = 0
    for picture in pictures:
        strip.paste(picture, (x, 0))
        x += picture.width + gap
    buffer = io.BytesIO()
    strip.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue(), strip.width


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------


def _page(
    records: List[Dict[str, Any]],
    links: Dict[int, Tuple[str, str]],
    store_path: str,
    metadata: Any,
) -> str:
    meta = metadata if isinstance(metadata, dict) else {}
    info = meta.get("info", {}) if isinstance(meta.get("info"), dict) else {}
    described = {
        key: str(value)
        for key, value in {**meta, **info}.items()
        if key in ("method", "model", "score", "created", "command", "target")
        and isinstance(value, (str, int, float))
    }
    title = f"extra-attrib report: {os.path.basename(str(store_path).rstrip('/'))}"
    # No "<" inside the script element: a path holding "</script>" or "<!--" stays data.
    data = json.dumps(
        {"store": str(store_path), "settings": described, "items": records},
        separators=(",", ":"),
    ).replace("<", "\\u003c")
    fields = {"GENERATOR": GENERATOR, "TITLE": html.escape(title), "DATA": data}
    return re.sub(r"%(GENERATOR|TITLE|DATA)%", lambda m: fields[m.group(1)], _TEMPLATE)


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="%GENERATOR%">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #f6f6f6; }
header { background: #fff; border-bottom: 1px solid #ddd; padding: 10px 16px; position: sticky;
  top: 0; z-index: 2; }
h1 { font-size: 17px; margin: 0 0 4px; }
#settings, #count { color: #555; font-size: 13px; }
#controls { display: flex; flex-wrap: wrap; gap: 8px 14px; align-items: center; margin: 8px 0 2px; }
#controls label { display: flex; gap: 4px; align-items: center; }
input[type=number] { width: 6em; }
#grid { display: flex; flex-wrap: wrap; gap: 10px; padding: 12px 16px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 4px; padding: 6px; margin: 0;
  cursor: pointer; max-width: 330px; }
.card:hover { border-color: #3572b0; }
.card img { display: block; background: #eee; }
.card figcaption { font-size: 12px; margin-top: 4px; overflow-wrap: anywhere; }
.card .name { font-weight: 600; }
.state-failed, .state-damaged { border-color: #d9534f; background: #fff6f6; }
.state-pending { opacity: 0.7; }
.message { color: #b52b27; font-family: ui-monospace, monospace; font-size: 11px;
  white-space: pre-wrap; max-height: 6em; overflow: auto; }
.tag { display: inline-block; padding: 0 5px; border-radius: 3px; font-size: 11px;
  background: #e8e8e8; }
.tag.failed, .tag.damaged { background: #d9534f; color: #fff; }
.tag.done { background: #5cb85c; color: #fff; }
#pager { padding: 0 16px 16px; display: flex; gap: 8px; align-items: center; }
#large { position: fixed; inset: 0; background: rgba(0,0,0,0.75); display: none; z-index: 5;
  align-items: center; justify-content: center; }
#large.open { display: flex; }
#large .box { background: #fff; padding: 14px; border-radius: 6px; max-width: 96vw;
  max-height: 94vh; overflow: auto; }
#large img { display: block; height: min(60vh, 480px); max-width: 92vw; object-fit: contain; }
#large .legend { font-size: 12px; color: #555; }
</style>
</head>
<body>
<header>
<h1 id="title">%TITLE%</h1>
<div id="settings"></div>
<div id="controls">
  <label>sort <select id="sort">
    <option value="index">index</option><option value="path">path</option>
    <option value="target">target</option><option value="score">score</option>
    <option value="state">state</option></select></label>
  <label><select id="order"><option value="asc">ascending</option>
    <option value="desc">descending</option></select></label>
  <label>state <select id="state"><option value="all">all</option></select></label>
  <label>target <select id="target"><option value="all">all</option></select></label>
  <label>score &ge; <input id="min" type="number" step="any"></label>
  <label>score &le; <input id="max" type="number" step="any"></label>
  <label>path <input id="q" type="search" placeholder="contains"></label>
</div>
<div id="count"></div>
</header>
<main id="grid"></main>
<nav id="pager"><button id="prev">&larr; previous</button><span id="page"></span>
<button id="next">next &rarr;</button></nav>
<div id="large"><div class="box"><div id="large-body"></div>
<p class="legend">Image, attribution (red: evidence for the target, blue: against) and
overlay. Esc closes, &larr; &rarr; step through the matching items.</p></div></div>
<script id="data" type="application/json">%DATA%</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const ITEMS = DATA.items;
const PER_PAGE = 100;
const STATES = ["done", "failed", "damaged", "pending"];
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;",
  ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const base = (p) => p ? p.split(/[\\/]/).pop() : "";
const fmt = (s) => s === null ? "" : (Math.abs(s) >= 1e4 || (s !== 0 && Math.abs(s) < 1e-3)
  ? s.toExponential(3) : s.toPrecision(4));
const DEFAULTS = {sort: "index", order: "asc", state: "all", target: "all", min: "", max: "",
  q: "", page: "1", item: ""};
let view = Object.assign({}, DEFAULTS);
let matching = [];

function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  view = Object.assign({}, DEFAULTS);
  for (const key of Object.keys(DEFAULTS)) if (params.has(key)) view[key] = params.get(key);
}
function writeHash(changes) {
  Object.assign(view, changes);
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(view))
    if (value !== DEFAULTS[key] && value !== "") params.set(key, value);
  // The address follows the view (a link or bookmark reopens it); the view is drawn at once.
  const hash = params.toString();
  if (location.hash.slice(1) !== hash)
    history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
  render();
}
function setup() {
  const counts = {};
  const targets = {};
  for (const it of ITEMS) {
    counts[it.st] = (counts[it.st] || 0) + 1;
    if (it.t !== null) targets[it.t] = (targets[it.t] || 0) + 1;
  }
  const option = (value, count) => `<option value="${value}">${value} (${count})</option>`;
  for (const st of STATES) if (counts[st])
    $("state").insertAdjacentHTML("beforeend", option(st, counts[st]));
  for (const t of Object.keys(targets).map(Number).sort((a, b) => a - b))
    $("target").insertAdjacentHTML("beforeend", option(t, targets[t]));
  const parts = [`${ITEMS.length} items`].concat(STATES.filter((s) => counts[s])
    .map((s) => `${counts[s]} ${s}`));
  const settings = Object.entries(DATA.settings).map(([k, v]) => `${esc(k)}: ${esc(v)}`);
  $("settings").innerHTML = esc(DATA.store) + " &middot; " + parts.join(", ") +
    (settings.length ? " &middot; " + settings.join(", ") : "");
  for (const id of ["sort", "order", "state", "target"])
    $(id).addEventListener("change", () => writeHash({[id]: $(id).value, page: "1"}));
  for (const id of ["min", "max", "q"])
    $(id).addEventListener("input", () => writeHash({[id]: $(id).value, page: "1"}));
  $("prev").addEventListener("click", () => writeHash({page: String(Number(view.page) - 1)}));
  $("next").addEventListener("click", () => writeHash({page: String(Number(view.page) + 1)}));
  $("grid").addEventListener("click", (e) => {
    const card = e.target.closest(".card");
    if (card) writeHash({item: card.dataset.index});
  });
  $("large").addEventListener("click", (e) => {
    if (e.target.id === "large") writeHash({item: ""});
  });
  document.addEventListener("keydown", (e) => {
    if (!view.item) return;
    if (e.key === "Escape") writeHash({item: ""});
    const at = matching.findIndex((it) => String(it.i) === view.item);
    if (e.key === "ArrowRight" && at >= 0 && at + 1 < matching.length)
      writeHash({item: String(matching[at + 1].i)});
    if (e.key === "ArrowLeft" && at > 0) writeHash({item: String(matching[at - 1].i)});
  });
  window.addEventListener("hashchange", () => { readHash(); render(); });
}
function compare(key) {
  const value = {
    index: (it) => it.i, path: (it) => it.p, target: (it) => it.t, score: (it) => it.s,
    state: (it) => STATES.indexOf(it.st)}[key] || ((it) => it.i);
  return (a, b) => {
    const x = value(a), y = value(b);
    if (x === y) return a.i - b.i;
    if (x === null) return 1;    // items without a value last, in either order
    if (y === null) return -1;
    const c = x < y ? -1 : 1;
    return view.order === "desc" ? -c : c;
  };
}
function filtered() {
  const min = view.min === "" ? null : Number(view.min);
  const max = view.max === "" ? null : Number(view.max);
  const q = view.q.toLowerCase();
  return ITEMS.filter((it) =>
    (view.state === "all" || it.st === view.state) &&
    (view.target === "all" || String(it.t) === view.target) &&
    (min === null || (it.s !== null && it.s >= min)) &&
    (max === null || (it.s !== null && it.s <= max)) &&
    (!q || it.p.toLowerCase().includes(q)));
}
function card(it) {
  const name = esc(base(it.p) || `item ${it.i}`);
  const picture = it.th ? `<img loading="lazy" src="${esc(it.th)}" alt="${name}" ` +
    `width="${it.w}" height="${it.h}">` : "";
  const numbers = it.st === "done" ? ` target ${it.t} &middot; score ${fmt(it.s)}` : "";
  const message = it.m ? `<div class="message">${esc(it.m)}</div>` : "";
  return `<figure class="card state-${it.st}" data-index="${it.i}" data-state="${it.st}"` +
    ` data-target="${it.t === null ? "" : it.t}" data-score="${it.s === null ? "" : it.s}">` +
    `${picture}<figcaption><span class="name" title="${esc(it.p)}">#${it.i} ${name}</span><br>` +
    `<span class="tag ${it.st}">${it.st}</span>${numbers}${message}</figcaption></figure>`;
}
function render() {
  for (const id of ["sort", "order", "state", "target", "min", "max", "q"])
    if ($(id).value !== view[id]) $(id).value = view[id];
  matching = filtered().sort(compare(view.sort));
  const pages = Math.max(1, Math.ceil(matching.length / PER_PAGE));
  const page = Math.min(Math.max(1, Number(view.page) || 1), pages);
  const shown = matching.slice((page - 1) * PER_PAGE, page * PER_PAGE);
  $("grid").innerHTML = shown.map(card).join("");
  $("count").textContent = matching.length ? `${matching.length} matching of ` +
    `${ITEMS.length}; showing ${(page - 1) * PER_PAGE + 1} to ` +
    `${(page - 1) * PER_PAGE + shown.length}` : `none of ${ITEMS.length} items match`;
  $("count").dataset.matching = matching.length;
  $("page").textContent = `page ${page} of ${pages}`;
  $("prev").disabled = page <= 1;
  $("next").disabled = page >= pages;
  const it = view.item === "" ? null : ITEMS[Number(view.item)];
  $("large").classList.toggle("open", !!it);
  $("large").dataset.index = it ? it.i : "";
  if (it) {
    const numbers = it.st === "done" ? `target ${it.t}, score ${fmt(it.s)}` : it.st;
    $("large-body").innerHTML = `<h2>#${it.i} ${esc(base(it.p) || "item " + it.i)}</h2>` +
      `<p>${esc(it.p)}<br>${numbers}</p>` +
      (it.lg ? `<img src="${esc(it.lg)}" alt="item ${it.i}">` : "") +
      (it.m ? `<div class="message">${esc(it.m)}</div>` : "");
  }
  document.body.dataset.ready = "1";
}
readHash();
setup();
render();
</script>
</body>
</html>
"""


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

DESCRIPTION = """\
Write one self-contained HTML page that browses every item of a store written by 'explain' or
extra_attrib.explain_dataset: each done item as image, attribution and overlay with its path,
target and score; failed items with their message. The page sorts and filters by target, score,
state and path, and a click shows an item large; it opens offline in any browser. Small stores
are embedded in the page; larger ones get their pictures in a folder OUT_files beside it (e.g.
report_files for report.html), loaded lazily, so 10,000 items stay usable. Nothing is written
into the store, and a file or folder that a report did not make is never overwritten. The view
is kept in the address, e.g. report.html#sort=score&order=desc&state=failed.
"""


def add_command(commands: Any) -> None:
    """Register ``report`` on the ``extra-attrib`` subparsers."""
    from extra_attrib._options import nonnegative_int, positive_int

    report = commands.add_parser(
        "report",
        help="write an HTML page to browse every item of a store",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("store", metavar="STORE.zarr", help="the store (local path or URL)")
    report.add_argument(
        "--out",
        required=True,
        metavar="REPORT.html",
        help="the page to write (.html or .htm); an existing file there must be a report",
    )
    report.add_argument(
        "--embed-limit",
        type=nonnegative_int,
        default=EMBED_LIMIT // 2**20,
        metavar="MIB",
        help="embed the pictures in the page up to this many MiB, else write them to the "
        f"folder beside it; 0: always the folder; default: {EMBED_LIMIT // 2**20}",
    )
    report.add_argument(
        "--thumb-size",
        type=positive_int,
        default=THUMB_SIZE,
        metavar="PX",
        help=f"height of the grid's pictures in pixels; default: {THUMB_SIZE}",
    )


def run(args: argparse.Namespace) -> int:
    """``extra-attrib report``: 0 when written, 1 without zarr, 2 for a bad store or --out."""
    try:
        summary = write_report(
            args.store,
            args.out,
            embed_limit=args.embed_limit * 2**20,
            thumb_size=args.thumb_size,
        )
    except ReportError as err:
        print(f"extra-attrib report: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:  # zarr missing
        print(f"extra-attrib report: {err}", file=sys.stderr)
        return 1
    beside = f" and {summary.folder}{os.sep}" if summary.folder else ""
    print(
        f"extra-attrib report: {summary.done} done, {summary.failed} failed, "
        f"{summary.damaged} unreadable of {summary.items} items -> {summary.path}{beside} "
        f"({summary.bytes / 2**20:.1f} MiB, {summary.seconds:.1f} s)"
    )
    return 0
