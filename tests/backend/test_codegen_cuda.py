"""CUDA code generation: every GPU configuration the solver yields builds, and fits the GPU once compiled.

The property: a configuration the constraints call valid turns into CUDA whose launch is the one the
template assumed (threads per block, STAGES copies of the tiles in dynamic shared memory) and which
ptxas fits within the limits the constraints were stated with (registers per thread and per SM,
shared memory per block). Hypothesis draws small operators and one configuration from the solver's
answer for each; the nvcc half runs only where nvcc is installed (no GPU is needed: ptxas reports
the allocation at compile time).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_profiles import examples

pytest.importorskip("tvm")

from optic import targets  # noqa: E402
from optic.autotune import solve  # noqa: E402
from optic.autotune.operator import Operator  # noqa: E402
from optic.autotune.space import SpaceError  # noqa: E402
from optic.backend import codegen_cuda as cc  # noqa: E402
from optic.backend import cuda_config, cuda_schedules, cuda_toolchain  # noqa: E402
from optic.errors import OpticError  # noqa: E402

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
GPUS = st.sampled_from(["a100", "h100"])
DTYPES = st.sampled_from(["float32", "float16"])
FEW = examples(12)


@functools.lru_cache(maxsize=64)
def _rows(operator: Operator, target: str, dtype: str) -> tuple[tuple[str, ...], list[tuple[int, ...]]]:
    result = solve(cc.gpu_space(operator, target, dtype))
    return result.names, result.rows


def _draw_config(data: st.DataObject, operator: Operator, target: str, dtype: str) -> dict[str, int]:
    names, rows = _rows(operator, target, dtype)
    assert rows, f"{operator} has no valid configuration on {target}"
    return dict(zip(names, data.draw(st.sampled_from(rows), label="config"), strict=True))


MATMULS = st.builds(
    lambda mnk, layout, epi: Operator("matmul", mnk, b_layout=layout, epilogue=epi),
    st.sampled_from([(32, 64, 48), (48, 32, 64), (50, 70, 36), (64, 128, 32), (17, 40, 24)]),
    st.sampled_from(["kn", "nk"]),
    st.lists(st.sampled_from(["bias", "residual", "relu", "gelu", "tanh"]), max_size=2, unique=True).map(tuple))
ELEMENTWISE = st.builds(lambda n, fn: Operator("elementwise", (n,), fn=fn, inputs=1 if fn in ("relu", "gelu") else 2),
                        st.sampled_from([256, 1000, 4096]), st.sampled_from(["add", "mul", "relu", "gelu"]))
REDUCTIONS = st.builds(lambda rc, kind: Operator("reduction", rc, kind=kind),
                       st.sampled_from([(32, 128), (8, 768), (100, 40)]), st.sampled_from(["softmax", "layernorm"]))


def _source(operator: Operator, cfg: dict[str, int], target: str, dtype: str) -> tuple[str, list[int], list[int]]:
    tvm = pytest.importorskip("tvm")
    return cc._cuda_source(tvm, cc.build(operator, cfg, dtype), targets.get(target))


def _template_figures(operator: Operator, cfg: dict[str, int], target: str, dtype: str) -> dict[str, float]:
    space = cc.gpu_space(operator, target, dtype)
    return {k: float(space.evaluate(v, cfg)) for k, v in space.derived.items()}


# -- CUDA source (no nvcc needed) -----------------------------------------------------------------------------


@FEW
@given(MATMULS, GPUS, DTYPES, st.data())
def test_matmul_source_launches_what_the_template_assumed(operator, target, dtype, data):
    cfg = _draw_config(data, operator, target, dtype)
    source, dyn, threads = _source(operator, cfg, target, dtype)
    fig = _template_figures(operator, cfg, target, dtype)
    assert threads == [fig["threads"]]
    assert f"__launch_bounds__({int(fig['threads'])})" in source
    # STAGES copies of the A and B tiles, exactly: the pipeline multi-buffered shared memory as promised.
    assert dyn == [fig["smem_bytes"]]
    assert ("half" in source) == (dtype == "float16")


@FEW
@given(ELEMENTWISE, GPUS, DTYPES, st.data())
def test_elementwise_source_uses_the_vector_width(operator, target, dtype, data):
    cfg = _draw_config(data, operator, target, dtype)
    source, dyn, threads = _source(operator, cfg, target, dtype)
    assert threads == [cfg["THREADS"]] and dyn == [0]
    # The inputs are read VEC elements a load: a vector type of that width (TVM's spellings).
    vec_types = {("float32", 2): {"float2"}, ("float32", 4): {"float4"}, ("float16", 2): {"half2"},
                 ("float16", 4): {"half4", "uint2"}, ("float16", 8): {"half8", "uint4"}}
    loads = set(re.findall(r"\*\((\w+)\*\)\(x0_ptr", source))
    assert loads == (vec_types[dtype, cfg["VEC"]] & loads if cfg["VEC"] > 1 else set()) and (loads or cfg["VEC"] == 1)


# -- nvcc and ptxas ---------------------------------------------------------------------------------------------


def _assert_fits(result: cc.CompiledKernel, target: str, threads: float) -> None:
    t = targets.get(target)
    assert result.compiled, result.reason
    assert result.within_limits, result.violations
    assert result.threads == threads
    assert 0 < result.registers <= t.regs_per_thread
    assert result.registers * result.threads <= t.regs_per_sm
    assert result.smem <= t.smem_per_block


@pytest.mark.slow
@needs_nvcc
@examples(25)
@given(MATMULS, GPUS, DTYPES, st.data())
def test_matmul_compiles_within_the_limits(operator, target, dtype, data):
    cfg = _draw_config(data, operator, target, dtype)
    result = cc.compile_cuda(operator, cfg, target, dtype=dtype)
    fig = _template_figures(operator, cfg, target, dtype)
    _assert_fits(result, target, fig["threads"])
    assert result.dynamic_smem == fig["smem_bytes"]
    assert result.spills == 0, f"{result.kernels}"


@needs_nvcc
@FEW
@given(REDUCTIONS, GPUS, DTYPES, st.data())
def test_reduction_compiles_within_the_limits(operator, target, dtype, data):
    cfg = _draw_config(data, operator, target, dtype)
    result = cc.compile_cuda(operator, cfg, target, dtype=dtype)
    _assert_fits(result, target, cfg["TPR"] * cfg["RPB"])


@needs_nvcc
@examples(8)
@given(ELEMENTWISE, GPUS, DTYPES, st.data())
def test_elementwise_compiles_within_the_limits(operator, target, dtype, data):
    cfg = _draw_config(data, operator, target, dtype)
    _assert_fits(cc.compile_cuda(operator, cfg, target, dtype=dtype), target, cfg["THREADS"])


@needs_nvcc
def test_a_large_tile_uses_dynamic_shared_memory_beyond_48_kib(tmp_path):
    # 4 stages of 128x32 + 32x128 fp32 tiles: 128 KiB, which only dynamic shared memory can hold.
    op = Operator("matmul", (256, 256, 256))
    cfg = dict(BM=128, BN=128, BK=32, WM=64, WN=32, TM=8, TN=8, STAGES=4, VEC=4)
    result = cc.compile_cuda(op, cfg, "h100", workdir=tmp_path)
    assert result.dynamic_smem == 4 * (128 * 32 + 32 * 128) * 4 > 48 * 1024
    assert result.within_limits, result.violations
    assert result.cu_path and (tmp_path / result.cu_path.rsplit("/", 1)[-1]).exists()
    # The same configuration is not valid on a GPU with 99 KiB per block: the constraints refuse it.
    with pytest.raises(SpaceError, match="shared memory per block"):
        cc.compile_cuda(op, cfg, "l4")


@needs_nvcc
def test_an_arch_nvcc_does_not_know_is_reported_not_raised():
    listed = subprocess.run(["nvcc", "--list-gpu-arch"], capture_output=True, text=True).stdout
    if "compute_70" in listed:
        pytest.skip("this nvcc still compiles for sm_70")
    op = Operator("elementwise", (1024,), fn="relu")
    result = cc.compile_cuda(op, {"THREADS": 128, "EPT": 4, "VEC": 4}, "v100")
    assert not result.compiled and result.within_limits is None
    assert "sm_70" in result.reason and result.source


# -- without nvcc, checks, errors ---------------------------------------------------------------------------


def test_without_nvcc_the_source_is_generated_but_not_compiled(monkeypatch):
    monkeypatch.setattr(cuda_toolchain.shutil, "which", lambda name: None)
    op = Operator("reduction", (32, 128), kind="softmax")
    result = cc.compile_cuda(op, {"TPR": 32, "RPB": 2, "VEC": 4}, "a100")
    assert not result.compiled and result.within_limits is None
    assert "nvcc" in result.reason and "__global__" in result.source
    assert result.threads == 64 and result.as_dict()["registers"] == 0


def test_the_verdict_flags_what_exceeds_a_limit():
    t = targets.get("a100")
    ok = cc.PtxasKernel("k", registers=64, static_smem=1024)
    r = cc.CompiledKernel("k", "a100", "sm_80", {}, "", compiled=True, kernels=[ok], threads=1024,
                          dynamic_smem=t.smem_per_block - 1024, limits=cc.target_limits(t))
    r.violations = cc._violations(r)
    assert r.within_limits
    for kernel, threads, dyn, words in [
        (cc.PtxasKernel("k", registers=65, static_smem=1024), 1024, 0, "per SM"),  # 65 x 1024 > 65536
        (cc.PtxasKernel("k", registers=256, static_smem=0), 32, 0, "per thread"),
        (ok, 1024, t.smem_per_block, "shared memory"),
    ]:
        bad = cc.CompiledKernel("k", "a100", "sm_80", {}, "", compiled=True, kernels=[kernel], threads=threads,
                                dynamic_smem=dyn, limits=cc.target_limits(t))
        bad.violations = cc._violations(bad)
        assert bad.within_limits is False and any(words in v for v in bad.violations), bad.violations


def test_ptxas_output_is_parsed_per_kernel():
    text = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'main_kernel' for 'sm_90'
ptxas info    : Function properties for main_kernel
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'other_kernel' for 'sm_90'
ptxas info    : Function properties for other_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers, 388 bytes cmem[0]
"""
    first, second = cuda_toolchain.parse_ptxas(text)
    assert (first.name, first.registers, first.static_smem, first.spill_stores, first.spill_loads) == \
        ("main_kernel", 96, 2048, 8, 12)
    assert (second.name, second.registers, second.static_smem) == ("other_kernel", 12, 0)


