"""``torch.compile(model, backend="optic")`` against ``optic.optimize`` and eager, per model at batch 1.

    PYTHONPATH=. python -m benchmarks.dynamo_backend [--models tiny_cnn,resnet18,mobilenetv2,branchy] [--out benchmarks/results]

Systems, each prepared once per model (both optic systems with optimize's defaults: exact passes, CPU
tactics measured here, the whole-graph implementations offered):

- ``eager``: the model;
- ``traced``: dynamo's own graph (what ``backend="eager"`` runs) called directly, outside dynamo (one-graph
  models only): ``compile-eager`` − ``traced`` is what dynamo's frame costs any backend (guards, its
  prologue and the wrappers around the compiled function). ``compile-eager`` − ``eager`` understates it,
  because the traced graph skips the nn.Module calls that eager makes;
- ``optimize``: ``optic.optimize(model, inputs)``; n/a where optic cannot capture the model;
- ``compile-eager``: ``torch.compile(model, backend="eager")``: dynamo's graphs run as traced, so its time
  over eager's is what dynamo itself costs (guards, frames, and with graph breaks the Python between graphs);
- ``compile-optimize``: a five-line backend whose graph runs ``optimize``'s result (one-graph models only):
  what dynamo costs a backend that runs a module built apart from dynamo's graph, without optic's checks;
- ``compile-optic``: ``torch.compile(model, backend="optic")``, optimized on its first call; the acceptance
  bar is ``optimize``'s time plus what dynamo's frame costs (``compile-eager`` − ``traced``; for a model
  with graph breaks, ``compile-eager`` − ``eager``, which then includes the Python between the graphs).

``branchy`` (:class:`Branchy`) has an ``if`` on a tensor's value in ``forward``: a graph break for dynamo,
a CaptureError for ``optimize``.

Latency: every system alternated in blocks after a 2 s warm-up each (``benchmarks.runner.warm_up``),
medians with the interquartile spread, all under ``torch.no_grad()``; outputs are checked against eager
first. Writes ``dynamo_backend.json`` and ``dynamo_backend.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("tiny_cnn", "resnet18", "mobilenetv2", "branchy")
SYSTEMS = ("eager", "traced", "optimize", "compile-eager", "compile-optimize", "compile-optic")


class Branchy(nn.Module):
    """Two conv+BN+ReLU layers around Python control flow on a tensor's value (``if x.sum() > 0``), then
    a linear head: dynamo breaks the graph at the ``if``, ``optic.optimize`` cannot capture it."""

    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        if x.sum() > 0:
            y = torch.relu(self.bn2(self.conv2(y)))
        else:
            y = -y
        return self.fc(y.mean((2, 3)))


def _model(name: str) -> tuple[nn.Module, tuple]:
    if name == "branchy":
        torch.manual_seed(0)
        return Branchy(width=32).eval(), (torch.randn(1, 3, 56, 56).abs(),)
    from benchmarks.zoo import get

    entry = get(name)
    return entry.factory(), entry.inputs(1)


def _kept(report) -> str:
    """What the CPU tactics kept, as the report's note says it."""
    for p in report.passes:
        for note in p.notes:
            if p.name == "cpu_tactics" and "kept" in note:
                return note.rsplit("→", 1)[-1].strip()
    return "the captured graph"


def _running(module: nn.Module, inputs: tuple):
    """A backend whose graph runs ``module`` on the model's own inputs (found among the graph's inputs by
    identity): ``compile-optimize``."""
    def backend(gm, example_inputs):
        at = [next(i for i, v in enumerate(example_inputs) if v is x) for x in inputs]
        return lambda *args: (module(*(args[i] for i in at)),)
    return backend


def _recording(store: list):
    """A backend that keeps dynamo's graph and its example inputs (the lifted weights and the model's inputs,
    the same tensors on every call) and runs the graph as traced: ``traced`` calls it directly."""
    def backend(gm, example_inputs):
        store.append((gm, list(example_inputs)))
        return gm.forward
    return backend


