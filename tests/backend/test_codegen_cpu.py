"""CPU code generation: every configuration the solver yields builds, runs and computes the reference.

"Zero invalid configurations built" is a property of templates and code generator together: the
constraints must rule out whatever the schedule cannot do. Hypothesis draws operators (odd sizes,
both matmul layouts, epilogues, strided and padded convolutions in both layouts, elementwise and
reduction kernels) and a configuration from the solver's answer for each; the configuration must
build with TVM and match PyTorch's float64 result.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis_profiles import examples

pytest.importorskip("tvm")

from optic.autotune import solve  # noqa: E402
from optic.autotune.operator import ELEMENTWISE_FNS, Operator  # noqa: E402
from optic.autotune.space import SpaceError  # noqa: E402
from optic.backend import codegen_cpu  # noqa: E402
from optic.pipeline.verify import compare  # noqa: E402
from optic.tvm_compat import host_target, require_tvm  # noqa: E402

EPILOGUES = st.lists(st.sampled_from(["bias", "residual", "relu", "relu6", "gelu", "silu", "tanh", "sigmoid"]),
                     max_size=2, unique=True).map(tuple)


@functools.lru_cache(maxsize=64)
def _configs(operator: Operator) -> tuple[tuple[str, ...], list[tuple[int, ...]]]:
    result = solve(operator.space("cpu"))
    return result.names, result.rows


def _build_and_check(operator: Operator, config: dict[str, int]) -> None:
    tvm = require_tvm()
    lib = codegen_cpu.compile_module(codegen_cpu.build(operator, config), host_target()).jit()
    inputs = operator.make_inputs(seed=1)
    out = torch.full(operator.out_shape, float("nan"))
    args = codegen_cpu.kernel_args(operator, config, inputs)
    lib["main"](*[tvm.runtime.from_dlpack(t) for t in (*args, out)])
    check = compare(operator.reference(inputs), out, 1e-4)
    assert check.ok, f"{operator} {config}: {check}"


def _check_drawn(data: st.DataObject, operator: Operator) -> None:
    names, rows = _configs(operator)
    assert rows, f"{operator}: the template has no valid configuration"
    row = rows[data.draw(st.integers(0, len(rows) - 1), label="config index")]
    _build_and_check(operator, dict(zip(names, row, strict=True)))


@examples(25)
@given(m=st.integers(1, 70), n=st.integers(1, 70), k=st.integers(1, 90), layout=st.sampled_from(["kn", "nk", "packed"]),
       epilogue=EPILOGUES, data=st.data())
@example(m=512, n=512, k=512, layout="kn", epilogue=(), data=None)
def test_matmul_configs_build_and_compute_the_reference(m, n, k, layout, epilogue, data):
    operator = Operator("matmul", (m, n, k), b_layout=layout, epilogue=epilogue)
    if data is None:  # the explicit example: the fastest-looking and the most overhanging configurations
        names, rows = _configs(operator)
        for row in (rows[0], rows[-1]):
            _build_and_check(operator, dict(zip(names, row, strict=True)))
        return
    _check_drawn(data, operator)


@st.composite
def convolutions(draw) -> Operator:
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 6))
    r, s = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride, padding, dilation = draw(st.integers(1, 2)), draw(st.integers(0, 2)), draw(st.integers(1, 2))
    h = draw(st.integers(dilation * (r - 1) + 1, 12))
    w = draw(st.integers(dilation * (s - 1) + 1, 12))
    f = draw(st.integers(9, 40))  # the template's smallest N block is 16 and must stay under 2*F
    return Operator("conv2d", (n, c, h, w, f, r, s), stride=stride, padding=padding, dilation=dilation,
                    layout=draw(st.sampled_from(["NHWC", "NCHW", "NCHWc", "NHWCc"])), epilogue=draw(EPILOGUES))


@examples(30)
@given(operator=convolutions(), data=st.data())
def test_conv2d_configs_build_and_compute_the_reference(operator, data):
    _check_drawn(data, operator)


@st.composite
def depthwise_convolutions(draw) -> Operator:
    n = draw(st.integers(1, 2))
    c = draw(st.sampled_from([1, 3, 8, 16, 24, 40, 64]))  # under a vector, odd, whole vectors, several
    r, s = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride, padding, dilation = draw(st.integers(1, 2)), draw(st.integers(0, 2)), draw(st.integers(1, 2))
    h = draw(st.integers(dilation * (r - 1) + 1, 14))
    w = draw(st.integers(dilation * (s - 1) + 1, 14))
    return Operator("depthwise_conv2d", (n, c, h, w, r, s), stride=stride, padding=padding, dilation=dilation,
                    epilogue=draw(EPILOGUES))


@examples(30)
@given(operator=depthwise_convolutions(), data=st.data())
def test_depthwise_conv2d_configs_build_and_compute_the_reference(operator, data):
    _check_drawn(data, operator)


def test_depthwise_convolutions_of_mobilenet_build_at_both_ends_of_their_space():
    """MobileNetV2's depthwise shapes: the model-preferred and the last configuration of each, with its
    epilogue (bias + ReLU6), and a 5x5 stride-2 one."""
    for shape in ("1x32x112x112,3x3,stride=1,pad=1", "1x144x56x56,3x3,stride=2,pad=1", "1x960x7x7,3x3,stride=1,pad=1",
                  "1x40x15x15,5x5,stride=2,pad=2"):
        operator = Operator.parse("depthwise_conv2d", shape, epilogue=("bias", "relu6"))
        names, rows = _configs(operator)
        for row in (rows[0], rows[-1]):
            _build_and_check(operator, dict(zip(names, row, strict=True)))


def test_the_benchmark_convolution_builds_at_both_ends_of_its_space():
    """The ResNet 3x3 convolution optic's benchmark tunes: its model-preferred and its last configuration."""
    operator = Operator.parse("conv2d", "1x64x56x56,64x64x3x3,stride=1,pad=1")
    names, rows = _configs(operator)
    for row in (rows[0], rows[-1]):
        _build_and_check(operator, dict(zip(names, row, strict=True)))


