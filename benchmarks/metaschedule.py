"""optic's tuner against TVM's MetaSchedule, side by side, on this CPU.

For each workload (GEMM 512x512x512, the BERT FFN GEMM 128x3072x768, conv2d 1x64x56x56 with 64 3x3
filters, stride 1, pad 1, NHWC):

1. MetaSchedule tunes the workload, written as a TE PrimFunc, with ``ms.tune_tir`` (its default
   space, xgboost cost model and evolutionary search; ``--trials-ms`` trials, ``--ms-per-iter`` a
   round) on the host target with ``num-cores`` set; its best schedule is compiled;
2. optic tunes the same operator with ``tune(..., trials=--trials-optic)`` (a fresh database);
3. the two kernels and PyTorch's own call (MKL's GEMM, oneDNN's convolution) are checked against
   the float64 reference and timed alternated in blocks over several rounds in this one process
   (``optic.pipeline.timing.compare``): medians per call and their interquartile spread.

Every timed kernel runs on the same number of threads (``--threads``, default the target's cores):
``torch.set_num_threads``, ``TVM_NUM_THREADS`` and ``OMP_NUM_THREADS`` for both TVM runtimes, and
the MetaSchedule target's ``num-cores``. Tuning wall times are each tuner's whole call (space
generation, building, measuring, final choice), both measuring on the same cores.

    python -m benchmarks.metaschedule [--trials-ms 64] [--trials-optic 32] [--quick]

Writes benchmarks/results/metaschedule.{json,md,png} (``--quick``: a smoke test with few trials,
written under the temporary directory, so that it never overwrites a full run).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = [  # (name, op, shape as `optic kernel` takes it)
    ("GEMM 512x512x512", "matmul", "512x512x512"),
    ("GEMM 128x3072x768 (BERT FFN)", "matmul", "128x3072x768"),
    ("conv2d 1x64x56x56, 64 3x3, pad 1 (NHWC)", "conv2d", "1x64x56x56,64x64x3x3,stride=1,pad=1"),
]


def _thread_env(threads: int) -> dict[str, str]:
    """One thread count for every runtime; idle threads of each spin briefly, then sleep, so that
    alternating them does not charge one's spinning to the other (the settings optic's measurement
    worker uses). OpenMP reads these when it is loaded, with torch: the process must start with them."""
    from optic.autotune.measure import SPIN_LIMITS

    env = {name: os.environ.get(name, value) for name, value in SPIN_LIMITS.items()}
    env.update({name: str(threads) for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    return env


def _te_workload(tvm: Any, operator: Any) -> Any:
    """The operator as a plain TE PrimFunc (no schedule): MetaSchedule's input, same layouts as optic's."""
    te = tvm.te
    if operator.op == "matmul":
        M, N, K = operator.args
        assert operator.opts["b_layout"] == "kn" and not operator.opts.get("epilogue")
        A = te.placeholder((M, K), name="A")
        B = te.placeholder((K, N), name="B")
        k = te.reduce_axis((0, K), name="k")
        C = te.compute((M, N), lambda i, j: te.sum(A[i, k] * B[k, j], axis=k), name="C")
        return te.create_prim_func([A, B, C])
    n, c, h, w, f, r, s = operator.args
    o = operator.opts
    assert o["layout"] == "NHWC" and o["dilation"] == 1 and not o.get("epilogue")
    stride, pad = o["stride"], o["padding"]
    oh, ow = operator.conv_out_hw
    X = te.placeholder((n, h, w, c), name="X")
    W = te.placeholder((f, c, r, s), name="W")
    Xp = te.compute((n, h + 2 * pad, w + 2 * pad, c), lambda b, y, x, ch: tvm.tirx.if_then_else(
        tvm.tirx.all(y >= pad, y < h + pad, x >= pad, x < w + pad), X[b, y - pad, x - pad, ch],
        tvm.tirx.const(0.0, "float32")), name="Xpad")
    rc, rr, rs = te.reduce_axis((0, c), "rc"), te.reduce_axis((0, r), "rr"), te.reduce_axis((0, s), "rs")
    Y = te.compute((n, oh, ow, f), lambda b, y, x, ff: te.sum(
        Xp[b, y * stride + rr, x * stride + rs, rc] * W[ff, rc, rr, rs], axis=[rr, rs, rc]), name="Y")
    return te.create_prim_func([X, W, Y])


def _ms_build(mod: Any, target: Any, params: Any) -> Any:
    """MetaSchedule's ``default_build`` without its ``import tvm.s_tir.tensor_intrin``: that import
    registers every target's tensor intrinsics (about 70 s here, CUDA's alone 50 s) in each fresh
    build process, which MetaSchedule starts for every round. No candidate of these fp32 workloads
    is tensorized (MetaSchedule logs "The workload cannot be tensorized"), so the build is the same;
    only MetaSchedule's wall time gets shorter."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    assert params is None
    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _metaschedule(tvm: Any, operator: Any, trials: int, per_iter: int, threads: int) -> tuple[Any, dict]:
    """Tune with MetaSchedule; the compiled best schedule and what the tuning took."""
    from tvm.s_tir import meta_schedule as ms

    from optic.tvm_compat import host_cpu

    target = tvm.target.Target({"kind": "llvm", "mcpu": host_cpu() or "generic", "num-cores": threads})
    func = _te_workload(tvm, operator)
    with tempfile.TemporaryDirectory(prefix="optic_ms_") as work_dir:
        start = time.perf_counter()
        database = ms.tune_tir(func, target, work_dir, max_trials_global=trials,
                               num_trials_per_iter=min(per_iter, trials), num_tuning_cores=threads, seed=0,
                               builder=ms.builder.LocalBuilder(f_build=_ms_build))
        sch = ms.tir_integration.compile_tir(database, func, target)
        lib = tvm.compile(sch.mod, target=target)
        seconds = time.perf_counter() - start
        records = database.get_all_tuning_records()
        measured = [r for r in records if r.run_secs]
    return lib, {"tune_seconds": seconds, "measurements": len(measured), "trials": trials,
                 "trials_per_iter": min(per_iter, trials), "target": str(target.export())}