def run(models: list[str]) -> dict:
    import torch._dynamo

    import optic
    import optic.dynamo
    from benchmarks.runner import warm_up
    from optic.pipeline import timing
    from optic.pipeline.verify import compare

    rows, load = [], os.getloadavg()[0]  # the machine is shared: the results say how busy it was
    for name in models:
        model, inputs = _model(name)
        print(f"{name}: preparing", flush=True)
        systems, prep, kept, notes = {"eager": model}, {}, {}, []
        t0 = time.perf_counter()
        try:
            systems["optimize"] = optic.optimize(model, inputs, target="cpu")
            prep["optimize"] = time.perf_counter() - t0
            kept["optimize"] = _kept(systems["optimize"].report)
        except optic.CaptureError as e:
            notes.append(f"optimize: {str(e).splitlines()[0]} (CaptureError)")
        torch._dynamo.reset()
        optic.dynamo.clear()
        traced: list = []
        with torch.no_grad():
            torch.compile(model, backend=_recording(traced))(*inputs)
        if len(traced) == 1:
            gm, ex = traced[0]
            systems["traced"] = (lambda *_, gm=gm, ex=ex: gm(*ex)[0])
        torch._dynamo.reset()
        systems["compile-eager"] = torch.compile(model, backend="eager")
        if "optimize" in systems:
            systems["compile-optimize"] = torch.compile(model, backend=_running(systems["optimize"], inputs))
        compiled = torch.compile(model, backend="optic")
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(*inputs)  # compiles, and optimizes each graph on its first call
        prep["compile-optic"] = time.perf_counter() - t0
        systems["compile-optic"] = compiled
        with torch.no_grad():
            for s in ("compile-eager", "compile-optimize"):
                if s in systems:
                    systems[s](*inputs)
        graphs = optic.dynamo.graphs()
        kept["compile-optic"] = "; ".join(f"{g.graph}: {_kept(g.report) if g.report else 'traced: ' + g.traced}"
                                          for g in graphs)
        fns = {s: (lambda fn=fn, ex=inputs: fn(*ex)) for s, fn in systems.items()}
        with torch.no_grad():
            ref = model(*inputs)
            errors = {s: compare(ref, fn(), float("inf")).rel for s, fn in fns.items()}
            warm = warm_up(fns, 2.0)
            times = timing.compare(fns, rounds=9, block=timing.calls_per_block(fns["eager"], 0.05, 100),
                                   warmup=2, budget_s=40.0)
        row = {"model": name, "batch": 1, "graphs": len(graphs), "prepare_s": prep, "warmup_s": warm,
               "max_rel_error_vs_eager": errors, "implementation": kept, "notes": notes,
               "latency_ms": {s: t.median * 1e3 for s, t in times.items()},
               "spread": {s: t.spread for s, t in times.items()},
               "speedup_vs_eager": {s: times["eager"].median / t.median for s, t in times.items()}}
        # what dynamo's frame costs any backend: against its own graph run directly where there is one graph,
        # else against eager (then the Python between the graphs is included)
        base = "traced" if "traced" in times else "eager"
        dynamo_s = times["compile-eager"].median - times[base].median
        row["dynamo_cost_ms"], row["dynamo_cost_against"] = dynamo_s * 1e3, base
        if "optimize" in times:
            row["compile_vs_optimize"] = times["optimize"].median / times["compile-optic"].median
            row["compile_vs_compile_optimize"] = times["compile-optimize"].median / times["compile-optic"].median
            row["overhead_ms"] = (times["compile-optic"].median - times["optimize"].median) * 1e3
            # the acceptance: at least as fast as optimize's result plus what dynamo costs any backend
            row["within_bar"] = times["compile-optic"].median <= (times["optimize"].median + max(dynamo_s, 0.0)) \
                * (1 + max(times["compile-optic"].spread, times["optimize"].spread) / 2)
        rows.append(row)
        print(_line(row), flush=True)
    return {"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average": {"start": load, "end": os.getloadavg()[0]}}


def _line(r: dict) -> str:
    parts = [f"{s} {r['latency_ms'][s]:.3f} ms ±{r['spread'][s]:.0%} ({r['speedup_vs_eager'][s]:.2f}×)"
             for s in SYSTEMS if s in r["latency_ms"]]
    return f"{r['model']}: " + "; ".join(parts)


def markdown(res: dict) -> str:
    lines = ["# torch.compile(backend=\"optic\") against optic.optimize", "",
             f"torch {res['torch']}, {res['threads']} threads, batch 1; load average {res['load_average']['start']:.1f} "
             f"at the start, {res['load_average']['end']:.1f} at the end (the machine is shared). Latency per call: "
             "medians of alternated "
             "blocks after a 2 s warm-up each (± is the interquartile spread); speed-up over eager. "
             "`compile-optic / optimize` above 1 means the backend is faster than optimize's result, `compile-optic "
             "/ compile-optimize` than optimize's result run from dynamo's frame; \"within\" allows half the wider "
             "interquartile spread.", "",
             "| model | graphs | eager | traced | optimize | compile-eager | compile-optimize | compile-optic | compile-optic / "
             "optimize | compile-optic / compile-optimize | compile-optic − optimize | dynamo's cost (compile-eager − "
             "traced, or − eager with graph breaks) | within optimize + dynamo's cost |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        cells = [f"{r['latency_ms'][s]:.3f} ms ±{r['spread'][s]:.0%}<br>{r['speedup_vs_eager'][s]:.2f}×"
                 if s in r["latency_ms"] else "n/a" for s in SYSTEMS]
        ratio = (f"{r['compile_vs_optimize']:.2f}× | {r['compile_vs_compile_optimize']:.2f}×"
                 if "compile_vs_optimize" in r else "n/a | n/a")
        extra = f"{r['overhead_ms'] * 1e3:+.0f} µs" if "overhead_ms" in r else "n/a"
        lines.append(f"| {r['model']} | {r['graphs']} | " + " | ".join(cells)
                     + f" | {ratio} | {extra} | {r['dynamo_cost_ms'] * 1e3:+.0f} µs (− {r.get('dynamo_cost_against', 'eager')}) | "
                     + {True: "yes", False: "**no**", None: "n/a"}[r.get("within_bar")] + " |")
    lines += [f"\n{note}" for note in res.get("notes", [])]
    lines += ["", "What each optic system runs (the CPU tactics' choice per graph) and how long it took to prepare:", ""]
    for r in res["rows"]:
        prep = ", ".join(f"{s} {v:.1f} s" for s, v in r["prepare_s"].items())
        impl = "; ".join(f"{s}: {v}" for s, v in r["implementation"].items())
        lines.append(f"- {r['model']}: {impl} (prepare: {prep})" + "".join(f"; {n}" for n in r["notes"]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    from benchmarks.runner import pin_threads

    pin_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run(args.models.split(","))
    (out / "dynamo_backend.json").write_text(json.dumps(res, indent=1))
    (out / "dynamo_backend.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
