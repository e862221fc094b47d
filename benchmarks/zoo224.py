"""The zoo's CNNs at 224²: does ``auto`` run them incrementally, and how much faster? (#20)

``python -m benchmarks.zoo224`` takes every 2D classifier of the zoo (torchvision's and the timm
selection of :mod:`benchmarks.zoo`, random weights) at 224², window 32 with ``k = 2`` (225
windows), one thread, and sorts out those with squeeze-excitation or attention (found from their
module classes, :data:`MIXING`): their gate or attention spreads a window's change over the whole
map, so #20 asks only that ``auto`` be no slower there. For each remaining CNN:

- what ``auto``'s engine choice does before any timing (:func:`choose_engine`): trace, cost
  model, payback rule and self-check; a model it declines runs dense, speed-up 1.00x;
- the steady per-window time of each engine on the same interior windows (:data:`CHUNK`
  windows per chunk, one warm-up chunk each, then :data:`TIMED` chunks each, interleaved; the
  fastest chunk counts): the engine a long ``auto`` call keeps is the faster one, because the
  race keeps what it measures; its speed-up over dense is what such a call gains, before the
  cost of deciding (whole calls with that cost: ``python -m benchmarks.zoo --speed``).

The table and its summary (share of CNNs on incremental, median speed-up) go to
``benchmarks/results/zoo224.md``. About 20 minutes on 2 shared cores; ``--models a,b`` runs some.
"""

from __future__ import annotations

import argparse
import datetime
import re
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torchvision
from torch import nn

from benchmarks.zoo import SKIPPED, TIMM_MODELS
from extra_attrib._engine import DenseEvaluator
from extra_attrib._geometry import TileGeometry
from extra_attrib._incremental import central_box, choose_engine

RESULTS = "benchmarks/results/zoo224.md"
#: Module classes that mix the whole map: squeeze-excitation gates, attention, selective
#: kernels (an SE-like gate over branches).
MIXING = re.compile(
    r"SqueezeExcit|SEModule|SEBlock|EffectiveSE|EcaModule|CecaModule|GatherExcite|"
    r"SelectiveKernel|SplitAttn|Attention|Attn|MultiheadAttention|EncoderBlock"
)
SIZE, WINDOW, K = 224, 32, 2
GEOMETRY = TileGeometry((3, SIZE, SIZE), (3, WINDOW, WINDOW), (1, K, K))
CHUNK, TIMED = 8, 2


def mixing_modules(model: nn.Module) -> List[str]:
    """Class names in ``model`` that mix the whole map (squeeze-excitation, attention)."""
    return sorted({type(m).__name__ for m in model.modules() if MIXING.search(type(m).__name__)})


def classifiers() -> List[Tuple[str, Callable[[], nn.Module]]]:
    """The zoo's 2D classifiers, built for 224² inputs."""
    out: List[Tuple[str, Callable[[], nn.Module]]] = []
    models = torchvision.models
    for name in models.list_models(module=models):
        if name in SKIPPED:
            continue
        kwargs: Dict[str, Any] = {"num_classes": 10}
        if name in ("inception_v3", "googlenet"):
            kwargs.update(aux_logits=False, init_weights=True)
        out.append((name, _make(models.get_model, name, kwargs)))
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is in the test extra
        return out
    for name in TIMM_MODELS:
        out.append((f"timm {name}", _make(timm.create_model, name, {"num_classes": 10})))
    return out


def _make(make: Callable[..., nn.Module], name: str, kwargs: Dict[str, Any]) -> Callable:
    return lambda: make(name, **kwargs).eval()


def _per_window(evaluator: Any, windows: List[int]) -> float:
    where = torch.tensor(windows)
    began = time.perf_counter()
    evaluator.evaluate(0, windows, where)
    return (time.perf_counter() - began) / len(windows)