def _optic(tvm: Any, operator: Any, trials: int, threads: int) -> tuple[Any, dict]:
    """Tune with optic (a fresh database); the compiled best configuration and what the tuning took."""
    from optic.autotune import tune
    from optic.backend.codegen_cpu import build, compile_module
    from optic.tvm_compat import host_target

    with tempfile.TemporaryDirectory(prefix="optic_db_") as tmp:
        start = time.perf_counter()
        result = tune(operator, "cpu", trials=trials, db=os.path.join(tmp, "tuning.db"), threads=threads)
        seconds = time.perf_counter() - start
    lib = compile_module(build(operator, result.config), host_target())
    return lib, {"tune_seconds": seconds, "measurements": result.measurements, "trials": trials,
                 "config": result.config, "invalid": result.invalid, "valid_configs": result.valid,
                 "tuner_seconds_per_call": result.seconds, "rank_correlation": result.rank_correlation}


def _time_side_by_side(tvm: Any, operator: Any, libs: dict[str, Any], rounds: int) -> dict[str, dict]:
    """Each compiled kernel and PyTorch's call: checked against the reference, then timed alternated."""
    import torch

    from optic.pipeline import timing
    from optic.pipeline.verify import compare

    inputs = operator.make_inputs(seed=0)
    ref = operator.reference(inputs)
    fns, errors = {}, {}
    for name, lib in libs.items():
        fn = lib["main"]
        out = torch.full(operator.out_shape, float("nan"))
        args = [tvm.runtime.from_dlpack(t) for t in (*inputs, out)]
        fn(*args)
        check = compare(ref, out, 1e-4)
        if not check.ok:
            raise AssertionError(f"{name}'s kernel is wrong for {operator}: {check}")
        errors[name] = check.rel
        fns[name] = lambda fn=fn, args=args: fn(*args)
    fns["torch"] = operator.torch_call(inputs)
    errors["torch"] = compare(ref, fns["torch"](), 1e-4).rel
    end = time.perf_counter() + 1.0  # every pool started and clocks up before the first round
    while time.perf_counter() < end:
        for f in fns.values():
            f()
    block = timing.calls_per_block(fns["torch"], target_s=0.02, cap=50)
    times = timing.compare(fns, rounds=rounds, block=block, warmup=2)
    return {name: {"seconds": t.median, "q1": t.q1, "q3": t.q3, "spread": t.spread, "samples": t.samples,
                   "gflops": operator.flops / t.median / 1e9, "max_error": errors[name], "block": block}
            for name, t in times.items()}


