"""Benchmark: optic's exact pipeline vs eager PyTorch vs torch.fx's optimize_for_inference.

    python benchmarks/exact_vs_eager.py                       # the default zoo, batch 1 and 8
    python benchmarks/exact_vs_eager.py --models resnet18 --batch 1

For every model and batch: the three systems are timed alternated in blocks over several rounds
(``optic.timing.compare``), so they share whatever the shared machine is doing; the table gives
per-call medians with their interquartile spread, the speed-up of optic over eager, preparation
time (optic: capture + passes + verification + measured tactics), and the max error vs eager.
A system that fails is reported with its first error line, never crashes the run. Results go to
``benchmarks/results/exact_cpu.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import optic  # noqa: E402
from benchmarks.zoo import get, names  # noqa: E402
from optic.timing import calls_per_block, compare  # noqa: E402
from optic.verify import compare as compare_outputs  # noqa: E402

DEFAULT = ["tiny_cnn", "resnet18", "resnet50", "mobilenetv2", "convnext", "vit_s16", "bert_base", "gpt2",
           "hf_resnet", "hf_mobilenetv2", "hf_convnext", "hf_vit", "hf_swin", "hf_bert", "hf_gpt2", "hf_llama"]


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"


def bench_one(name: str, batch: int, rounds: int) -> dict:
    entry = get(name)
    model, inputs = entry.factory(), entry.inputs(batch)
    row: dict = {"model": name, "batch": batch, "capture": entry.capture, "systems": {}}
    with torch.no_grad():
        ref = model(*inputs)
    systems = {"eager": model}
    t0 = time.perf_counter()
    try:
        opt = optic.optimize(model, inputs)
        row["optic_prepare_s"] = time.perf_counter() - t0
        row["passes"] = {p.name: p.matched for p in opt.report.passes if p.changed}
        systems["optic"] = opt
    except Exception as e:
        row["systems"]["optic"] = {"error": _first_line(e)}
    t0 = time.perf_counter()
    try:
        from torch.fx.experimental.optimization import optimize_for_inference

        ofi = optimize_for_inference(model)
        with torch.no_grad():
            ofi(*inputs)
        row["ofi_prepare_s"] = time.perf_counter() - t0
        systems["optimize_for_inference"] = ofi
    except Exception as e:
        row["systems"]["optimize_for_inference"] = {"error": _first_line(e)}
    for sys_name, fn in systems.items():
        if sys_name == "eager":
            continue
        with torch.no_grad():
            c = compare_outputs(ref, fn(*inputs), float("inf"))
        row["systems"].setdefault(sys_name, {})["max_rel_error"] = c.rel
    calls = {k: (lambda f=f: f(*inputs)) for k, f in systems.items()}
    block = calls_per_block(calls["eager"], target_s=0.05, cap=10)
    times = compare(calls, rounds=rounds, block=block, warmup=2)
    for k, t in times.items():
        row["systems"].setdefault(k, {}).update(median_ms=t.median * 1e3, q1_ms=t.q1 * 1e3, q3_ms=t.q3 * 1e3,
                                                samples=t.samples)
    eager = times["eager"]
    if "optic" in times:
        o = times["optic"]
        row["speedup"] = eager.median / o.median
        noise = max(eager.spread, o.spread)
        row["noise"] = noise
        row["slower_beyond_noise"] = o.median > eager.median * (1 + noise)
    return row


def machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    cpu = optic.targets.host()
    return {"cpu": cpu.description, "cores": cpu.cores, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Machine: {meta['cpu']}, {meta['threads']} threads; torch {meta['torch']}; commit {meta['commit']}; "
             f"{meta['date']}.", "",
             "| model | batch | eager ms | optic ms | speed-up | optimize_for_inference ms | optic prep s | max err |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["systems"]

        def cell(k, s=s):
            v = s.get(k, {})
            if "error" in v:
                return f"fails ({v['error'][:40]})"
            if "median_ms" not in v:
                return "–"
            return f"{v['median_ms']:.2f} [{v['q1_ms']:.2f}–{v['q3_ms']:.2f}]"

        sp = f"{r['speedup']:.2f}×" if "speedup" in r else "–"
        if r.get("slower_beyond_noise"):
            sp += " (slower)"
        err = s.get("optic", {}).get("max_rel_error")
        lines.append(f"| {r['model']} | {r['batch']} | {cell('eager')} | {cell('optic')} | {sp} | "
                     f"{cell('optimize_for_inference')} | {r.get('optic_prepare_s', float('nan')):.1f} | "
                     f"{'' if err is None else f'{err:.1e}'} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    batches = sorted({r["batch"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, len(models) * 0.8), 4))
    width = 0.8 / (2 * len(batches))
    for i, b in enumerate(batches):
        for j, sysname in enumerate(["optic", "optimize_for_inference"]):
            vals = []
            for m in models:
                r = next((r for r in rows if r["model"] == m and r["batch"] == b), None)
                e = r["systems"].get("eager", {}).get("median_ms") if r else None
                o = r["systems"].get(sysname, {}).get("median_ms") if r else None
                vals.append(e / o if e and o else 0)
            xs = [k + (i * 2 + j - len(batches)) * width + width / 2 for k in range(len(models))]
            ax.bar(xs, vals, width, label=f"{sysname} b={b}", alpha=0.9 if j == 0 else 0.5)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
    ax.set_ylabel("speed-up vs eager (×)")
    ax.set_title("optic exact passes vs eager PyTorch (CPU, 2 cores)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT))
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    wanted = [m for m in args.models.split(",") if m]
    available = set(names())
    rows = []
    for name in wanted:
        if name not in available:
            print(f"skip {name}: not in the zoo here (transformers missing?)", file=sys.stderr)
            continue
        for b in (int(x) for x in args.batch.split(",")):
            t0 = time.perf_counter()
            try:
                row = bench_one(name, b, args.rounds)
            except Exception as e:  # a broken entry is reported, never ends the run
                row = {"model": name, "batch": b, "systems": {"eager": {"error": _first_line(e)}}}
            rows.append(row)
            sp = row.get("speedup")
            print(f"{name:16s} b={b}: {'' if sp is None else f'{sp:.2f}x'} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = machine()
    (out / "exact_cpu.json").write_text(json.dumps({"machine": meta, "rows": rows}, indent=2, default=str))
    (out / "exact_cpu.md").write_text(markdown(rows, meta))
    chart(rows, out / "exact_cpu.png")
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
