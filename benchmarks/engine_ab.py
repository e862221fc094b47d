"""The dense engine against an earlier commit's, in one process, interleaved.

The earlier ``extra_attrib`` is taken from git (``git archive REF extra_attrib``) into a temporary
folder under the name ``extra_attrib_ref`` and imported next to this checkout's. Per case, each
round times, CPU time, the fastest of 3 calls each of:

- ``new``: this checkout, one object across rounds (later calls reuse its tuned chunk size);
- ``ref``: the earlier commit, one object across rounds;
- ``new_first``: this checkout, a new object every call (it tunes from scratch).

Both run ``engine="dense"`` (the engine this compares) with default settings. Before timing,
both are run at a fixed ``perturbations_per_eval=4`` and must give bit-identical maps. Reported:
the medians over rounds of ``new / ref`` and ``new_first / ref`` with their ranges. Run
``PYTHONPATH=$PWD python -m benchmarks.engine_ab --ref 9b367ab --cases tabular64 series1d``.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from typing import Dict, List, Sequence

import torch

from benchmarks.occlusion_speed import ALL_CASES, best_of, build_case
from extra_attrib import TiledOcclusion


def load_reference(ref: str, into: pathlib.Path) -> type:
    """``TiledOcclusion`` of commit ``ref``, imported as ``extra_attrib_ref``."""
    archive = into / "ref.tar"
    with open(archive, "wb") as out:
        subprocess.run(["git", "archive", ref, "extra_attrib"], check=True, stdout=out)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    package = into / "extra_attrib_ref"
    (into / "extra_attrib").rename(package)
    for source in package.rglob("*.py"):
        source.write_text(re.sub(r"\bextra_attrib\b", "extra_attrib_ref", source.read_text()))
    sys.path.insert(0, str(into))
    return importlib.import_module("extra_attrib_ref").TiledOcclusion


def compare(case: str, reference: type, rounds: int) -> Dict[str, object]:
    model, x, window, k = build_case(case, False)
    new, ref = TiledOcclusion(model), reference(model)
    settings = dict(target=0, window=window, k=k, engine="dense")
    fixed = [t.attribute(x, **settings, perturbations_per_eval=4) for t in (new, ref)]
    if not torch.equal(fixed[0], fixed[1]):
        raise AssertionError(f"{case}: the engines differ at the same chunk size")
    for t in (new, ref):
        t.attribute(x, **settings)  # warm-up; the objects keep what they tuned
    ratios: Dict[str, List[float]] = {"new": [], "new_first": []}
    for _ in range(rounds):
        t_new = best_of(lambda: new.attribute(x, **settings), 3, False)
        t_ref = best_of(lambda: ref.attribute(x, **settings), 3, False)
        t_first = best_of(lambda: TiledOcclusion(model).attribute(x, **settings), 3, False)
        ratios["new"].append(t_new / t_ref)
        ratios["new_first"].append(t_first / t_ref)
    return {
        key: (statistics.median(values), min(values), max(values)) for key, values in ratios.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, help="the earlier commit, e.g. 9b367ab")
    parser.add_argument("--cases", nargs="+", choices=ALL_CASES, default=["tabular64"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        reference = load_reference(args.ref, pathlib.Path(tmp))
        print(f"| case | rounds | new / {args.ref} | new, first call / {args.ref} |")
        print("|---|---|---|---|")
        for case in args.cases:
            r = compare(case, reference, args.rounds)
            new, first = r["new"], r["new_first"]
            print(
                f"| {case} | {args.rounds} | {new[0]:.2f}x ({new[1]:.2f}-{new[2]:.2f}) | "
                f"{first[0]:.2f}x ({first[1]:.2f}-{first[2]:.2f}) |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