def run(args: argparse.Namespace) -> dict:
    """Tune and time every workload; the results as plain data."""
    import torch

    from optic.autotune import Operator
    from optic.backend.codegen_cpu import CODEGEN_VERSION
    from optic.tvm_compat import require_tvm

    tvm = require_tvm()
    torch.set_num_threads(args.threads)
    # MetaSchedule imports every target's tensor intrinsics once per process (about 70 s here): paid
    # before its first clock starts, so that only the first workload would not carry it.
    start = time.perf_counter()
    importlib.import_module("tvm.s_tir.tensor_intrin")
    intrin_s = time.perf_counter() - start
    rows = []
    for name, op, shape in WORKLOADS:
        operator = Operator.parse(op, shape)
        ms_lib, ms_info = _metaschedule(tvm, operator, args.trials_ms, args.ms_per_iter, args.threads)
        optic_lib, optic_info = _optic(tvm, operator, args.trials_optic, args.threads)
        kernels = _time_side_by_side(tvm, operator, {"metaschedule": ms_lib, "optic": optic_lib}, args.rounds)
        torch_s = kernels["torch"]["seconds"]
        row = {"workload": name, "operator": str(operator), "flops": operator.flops, "kernels": kernels,
               "fraction_of_torch": {k: torch_s / v["seconds"] for k, v in kernels.items()},
               "optic_over_metaschedule": kernels["metaschedule"]["seconds"] / kernels["optic"]["seconds"],
               "tuning": {"metaschedule": ms_info, "optic": optic_info},
               "tuning_time_ratio": ms_info["tune_seconds"] / optic_info["tune_seconds"]}
        rows.append(row)
        print(_row_line(row), flush=True)
    return {"settings": {"threads": args.threads, "trials_ms": args.trials_ms, "ms_trials_per_iter": args.ms_per_iter,
                         "trials_optic": args.trials_optic, "rounds": args.rounds, "quick": args.quick,
                         "ms_intrinsics_import_seconds_excluded": intrin_s,
                         "torch": torch.__version__, "tvm": tvm.__version__, "codegen_version": CODEGEN_VERSION,
                         "machine": platform.processor() or platform.machine(),
                         "thread_settings": "torch.set_num_threads, TVM_NUM_THREADS, OMP_NUM_THREADS, "
                                            "MKL_NUM_THREADS and the MetaSchedule target's num-cores"},
            "rows": rows}


def _row_line(row: dict) -> str:
    k, f, t = row["kernels"], row["fraction_of_torch"], row["tuning"]
    return (f"{row['workload']}: torch {k['torch']['gflops']:.1f} GFLOP/s; "
            f"MetaSchedule {k['metaschedule']['gflops']:.1f} ({f['metaschedule']:.2f}x torch, "
            f"{t['metaschedule']['tune_seconds']:.0f} s, {t['metaschedule']['measurements']} measured); "
            f"optic {k['optic']['gflops']:.1f} ({f['optic']:.2f}x torch, {t['optic']['tune_seconds']:.0f} s, "
            f"{t['optic']['measurements']} measured); tuning {row['tuning_time_ratio']:.1f}x shorter")


