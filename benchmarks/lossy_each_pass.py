"""Each lossy pass alone, on a model where it should pay: measured gain at batch 1 on this CPU.

    python benchmarks/lossy_each_pass.py          # writes benchmarks/results/lossy_each_pass.{json,md}

For every pass the baseline is the model after the exact rewrites (cleanup, fold_norm, fuse), so
the ratio is what the lossy pass adds, not what folding BN gives. Both are timed together with
eager in one ``optic.pipeline.timing.compare`` call over the digits test images in turn, batch 1; top-1 is
measured on the test split, which optic never sees. 2:4 sparsity cannot pay on a CPU: it is run
for this machine (it declines, and the reason is printed) and for an A100 (predicted gain only), on
a random MLP whose 2:4 masking costs about half of its output (a budget no real model would give;
it shows what the pass would predict, not that random weights survive it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import digits_cnn  # noqa: E402
import digits_common as common  # noqa: E402
import digits_transformer  # noqa: E402

import optic  # noqa: E402

EXACT = ["cleanup", "fold_norm", "fuse", "cleanup"]
CASES = [  # (pass, model, budget): where each should pay
    ("lowrank", digits_cnn, 0.02),
    ("prune", digits_transformer, 0.02),
    ("early_exit", digits_cnn, 0.01),
]


def run_case(name: str, module, max_drop: float, data: common.Digits) -> dict:
    model = module.build()
    example = module.example_inputs()
    cal = data.calibration.batches()
    base = optic.optimize(model, example, target="cpu", passes=EXACT)
    fast = optic.optimize(model, example, target="cpu", passes=[*EXACT, name],
                          budget=optic.Budget(max_drop=max_drop), calibration=cal)
    rec = fast.report.pass_record(name)
    t = common.latency_batch1(model, {"exact": base, name: fast}, data.test.x)
    kept = [r for r in (fast.report.budget or {}).get("actions", []) if r["status"] == "kept"]
    return {
        "pass": name, "model": module.NAME, "max_drop": max_drop, "changed": rec.changed and not rec.rolled_back,
        "what": [f"{r['layer']}: {r['action']}" for r in kept] or [
            f"exit after {e.get('module') or e.get('node')}: {e['holdout_exit_rate']:.0%} leave"
            for e in rec.measured.get("exits", [])] or rec.notes,
        "eager_ms": t["eager"].median * 1e3, "exact_ms": t["exact"].median * 1e3, "pass_ms": t[name].median * 1e3,
        "spread": max(t["exact"].spread, t[name].spread),
        "gain_over_exact": t["exact"].median / t[name].median,
        "top1_exact": common.accuracy(base, data.test, batch_size=1),
        "top1_pass": common.accuracy(fast, data.test, batch_size=1),
    }


def sparse24_case() -> list[dict]:
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)).eval()
    x = torch.randn(512, 1024)
    cal = [torch.randn(512, 1024) for _ in range(3)]
    out = []
    for target in ("cpu", "a100"):
        fast = optic.optimize(model, (x,), target=target, passes=["sparse24"], measure=False,
                              budget=optic.Budget(max_drop=0.6, metric="rel_error"), calibration=cal)
        rec = fast.report.pass_record("sparse24")
        kept = [r for r in fast.report.budget["actions"] if r["status"] == "kept"]
        out.append({"pass": "sparse24", "target": target, "changed": rec.changed, "notes": rec.notes,
                    "predicted_speedup": [round(r["predicted_speedup"], 2) for r in kept]})
    return out


def main() -> None:
    data = common.load_digits()
    rows = []
    for name, module, budget in CASES:
        print(f"{name} on {module.NAME} (budget {budget:.0%}) ...", flush=True)
        rows.append(run_case(name, module, budget, data))
        r = rows[-1]
        print(f"  {r['exact_ms']:.3f} ms exact → {r['pass_ms']:.3f} ms with {name}: {r['gain_over_exact']:.2f}× "
              f"(±{r['spread']:.0%}); top-1 {r['top1_exact']:.2%} → {r['top1_pass']:.2%}", flush=True)
    sparse = sparse24_case()
    for s in sparse:
        print(f"sparse24 on {s['target']}: changed={s['changed']} {s['notes'] or s['predicted_speedup']}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lossy_each_pass.json").write_text(json.dumps({"rows": rows, "sparse24": sparse}, indent=2, default=str))
    md = ["| pass alone | model | budget | exact → with the pass (ms, batch 1) | gain | test top-1 | what it kept |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| `{r['pass']}` | {r['model']} | {r['max_drop']:.0%} | {r['exact_ms']:.3f} → {r['pass_ms']:.3f} | "
                  f"{r['gain_over_exact']:.2f}× (±{r['spread']:.0%}) | {r['top1_exact']:.2%} → {r['top1_pass']:.2%} | "
                  f"{'; '.join(r['what'])[:160]} |")
    for s in sparse:
        what = "; ".join(s["notes"]) if s["notes"] else f"predicted {s['predicted_speedup']}× per layer on the target"
        md.append(f"| `sparse24` | random 2-layer MLP, batch 512 | 0.6 rel. error | target {s['target']}: "
                  f"{'changed' if s['changed'] else 'no change'} | not measured here | | {what[:160]} |")
    (out / "lossy_each_pass.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
