"""Is ``extra-attrib report`` usable for a store of 10,000 items?

Makes a store of N photos (random 32 x 32 PNG files explained by a tiny CNN, every 97th file
broken so the store holds failures), writes the report, and loads it in headless Chromium:
the default view, sorted by score, filtered by target, and with one item opened large. Prints a
Markdown table (written to ``benchmarks/results/report_scale.md`` with ``--write``): the
report's time and size, and each view's wall time in the browser (which includes starting the
browser; ``--virtual-time-budget`` lets the page's script finish).

Run: ``python -m benchmarks.report_scale [--items 10000] [--write]`` (needs zarr, Pillow and
``chromium`` on the PATH).
"""

import argparse
import datetime
import os
import re
import shutil
import subprocess
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


def _chromium(page, fragment):
    start = time.perf_counter()
    result = subprocess.run(
        [
            shutil.which("chromium") or "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
            "--dump-dom",
            f"file://{page}#{fragment}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - start
    cards = len(re.findall(r'<figure class="card', result.stdout))
    ready = 'data-ready="1"' in result.stdout
    return seconds, cards, ready


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
        views = {
            "default (index order)": "",
            "sorted by score, descending": "sort=score&order=desc",
            "filtered: target 2, done": "target=2&state=done",
            "filtered: failed": "state=failed",
            "one item large": "item=4321" if args.items > 4321 else "item=1",
        }
        rows = [(name, *_chromium(page, fragment)) for name, fragment in views.items()]
    lines = [
        f"# extra-attrib report on {args.items} items",
        "",
        f"{datetime.date.today()}, `python -m benchmarks.report_scale --items {args.items}`; "
        f"CPU, shared machine (load average {' '.join(load)} when the report started); "
        f"{shutil.which('chromium') and 'Debian chromium'} headless.",
        "",
        f"- store: {summary.done} done, {summary.failed} failed, explained in {explained:.0f} s",
        f"- report: {report.seconds:.1f} s ({report.seconds / args.items * 1e3:.2f} ms per item); "
        f"page {page_mib:.1f} MiB, with pictures {report.bytes / 2**20:.0f} MiB "
        f"({'folder beside the page' if report.folder else 'embedded'})",
        "",
        "| view | Chromium wall time (s) | cards on the page | script finished |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {name} | {s:.1f} | {cards} | {ready} |" for name, s, cards, ready in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        out = os.path.join(os.path.dirname(__file__), "results", "report_scale.md")
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