def test_direct_convolutions_compute_the_reference_with_every_channel_block_and_edge():
    """The direct (NCHWc) convolution on ResNet's shapes cut small: every input-channel block the template
    offers, filters that do not fill the last block (F=20), columns that do not fill the last register
    tile (OW=7), a stride, a dilation, the residual epilogue; and each time its packed weights unpack to
    the layer's."""
    cases = [("2x16x9x7,20x16x3x3,pad=1", ("bias", "residual", "relu")),
             ("1x12x11x11,32x12x3x3,stride=2,pad=1", ("bias", "gelu")),
             ("1x8x10x10,16x8x3x3,pad=2,dilation=2", ()),
             ("1x3x15x15,16x3x7x7,stride=2,pad=3", ("bias", "relu")),
             ("1x32x7x7,48x32x1x1", ("residual",)), ("2x8x6x6,8x8x3x3,pad=1", ("bias", "sigmoid"))]
    for shape, epilogue in cases:
        operator = Operator.parse("conv2d", shape, layout="NCHWc", epilogue=epilogue)
        names, rows = _configs(operator)
        configs = [dict(zip(names, r, strict=True)) for r in rows]
        blocks = sorted({c["IC_BN"] for c in configs})
        assert blocks == [d for d in range(1, operator.args[1] + 1) if operator.args[1] % d == 0]
        for icb in blocks:  # the cost model's best with each channel block, and the last configuration
            _build_and_check(operator, next(c for c in configs if c["IC_BN"] == icb))
        _build_and_check(operator, configs[-1])
        for ocb in (48, 64):  # filter blocks of several vectors (cut into whole vectors by the schedule)
            wide = next((c for c in configs if c["OC_BN"] == ocb), None)
            if wide is not None:
                _build_and_check(operator, wide)
        w = operator.make_inputs(seed=2)[1]
        packed = codegen_cpu.pack_direct_weight(w, operator, configs[-1])
        assert packed.shape == codegen_cpu.direct_weight_shape(operator, configs[-1])
        assert torch.equal(codegen_cpu.unpack_direct_weight(packed, operator), w)


