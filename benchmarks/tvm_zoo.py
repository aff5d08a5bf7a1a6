"""The TVM backend on the zoo at batch 1: tuning, a second optimize, latency against eager and the torch backend.

    OMP_NUM_THREADS=2 python -m benchmarks.tvm_zoo [--models resnet18,...] [--tune fast] [--rounds 9]

For each model: ``optimize(backend="tvm", tune=...)`` with a fresh tuning database (its tuning
measurements and seconds, how many distinct kernels run generated code), the same ``optimize`` again
(it must measure nothing: the database has every record and every tactic verdict), the torch
backend (``optimize`` with the same passes, no generated kernels), then eager, optic-torch and
optic-tvm timed alternated in blocks (``optic.pipeline.timing.compare``, medians and quartiles, same process,
same threads), and the outputs checked against eager. Writes
``benchmarks/results/tvm_zoo.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import optic
from benchmarks.render import save
from benchmarks.runner import machine
from benchmarks.zoo import registry
from optic.pipeline import timing
from optic.pipeline.verify import compare

DEFAULT = ["resnet18", "resnet50", "mobilenetv2", "vit_s16", "bert_base"]
OUT = Path(__file__).resolve().parent / "results"


def _record(out, name: str = "tvm_kernels") -> dict:
    return next((r for r in out.report.passes if r.name == name), None)


def _kept(out) -> tuple[str, dict]:
    """What the CPU step kept for the whole model, and the time of each implementation it measured (ms)."""
    r = _record(out, "cpu_tactics")
    if r is None:
        return "-", {}
    return r.measured.get("kept", "torch ops"), r.measured.get("variants_ms", {})


def run_model(name: str, tune: str, rounds: int, db: Path) -> dict:
    entry = registry.get(name)
    model, x = entry.factory(), entry.inputs(1)
    with torch.no_grad():
        ref = model(*x)
    start = time.perf_counter()
    first = optic.optimize(model, x, backend="tvm", tune=tune, tuning_db=db)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    second = optic.optimize(model, x, backend="tvm", tune=tune, tuning_db=db)
    second_s = time.perf_counter() - start
    plain = optic.optimize(model, x)
    r1, r2 = _record(first), _record(second)
    kernels = (r1.measured.get("kernels") if r1 else None) or []
    fns = {"eager": lambda: model(*x), "optic-torch": lambda: plain(*x), "optic-tvm": lambda: second(*x)}
    with torch.no_grad():
        for f in fns.values():
            f()
        block = timing.calls_per_block(fns["eager"], target_s=0.05, cap=50)
        t = timing.compare(fns, rounds=rounds, block=block, warmup=1)
        errors = {k: compare(ref, f(), 1e-4).rel for k, f in (("optic-torch", fns["optic-torch"]),
                                                             ("optic-tvm", fns["optic-tvm"]))}
    generated = [k for k in kernels if k["chosen"] == "tvm"]
    kept, variants = _kept(second)
    return {
        "kept": kept, "variants_ms": variants,
        "model": name, "tune": tune,
        "first_optimize_s": round(first_s, 1), "second_optimize_s": round(second_s, 1),
        "tuning_measurements": (r1.measured.get("tuning_measurements", 0) if r1 else 0),
        "tuning_s": (r1.measured.get("tuning_s", 0) if r1 else 0),
        "second_tuning_measurements": (r2.measured.get("tuning_measurements", 0) if r2 else 0),
        "second_cached_verdicts": sum(bool(k.get("cached")) for k in ((r2.measured.get("kernels") if r2 else None) or [])),
        "distinct_kernels": len(kernels), "generated_kept": len(generated),
        "generated": [{"operator": k["operator"], "times_ms": k["times_ms"]} for k in generated],
        "tvm_pass_changed": bool(r2 and r2.changed and not r2.rolled_back),
        "ms": {k: v.median * 1e3 for k, v in t.items()},
        "q": {k: [v.q1 * 1e3, v.q3 * 1e3] for k, v in t.items()},
        "speedup_vs_eager": {k: t["eager"].median / t[k].median for k in ("optic-torch", "optic-tvm")},
        "tvm_vs_torch_backend": t["optic-torch"].median / t["optic-tvm"].median,
        "max_error": errors,
    }


def render(results: dict) -> str:
    m = results["machine"]
    lines = ["# The TVM backend on the zoo, batch 1", "",
             f"{m['cpu']}, {m['threads']} threads, torch {m['versions'].get('torch')}, TVM {m['versions'].get('apache-tvm')}; "
             f"commit {(m['commit'] or '?')[:10]}, {m['date']}; tune={results['tune']!r}; {results['rounds']} alternated rounds, "
             "medians [quartiles]; a fresh tuning database per run.", "",
             "| model | eager ms | optic-torch | optic-tvm | tvm vs torch backend | generated kernels kept | "
             "tuning (1st optimize) | 2nd optimize | max error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        ms, q, s = r["ms"], r["q"], r["speedup_vs_eager"]
        lines.append(
            f"| {r['model']} | {ms['eager']:.2f} [{q['eager'][0]:.2f}–{q['eager'][1]:.2f}] "
            f"| **{s['optic-torch']:.2f}×** {ms['optic-torch']:.2f} "
            f"| **{s['optic-tvm']:.2f}×** {ms['optic-tvm']:.2f} [{q['optic-tvm'][0]:.2f}–{q['optic-tvm'][1]:.2f}] "
            f"| {r['tvm_vs_torch_backend']:.2f}× | {r['generated_kept']} of {r['distinct_kernels']} "
            f"| {r['tuning_measurements']} measurements, {r['tuning_s']:.0f} s ({r['first_optimize_s']:.0f} s in all) "
            f"| {r['second_tuning_measurements']} measurements, {r['second_cached_verdicts']} stored verdicts, "
            f"{r['second_optimize_s']:.0f} s | {r['max_error']['optic-tvm']:.1e} |")
    lines += ["", "× is the speed-up over eager PyTorch in the same alternated timing (higher is faster). "
              "'generated kernels kept': distinct conv/linear kernels whose generated code beat PyTorch's (ATen and "
              "oneDNN) in the per-kernel tactic; the whole model then keeps them only if it is faster with them.", ""]
    for r in results["rows"]:
        if r.get("variants_ms"):
            times = ", ".join(f"{k} {v:.2f}" for k, v in r["variants_ms"].items())
            lines.append(f"- {r['model']}, what the CPU step timed for backend='tvm' (ms): {times}; kept: **{r['kept']}**")
    lines.append("")
    for r in results["rows"]:
        for g in r["generated"]:
            times = ", ".join(f"{k} {v:.3f} ms" for k, v in g["times_ms"].items())
            lines.append(f"- {r['model']}: {g['operator']}: {times}")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.38
    for i, system in enumerate(("optic-torch", "optic-tvm")):
        xs = [j + (i - 0.5) * width for j in range(len(rows))]
        ax.bar(xs, [r["speedup_vs_eager"][system] for r in rows], width, label=system)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows])
    ax.set_ylabel("speed-up over eager (batch 1)")
    ax.set_title(f"TVM backend (tune={results['tune']!r}) vs torch backend, this CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT))
    p.add_argument("--tune", default="fast")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    results = {"machine": machine(threads), "tune": args.tune, "rounds": args.rounds, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m for m in args.models.split(",") if m]:
            print(f"{name} ...", flush=True)
            row = run_model(name, args.tune, args.rounds, Path(tmp) / f"{name}.db")
            results["rows"].append(row)
            print(f"  eager {row['ms']['eager']:.2f} ms, optic-torch {row['speedup_vs_eager']['optic-torch']:.2f}×, "
                  f"optic-tvm {row['speedup_vs_eager']['optic-tvm']:.2f}×; {row['generated_kept']} generated kept; "
                  f"tuning {row['tuning_measurements']} in {row['tuning_s']} s; second run "
                  f"{row['second_tuning_measurements']} measurements", flush=True)
    save(args.out, "tvm_zoo", results, render(results))
    plot(results, Path(args.out) / "tvm_zoo.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