def measure(name: str, build: Callable[[], nn.Module]) -> Dict[str, Any]:
    """One row: mixing modules, auto's choice before timing, steady per-window times."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build()
    mixing = mixing_modules(model)
    row: Dict[str, Any] = {"model": name, "mixing": ", ".join(mixing)}
    if mixing:
        return row
    x = torch.randn(1, 3, SIZE, SIZE)
    fill = torch.zeros(())
    geometry = GEOMETRY
    with torch.no_grad():
        model(x)
        began = time.perf_counter()
        choice = choose_engine("auto", model, (x,), (fill,), (), central_box(geometry), geometry)
        row["decide_s"] = time.perf_counter() - began
        row["choice"], row["reason"] = choice.engine, choice.reason
        engines: Dict[str, Any] = {
            "dense": DenseEvaluator(model, (x,), (fill,), [geometry], (), CHUNK)
        }
        if choice.factory is not None:
            engines["incremental"] = choice.factory(model, (x,), (fill,), [geometry], (), CHUNK)
        middle = geometry.num_perturbations // 2 - (TIMED + 1) * CHUNK // 2
        chunks = [
            list(range(middle + c * CHUNK, middle + (c + 1) * CHUNK)) for c in range(TIMED + 1)
        ]
        times: Dict[str, List[float]] = {e: [] for e in engines}
        for c, chunk in enumerate(chunks):
            for engine, evaluator in engines.items():
                seconds = _per_window(evaluator, chunk)
                if c:  # the first chunk warms the engine up
                    times[engine].append(seconds)
        for evaluator in engines.values():
            evaluator.finish(0)
    best = {e: min(t) for e, t in times.items()}
    row["dense_ms"] = 1e3 * best["dense"]
    row["incremental_ms"] = 1e3 * best["incremental"] if "incremental" in best else None
    row["kept"] = min(best, key=best.__getitem__)
    row["speedup"] = best["dense"] / best[row["kept"]]
    return row


def table(rows: Sequence[Dict[str, Any]]) -> str:
    lines = [
        "| model | auto before timing | dense ms / window | incremental ms / window | "
        "a long auto call keeps | speed-up over dense | deciding s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["mixing"]:
            continue
        incremental = "-" if r["incremental_ms"] is None else f"{r['incremental_ms']:.1f}"
        why = r["choice"] if r["choice"] != "dense" else f"dense: {r['reason']}"
        lines.append(
            f"| {r['model']} | {why} | {r['dense_ms']:.1f} | {incremental} | {r['kept']} | "
            f"{r['speedup']:.2f}x | {r['decide_s']:.2f} |"
        )
    return "\n".join(lines)


def summary(rows: Sequence[Dict[str, Any]]) -> str:
    cnns = [r for r in rows if not r["mixing"]]
    mixing = [r for r in rows if r["mixing"]]
    if not cnns:
        return "no CNN without squeeze-excitation or attention was measured"
    incremental = [r for r in cnns if r["kept"] == "incremental"]
    speedups = [r["speedup"] for r in cnns]
    return (
        f"{len(cnns)} CNNs without squeeze-excitation or attention ({len(mixing)} models with "
        f"them left out: {', '.join(r['model'] for r in mixing)}). A long `auto` call keeps "
        f"incremental on **{len(incremental)} of {len(cnns)} "
        f"({100 * len(incremental) / len(cnns):.0f} %)**; median speed-up over dense "
        f"**{statistics.median(speedups):.2f}x** (quartiles "
        f"{_quantile(speedups, 0.25):.2f}x, {_quantile(speedups, 0.75):.2f}x; "
        f"best {max(speedups):.2f}x)."
    )


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated names (default: all)")
    parser.add_argument("--out", default=RESULTS, help="markdown file ('' for none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    wanted = {m for m in args.models.split(",") if m}
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for name, build in classifiers():
        if wanted and name not in wanted:
            continue
        try:
            row = measure(name, build)
        except Exception as error:  # a model that cannot run at 224² is reported, not fatal
            print(f"{name}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            continue
        rows.append(row)
        print(
            table([row]).splitlines()[-1] if not row["mixing"] else f"{name}: {row['mixing']}",
            flush=True,
        )
    text = (
        f"# The zoo's CNNs at 224² (#20)\n\n`python -m benchmarks.zoo224`, started "
        f"{started:%Y-%m-%d %H:%M} UTC, 1 thread, torch {torch.__version__}; random weights, "
        f"input 3x{SIZE}x{SIZE}, window {WINDOW}, k = {K} ({GEOMETRY.num_perturbations} "
        f"windows). Steady per-window times: {CHUNK}-window chunks of interior windows, one "
        f"warm-up chunk per engine, then {TIMED} interleaved chunks each, the fastest counts.\n\n"
        f"{summary(rows)}\n\n{table(rows)}\n"
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
