"""Search-space construction: the constraint solver against brute-force filtering.

The A100 GEMM space (block, warp and thread tiles, K tile, stages, vector width; fp16,
4096 x 4096 x 4096) is enumerated both ways, checked to give the same configurations, and timed
together with ``optic.pipeline.timing.compare`` (alternated rounds, medians and interquartile spread).
Brute force filters the whole Cartesian product with the same compiled constraints the solver
uses, stopping at the first that fails. Also timed in the same rounds: the solver followed by
building its rows as Python tuples (``SolveResult.rows``, built on first use: brute force builds
its tuples as it filters, and pays for them inside its time), and compiling the constraints
(sympy to Python, which both do first). A line after it estimates brute force with
``Space.check`` (sympy, per configuration) from a sample. Then the solver alone on the other
templates, against the same number of configurations filtered.

    OMP_NUM_THREADS=1 python -m benchmarks.autotune_space   # writes benchmarks/results/autotune_space.{json,md}
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from benchmarks.runner import machine
from optic import autotune
from optic.autotune.constraints import compile_constraints
from optic.pipeline import timing

RESULTS = Path(__file__).resolve().parent / "results"


def _gemm_comparison(rounds: int) -> dict:
    space = autotune.matmul_gpu(4096, 4096, 4096, "a100", dtype="float16")
    solved, brute = autotune.solve(space), autotune.brute_force(space)
    same = sorted(solved.rows) == sorted(brute.rows)
    times = timing.compare({"solve": lambda: autotune.solve(space),
                            "solve, then rows as tuples": lambda: autotune.solve(space).rows,
                            "compile constraints": lambda: compile_constraints(space),
                            "brute force": lambda: autotune.brute_force(space)},
                           rounds=rounds, block=1, warmup=1)
    b = times["brute force"]
    out = {
        "space": "matmul_gpu(4096, 4096, 4096, 'a100', dtype='float16')",
        "variables": len(space.variables), "constraints": len(space.constraints), "space_size": space.size,
        "valid": solved.valid, "brute_force_valid": brute.valid, "same_set": same,
        "removed_by_propagation": solved.pruned_by_propagation, "search_nodes": solved.nodes,
        "order": list(solved.order), "rounds": b.samples,
        "timings_ms": {name: {"median": t.median * 1e3, "q1": t.q1 * 1e3, "q3": t.q3 * 1e3, "spread": t.spread}
                       for name, t in times.items()},
        "ratio": b.median / times["solve"].median,
        "ratio_with_rows": b.median / times["solve, then rows as tuples"].median,
        # The ratio's range over the quartiles: slowest solver against fastest brute force, and the reverse.
        "ratio_range": [b.q1 / times["solve"].q3, b.q3 / times["solve"].q1],
    }
    print(f"A100 GEMM 4096x4096x4096 fp16 ({out['variables']} variables, {out['constraints']} constraints)")
    print(f"  space size            {space.size:>12,}")
    print(f"  valid configurations  {solved.valid:>12,}   (brute force: {brute.valid:,}; same set: {same})")
    print(f"  removed by propagation{solved.pruned_by_propagation:>12,}   search nodes: {solved.nodes:,}")
    for name, t in times.items():
        print(f"  {name:28s} {t.median * 1e3:>10.1f} ms  ({t})")
    print(f"  ratio                 {out['ratio']:>12.0f} x   (quartile range {out['ratio_range'][0]:.0f}-"
          f"{out['ratio_range'][1]:.0f} x; with rows as tuples {out['ratio_with_rows']:.0f} x; {b.samples} rounds)")
    sample = list(itertools.islice(itertools.product(*(v.domain for v in space.variables)), 0, None, 4500))[:500]
    start = time.perf_counter()
    for values in sample:
        space.check(dict(zip(space.names, values, strict=True)))
    per_config = (time.perf_counter() - start) / len(sample)
    out["brute_force_sympy_estimate_s"] = per_config * space.size
    print(f"  brute force with Space.check (sympy), estimated from {len(sample):,} configurations: "
          f"{per_config * space.size:,.0f} s ({per_config * space.size / times['solve'].median:,.0f} x the solver)")
    return out


def _templates() -> list[dict]:
    spaces = {
        "BERT GEMM 128x3072x768 fp16 + bias, gelu, residual (a100)":
            autotune.matmul_gpu(128, 3072, 768, "a100", epilogue=("bias", "gelu", "residual")),
        "conv2d 1x64x56x56, 64 3x3, NHWC (a100)": autotune.conv2d_gpu(1, 64, 56, 56, 64, 3, 3, "a100", padding=1),
        "conv2d 1x64x56x56, 64 3x3, NCHW (a100)":
            autotune.conv2d_gpu(1, 64, 56, 56, 64, 3, 3, "a100", padding=1, layout="NCHW"),
        "conv2d 1x64x56x56, 64 3x3 (host CPU)": autotune.conv2d_cpu(1, 64, 56, 56, 64, 3, 3, "cpu", padding=1),
        "GEMM 512x512x512 fp32 (host CPU)": autotune.matmul_cpu(512, 512, 512, "cpu"),
        "elementwise 2^24, 2 inputs fp16 (a100)": autotune.elementwise_gpu(1 << 24, "a100", inputs=2),
        "softmax 4096x1024 fp16 (a100)": autotune.reduction_gpu(4096, 1024, "a100"),
        "layer norm 65536x768 fp16 (a100)": autotune.reduction_gpu(65536, 768, "a100", kind="layernorm"),
        "elementwise 2^24 fp32 (host CPU)": autotune.elementwise_cpu(1 << 24, "cpu"),
        "softmax 4096x1024 fp32 (host CPU)": autotune.reduction_cpu(4096, 1024, "cpu"),
    }
    rows = []
    print(f"\n{'template':60s} {'space size':>16s} {'valid':>9s} {'solver ms':>10s}")
    for name, space in spaces.items():
        times = [autotune.solve(space).seconds for _ in range(5)]
        result = autotune.solve(space)
        ms = sorted(times)[2] * 1e3
        rows.append({"template": name, "space_size": space.size, "valid": result.valid, "solver_ms": ms})
        print(f"{name:60s} {space.size:>16,} {result.valid:>9,} {ms:>10.1f}")
    return rows


def _markdown(gemm: dict, templates: list[dict], meta: dict) -> str:
    t = gemm["timings_ms"]
    lines = [
        "# Search-space construction: solver against brute-force filtering",
        "",
        f"{meta['cpu']}, {meta['cores']} cores, 1 thread, Python {meta['python']}; commit {meta['commit']}, "
        f"{meta['date']}; `OMP_NUM_THREADS=1 python -m benchmarks.autotune_space` "
        f"({gemm['rounds']} alternated rounds, medians, ± half the interquartile range).",
        "",
        f"A100 GEMM 4096×4096×4096 fp16: {gemm['variables']} variables, {gemm['constraints']} constraints, "
        f"{gemm['space_size']:,} configurations, {gemm['valid']:,} valid "
        f"(brute force: {gemm['brute_force_valid']:,}; same set: {gemm['same_set']}); "
        f"propagation removes {gemm['removed_by_propagation']:,} before the search, which tries "
        f"{gemm['search_nodes']:,} values.",
        "",
        "| | ms | ± |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {v['median']:.1f} | {v['spread'] * 50:.0f}% |" for name, v in t.items()]
    lines += [
        "",
        f"**Solver {gemm['ratio']:.0f}× faster than brute force** (quartile range "
        f"{gemm['ratio_range'][0]:.0f}–{gemm['ratio_range'][1]:.0f}×); {gemm['ratio_with_rows']:.0f}× "
        "including building its rows as Python tuples (`SolveResult.rows`, built on first use; the solver "
        "returns an integer array). Compiling the constraints (sympy to Python) is part of both. Brute force "
        f"with `Space.check` (sympy) instead: about {gemm['brute_force_sympy_estimate_s']:,.0f} s.",
        "",
        "Other templates, solver alone (median of 5):",
        "",
        "| template | space size | valid | solver ms |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['template']} | {r['space_size']:,} | {r['valid']:,} | {r['solver_ms']:.1f} |" for r in templates]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="timing rounds (each runs brute force once)")
    args = parser.parse_args()
    gemm = _gemm_comparison(args.rounds)
    templates = _templates()
    meta = machine(threads=1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "autotune_space.json").write_text(
        json.dumps({"machine": meta, "gemm_a100": gemm, "templates": templates}, indent=2) + "\n")
    (RESULTS / "autotune_space.md").write_text(_markdown(gemm, templates, meta))


if __name__ == "__main__":
    main()