def test_an_invalid_configuration_is_refused_not_built():
    op = Operator("matmul", (64, 64, 64))
    cfg = dict(BM=64, BN=64, BK=32, WM=32, WN=32, TM=4, TN=4, STAGES=2, VEC=4)  # WM/TM * WN/TN = 64 != 32
    with pytest.raises(SpaceError, match="warp"):
        cc.compile_cuda(op, cfg, "a100")
    with pytest.raises(SpaceError, match="lacks"):
        cc.build(op, {"BM": 64})


def test_bad_targets_and_operators_are_optic_errors():
    op = Operator("elementwise", (1024,))
    with pytest.raises(OpticError, match="GPU target"):
        cc.compile_cuda(op, {"THREADS": 128, "EPT": 4, "VEC": 4}, "cpu")
    with pytest.raises(OpticError, match="float32 or float16"):
        cc.gpu_space(op, "a100", dtype="int8")
    with pytest.raises(OpticError, match="no CUDA code generator for conv2d"):
        cc.build(Operator("conv2d", (1, 8, 8, 8, 8, 3, 3)), {})


def test_every_operator_with_a_schedule_has_a_space_and_back():
    """The configuration's table and the schedules' table name the same operators: a schedule without a
    space could never be configured, a space without a schedule never built."""
    assert set(cuda_config.SPACES) == set(cuda_schedules.BUILDERS) == {"matmul", "elementwise", "reduction"}


