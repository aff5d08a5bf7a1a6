"""optic.save / optic.load: is a loaded result as fast as the one that was saved? Same run, alternated.

    python -m benchmarks.save_load [--models resnet18,mobilenetv2,tiny_transformer,hf_bert] [--out benchmarks/results]

For each zoo model at batch 1: ``optic.optimize`` (default settings), ``optic.save`` to a temporary file,
``optic.load``; then the saved and the loaded module are checked equal on the model's inputs, warmed up for
2 s each and timed alternated in blocks (optic.pipeline.timing.compare_models), medians with their interquartile
spread. The loaded module's first call (where packed weights are packed and compiled code compiled or
loaded again) is timed on its own and reported too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("resnet18", "mobilenetv2", "tiny_transformer", "hf_bert")


def run_model(name: str) -> dict:
    import optic
    from benchmarks.runner import warm_up
    from benchmarks.zoo import get, output_tensors
    from optic.pipeline.timing import compare_models

    entry = get(name)
    model, x = entry.factory(), entry.inputs(1)
    saved = optic.optimize(model, x)
    with tempfile.TemporaryDirectory() as tmp:
        path = optic.save(saved, Path(tmp) / "m.optic.pt")
        size = path.stat().st_size
        t0 = time.perf_counter()
        loaded = optic.load(path)
        load_s = time.perf_counter() - t0
    with torch.no_grad():
        t0 = time.perf_counter()
        got = loaded(*x)
        first_call_s = time.perf_counter() - t0
        want = saved(*x)
    equal = all(torch.equal(a, b) for a, b in zip(output_tensors(want), output_tensors(got), strict=True))
    fns = {"saved": lambda: saved(*x), "loaded": lambda: loaded(*x)}
    with torch.no_grad():
        warm_up(fns, 2.0)
        t = compare_models(fns, budget_s=6.0)
    kept = [p.name for p in saved.report.passes if p.changed and not p.rolled_back]
    return {"model": name, "file_mb": size / 2 ** 20, "load_s": load_s, "first_call_s": first_call_s,
            "outputs_equal": equal, "passes_kept": kept,
            "saved_ms": t["saved"].median * 1e3, "saved_spread": t["saved"].spread,
            "loaded_ms": t["loaded"].median * 1e3, "loaded_spread": t["loaded"].spread,
            "ratio": t["loaded"].median / t["saved"].median}


def markdown(results: list[dict]) -> str:
    lines = ["| model | file | load | first call | saved | loaded | loaded / saved | outputs equal |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['file_mb']:.1f} MB | {r['load_s']:.2f} s | {r['first_call_s']:.2f} s | "
                     f"{r['saved_ms']:.3f} ms ±{r['saved_spread'] * 50:.0f}% | {r['loaded_ms']:.3f} ms "
                     f"±{r['loaded_spread'] * 50:.0f}% | {r['ratio']:.2f} | {'yes' if r['outputs_equal'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    results = []
    for name in args.models.split(","):
        print(f"{name}: optimize, save, load, time...", file=sys.stderr)
        results.append(run_model(name))
    from benchmarks.hf_generate import _machine

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "save_load.json").write_text(json.dumps({"machine": _machine(), "results": results}, indent=2))
    table = markdown(results)
    (args.out / "save_load.md").write_text(f"Saved vs loaded result, batch 1, same run, {_machine()}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
