"""int8 on the digits models: optic's budgeted int8 against its float32 result, eager and ONNX Runtime's
static int8 quantization, at batch 1 and 8, with test accuracy.

    python -m benchmarks.int8 [--models digits_cnn,digits_transformer] [--batches 1,8] [--out benchmarks/results]

Systems, each prepared once per model and batch size:

- ``eager``: the trained model;
- ``optic-fp32``: ``optic.optimize(passes="default", budget=Budget(max_drop=0.01))`` with ``quantize`` and
  ``precision`` disabled;
- ``optic-int8``: the default preset as it is (int8 layers, and bf16 ones where this CPU has bf16 and a layer
  measures better so);
- ``ort``: ONNX Runtime, all graph optimizations, float32;
- ``ort-int8``: ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, uint8
  activations, min-max calibration) on the same calibration images optic gets, all graph optimizations.

Latency: per call over the test images in turn (each call takes the next batch), all systems alternated in
blocks after a 2 s warm-up each (``benchmarks.runner.warm_up``), medians with the interquartile spread.
Accuracy: top-1 on the test split, every system at the batch size it was prepared for.

This module imports torch before optic, so optic cannot limit libgomp's spinning here (``optic.threads``): run
it with ``GOMP_SPINCOUNT=10000`` in the environment, as the results since 2026-12-08 were.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("digits_cnn", "digits_transformer")
SYSTEMS = ("eager", "optic-fp32", "optic-int8", "ort", "ort-int8")


def _example(name: str):
    sys.path.insert(0, str(ROOT / "examples"))
    import importlib

    return importlib.import_module(name)


def _ort_systems(model: torch.nn.Module, example: tuple, calibration: list[tuple], tmp: Path) -> dict:
    """ONNX Runtime float32 and its static int8 (``benchmarks.systems.ort_quantize``) calibrated on
    ``calibration``, the same data optic gets."""
    from benchmarks.systems import _onnx_export, ort_quantize, ort_session

    fp32 = tmp / "model.onnx"
    _onnx_export(model, example, fp32)
    session = ort_session(fp32)
    s8 = ort_session(ort_quantize(fp32, calibration, example[0].shape[0]))
    names = [i.name for i in session.get_inputs()]

    def call(sess):
        return lambda *xs: torch.from_numpy(sess.run(None, dict(zip(names, (x.numpy() for x in xs), strict=True)))[0])
    return {"ort": call(session), "ort-int8": call(s8)}


def run(models: list[str], batches: list[int], max_drop: float = 0.01) -> dict:
    import optic
    from benchmarks.runner import warm_up
    from optic.pipeline import timing

    torch.manual_seed(0)
    rows = []
    for name in models:
        mod = _example(name)
        common = _example("digits_common")
        data = common.load_digits()
        model = mod.build()
        cal_batches = common.calibration()
        for batch in batches:
            print(f"{name} batch {batch}: preparing", flush=True)
            example = data.calibration.x[:batch]
            systems, prep = {"eager": model}, {}
            for sysname, disable in (("optic-fp32", ["quantize", "precision"]), ("optic-int8", [])):
                t0 = time.perf_counter()
                systems[sysname] = optic.optimize(model, (example,), target="cpu", passes="default",
                                                  budget=optic.Budget(max_drop=max_drop), calibration=cal_batches,
                                                  disable=disable)
                prep[sysname] = time.perf_counter() - t0
            with tempfile.TemporaryDirectory(prefix="optic-int8-") as tmp:
                t0 = time.perf_counter()
                systems.update(_ort_systems(model, (example,), [(x,) for x, _ in cal_batches], Path(tmp)))
                prep["ort-int8"] = time.perf_counter() - t0
            test = data.test
            n = len(test) - len(test) % batch
            inputs = [((test.x[i:i + batch],), {}) for i in range(0, n, batch)]
            acc = {}
            with torch.no_grad():
                for s, fn in systems.items():
                    correct = sum(int((fn(x).argmax(-1) == test.y[i * batch:(i + 1) * batch]).sum())
                                  for i, ((x,), _) in enumerate(inputs))
                    acc[s] = correct / n
                fns = {s: timing.rotating(fn, inputs) for s, fn in systems.items()}
                warm = warm_up(fns, 2.0)
                times = timing.compare(fns, rounds=9, block=timing.calls_per_block(fns["eager"], 0.05, 100),
                                       warmup=2, budget_s=30.0)
            int8_layers = [r for r in systems["optic-int8"].report.budget["actions"]
                           if r["pass"] == "quantize" and r["status"] == "kept"]
            row = {"model": name, "batch": batch, "test_images": n, "warmup_s": warm,
                   "accuracy": acc, "prepare_s": prep, "optic_int8_layers": len(int8_layers),
                   "latency_ms": {s: t.median * 1e3 for s, t in times.items()},
                   "spread": {s: t.spread for s, t in times.items()},
                   "speedup_vs_eager": {s: times["eager"].median / t.median for s, t in times.items()}}
            rows.append(row)
            print(_line(row), flush=True)
    return {"rows": rows, "max_drop": max_drop, "torch": torch.__version__, "isa": _isa()}


ZOO_PASSES = ["cleanup", "fold_norm", "fuse", "cleanup", "quantize", "cpu_tactics"]


def _like(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if t.is_floating_point():
        return torch.randn(t.shape, generator=g, dtype=t.dtype)
    return torch.randint(0, int(t.max()) + 1, t.shape, generator=g, dtype=t.dtype)


def run_zoo(models: list[str], batches: list[int], max_drop: float = 0.01, calibration_batches: int = 4) -> dict:
    """Real-size zoo models (random weights): optic's float32 result (the exact preset) against the same
    with ``quantize`` under ``Budget(max_drop, metric="agreement")`` on random calibration inputs shaped
    like the example, and ONNX Runtime float32 and static int8 calibrated on the same inputs."""
    import optic
    from benchmarks.runner import warm_up
    from benchmarks.zoo import registry
    from optic.pipeline import timing

    rows = []
    for name in models:
        entry = registry.get(name)
        model = entry.factory()
        for batch in batches:
            print(f"{name} batch {batch}: preparing", flush=True)
            example = entry.inputs(batch)
            g = torch.Generator().manual_seed(1)
            cal = [tuple(_like(t, g) for t in entry.inputs(8)) for _ in range(calibration_batches)]
            systems, prep = {"eager": model}, {}
            t0 = time.perf_counter()
            systems["optic-fp32"] = optic.optimize(model, example, target="cpu")
            prep["optic-fp32"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            systems["optic-int8"] = optic.optimize(model, example, target="cpu", passes=ZOO_PASSES,
                                                   budget=optic.Budget(max_drop=max_drop, metric="agreement"),
                                                   calibration=cal)
            prep["optic-int8"] = time.perf_counter() - t0
            with tempfile.TemporaryDirectory(prefix="optic-int8-") as tmp:
                t0 = time.perf_counter()
                systems.update(_ort_systems(model, example, cal, Path(tmp)))
                prep["ort-int8"] = time.perf_counter() - t0
            fns = {s: (lambda fn=fn, ex=example: fn(*ex)) for s, fn in systems.items()}
            with torch.no_grad():
                ref = model(*example)
                agree = {}
                for s, fn in fns.items():
                    out = fn()
                    out = out[0] if isinstance(out, tuple | list) else getattr(out, "logits", out)
                    r = ref[0] if isinstance(ref, tuple | list) else getattr(ref, "logits", ref)
                    agree[s] = float((out.argmax(-1) == r.argmax(-1)).float().mean())
                warm = warm_up(fns, 2.0)
                times = timing.compare(fns, rounds=9, block=timing.calls_per_block(fns["eager"], 0.1, 20),
                                       warmup=1, budget_s=60.0)
            rep = systems["optic-int8"].report
            rows.append({"model": name, "batch": batch, "warmup_s": warm, "prepare_s": prep,
                         "agreement_with_eager": agree,
                         **_int8_layers(rep),
                         "latency_ms": {s: t.median * 1e3 for s, t in times.items()},
                         "spread": {s: t.spread for s, t in times.items()},
                         "speedup_vs_eager": {s: times["eager"].median / t.median for s, t in times.items()}})
            print(_line(rows[-1], "agreement_with_eager"), flush=True)
    return {"rows": rows, "max_drop": max_drop, "torch": torch.__version__, "isa": _isa()}


def _int8_layers(report) -> dict:
    """How many layers the report's allocation kept in int8 (of them smoothed), and the layers left in float32
    with why (a layer's smoothed and plain actions are one layer: kept if either was)."""
    acts = [r for r in (report.budget or {}).get("actions", []) if r["pass"] == "quantize"]
    kept = [r for r in acts if r["status"] == "kept"]
    done = {r["layer"] for r in kept}
    stayed: dict[str, str] = {}
    for r in acts:
        if r["layer"] not in done:
            stayed.setdefault(r["layer"], r["status"])
    step = next((p for p in report.passes if p.name == "cpu_tactics"), None)
    return {"optic_int8_layers": len(kept), "optic_int8_smoothed": sum("smoothing_alpha" in r for r in kept),
            "optic_int8_bias_corrected": sum(bool(r.get("bias_corrected")) for r in kept),
            "optic_int8_stayed_fp32": [{"layer": k, "why": v} for k, v in stayed.items()],
            # which implementation of the whole model the CPU step kept, and what it timed (ms)
            "optic_int8_kept": step.measured.get("kept") if step else None,
            "optic_int8_variants_ms": step.measured.get("variants_ms") if step else None}


def _isa() -> list[str]:
    from optic import targets

    return sorted(i for i in targets.get("cpu").isa if "vnni" in i or "amx" in i or "avx512" in i)


def _line(r: dict, quality: str = "accuracy") -> str:
    parts = [f"{s} {r['latency_ms'][s]:.3f} ms ({r['speedup_vs_eager'][s]:.2f}×, {quality} {r[quality][s]:.2%})"
             for s in SYSTEMS if s in r["latency_ms"]]
    return f"{r['model']} b{r['batch']}: " + "; ".join(parts)


def _cell(r: dict, s: str, quality: str, digits: int) -> str:
    return (f"{r['latency_ms'][s]:.{digits}f} ms ±{r['spread'][s]:.0%}<br>{r['speedup_vs_eager'][s]:.2f}×, "
            f"{r[quality][s]:.{2 if quality == 'accuracy' else 0}%}")


def markdown(res: dict) -> str:
    lines = ["# int8 on the digits models", "",
             f"torch {res['torch']}; CPU int8 features: {', '.join(res['isa']) or 'none'}; budget {res['max_drop']:.0%} "
             "top-1 for optic. Latency per call over the test images (medians of alternated blocks after a 2 s "
             "warm-up each; ± is the interquartile spread); speed-up over eager.", "",
             "| model | batch | " + " | ".join(SYSTEMS) + " | optic-int8 / ort-int8 |",
             "|---|---:|" + "---:|" * len(SYSTEMS) + "---:|"]
    for r in res["rows"]:
        cells = [_cell(r, s, "accuracy", 3) for s in SYSTEMS]
        ratio = r["latency_ms"]["ort-int8"] / r["latency_ms"]["optic-int8"]
        lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(cells) + f" | {ratio:.2f}× |")
    lines += ["", "optic-int8 / ort-int8 above 1 means optic is faster. Layers optic kept in int8: "
              + ", ".join(f"{r['model']} b{r['batch']}: {r['optic_int8_layers']}" for r in res["rows"])]
    return "\n".join(lines) + "\n"


