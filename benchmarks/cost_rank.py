"""The cost model's rank correlation per template and layout, on a spread of each kernel's space.

    GOMP_SPINCOUNT=10000 OMP_NUM_THREADS=2 python -m benchmarks.cost_rank [--layers benchmarks/results/layers.json] [--k 8]
    python -m benchmarks.cost_rank --tvm-graph mobilenetv2,resnet50 --out DIR   # the whole TVM program's kernels

The correlation ``optimize`` reports per kernel is over what tuning measured: the model's own top picks,
which it predicts within a few percent of each other, so it mostly says how noise orders near-ties. What
tells whether the model ranks a space is a spread of it: for every distinct kernel of the layers
benchmark (``layers.json``, its ``spec``), ``--k`` configurations at evenly spaced ranks of the model's
order (its best, its worst and between), each built, checked and timed by the tuner's worker, then
Spearman's correlation of predicted with measured time. Writes ``benchmarks/results/cost_rank.{json,md}``:
one row per kernel and, per template and layout, the median and the lowest correlation. ``--tvm-graph``
takes the kernels of the whole-graph TVM program of the named zoo models instead (``optic.backend.tvm_graph``:
NHWC direct and implicit-GEMM convolutions, depthwise convolutions, GEMMs with prepacked weights), at batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.render import save
from benchmarks.runner import machine
from optic.autotune import Runner, cost_model, solve
from optic.autotune.operator import Operator

OUT = Path(__file__).resolve().parent / "results"


def template_of(operator: Operator) -> str:
    """The template and the layout it was asked about: ``conv2d_direct_cpu NCHWc``, ``matmul_cpu B[K,N]``."""
    name = operator.space("cpu").name.split("[", 1)[0]
    o = operator.opts
    if operator.op == "conv2d":
        layout = o["layout"]
    elif operator.op == "depthwise_conv2d":
        layout = "NHWC"
    else:
        layout = {"kn": "B[K,N]", "nk": "B[N,K]", "packed": "B packed"}[o["b_layout"]]
    return f"{name} {layout}"


def spread(predicted: np.ndarray, order: np.ndarray, k: int) -> list[int]:
    """``k`` rows at evenly spaced ranks of the model's order, its best and its worst among them."""
    picks = np.linspace(0, len(order) - 1, min(k, len(order))).round().astype(int)
    return [int(order[i]) for i in dict.fromkeys(picks.tolist())]


def sample(operator: Operator, k: int, runner: Runner) -> dict:
    space = operator.space("cpu")
    solved = solve(space)
    order, predicted = cost_model.rank(space, solved.names, solved.rows)
    rows = spread(predicted, order, k)
    configs = [dict(zip(solved.names, solved.rows[i], strict=True)) for i in rows]
    runner.prebuild(operator, configs)
    seconds = [runner.measure(operator, c).seconds for c in configs]
    rho = cost_model.spearman([float(predicted[i]) for i in rows], seconds)
    return {"operator": str(operator), "template": template_of(operator), "valid": int(solved.valid),
            "configs": configs, "predicted_ms": [float(predicted[i]) * 1e3 for i in rows],
            "measured_ms": [s * 1e3 for s in seconds], "rank_correlation": rho}


def summary(rows: list[dict]) -> list[dict]:
    by: dict[str, list[float]] = {}
    for r in rows:
        if r["rank_correlation"] is not None:
            by.setdefault(r["template"], []).append(r["rank_correlation"])
    return [{"template": t, "kernels": len(v), "median": statistics.median(v), "lowest": min(v),
             "at_least_half": sum(x >= 0.5 for x in v)} for t, v in sorted(by.items())]


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# Cost model: rank correlation on a spread of each kernel's space", "",
             f"{m['cpu']}; {m['threads']} threads; {m['date']}. For every distinct conv/linear of "
             f"{', '.join(results['models'])} ({results.get('source', 'benchmarks/results/layers.json')}), "
             f"{results['k']} configurations at "
             "evenly spaced ranks of the cost model's order, each timed by the tuner's worker; ρ: Spearman's "
             f"correlation of predicted with measured time. {results['seconds']:.0f} s in all.", "",
             "| template, layout | kernels | median ρ | lowest ρ | kernels with ρ ≥ 0.5 |", "|---|---:|---:|---:|---:|"]
    for s in results["summary"]:
        lines.append(f"| {s['template']} | {s['kernels']} | {s['median']:+.2f} | {s['lowest']:+.2f} "
                     f"| {s['at_least_half']} of {s['kernels']} |")
    lines += ["", "| kernel | template | ρ | measured ms, best … worst predicted |", "|---|---|---:|---|"]
    for r in results["rows"]:
        rho = "n/a" if r["rank_correlation"] is None else f"{r['rank_correlation']:+.2f}"
        times = " ".join("fail" if not np.isfinite(t) else f"{t:.3g}" for t in r["measured_ms"])
        lines.append(f"| {r['operator']} | {r['template']} | {rho} | {times} |")
    return "\n".join(lines) + "\n"


def tvm_graph_specs(models: list[str]) -> list[tuple[str, dict]]:
    """(model, operator spec) of every distinct template kernel of each zoo model's whole-graph TVM program,
    batch 1 (the graph captured and its norms folded by optic's exact passes, as the CPU step sees it)."""
    import torch.utils._pytree as pytree

    import optic
    from benchmarks.zoo import registry
    from optic.backend import tvm_graph

    out, seen = [], set()
    for name in models:
        entry = registry.get(name)
        model, x = entry.factory(), entry.inputs(1)
        program = optic.optimize(model, x, options={"whole_graph": False}, disable=["cpu_tactics"]).program
        flat = tuple(pytree.tree_leaves((program.example_args, program.example_kwargs)))
        _, kernels, _, _ = tvm_graph.lower(program.gm, flat)
        for k in kernels:
            key = json.dumps(k.spec, sort_keys=True) if k.spec else None
            if key and key not in seen:
                seen.add(key)
                out.append((name, k.spec))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default=str(OUT / "layers.json"))
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--tvm-graph", metavar="MODELS", help="comma-separated zoo models: rank the kernels of their "
                    "whole-graph TVM program instead of the layers benchmark's")
    args = ap.parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    if args.tvm_graph:
        specs = tvm_graph_specs(args.tvm_graph.split(","))
    else:
        layers = json.loads(Path(args.layers).read_text())
        specs = [(r["model"], k["spec"]) for r in layers["rows"] for k in r["kernels"] if k.get("spec")]
    if not specs:
        raise SystemExit(f"{args.layers} names no kernel with its spec: run python -m benchmarks.layers first")
    start = time.perf_counter()
    rows = []
    runner = Runner(threads=threads)
    try:
        for i, (model, spec) in enumerate(specs):
            operator = Operator.from_dict(spec)
            rows.append({"model": model, **sample(operator, args.k, runner)})
            rho = rows[-1]["rank_correlation"]
            print(f"[{i + 1}/{len(specs)}] {operator}: rho {rho if rho is None else round(rho, 2)}", flush=True)
    finally:
        runner.close()
    results = {"machine": machine(threads), "k": args.k, "models": sorted({m for m, _ in specs}), "rows": rows,
               "source": ("the kernels of their whole-graph TVM program, batch 1" if args.tvm_graph
                          else "benchmarks/results/layers.json"),
               "summary": summary(rows), "seconds": time.perf_counter() - start}
    save(args.out, "cost_rank", results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