def markdown(results: dict) -> str:
    """The results as a Markdown report."""
    s = results["settings"]
    lines = [
        "# optic vs MetaSchedule on this CPU",
        "",
        f"{s['machine']}, {s['threads']} thread(s) for every kernel ({s['thread_settings']}); torch {s['torch']}, "
        f"TVM {s['tvm']}, optic codegen {s['codegen_version']}. MetaSchedule: {s['trials_ms']} trials, "
        f"{s['ms_trials_per_iter']} a round, xgboost cost model, evolutionary search. optic: {s['trials_optic']} "
        f"measurements at most. The three kernels of a workload were checked against the float64 "
        f"reference, then timed alternated in blocks over {s['rounds']} rounds in one process; medians per "
        f"call, ± half the interquartile range.",
        "",
        f"MetaSchedule's tuning times are shorter than as shipped, on purpose: its builder here skips "
        f"`import tvm.s_tir.tensor_intrin` (every target's tensor intrinsics, which its default builder "
        f"imports in the fresh process it starts for each round; no candidate here is tensorized), and the "
        f"same import in this process ({s['ms_intrinsics_import_seconds_excluded']:.0f} s, once) is left out "
        f"of its clock. optic's time is its whole `tune` call, worker start-up included.",
        "",
        "| workload | torch GFLOP/s | MetaSchedule GFLOP/s | optic GFLOP/s | MS / torch | optic / torch "
        "| optic / MS | MS tuning s (measured) | optic tuning s (measured) | tuning ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        k, f, t = r["kernels"], r["fraction_of_torch"], r["tuning"]

        def g(name: str, k: dict = k) -> str:
            return f"{k[name]['gflops']:.1f} ±{k[name]['spread'] * 50:.0f}%"

        lines.append(
            f"| {r['workload']} | {g('torch')} | {g('metaschedule')} | {g('optic')} | {f['metaschedule']:.2f} "
            f"| {f['optic']:.2f} | {r['optic_over_metaschedule']:.2f} | {t['metaschedule']['tune_seconds']:.0f} "
            f"({t['metaschedule']['measurements']}) | {t['optic']['tune_seconds']:.0f} ({t['optic']['measurements']}) "
            f"| {r['tuning_time_ratio']:.1f}x |")
    lines += ["", "optic's chosen configurations:", ""]
    lines += [f"- {r['workload']}: " + " ".join(f"{a}={b}" for a, b in r["tuning"]["optic"]["config"].items())
              for r in results["rows"]]
    lines += ["", "Acceptance (optic's best after at most the given measurements at least as fast as "
              "MetaSchedule's best, tuning at least 5x shorter):", ""]
    for r in results["rows"]:
        fast = r["optic_over_metaschedule"] >= 1.0
        quick = r["tuning_time_ratio"] >= 5.0
        lines.append(f"- {r['workload']}: speed {'met' if fast else 'NOT met'} "
                     f"({r['optic_over_metaschedule']:.2f}x), tuning time {'met' if quick else 'NOT met'} "
                     f"({r['tuning_time_ratio']:.1f}x)")
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> None:
    """Bars of GFLOP/s per workload (torch, MetaSchedule, optic) with interquartile whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    systems = [("torch", "torch (MKL / oneDNN)"), ("metaschedule", "MetaSchedule"), ("optic", "optic")]
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    width = 0.8 / len(systems)
    for j, (key, label) in enumerate(systems):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(rows))]
        ys = [r["kernels"][key]["gflops"] for r in rows]
        lo = [y - r["flops"] / r["kernels"][key]["q3"] / 1e9 for y, r in zip(ys, rows, strict=True)]
        hi = [r["flops"] / r["kernels"][key]["q1"] / 1e9 - y for y, r in zip(ys, rows, strict=True)]
        tune_s = [r["tuning"].get(key, {}).get("tune_seconds") for r in rows]
        bars = ax.bar(xs, ys, width, label=label, yerr=[lo, hi], error_kw={"lw": 0.7, "capsize": 2})
        for bar, ts in zip(bars, tune_s, strict=True):
            if ts is not None:
                ax.annotate(f"{ts:.0f} s", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 6), textcoords="offset points")
    ax.set_xticks(range(len(rows)), [r["workload"].replace(" (", "\n(").replace(", 64", "\n64") for r in rows],
                  fontsize=8)
    ax.set_ylabel("GFLOP/s (higher is better)")
    s = results["settings"]
    ax.set_title(f"fp32 on {s['threads']} threads; labels: tuning wall time "
                 f"(MetaSchedule {s['trials_ms']} trials, optic {s['trials_optic']})", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials-ms", type=int, default=64, help="MetaSchedule trials per workload")
    ap.add_argument("--ms-per-iter", type=int, default=16,
                    help="MetaSchedule trials a round (its cost model is retrained between rounds)")
    ap.add_argument("--trials-optic", type=int, default=32, help="optic's measurements per workload, at most")
    ap.add_argument("--threads", type=int, default=None, help="threads for every kernel (default: the cores)")
    ap.add_argument("--rounds", type=int, default=15, help="rounds of the alternated timing")
    ap.add_argument("--quick", action="store_true", help="a smoke test: 8 MetaSchedule trials, 4 optic ones")
    args = ap.parse_args(argv)
    if args.quick:
        args.trials_ms, args.ms_per_iter, args.trials_optic, args.rounds = 8, 8, 4, 5
    if args.threads is None:
        from optic import targets

        args.threads = targets.get("cpu").cores or 1
    env = _thread_env(args.threads)
    if any(os.environ.get(k) != v for k, v in env.items()):  # torch is loaded already: start afresh with them
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.metaschedule", *argv, f"--threads={args.threads}"],
                  {**os.environ, **env})
    results = run(args)
    out = Path(tempfile.gettempdir()) / "optic_metaschedule_quick" if args.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "metaschedule.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "metaschedule.md").write_text(markdown(results))
    chart(results, out / "metaschedule.png")
    print(f"wrote {out}/metaschedule.{{json,md,png}}")


if __name__ == "__main__":
    main()