def test_padding_zero_has_the_element_type_of_the_value():
    """The shared padding expression selects a zero of the value's own type (fp16 tiles stay fp16)."""
    tvm = pytest.importorskip("tvm")
    from optic.backend.tir_expr import padded

    i = tvm.tirx.Var("i", "int32")
    x = tvm.te.placeholder((8,), "float16", name="A")[i]
    assert padded(tvm, [None, None], x) is x  # no condition: no select
    sel = padded(tvm, [i < 4, None], x)
    assert sel.op.name.endswith("if_then_else") and str(sel.args[2]) == "T.float16(0.0)"
    both = padded(tvm, [i < 4, i >= 0], x)
    assert type(both.args[0]).__name__ == "And"


# -- the toolchain, with a stand-in nvcc (no CUDA needed) ---------------------------------------------------

_PTXAS_300_REGS = """ptxas info    : Compiling entry function 'main_kernel' for 'sm_80'
ptxas info    : Function properties for main_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 300 registers, used 0 barriers, 1024 bytes smem, 388 bytes cmem[0]
"""


def _stand_in_nvcc(tmp_path, monkeypatch, body: str):
    """A shell script named ``nvcc`` first on PATH, running ``body``; returns the file it logs its arguments to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "nvcc_args.txt"
    script = bin_dir / "nvcc"
    script.write_text(f'#!/bin/sh\necho "$@" > "{log}"\n{body}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_what_ptxas_reports_is_read_back_and_checked_against_the_target(tmp_path, monkeypatch):
    log = _stand_in_nvcc(tmp_path, monkeypatch, f"cat >&2 <<'END'\n{_PTXAS_300_REGS}END")
    op = Operator("elementwise", (1024,), fn="relu")
    result = cc.compile_cuda(op, {"THREADS": 128, "EPT": 4, "VEC": 4}, "a100")
    args = log.read_text().split()
    assert args[:5] == ["-cubin", "-arch=sm_80", "-Xptxas", "-v", "-o"] and args[-1].endswith("_sm_80.cu")
    assert result.compiled and result.kernels == [cuda_toolchain.PtxasKernel("main_kernel", 300, 1024)]
    assert result.registers == 300 and result.smem == 1024 and result.threads == 128
    assert result.within_limits is False
    assert result.violations == [f"main_kernel: 300 registers per thread > {targets.get('a100').regs_per_thread}"]


@pytest.mark.parametrize(("body", "reason"), [
    ("echo 'k.cu(3): warning: unused' >&2; echo 'k.cu(7): error: identifier \"q\" is undefined' >&2; exit 2",
     'nvcc failed for sm_90: k.cu(7): error: identifier "q" is undefined'),
    ("exit 0", "nvcc succeeded but ptxas reported no kernel"),
    ("exec sleep 30", "nvcc took over 0.5 s for sm_90; not compiled"),
], ids=["error", "silent", "hangs"])
def test_an_nvcc_that_fails_says_nothing_or_hangs_is_a_reason_not_an_exception(tmp_path, monkeypatch, body, reason):
    _stand_in_nvcc(tmp_path, monkeypatch, body)
    monkeypatch.setattr(cuda_toolchain, "NVCC_TIMEOUT_S", 0.5)
    start = time.perf_counter()
    built = cuda_toolchain.compile_cubin("__global__ void k() {}", "sm_90")
    assert (built.reason, built.kernels) == (reason, [])
    assert time.perf_counter() - start < 10 and built.seconds < 10
    op = Operator("elementwise", (1024,), fn="relu")
    result = cc.compile_cuda(op, {"THREADS": 128, "EPT": 4, "VEC": 4}, "h100")
    assert not result.compiled and result.within_limits is None and result.reason == reason


def test_the_source_is_kept_in_a_given_directory_only(tmp_path, monkeypatch):
    _stand_in_nvcc(tmp_path, monkeypatch, f"cat >&2 <<'END'\n{_PTXAS_300_REGS}END")
    kept = cuda_toolchain.compile_cubin("// the source", "sm_80", "matmul 64x64x64 + bias", workdir=tmp_path / "w")
    assert kept.cu_path == str(tmp_path / "w" / "matmul_64x64x64_bias_sm_80.cu")
    assert (tmp_path / "w" / "matmul_64x64x64_bias_sm_80.cu").read_text() == "// the source"
    assert cuda_toolchain.compile_cubin("// the source", "sm_80").cu_path is None


def test_nvcc_version_is_its_release_line(tmp_path, monkeypatch):
    _stand_in_nvcc(tmp_path, monkeypatch, "echo 'nvcc: NVIDIA (R) Cuda compiler driver'; "
                                          "echo 'Cuda compilation tools, release 12.4, V12.4.131'")
    assert cuda_toolchain.nvcc_version() == "release 12.4, V12.4.131"
    monkeypatch.setattr(cuda_toolchain.shutil, "which", lambda name: None)
    assert cuda_toolchain.nvcc_version() is None


def test_an_fp16_reduction_never_gets_a_vector_its_fp32_statistics_cannot_have():
    """fp16 rows read 8 wide would make the fp32 partial statistics 32-byte vectors, which nvcc refuses
    (found by the deep hypothesis profile): the space leaves them out, and what it yields compiles."""
    from optic.autotune import Operator, solve
    from optic.backend.cuda_config import gpu_space

    op = Operator("reduction", (32, 128), kind="softmax")
    space = gpu_space(op, targets.get("a100"), "float16")
    assert not space.is_valid({"TPR": 4, "RPB": 8, "VEC": 8})
    configs = solve(space).configs
    assert configs and max(cfg["VEC"] for cfg in configs) == 2 * 2  # 4 fp32 lanes: 16 bytes