def test_the_direct_convolution_copies_its_input_only_where_it_must_be_padded():
    """It broadcasts input elements one at a time, so it reads NCHW in place, except where zeros must
    surround the input: padding, or the last register tile reaching beyond W."""
    def blocks(shape: str, reg_n: int) -> set[str]:
        operator = Operator.parse("conv2d", shape, layout="NCHWc", epilogue=("bias",))
        config = {"IC_BN": 8, "OC_BN": 16, "REG_N": reg_n, "UNROLL_KW": 1, "PARALLEL": 1}
        _build_and_check(operator, config)
        text = codegen_cpu.build(operator, config).script()
        return {name for name in ("Xp", "conv", "C") if f'T.sblock("{name}")' in text}

    assert "Xp" not in blocks("1x16x8x8,16x16x1x1", 4)  # no padding, 4 divides OW
    assert "Xp" in blocks("1x16x8x8,16x16x1x1", 3)  # the last tile's columns reach beyond W
    assert "Xp" in blocks("1x16x8x8,16x16x3x3,pad=1", 4)
    space = Operator.parse("conv2d", "1x16x8x8,16x16x1x1", layout="NCHWc").space("cpu")
    assert {row[space.names.index("UNROLL_KW")] for row in solve(space).rows} == {1}  # nothing to unroll


def test_the_direct_convolution_has_no_gpu_template():
    operator = Operator.parse("conv2d", "1x16x8x8,16x16x3x3,pad=1", layout="NCHWc")
    with pytest.raises(SpaceError, match="no gpu template.*NCHW or NHWC"):
        operator.space("a100")


def _allocations(operator: Operator, config: dict[str, int]) -> dict[str, int]:
    """Elements of every buffer the scheduled kernel allocates, after TVM narrows each to the region
    its loop nest uses (as compilation does)."""
    tvm = require_tvm()
    t = tvm.s_tir.transform
    mod = codegen_cpu.build(operator, config)
    for p in (t.LowerInitBlock(), t.PlanAndUpdateBufferAllocationLocation(), t.ConvertBlocksToOpaque(),
              t.CompactBufferAllocation()):
        mod = p(mod)
    sizes: dict[str, int] = {}
    todo = [mod["main"].body]
    while todo:  # the statement tree: loops, sequences, blocks and their realizations, branches
        node = todo.pop()
        for buf in getattr(node, "alloc_buffers", ()):
            sizes[buf.name] = int(functools.reduce(lambda a, b: a * b, [int(x) for x in buf.shape], 1))
        todo += list(getattr(node, "seq", ()))
        todo += [getattr(node, f) for f in ("body", "block", "then_case", "else_case", "init")
                 if getattr(node, f, None) is not None]
    return sizes


def test_matmul_accumulates_in_its_output_unless_it_must_clip_or_apply_an_epilogue():
    config = dict(MR=4, NR=64, KC=64, MC=256, NC=128, UNROLL=4, PARALLEL=2)
    exact = _allocations(Operator("matmul", (512, 512, 512)), config)
    assert "Cp" not in exact  # no product buffer, no write-back pass
    assert exact["Bp"] == 128 * 64  # one KC x NC panel per tile
    assert "Cp" in _allocations(Operator("matmul", (512, 512, 512), epilogue=("relu",)), config)
    assert "Cp" in _allocations(Operator("matmul", (500, 512, 512)), config)  # M padded to 512


def test_conv2d_gathers_im2col_blocks_per_tile_and_nhwc_writes_its_output_in_place():
    operator = Operator.parse("conv2d", "1x64x56x56,64x64x3x3,stride=1,pad=1")
    config = dict(MR=4, NR=64, KC=64, TOH=4, NC=64, UNROLL=8, PARALLEL=2)
    sizes = _allocations(operator, config)
    assert sizes["Ap"] == 4 * 56 * 64  # one MC x KC block, not the 3136 x 576 im2col matrix
    assert sizes["Bp"] == 64 * 576  # the weights, packed once
    assert "Cp" not in sizes
    _build_and_check(operator, config)
    nchw = Operator.parse("conv2d", "1x64x56x56,64x64x3x3,stride=1,pad=1,layout=NCHW")
    sizes = _allocations(nchw, config)
    assert sizes["Ap"] == 4 * 56 * 64 and sizes["Bp"] == 64 * 64 and "Cp" in sizes  # transposed after the GEMM
    _build_and_check(nchw, config)


