"""The incremental cost model against measured per-window times: the fit of its node costs.

For each CNN and input size: the cost model's units for one dense window and one incremental
window at the centre (multiply-adds and elements moved; the node costs ``DENSE_NODE_COST`` /
``INCREMENTAL_NODE_COST`` come per node run, views excepted), and the measured time per window
of each engine on a chunk of 4 interior windows (the fastest of 3). A least-squares fit of
``time = units / throughput + nodes * overhead`` per engine gives the node costs in units;
the table compares the predicted gain with FLOPs alone, with the node costs, and the measured
one (#20).

Run: ``PYTHONPATH=$PWD python -m benchmarks.cost_model`` (about 6 minutes on one thread).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
import warnings
from typing import Any, Callable, Dict, List, Sequence

import torch
import torchvision

from extra_attrib._geometry import TileGeometry, perturbation_boxes
from extra_attrib._incremental import _ops
from extra_attrib._incremental._boxes import input_patch
from extra_attrib._incremental._sweep import _budgeted_sweep, _supported_program, central_box

RESULTS = "benchmarks/results/cost_model.md"
#: 20 torchvision and timm CNNs without squeeze-excitation or attention (``timm:`` prefix).
MODELS = (
    "resnet18,resnet50,densenet121,densenet169,mobilenet_v2,vgg11,convnext_tiny,regnet_x_400mf,"
    "regnet_x_1_6gf,mnasnet0_5,squeezenet1_0,shufflenet_v2_x0_5,shufflenet_v2_x1_0,googlenet,"
    "alexnet,resnext50_32x4d,timm:cspresnet50,timm:dla34,timm:resnet18d,timm:hrnet_w18_small,"
    "timm:repvgg_a0,timm:mobilenetv2_100,timm:efficientnet_lite0"
)
#: (side, window): windows of a quarter or a seventh of the side at k = 2.
SIZES = ((64, 16), (224, 32))
CHUNK = 4


def _build(name: str) -> torch.nn.Module:
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False, num_classes=10).eval()
    return torchvision.models.get_model(name, num_classes=10).eval()


def _fastest(run: Callable[[], Any], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return min(times)


def measure(name: str, side: int, window: int) -> Dict[str, Any]:
    """Units and seconds per window of both engines for one model and size."""
    torch.manual_seed(0)
    model = _build(name)
    x, zero = torch.randn(1, 3, side, side), torch.tensor(0.0)
    geometry = TileGeometry((3, side, side), (3, window, window), (1, 2, 2))
    program = _supported_program(model, (x,), ())
    sweep = _budgeted_sweep(program, (x,), (zero,), ())
    saved = _ops.DENSE_NODE_COST, _ops.INCREMENTAL_NODE_COST
    try:
        _ops.DENSE_NODE_COST = _ops.INCREMENTAL_NODE_COST = 0.0
        flops_dense = program.dense_cost(program.run_clean(x.clone()), 1)
        cost = _ops._Cost()
        with torch.no_grad():
            patch = input_patch(x, zero.expand_as(x), [central_box(geometry)])
            program.run_patched(sweep.clean, patch, cost)
    finally:
        _ops.DENSE_NODE_COST, _ops.INCREMENTAL_NODE_COST = saved
    ignored = {"static", "input", "output"} | _ops.VIEW_KINDS
    steps = [s for s in program.steps if s.kind not in ignored]
    nodes = sum(1 for s in steps if s.node in program.reach[0])
    rows, cols = geometry.grid[1:]
    middle = [(rows // 2 + dy) * cols + cols // 2 + dx for dy in (0, 1) for dx in (0, 1)]
    boxes = perturbation_boxes(geometry, middle)
    copies = x.repeat(CHUNK, 1, 1, 1)
    for i, box in enumerate(boxes):
        copies[(i, *box[1:])] = 0.0
    with torch.no_grad():
        model(copies)
        dense = _fastest(lambda: model(copies)) / CHUNK
        sweep.run(0, boxes)
        incremental = _fastest(lambda: sweep.run(0, boxes)) / CHUNK
    return {
        "name": name,
        "side": side,
        "dense_units": flops_dense,
        "incremental_units": cost.total,
        "dense_nodes": len(steps),
        "incremental_nodes": nodes,
        "dense_s": dense,
        "incremental_s": incremental,
    }


def _fit(units: Sequence[float], nodes: Sequence[float], seconds: Sequence[float]) -> List[float]:
    """Relative least squares of ``seconds = a * units + b * nodes``; returns ``[a, b]``."""
    rows = torch.tensor([[u / s, n / s] for u, n, s in zip(units, nodes, seconds)], dtype=float)
    ones = torch.ones(len(seconds), 1, dtype=float)
    solution = torch.linalg.lstsq(rows, ones).solution
    return [float(v) for v in solution[:, 0]]


def report(rows: List[Dict[str, Any]]) -> str:
    """The fit and the table, in markdown."""
    a_d, b_d = _fit(*zip(*((r["dense_units"], r["dense_nodes"], r["dense_s"]) for r in rows)))
    a_i, b_i = _fit(
        *zip(*((r["incremental_units"], r["incremental_nodes"], r["incremental_s"]) for r in rows))
    )
    dense_node, incremental_node = b_d / a_d, b_i / a_d
    lines = [
        f"Fit over {len(rows)} model-size pairs: dense {1e12 * a_d:.1f} ps per unit and "
        f"{1e6 * b_d:.1f} us per node per window; incremental {1e12 * a_i:.1f} ps per unit "
        f"and {1e6 * b_i:.1f} us per node per window. In dense units per node: "
        f"{dense_node:.3g} (dense), {incremental_node:.3g} (incremental). The package uses "
        f"DENSE_NODE_COST = {_ops.DENSE_NODE_COST:.3g}, INCREMENTAL_NODE_COST = "
        f"{_ops.INCREMENTAL_NODE_COST:.3g}.",
        "",
        "| model | side | nodes | predicted, FLOPs alone | predicted, with node costs | "
        "measured | with node costs / measured |",
        "|---|---|---|---|---|---|---|",
    ]
    errors: Dict[str, List[float]] = {"flops": [], "nodes": []}
    for r in rows:
        measured = r["dense_s"] / r["incremental_s"]
        flops = r["dense_units"] / r["incremental_units"]
        with_nodes = (r["dense_units"] + r["dense_nodes"] * _ops.DENSE_NODE_COST) / (
            r["incremental_units"] + r["incremental_nodes"] * _ops.INCREMENTAL_NODE_COST
        )
        errors["flops"].append(flops / measured)
        errors["nodes"].append(with_nodes / measured)
        lines.append(
            f"| {r['name']} | {r['side']} | {r['dense_nodes']} | {flops:.2f}x | "
            f"{with_nodes:.2f}x | {measured:.2f}x | {with_nodes / measured:.2f} |"
        )
    for key, label in (("flops", "FLOPs alone"), ("nodes", "with node costs")):
        e = errors[key]
        lines.append("")
        lines.append(
            f"Predicted / measured, {label}: median {statistics.median(e):.2f}, "
            f"range {min(e):.2f}-{max(e):.2f}."
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS, help="comma-separated model names")
    parser.add_argument("--out", default=RESULTS, help="markdown file ('' for none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for name in args.models.split(","):
        for side, window in SIZES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    rows.append(measure(name, side, window))
                except _ops.UnsupportedModel as error:
                    print(f"{name} {side}: not incremental ({error})", flush=True)
                    continue
            print(json.dumps(rows[-1]), flush=True)
    text = report(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(
                "# The incremental cost model against measured time (#20)\n\n"
                f"`python -m benchmarks.cost_model`, started {started:%Y-%m-%d %H:%M} UTC, one "
                f"thread, torch {torch.__version__}; chunks of {CHUNK} interior windows at "
                "k = 2, fastest of 3.\n\n" + text + "\n"
            )


if __name__ == "__main__":
    main()