def markdown_zoo(res: dict) -> str:
    systems = [s for s in SYSTEMS if all(s in r["latency_ms"] for r in res["rows"])]
    lines = ["# int8 on real-size models (random weights)", "",
             f"torch {res['torch']}; CPU int8 features: {', '.join(res['isa']) or 'none'}. optic-int8: the exact "
             f"passes, then `quantize` under a {res['max_drop']:.0%} top-1 agreement budget on random calibration "
             "inputs, then the CPU step; optic-fp32: the exact preset. Latency per call (medians of alternated "
             "blocks after a 2 s warm-up each; ± the interquartile spread); speed-up over eager; top-1 agreement "
             "with eager on the example input.", "",
             "| model | batch | " + " | ".join(systems) + " | int8 layers |",
             "|---|---:|" + "---:|" * len(systems) + "---:|"]
    for r in res["rows"]:
        cells = [_cell(r, s, "agreement_with_eager", 2) for s in systems]
        smoothed = r.get("optic_int8_smoothed")
        layers = f"{r['optic_int8_layers']}" + (f" ({smoothed} smoothed)" if smoothed else "")
        lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(cells) + f" | {layers} |")
    for r in res["rows"]:
        if r.get("optic_int8_kept"):
            lines += ["", f"{r['model']} b{r['batch']}: optic-int8 runs as \"{r['optic_int8_kept']}\" (the CPU step "
                      f"timed: {', '.join(f'{k} {v:.1f} ms' for k, v in (r.get('optic_int8_variants_ms') or {}).items())}); "
                      f"{r.get('optic_int8_bias_corrected', 0)} int8 layers bias-corrected"]
        if r["optic_int8_stayed_fp32"]:
            why = {}
            for x in r["optic_int8_stayed_fp32"]:
                why.setdefault(x["why"], []).append(x["layer"])
            lines.append("")
            lines.append(f"{r['model']} b{r['batch']}, layers left in float32: "
                         + "; ".join(f"{k}: {len(v)} ({', '.join(v[:4])}{', …' if len(v) > 4 else ''})"
                                     for k, v in why.items()))
    return "\n".join(lines) + "\n"