@examples(12)
@given(numel=st.integers(1, 5000), fn=st.sampled_from(sorted(ELEMENTWISE_FNS)), extra=st.integers(0, 1),
       data=st.data())
def test_elementwise_configs_build_and_compute_the_reference(numel, fn, extra, data):
    inputs = 1 if ELEMENTWISE_FNS[fn][0] == 1 else 2 + extra
    _check_drawn(data, Operator("elementwise", (numel,), fn=fn, inputs=inputs))


@examples(12)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), kind=st.sampled_from(["softmax", "layernorm"]),
       data=st.data())
def test_reduction_configs_build_and_compute_the_reference(rows, cols, kind, data):
    _check_drawn(data, Operator("reduction", (rows, cols), kind=kind))


def test_operator_parsing_and_errors():
    op = Operator.parse("conv2d", "1x64x56x56,64x64x3x3,stride=2,pad=1")
    assert op.args == (1, 64, 56, 56, 64, 3, 3) and op.opts["stride"] == 2 and op.opts["padding"] == 1
    assert op.out_shape == (1, 28, 28, 64)  # NHWC, the template's preferred layout
    assert Operator.parse("matmul", "128x3072x768").flops == 2 * 128 * 3072 * 768
    assert Operator.parse("reduction", "4x8x32,kind=layernorm").args == (32, 32)
    assert Operator.parse("matmul", "8x8x8,epilogue=bias+relu").opts["epilogue"] == ("bias", "relu")
    assert Operator("matmul", (8, 8, 8)).key == Operator.parse("matmul", "8x8x8").key
    assert Operator("matmul", (8, 8, 8)).key != Operator("matmul", (8, 8, 8), b_layout="nk").key
    from optic.autotune import SpaceError

    for op, shape in (("matmul", "8x8"), ("conv2d", "1x3x8x8,4x2x3x3"), ("matmul", "8x8x8,colour=red"),
                      ("elementwise", "8,fn=nope"), ("matmul", "axbxc")):
        with pytest.raises(SpaceError):
            Operator.parse(op, shape)


def _init_elements(operator: Operator, config: dict[str, int]) -> int:
    """Elements the GEMM's initialising block zeroes per execution (its own loops' extents)."""
    tvm = require_tvm()
    s = tvm.s_tir.Schedule(codegen_cpu.build(operator, config))
    name = "C" if '"C_init"' in str(s.mod) else "Cp"  # the product accumulates in the output, or in Cp
    gemm, init = s.get_sblock(f"{name}_update"), s.get_sblock(f"{name}_init")
    shared = {s.get_sref(loop) for loop in s.get_loops(gemm)}
    return functools.reduce(lambda a, b: a * b,
                            [int(s.get(lp).extent) for lp in s.get_loops(init) if s.get_sref(lp) not in shared], 1)


def test_one_k_block_zeroes_the_register_tile_and_several_zero_the_macro_tile_first():
    mm = Operator("matmul", (512, 512, 512))
    base = dict(MR=8, NR=32, MC=256, NC=128, UNROLL=4, PARALLEL=2)
    assert _init_elements(mm, {**base, "KC": 512}) == 8 * 32  # in registers, inside the k loop's tile
    assert _init_elements(mm, {**base, "KC": 128}) == 256 * 128  # a pass over the macro tile, then reloads
    # K not a power of two: the space offers KC = K (one unpadded block), and it computes the product,
    # for a matmul with an epilogue and a padded M, and for a convolution (K = C*R*S = 27)
    odd = Operator("matmul", (40, 48, 24), epilogue=("bias", "relu"))
    names, rows = _configs(odd)
    single = [dict(zip(names, r, strict=True)) for r in rows if r[names.index("KC")] == 24]
    assert single
    _build_and_check(odd, single[0])
    _build_and_check(odd, single[-1])
    conv = Operator.parse("conv2d", "1x3x12x12,16x3x3x3,pad=1")
    names, rows = _configs(conv)
    single = [dict(zip(names, r, strict=True)) for r in rows if r[names.index("KC")] == 27]
    assert single
    _build_and_check(conv, single[0])


