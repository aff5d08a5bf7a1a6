"""Search spaces: declaration, checking, and the templates on realistic workloads.

Template configurations are checked twice: by ``Space.check`` (sympy) on a sample, and on all of
them against limits recomputed here from the config values and the CUDA/CPU figures, not through
the template's own expressions.
"""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
import sympy
from sympy import Eq, Le, Mod

from optic import autotune
from optic.autotune import Constraint, Space, SpaceError, Var, divisors, powers_of_two, range_, symbols
from optic.targets import get, host

A100 = get("a100")
# CUDA C++ Programming Guide, compute capability 8.0: 163 KiB opt-in shared memory per block.
A100_SMEM_PER_BLOCK = 163 * 1024


# -- Var and Space ------------------------------------------------------------------------------------


def test_domain_helpers():
    assert divisors(12) == (1, 2, 3, 4, 6, 12)
    assert powers_of_two(3, 40) == (4, 8, 16, 32)
    assert range_(2, 10, 3) == (2, 5, 8)
    assert Var("X", [8, 2, 4, 2]).domain == (2, 4, 8)


@pytest.mark.parametrize("name, domain", [("X", []), ("X", [0, 1]), ("X", [1.5]), ("for", [1]),
                                          ("_x", [1]), ("math", [1]), ("a b", [1])])
def test_bad_variables_are_refused(name, domain):
    with pytest.raises(SpaceError):
        Var(name, domain)


def _demo() -> Space:
    BM, BN = symbols("BM BN")
    M, LIMIT = sympy.Symbol("M"), sympy.Symbol("LIMIT")  # plain symbols resolve by name
    return Space("demo", [Var("BM", powers_of_two(16, 128)), Var("BN", powers_of_two(16, 128))],
                 [Eq(Mod(M, BM), 0), Constraint(Le(BM * BN, LIMIT), "tile area")],
                 params={"M": 96, "LIMIT": 2048}, derived={"area": BM * BN / 2})


def test_space_size_symbols_and_check():
    s = _demo()
    assert s.size == 16 and s.names == ("BM", "BN")
    assert set(s.symbols) == {"BM", "BN", "M", "LIMIT"}
    assert s.check({"BM": 32, "BN": 64}) == []
    assert s.is_valid({"BM": 16, "BN": 128})
    violated = s.check({"BM": 64, "BN": 64})
    assert violated == ["Eq(Mod(M, BM), 0): Mod(96, 64) = 32", "BM*BN <= LIMIT [tile area]: 4096 <= 2048 is false"]
    assert s.check({"BM": 48, "BN": 16}) == ["BM=48 is not in its domain (16, 32, 64, 128)"]
    assert s.evaluate("area", {"BM": 16, "BN": 16}) == 128
    assert s.evaluate(sympy.Symbol("BM") / 3, {"BM": 16, "BN": 16}) == Fraction(16, 3)
    with pytest.raises(SpaceError):
        s.check({"BM": 16})


def test_str_shows_the_declaration():
    text = str(_demo())
    for piece in ("Space demo", "16 configurations", "M=96", "BM in {16, 32, 64, 128}", "area = BM*BN/2",
                  "BM*BN <= LIMIT [tile area]"):
        assert piece in text


def test_unknown_symbols_and_bad_params_are_refused():
    X = symbols("X")[0]
    with pytest.raises(SpaceError, match="neither a variable"):
        Space("s", [Var("X", [1, 2])], [Le(X, sympy.Symbol("UNBOUND"))])
    with pytest.raises(SpaceError, match="must be an integer"):
        Space("s", [Var("X", [1, 2])], [Le(X, sympy.Symbol("P"))], params={"P": 2.5})
    with pytest.raises(SpaceError, match="not a sympy relation"):
        Space("s", [Var("X", [1, 2])], [X + 1])
    with pytest.raises(SpaceError, match="repeat"):
        Space("s", [Var("X", [1]), Var("X", [2])])


def test_restrict_keeps_constraints_and_params():
    s = _demo().restrict(BN=(16, 32))
    assert s.size == 8 and s.params["M"] == 96 and s.constraints == _demo().constraints


# -- templates ------------------------------------------------------------------------------------------