def chart(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(SYSTEMS)
    for i, s in enumerate(SYSTEMS):
        ax.bar(np.arange(len(rows)) + i * width, [r["speedup_vs_eager"][s] for r in rows], width, label=s)
    ax.set_xticks(np.arange(len(rows)) + width * (len(SYSTEMS) - 1) / 2)
    ax.set_xticklabels([f"{r['model']}\nbatch {r['batch']}" for r in rows])
    ax.set_ylabel("speed-up over eager")
    ax.axhline(1, color="grey", lw=0.5)
    ax.legend(ncol=len(SYSTEMS), fontsize=8)
    ax.set_title("int8 on the digits models (higher is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--zoo", default="", help="zoo models instead (e.g. resnet50,bert_base): int8_zoo.json/.md")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--max-drop", type=float, default=0.01,
                    help="optic's budget (top-1 agreement for --zoo, accuracy points for the digits models)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    from benchmarks.runner import pin_threads

    pin_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    if args.zoo:
        res = run_zoo(args.zoo.split(","), batches, max_drop=args.max_drop)
        (out / "int8_zoo.json").write_text(json.dumps(res, indent=1))
        (out / "int8_zoo.md").write_text(markdown_zoo(res))
        print(markdown_zoo(res))
        return 0
    res = run(args.models.split(","), batches, max_drop=args.max_drop)
    (out / "int8.json").write_text(json.dumps(res, indent=1))
    (out / "int8.md").write_text(markdown(res))
    chart(res, out / "int8.png")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
