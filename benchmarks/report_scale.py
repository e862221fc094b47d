"""Is ``extra-attrib report`` usable for a store of 10,000 items?

Makes a store of N photos (random 32 x 32 PNG files explained by a tiny CNN, every 97th file
broken so the store holds failures), writes the report, and loads it in headless Chromium:
opens it, sorts by score, filters by target, state and a score range and opens one item large,
through the page's own controls (as ``tests/test_report.py`` does). Prints a Markdown table
(written to ``benchmarks/results/report_scale.md`` with ``--write``): the report's time and
size, and each action's time in the browser.

Run: ``python -m benchmarks.report_scale [--items 10000] [--write]`` (needs zarr, Pillow and
``chromium`` on the PATH).
"""

import argparse
import datetime
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from torch import nn

from extra_attrib import TiledOcclusion, explain_dataset
from extra_attrib._report import write_report


class _Photos(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _photos(folder, n):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"photo_{i:05d}.png")
        if i % 97 == 5:
            with open(path, "wb") as f:
                f.write(b"not a png")
        else:
            base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(base).resize((32, 32), Image.Resampling.BILINEAR).save(path)
        paths.append(path)
    return paths


def _views(page, target):
    """Seconds each view takes in the browser, through the page's own controls."""
    from tests._browser import Browser

    cards = "document.querySelectorAll('.card').length"
    rows = []
    with Browser(width=1280, height=900) as browser:
        start = time.perf_counter()
        browser.open(page)
        records = browser.evaluate("ITEMS.length")
        opened = f"open the page (read {records} records, draw the first 100 cards)"
        rows.append((opened, time.perf_counter() - start, browser.evaluate(cards)))
        for name, act in [
            (
                "sort by score, descending",
                lambda: (browser.choose("sort", "score"), browser.choose("order", "desc")),
            ),
            (f"filter: target {target}", lambda: browser.choose("target", str(target))),
            (
                "filter: failed",
                lambda: (browser.choose("target", "all"), browser.choose("state", "failed")),
            ),
            (
                "type a score range",
                lambda: (browser.choose("state", "all"), browser.type_into("min", "0.1")),
            ),
            ("click an item: large view", lambda: browser.click(".card")),
        ]:
            start = time.perf_counter()
            act()
            rows.append((name, time.perf_counter() - start, browser.evaluate(cards)))
        browser.key("Escape")
        time.sleep(1.0)
        loaded = browser.evaluate(
            "[...document.images].filter((i) => i.naturalWidth > 0).length + ' of ' +"
            " document.images.length"
        )
    return rows, loaded


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    ).eval()
    with tempfile.TemporaryDirectory() as root:
        folder = os.path.join(root, "photos")
        os.makedirs(folder)
        paths = _photos(folder, args.items)
        store = os.path.join(root, "photos.zarr")
        start = time.perf_counter()
        summary = explain_dataset(
            TiledOcclusion(model),
            _Photos(paths),
            store,
            batch_size=64,
            show_progress=False,
            window=16,
            k=2,
            perturbations_per_eval=16,
        )
        explained = time.perf_counter() - start
        page = os.path.join(root, "report.html")
        load = open("/proc/loadavg").read().split()[:3]
        report = write_report(store, page)
        page_mib = os.path.getsize(page) / 2**20
        from extra_attrib import open_attributions

        opened = open_attributions(store, verify=False)
        targets, counts = np.unique(opened.targets[opened.done], return_counts=True)
        rows, loaded = _views(page, int(targets[counts.argmax()]))
    lines = [
        f"# extra-attrib report on {args.items} items",
        "",
        f"{datetime.date.today()}, `python -m benchmarks.report_scale --items {args.items}`; "
        f"CPU, shared machine (load average {' '.join(load)} when the report started); "
        f"{shutil.which('chromium') and 'Debian chromium'} headless.",
        "",
        f"- store: {summary.done} done, {summary.failed} failed, explained in {explained:.0f} s",
        f"- report: {report.seconds:.1f} s ({report.seconds / args.items * 1e3:.2f} ms per item); "
        + (
            f"page {page_mib:.1f} MiB + pictures' folder {report.bytes / 2**20 - page_mib:.0f} MiB"
            if report.folder
            else f"page {page_mib:.1f} MiB, pictures embedded"
        ),
        "",
        "Headless Chromium, driven through the page's controls (DevTools protocol), "
        "1280 x 900 window; each action's time includes the protocol's round trips:",
        "",
        "| action | seconds | cards on the page |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {seconds:.3f} | {cards} |" for name, seconds, cards in rows]
    lines += [
        "",
        f"Pictures loaded 1 s after the last view: {loaded} (lazily, as they come into view).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        out = os.path.join(os.path.dirname(__file__), "results", "report_scale.md")
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
