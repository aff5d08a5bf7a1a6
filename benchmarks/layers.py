"""Every distinct conv/linear layer of a model, with its epilogue, in the model's own layouts: PyTorch's
kernel, oneDNN's, and optic's generated one after ``tune="fast"``, timed alternated in the model's
process; and the cost model's rank correlation on each.

    GOMP_SPINCOUNT=10000 OMP_NUM_THREADS=2 python -m benchmarks.layers [--models resnet50,bert_base] [--tune fast]

This module imports torch before optic, so optic cannot limit libgomp's spinning here (optic.threads):
without GOMP_SPINCOUNT in the environment, PyTorch's spinning threads slow every generated kernel 2-3x
(benchmarks/results/layers_default_spin.md). The table says how the thread pools were set.

Runs ``optimize(backend="tvm", tune=...)`` with a fresh tuning database and the whole-graph
implementations left out (what is compared here is each kernel), then reads the backend's per-kernel
verdicts (``report.passes[...].measured["kernels"]``). Writes ``benchmarks/results/layers.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import optic
from benchmarks.render import save
from benchmarks.runner import machine
from benchmarks.zoo import registry

OUT = Path(__file__).resolve().parent / "results"
# how the two thread pools in the process (PyTorch's OpenMP, TVM's) were set up: the table says it
THREAD_ENV = ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "TVM_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")
DEFAULT = ["resnet50", "bert_base"]


def run_model(name: str, tune: str, db: Path) -> dict:
    entry = registry.get(name)
    model, x = entry.factory(), entry.inputs(1)
    t0 = time.perf_counter()
    out = optic.optimize(model, x, backend="tvm", tune=tune, tuning_db=str(db), options={"whole_graph": False})
    seconds = time.perf_counter() - t0
    rec = next((r for r in out.report.passes if r.name == "tvm_kernels"), None)
    kernels = (rec.measured.get("kernels") if rec else None) or []
    return {"model": name, "optimize_s": round(seconds, 1), "kernels": kernels,
            "tuning_measurements": rec.measured.get("tuning_measurements") if rec else 0,
            "tuning_s": rec.measured.get("tuning_s") if rec else 0}


def summary(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        ks = [k for k in r["kernels"] if k.get("times_ms")]
        gen_wins = sum(1 for k in ks if k["chosen"] == "tvm")
        rho = [k["rank_correlation"] for k in ks if k.get("rank_correlation") is not None]
        good = sum(1 for v in rho if v >= 0.5)
        lines.append(f"{r['model']}: {len(ks)} distinct kernels timed; the generated one is fastest on {gen_wins}; "
                     f"cost-model rank correlation >= 0.5 on {good} of {len(rho)} with a correlation "
                     f"({r['tuning_measurements']} tuning measurements in {r['tuning_s']} s)")
    return lines


def _cell(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# Layers: PyTorch, oneDNN and optic's generated kernel, per distinct conv/linear", "",
             f"{m['cpu']}; {m['threads']} threads; {m['date']}; tune={results['tune']}. Milliseconds per call, "
             "median of alternated blocks in the model's process, on the values the layer sees in the model; "
             "ρ: Spearman rank correlation of the cost model with the tuning measurements of that workload "
             "(n/a: fewer than 3 measurements). Thread pools: "
             + ", ".join(f"{k}={v}" for k, v in (results.get("env") or {}).items() if v is not None) + ".", ""]
    for line in summary(results["rows"]):
        lines.append(f"- {line}")
    for r in results["rows"]:
        lines += ["", f"## {r['model']}", "", "| kernel | layers | ATen ms | oneDNN ms | generated ms | runs | ρ |",
                  "|---|---:|---:|---:|---:|---|---:|"]
        for k in r["kernels"]:
            t = k.get("times_ms") or {}
            rho = k.get("rank_correlation")
            lines.append(f"| {k['operator']} | {len(k['layers'])} | {_cell(t.get('torch'))} | {_cell(t.get('oneDNN'))} "
                         f"| {_cell(t.get('tvm'))} | {k['chosen']} | {'n/a' if rho is None else f'{rho:+.2f}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT))
    ap.add_argument("--tune", default="fast")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            print(f"layers: {name} ...", flush=True)
            rows.append(run_model(name, args.tune, Path(tmp) / "tuning.db"))
            print("  " + summary(rows[-1:])[0], flush=True)
    results = {"machine": machine(threads), "tune": args.tune, "rows": rows,
               "env": {k: os.environ.get(k) for k in THREAD_ENV}}
    save(args.out, "layers", results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
