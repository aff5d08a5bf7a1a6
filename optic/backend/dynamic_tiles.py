"""Dynamic macro tiles: the CPU GEMM's parallel loop, rewritten so that each thread takes the next tile.

TVM's parallel loop hands each thread a fixed share of the iterations, so the slowest core sets the
time. On a shared machine cores do not run at one speed: on this 2-vCPU VM one of them runs at ~60 %
for seconds at a time. The GEMM's macro-tile loop is therefore marked (:func:`mark_dynamic`) and,
after TVM's lowering, rewritten so that each of PARALLEL threads takes the next tile from a shared
atomic counter until none is left: a fast core takes more tiles. (Measured, 512^3 on 2 threads,
alternated in one process: 5-10 % faster than the static split in three runs of four, equal in the
fourth.) TVM's LLVM back end has no atomic builtin on CPUs, so the counter's fetch-and-add is a
three-line LLVM IR function linked into the module (``pragma_import_llvm``).

The rewrite is the last pass of the TIR pipeline :data:`TIR_PIPELINE` (TVM's default one before it),
which :func:`register_pipeline` adds to TVM's pipelines once per process.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TIR_PIPELINE", "mark_dynamic", "register_pipeline"]

TIR_PIPELINE = "optic_cpu"  # TVM's default TIR pipeline, then the dynamic-tile rewrite
_DYNAMIC = "pragma_optic_dynamic"
_NEXT_TILE = "optic_next_tile"
_NEXT_TILE_LL = f"""
define i32 @{_NEXT_TILE}(ptr %counter) {{
entry:
  %tile = atomicrmw add ptr %counter, i32 1 seq_cst
  ret i32 %tile
}}
"""


def mark_dynamic(s: Any, loop: Any, threads: int) -> None:
    """Mark the parallel ``loop`` of schedule ``s`` for the rewrite: ``threads`` workers take its tiles."""
    s.annotate(loop, _DYNAMIC, threads)
    s.annotate(loop, "pragma_import_llvm", _NEXT_TILE_LL)


def _dynamic_tiles(tirx: Any, loop: Any, threads: int) -> Any:
    """``for t in parallel(min, min + T): body(t)`` becomes ``threads`` parallel workers that each take
    the next tile from a counter (set to ``min`` on every call) until it passes ``min + T``."""
    counter = tirx.decl_buffer((1,), "int32", name="tile_counter")
    tile = tirx.decl_buffer((1,), "int32", name="tile")
    fetch = tirx.call_extern("int32", _NEXT_TILE, counter.data)
    current = tirx.BufferLoad(tile, [0])
    # The tile's body stays under a one-iteration loop over the tile's own variable: its buffers'
    # allocation and release keep their scope (a bare binding let them escape the while loop).
    work = tirx.SeqStmt([tirx.For(loop.loop_var, current, 1, tirx.ForKind.SERIAL, loop.body),
                         tirx.BufferStore(tile, fetch, [0])])
    worker = tirx.SeqStmt([tirx.AllocBuffer(tile), tirx.BufferStore(tile, fetch, [0]),
                           tirx.While(current < loop.min + loop.extent, work)])
    workers = tirx.For(tirx.Var("worker", "int32"), 0, threads, tirx.ForKind.PARALLEL, worker)
    first = tirx.Cast("int32", loop.min)  # 0 after TVM's loop canonicalisation, but not assumed
    return tirx.SeqStmt([tirx.AllocBuffer(counter), tirx.BufferStore(counter, first, [0]), workers])


def _rewrite_dynamic(tirx: Any, stmt: Any) -> Any:
    """``stmt`` with every marked parallel loop made dynamic (the lowered function's statement tree;
    TVM exposes no statement mutator to Python, so the few node kinds that hold bodies are walked)."""
    if isinstance(stmt, tirx.AttrStmt):
        if stmt.attr_key == _DYNAMIC and isinstance(stmt.body, tirx.For) \
                and stmt.body.kind == tirx.ForKind.PARALLEL:
            return _dynamic_tiles(tirx, stmt.body, int(stmt.value))
        body = _rewrite_dynamic(tirx, stmt.body)
        return stmt if body.same_as(stmt.body) else tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body)
    if isinstance(stmt, tirx.SeqStmt):
        seq = [_rewrite_dynamic(tirx, x) for x in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq, strict=True)) else tirx.SeqStmt(seq)
    if isinstance(stmt, tirx.For):
        body = _rewrite_dynamic(tirx, stmt.body)
        return stmt if body.same_as(stmt.body) else tirx.For(
            stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding, stmt.annotations)
    if isinstance(stmt, tirx.IfThenElse):
        then = _rewrite_dynamic(tirx, stmt.then_case)
        other = None if stmt.else_case is None else _rewrite_dynamic(tirx, stmt.else_case)
        if then.same_as(stmt.then_case) and (other is None or other.same_as(stmt.else_case)):
            return stmt
        return tirx.IfThenElse(stmt.condition, then, other)
    return stmt


def register_pipeline(tvm: Any) -> None:
    """Add :data:`TIR_PIPELINE` to TVM's TIR pipelines (once per process)."""
    from tvm.tirx import compilation_pipeline as pipelines

    if TIR_PIPELINE in pipelines.PIPELINE_MAP:
        return
    tirx = tvm.tirx

    @tirx.transform.prim_func_pass(opt_level=0, name="optic.DynamicTiles")
    def dynamic_tiles(func: Any, mod: Any, ctx: Any) -> Any:
        body = _rewrite_dynamic(tirx, func.body)
        return func if body.same_as(func.body) else func.with_body(body)

    def factory() -> tuple[Any, Any, Any]:
        base, finalize_host, finalize_device = pipelines.get_tir_pipeline("s_tir")
        return tvm.transform.Sequential([base, dynamic_tiles]), finalize_host, finalize_device

    pipelines.PIPELINE_MAP[TIR_PIPELINE] = factory
