"""Search-space construction: the constraint solver against brute-force filtering.

The A100 GEMM space (block, warp and thread tiles, K tile, stages, vector width; fp16,
4096 x 4096 x 4096) is enumerated both ways, checked to give the same configurations, and timed
together with ``optic.timing.compare`` (alternated rounds, medians). Brute force filters the
whole Cartesian product with the same compiled constraints the solver uses, stopping at the first
that fails; the line after it estimates brute force with ``Space.check`` (sympy, per
configuration) from a sample. Then the solver alone on the other templates.

    OMP_NUM_THREADS=1 python -m benchmarks.autotune_space
"""

from __future__ import annotations

import argparse
import itertools
import time

from optic import autotune, timing


def _gemm_comparison(rounds: int) -> None:
    space = autotune.matmul_gpu(4096, 4096, 4096, "a100", dtype="float16")
    solved, brute = autotune.solve(space), autotune.brute_force(space)
    same = sorted(solved.rows) == sorted(brute.rows)
    times = timing.compare({"solve": lambda: autotune.solve(space),
                            "brute force": lambda: autotune.brute_force(space)},
                           rounds=rounds, block=1, warmup=0)
    s, b = times["solve"].median, times["brute force"].median
    print(f"A100 GEMM 4096x4096x4096 fp16 ({len(space.variables)} variables, {len(space.constraints)} constraints)")
    print(f"  space size            {space.size:>12,}")
    print(f"  valid configurations  {solved.valid:>12,}   (brute force: {brute.valid:,}; same set: {same})")
    print(f"  removed by propagation{solved.pruned_by_propagation:>12,}   search nodes: {solved.nodes:,}")
    print(f"  solver                {s * 1e3:>12.1f} ms  ({times['solve']})")
    print(f"  brute force           {b * 1e3:>12.1f} ms  ({times['brute force']})")
    print(f"  ratio                 {b / s:>12.0f} x")
    sample = list(itertools.islice(itertools.product(*(v.domain for v in space.variables)), 0, None, 4500))[:500]
    start = time.perf_counter()
    for values in sample:
        space.check(dict(zip(space.names, values, strict=True)))
    per_config = (time.perf_counter() - start) / len(sample)
    print(f"  brute force with Space.check (sympy), estimated from {len(sample):,} configurations: "
          f"{per_config * space.size:,.0f} s ({per_config * space.size / s:,.0f} x the solver)")


def _templates() -> None:
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
    print(f"\n{'template':60s} {'space size':>16s} {'valid':>9s} {'solver ms':>10s}")
    for name, space in spaces.items():
        result = autotune.solve(space)
        print(f"{name:60s} {space.size:>16,} {result.valid:>9,} {result.seconds * 1e3:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (each runs brute force once)")
    args = parser.parse_args()
    _gemm_comparison(args.rounds)
    _templates()


if __name__ == "__main__":
    main()
