"""Accuracy against batch-1 latency as the budget grows: both digits models, budgets 0.5 %, 1 %, 2 %, 5 %.

    python examples/budget_sweep.py                  # writes benchmarks/results/budget_sweep.{json,png}

Per model: train (or load from the cache), measure eager top-1 on the test split, then for each
budget ``optic.optimize(model, x, passes="default", budget=Budget(max_drop=b), calibration=...)``
and top-1 of the result on the test split (at batch 1). The eager model and the optimized ones are
then timed together, in one ``optic.pipeline.timing.compare`` call, at batch 1 over the test images in turn,
so the speed-ups of one model come from one measurement. Besides the figures the JSON records, per
budget, what each pass did (from the report), so that a flat curve can be traced to the pass that
declined.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import digits_cnn  # noqa: E402
import digits_common as common  # noqa: E402
import digits_transformer  # noqa: E402

BUDGETS = (0.005, 0.01, 0.02, 0.05)
MODELS = {"cnn": digits_cnn, "transformer": digits_transformer}
RESULTS = Path(__file__).parent.parent / "benchmarks" / "results"


def pass_summary(report: Any) -> list[dict[str, Any]]:
    """Per pass of the report: status, rules matched, and for the lossy ones what they kept."""
    rows = []
    for p in report.passes:
        rows.append({"pass": p.name, "status": p.status, "matched": dict(p.matched), "rolled_back": p.reason,
                     "declined": len(p.declined), "notes": list(p.notes), "measured": dict(p.measured)})
    return rows


def budget_summary(report: Any) -> dict[str, Any] | None:
    b = report.budget
    if not b:
        return None
    keys = ("fit_samples", "holdout_samples", "base_fit", "base_holdout", "fit_drop", "holdout_drop",
            "final_holdout_drop", "evaluations")
    kept = [{k: r.get(k) for k in ("pass", "layer", "action", "predicted_gain_s", "measured_gain_s", "drop_alone")}
            for r in b.get("actions", []) if r.get("status") == "kept"]
    return {**{k: b.get(k) for k in keys}, "kept": kept}


def sweep_model(name: str, module: Any, data: common.Digits, budgets: tuple[float, ...],
                passes: str | list) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = module.build(verbose=True)
    ready_s = time.perf_counter() - t0
    eager_acc = common.accuracy(model, data.test)
    print(f"{name}: ready in {ready_s:.1f} s, test top-1 {eager_acc:.2%}", flush=True)
    optimized, rows = {}, []
    for b in budgets:
        import optic

        print(f"  budget {b:.1%}: optimizing ...", flush=True)
        t0 = time.perf_counter()
        fast = optic.optimize(model, module.example_inputs(), target="cpu", passes=passes,
                              budget=optic.Budget(max_drop=b), calibration=module.calibration())
        seconds = time.perf_counter() - t0
        acc = common.accuracy(fast, data.test, batch_size=1)
        print(f"    test top-1 {acc:.2%} (drop {(eager_acc - acc) * 100:+.2f} points), optimize took {seconds:.0f} s",
              flush=True)
        optimized[f"{b:g}"] = fast
        rows.append({"max_drop": b, "test_accuracy": acc, "test_drop": eager_acc - acc, "optimize_s": seconds,
                     "report_latency_s": report_latency(fast.report), "budget": budget_summary(fast.report),
                     "passes": pass_summary(fast.report), "notes": list(fast.report.notes)})
    print(f"  timing eager and {len(optimized)} optimized models at batch 1 ...", flush=True)
    t = common.latency_batch1(model, optimized, data.test.x, rounds=21, budget_s=30.0)
    eager = t["eager"]
    for row in rows:
        timing = t[f"{row['max_drop']:g}"]
        row.update(latency_s=timing.median, latency_q1_s=timing.q1, latency_q3_s=timing.q3,
                   speedup=eager.median / timing.median)
        print(f"    budget {row['max_drop']:.1%}: {row['test_accuracy']:.2%}, {timing} ({row['speedup']:.2f}×)")
    return {"params": sum(p.numel() for p in model.parameters()), "train_config": vars(module.CONFIG),
            "ready_s": ready_s, "eager": {"test_accuracy": eager_acc, "latency_s": eager.median,
                                          "latency_q1_s": eager.q1, "latency_q3_s": eager.q3},
            "budgets": rows}


def report_latency(report: Any) -> list[float] | None:
    return list(report.measured_latency_s) if report.measured_latency_s else None


def machine() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, res), color in zip(results["models"].items(), ("tab:blue", "tab:orange"), strict=False):
        rows = sorted(res["budgets"], key=lambda r: r["max_drop"])
        xs = [r["latency_s"] * 1e3 for r in rows]
        ys = [r["test_accuracy"] * 100 for r in rows]
        # the bars are the interquartile range of the timing: the machine is shared and noisy
        xerr = [[x - r["latency_q1_s"] * 1e3 for r, x in zip(rows, xs, strict=True)],
                [r["latency_q3_s"] * 1e3 - x for r, x in zip(rows, xs, strict=True)]]
        ax.errorbar(xs, ys, xerr=xerr, fmt="o-", color=color, capsize=3, label=f"{name}, optimized")
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(f"{r['max_drop']:.1%}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        eager = res["eager"]
        ax.errorbar([eager["latency_s"] * 1e3], [eager["test_accuracy"] * 100],
                    xerr=[[(eager["latency_s"] - eager["latency_q1_s"]) * 1e3], [(eager["latency_q3_s"] - eager["latency_s"]) * 1e3]],
                    fmt="*", color=color, markersize=14, markeredgecolor="black", capsize=3, label=f"{name}, eager")
    ax.set_xlabel("batch-1 latency per image, ms (median, bars: quartiles)")
    ax.set_ylabel("top-1 on the test split, %")
    ax.set_title("digits: accuracy vs latency as the budget grows (labels: max_drop)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    parser.add_argument("--passes", default="default", help="a preset or comma-separated pass names")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    budgets = tuple(float(b) for b in args.budgets.split(","))
    data = common.load_digits()
    t0 = time.perf_counter()
    results = {"machine": machine(), "budgets": list(budgets), "passes": args.passes,
               "split": {k: len(getattr(data, k)) for k in ("train", "calibration", "test")}, "models": {}}
    for name in args.models.split(","):
        results["models"][name] = sweep_model(name, MODELS[name], data, budgets, args.passes)
    results["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "budget_sweep.json").write_text(json.dumps(results, indent=2, default=str))
    plot(results, args.out / "budget_sweep.png")
    print(f"wrote {args.out / 'budget_sweep.json'} and {args.out / 'budget_sweep.png'} "
          f"({results['seconds'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