GPU_CASES = {
    "a100 gemm 4096^3 fp16": lambda: autotune.matmul_gpu(4096, 4096, 4096, "a100"),
    "a100 bert gemm 128x3072x768 + epilogue": lambda: autotune.matmul_gpu(
        128, 3072, 768, "a100", epilogue=("bias", "gelu", "residual")),
    "v100 gemm 1000^3 fp32, N-major B": lambda: autotune.matmul_gpu(1000, 1000, 1000, "v100", dtype="float32",
                                                                   b_contiguous="n"),
    "a100 conv 1x64x56x56 3x3 NHWC": lambda: autotune.conv2d_gpu(1, 64, 56, 56, 64, 3, 3, "a100", padding=1),
    "a100 conv 1x64x56x56 3x3 NCHW": lambda: autotune.conv2d_gpu(1, 64, 56, 56, 64, 3, 3, "a100", padding=1,
                                                                 layout="NCHW"),
}


@pytest.fixture(scope="module", params=list(GPU_CASES))
def gpu_case(request):
    space = GPU_CASES[request.param]()
    return space, autotune.solve(space)


def _sample(configs, n=25):
    return random.Random(0).sample(configs, min(n, len(configs)))


def test_gpu_templates_yield_configs_that_respect_the_limits(gpu_case):
    space, result = gpu_case
    t = get(space.meta["target"])
    nbytes = {"float16": 2, "float32": 4}[space.meta["dtype"]]
    assert result.valid > 0 and result.complete
    for cfg in _sample(result.configs):
        assert space.check(cfg) == [], cfg
        assert space.evaluate("threads", cfg) == cfg["BM"] * cfg["BN"] // (cfg["TM"] * cfg["TN"])
    for cfg in result.configs:  # every one, against limits recomputed from the values
        threads = cfg["BM"] * cfg["BN"] // (cfg["TM"] * cfg["TN"])
        assert threads * cfg["TM"] * cfg["TN"] == cfg["BM"] * cfg["BN"]
        assert threads <= t.max_threads_per_block and threads % t.warp_size == 0
        assert (cfg["WM"] // cfg["TM"]) * (cfg["WN"] // cfg["TN"]) == t.warp_size
        for outer, inner in (("BM", "WM"), ("BN", "WN"), ("WM", "TM"), ("WN", "TN"), ("BK", "VEC")):
            assert cfg[outer] % cfg[inner] == 0, (outer, inner, cfg)
        assert cfg["STAGES"] * (cfg["BM"] + cfg["BN"]) * cfg["BK"] * nbytes <= t.smem_per_block
        assert cfg["BM"] * cfg["BN"] * 4 <= t.smem_per_block
        assert cfg["VEC"] * nbytes <= 16
        assert space.meta.get("b_contiguous") != "n" or cfg["BN"] % cfg["VEC"] == 0
        # The documented estimate: fp32 accumulators, double-buffered fragments, 32 for addressing.
        regs = cfg["TM"] * cfg["TN"] + Fraction(2 * (cfg["TM"] + cfg["TN"]) * nbytes, 4) + 32
        regs += cfg["TN"] if "bias" in space.meta["epilogue"] else 0
        regs += Fraction(cfg["TM"] * cfg["TN"] * nbytes, 4) if "residual" in space.meta["epilogue"] else 0
        assert regs <= t.regs_per_thread and threads * regs <= t.regs_per_sm


def test_a100_gemm_limits_are_the_data_sheet_figures():
    space = autotune.matmul_gpu(4096, 4096, 4096, "a100")
    assert space.params["SMEM"] == A100_SMEM_PER_BLOCK == A100.smem_per_block
    assert (space.params["MAX_THREADS"], space.params["WARP"], space.params["REGS"]) == (1024, 32, 255)
    assert all(c.why for c in space.constraints)  # each constraint names the limit it expresses
    result = autotune.solve(space)
    assert {cfg["BM"] for cfg in result.configs} == {16, 32, 64, 128, 256}
    assert all(4096 % cfg["BK"] == 0 and cfg["STAGES"] * cfg["BK"] <= 4096 for cfg in result.configs)


def test_conv_gpu_tiles_are_output_patches_and_nhwc_vectors_stay_in_a_pixel():
    nhwc = autotune.conv2d_gpu(1, 64, 56, 56, 64, 3, 3, "a100", padding=1)
    nchw = autotune.conv2d_gpu(1, 64, 56, 56, 64, 3, 3, "a100", padding=1, layout="NCHW")
    assert nhwc.params["OH"] == nhwc.params["OW"] == 56
    for space in (nhwc, nchw):
        result = autotune.solve(space)
        assert result.valid > 0
        assert all(cfg["BM"] == cfg["TOH"] * cfg["TOW"] and 56 % cfg["TOH"] == 0 for cfg in result.configs)
        assert all(576 % cfg["BK"] == 0 for cfg in result.configs)  # K = C*R*S
    # NCHW gathers A with scalar loads, so it admits A tiles that NHWC's vector loads cannot split.
    assert set(autotune.solve(nhwc).rows) <= set(autotune.solve(nchw).rows)


def test_masked_edges_when_the_extent_is_not_a_multiple_of_the_smallest_tile():
    result = autotune.solve(autotune.matmul_gpu(100, 4096, 4096, "a100"))
    assert {cfg["BM"] for cfg in result.configs} == {16, 32, 64, 128}  # BM < 2*100


def test_cpu_gemm_on_the_host_respects_registers_and_caches():
    t = host()
    space = autotune.matmul_cpu(512, 512, 512)
    result = autotune.solve(space)
    assert result.valid > 0
    lanes = t.vector_bits // 32
    vregs = 32 if t.isa & {"avx512f", "neon", "asimd", "sve"} else 16
    for cfg in _sample(result.configs):
        assert space.check(cfg) == [], cfg
    for cfg in result.configs:
        assert cfg["NR"] % lanes == 0
        assert cfg["MR"] * cfg["NR"] // lanes + cfg["NR"] // lanes + 1 <= vregs
        panels = (cfg["MR"] + cfg["NR"]) * cfg["KC"] * 4
        assert panels <= t.l1d_bytes or (cfg["KC"] >= 512 and panels <= t.l2_bytes // 2)  # L2: one k block
        assert cfg["MC"] * cfg["KC"] * 4 <= t.l2_bytes
        assert cfg["MC"] % cfg["MR"] == 0 and cfg["NC"] % cfg["NR"] == 0 and cfg["KC"] % cfg["UNROLL"] == 0
        assert t.cores % cfg["PARALLEL"] == 0


def test_cpu_conv_on_the_host():
    space = autotune.conv2d_cpu(1, 64, 56, 56, 64, 3, 3, padding=1)
    result = autotune.solve(space)
    assert result.valid > 0
    for cfg in _sample(result.configs):
        assert space.check(cfg) == []
    assert all(cfg["TOH"] * 56 % cfg["MR"] == 0 for cfg in result.configs)


@pytest.mark.parametrize("make", [
    lambda: autotune.elementwise_gpu(1 << 20, "a100", inputs=2),
    lambda: autotune.elementwise_gpu(1001, "t4"),
    lambda: autotune.reduction_gpu(4096, 1024, "a100"),
    lambda: autotune.reduction_gpu(65536, 768, "h100", kind="layernorm", dtype="bfloat16"),
    lambda: autotune.elementwise_cpu(1 << 20),
    lambda: autotune.reduction_cpu(4096, 1024),
    lambda: autotune.reduction_cpu(3, 7, kind="layernorm"),
])
def test_elementwise_and_reduction_templates(make):
    space = make()
    result = autotune.solve(space)
    assert result.valid > 0
    for cfg in _sample(result.configs):
        assert space.check(cfg) == [], cfg
    if space.meta["target"] != "cpu":
        t = get(space.meta["target"])
        for cfg in result.configs:
            threads = cfg.get("THREADS") or cfg["TPR"] * cfg["RPB"]
            assert threads <= t.max_threads_per_block and threads % t.warp_size == 0
            assert cfg["VEC"] * space.params["BYTES"] <= 16


def test_reduction_row_threads_fit_warps():
    result = autotune.solve(autotune.reduction_gpu(4096, 1024, "a100"))
    assert all(32 % c["TPR"] == 0 or c["TPR"] % 32 == 0 for c in result.configs)
    assert {c["TPR"] for c in result.configs} >= {1, 32, 1024}


def test_template_errors_and_dispatch():
    with pytest.raises(SpaceError, match="is a cpu"):
        autotune.matmul_gpu(64, 64, 64, "cpu")
    with pytest.raises(SpaceError, match="is a gpu"):
        autotune.matmul_cpu(64, 64, 64, "a100")
    with pytest.raises(SpaceError, match="epilogue"):
        autotune.matmul_gpu(64, 64, 64, "a100", epilogue=("softmax",))
    with pytest.raises(SpaceError, match="layout"):
        autotune.conv2d_gpu(1, 3, 8, 8, 4, 3, 3, "a100", layout="CHWN")
    with pytest.raises(SpaceError, match="dtype"):
        autotune.matmul_gpu(64, 64, 64, "a100", dtype="float8")
    assert autotune.template("matmul", 64, 64, 64, target="a100").name == "matmul_gpu[a100]"
    assert autotune.template("reduction", 8, 8, target="cpu").name == "reduction_cpu[cpu]"