def test_parallel_gemms_take_macro_tiles_dynamically_and_serial_ones_do_not():
    """With PARALLEL > 1 the macro tiles come from a shared counter (an atomic add in the code), so a
    faster core takes more of them; the result is the same as the reference either way."""
    operator = Operator("matmul", (96, 80, 40), epilogue=("bias",))  # 6 x 3 padded macro tiles
    for parallel, dynamic in ((2, True), (1, False)):
        config = dict(MR=4, NR=16, KC=40, MC=16, NC=32, UNROLL=4, PARALLEL=parallel)
        lib = codegen_cpu.compile_module(codegen_cpu.build(operator, config), host_target())
        ir = lib.mod.inspect_source("ll")
        assert ("atomicrmw add" in ir) is dynamic  # the counter's fetch-and-add (LLVM inlines it)
        _build_and_check(operator, config)


def test_the_dynamic_tile_rewrite_turns_only_marked_parallel_loops_into_workers():
    """A marked parallel loop of T tiles becomes PARALLEL workers that take tiles from a counter until
    none is left; an unmarked loop, or a marked one that is not parallel, is left as it is."""
    tvm = require_tvm()
    from optic.backend import dynamic_tiles

    tirx = tvm.tirx
    i = tirx.Var("i", "int32")
    body = tirx.Evaluate(tirx.const(0, "int32"))
    parallel = tirx.For(i, 0, 10, tirx.ForKind.PARALLEL, body)

    def attr(key, loop):
        return tirx.AttrStmt(tvm.runtime.convert("x"), key, tirx.const(3, "int32"), loop)

    marked = attr(dynamic_tiles._DYNAMIC, parallel)
    out = dynamic_tiles._rewrite_dynamic(tirx, marked)
    counter, start, workers = out.seq
    assert type(counter).__name__ == "AllocBuffer" and type(start).__name__ == "BufferStore"
    assert workers.kind == tirx.ForKind.PARALLEL and int(workers.extent) == 3  # PARALLEL workers, not T tiles
    text = str(out)
    assert text.count("optic_next_tile") == 2 and "while tile < 10" in text  # a tile to start, then the next
    for untouched in (attr("pragma_other", parallel),
                      attr(dynamic_tiles._DYNAMIC, tirx.For(i, 0, 10, tirx.ForKind.SERIAL, body))):
        assert dynamic_tiles._rewrite_dynamic(tirx, untouched).same_as(untouched)
    nested = tirx.SeqStmt([attr("pragma_other", parallel), tirx.For(tirx.Var("j", "int32"), 0, 2, tirx.ForKind.SERIAL,
                                                                     marked)])
    rewritten = dynamic_tiles._rewrite_dynamic(tirx, nested)
    assert rewritten.seq[0].same_as(nested.seq[0]) and str(rewritten.seq[1].body) == text  # found inside a loop


def test_a_gemm_with_b_packed_ahead_packs_nothing_at_run_time_and_the_model_charges_nothing():
    """b_layout="packed": B arrives in its micro-panels (constant weights packed once), so the kernel has no
    packing stage, its packed weights unpack to B, and the cost model drops B's packing from its figure."""
    from optic.autotune import cost_model

    operator = Operator("matmul", (1, 1000, 1280), b_layout="packed", epilogue=("bias",))
    names, rows = _configs(operator)
    config = dict(zip(names, rows[0], strict=True))
    kn = Operator("matmul", (1, 1000, 1280), b_layout="kn", epilogue=("bias",))
    assert '"Bp"' in codegen_cpu.build(kn, config)["main"].script()  # the packing stage, per call
    assert '"Bp"' not in codegen_cpu.build(operator, config)["main"].script()
    b = torch.randn(1280, 1000)
    packed = codegen_cpu.pack_gemm_weight(b, operator, config)
    panels, kp, nr = packed.shape
    assert torch.equal(packed.permute(1, 0, 2).reshape(kp, panels * nr)[:1280, :1000], b)
    space_kn, space_packed = kn.space("cpu"), operator.space("cpu")
    assert space_packed.meta["b_layout"] == "packed" and "b_layout" not in space_kn.meta
    assert cost_model.predict(space_packed, config).parts["pack"] < cost_model.predict(space_kn, config).parts["pack"]
    _build_and_check(operator, config)
