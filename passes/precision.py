"""precision: bf16/fp16 GEMMs and convolutions, chosen per layer under the accuracy budget. Lossy.

Per convolution, linear, matmul and attention (``scaled_dot_product_attention``) a layer may run in
half precision with fp32 accumulation, as the tensor cores compute it::

    y = cast_fp32( op( cast_h(x), cast_h(W), cast_h(b) ) ),   h = bfloat16 (or float16)

The weights are stored in half precision once; the activations are cast on the way in and the result
back to fp32 on the way out, so every op around the layer (LayerNorm, softmax, residual adds,
activations) stays fp32: they are where half precision loses accuracy first, and they are memory-bound,
so half precision buys them little. bf16 where the target has bf16 tensor cores (Ampere and later),
fp16 where it has only fp16 ones (V100, T4); option ``precision_dtype`` forces one.

Each layer is one action of the budget's allocator (:mod:`optic.budget`): its metric cost is measured on
the fit split (half-precision numerics are computed wherever the model runs, the CPU included: PyTorch's
bf16/fp16 GEMMs and convolutions accumulate in fp32 there too), its gain is the target's roofline at the
tensor-core rate against fp32 (CUDA cores for GEMMs, TF32 for convolutions, which cuDNN uses by default),
the casts' memory traffic and launches included; with the model on the GPU the allocator also times it
there and undoes a layer that is not faster. A layer the roofline predicts no gain for is declined with
that reason. The report's per-layer table lists the precision each layer got.

The pass also reports the whole precision plan from the target's data-sheet rates: every layer's roofline
time in fp32, bf16, fp16, fp8 and int8 where the target has the rate (``measured["precision_plan"]`` and a
note with the totals). bf16/fp16 are what it applies; int8 and fp8 need GPU kernels optic does not build yet
(the tensor-core template has int8; nothing wires it to a model), so for them the plan is what a user reads.

On a CPU with bf16 (or fp16) matrix or vector instructions (AMX-BF16, AVX512-BF16), when the target is
this machine, the same actions run through PyTorch's bf16 kernels (oneDNN: AMX tiles), and the allocator
keeps a layer only where it measures faster here; the roofline is the CPU's bf16 estimate. There a
layer's bf16 action and its int8 action (pass ``quantize``) are alternatives of one allocator group, bf16
the milder level: the allocator keeps at most one of them, the stronger where the budget allows. On
this development machine (a Xeon with AMX, 2 vCPUs) BERT-base's 128-token linears ran 2.9-3.4x faster
in bf16 than in fp32, the casts included; a single-token linear did not gain (0.97x).

Never exact: a bf16 product keeps 8 bits of mantissa. A CPU target other than this machine is planned
but not changed (the gain there is only known by measuring).
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from typing import Any

import torch
import torch.fx as fx

from optic import ir
from optic.budget.allocator import Action
from optic.ir.opview import Op
from optic.ir.rewrite import Site, find_sites
from optic.pipeline import cost
from optic.pipeline.registry import Option, register

RULE = "precision"
KINDS = frozenset({"conv", "linear", "matmul", "sdpa"})
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"bfloat16": "bf16", "float16": "fp16"}  # as the plan and the report name them
_CAST_FLOPS_PER_ELEMENT = 1


def half_dtype(target: Any, choice: str = "auto") -> str | None:
    """The half-precision type for ``target``: bf16 where it has bf16 tensor cores, else fp16 where it has
    fp16 ones, else None; ``choice`` forces one (None when the target has no figure for it)."""
    if choice != "auto":
        return choice if target.peak_flops(choice) else None
    for d in ("bfloat16", "float16"):
        if target.peak_flops(d):
            return d
    return None


def _float_inputs(node: fx.Node) -> list[fx.Node]:
    """The node's tensor arguments that are float32 activations (not constants)."""
    out: list[fx.Node] = []
    fx.map_arg((node.args, node.kwargs), lambda a: out.append(a) if (
        a.op != "get_attr" and ir.dtype(a) == torch.float32 and a not in out) else None)
    return out


class HalfPrecisionLayer(Site):
    """A GEMM-like op whose result is one float32 tensor, every tensor it reads float32 or integer/bool."""

    def guard(self, op: Op, ctx: Any) -> str | None:
        node = op.node
        if ir.dtype(node) != torch.float32 or ir.shape(node) is None:
            return "its result is not one float32 tensor of known shape"
        bad = []
        fx.map_arg((node.args, node.kwargs), lambda a: bad.append(a.name) if (
            a.op != "get_attr" and ir.dtype(a) not in (torch.float32, torch.bool, torch.int64, torch.int32, None)
        ) else None)
        if bad:
            return f"it reads {', '.join(bad)}, which is not float32"
        if not _float_inputs(node):
            return "it reads no float32 activation"
        return None


SITE = HalfPrecisionLayer(RULE, kinds=KINDS)


# The precisions a GPU plan weighs: (name in the report, the target's peak field, bytes per element).
PLAN = (("fp32", "float32", 4), ("bf16", "bfloat16", 2), ("fp16", "float16", 2), ("fp8", "float8", 1),
        ("int8", "int8", 1))


def plan_seconds(node: fx.Node, gm: fx.GraphModule, kind: str, target: Any) -> dict[str, float]:
    """The layer's roofline seconds on ``target`` in every precision the target has a tensor-core rate for
    (fp32: CUDA cores for GEMMs, TF32 for convolutions, as cuDNN runs them by default). Below fp32 the
    weights are stored in that precision and the activations are cast in and the result out, one pass over
    each (read fp32, write the narrow type; and back), each cast a kernel of its own."""
    c = cost.node_cost(node, gm)
    flops, nbytes = float(c.flops), float(c.bytes)
    launch = cost.kernel_seconds(0, 0, target)
    casts = [math.prod(ir.shape(a) or ()) for a in [*_float_inputs(node), node]]
    out = {}
    for name, field, size in PLAN:
        peak = target.peak_flops(field)
        if name == "fp32" and kind == "conv" and target.kind == "gpu":  # cuDNN: TF32 by default
            peak = target.peak_flops("tf32") or peak
        if not peak:
            continue
        t = max(flops / peak, nbytes * size / 4 / target.mem_bandwidth) + launch
        if name != "fp32":
            t += sum(max(_CAST_FLOPS_PER_ELEMENT * n / target.peak_flops("float32"),
                         (4 + size) * n / target.mem_bandwidth) + launch for n in casts)
        out[name] = t
    return out


def run_in(gm: fx.GraphModule, node: fx.Node, dtype: torch.dtype) -> fx.Node:
    """Rewrite ``node`` to compute in ``dtype``: float32 activations cast in, float constants (and a module's
    parameters) stored in ``dtype``, the result cast back to float32. Returns the cast-back node."""
    graph = gm.graph
    casts: dict[fx.Node, fx.Node] = {}

    def cast(a: fx.Node) -> fx.Node:
        if a in casts:
            return casts[a]
        if a.op == "get_attr":
            t = ir.fetch_attr(gm, a.target)
            new = ir.const_node(graph, gm, t.detach().to(dtype), "half") if (
                isinstance(t, torch.Tensor) and t.is_floating_point()) else a
        elif ir.dtype(a) == torch.float32:
            new = graph.call_method("to", (a, dtype))
        else:
            new = a
        casts[a] = new
        return new

    with graph.inserting_before(node):
        args, kwargs = fx.map_arg(node.args, cast), fx.map_arg(node.kwargs, cast)
        target = node.target
        if node.op == "call_module":  # its own copy: another node may call the same module in fp32
            target = ir.free_name(gm, "half")
            gm.add_submodule(target, copy.deepcopy(gm.get_submodule(node.target)).to(dtype))
        half = graph.create_node(node.op, target, args, kwargs)
    with graph.inserting_after(half):
        back = graph.call_method("to", (half, torch.float32))
    ir.replace(node, back, RULE, [node])
    graph.erase_node(node)
    return back


@register
class Precision:
    name = "precision"
    exact = False
    description = ("bf16/fp16 convolutions, linears, matmuls and attention (GPU targets; CPUs with AMX/AVX512-BF16, "
                   "where measured faster), per layer under the budget")
    options = (
        Option("precision_dtype", str, "auto", "the half-precision type: 'auto' (bf16 where the target has bf16 "
               "tensor cores, else fp16), 'bfloat16' or 'float16'", choices=("auto", "bfloat16", "float16")),
    )

    def candidates(self, program: Any, ctx: Any) -> list[Action]:
        tgt = ctx.target
        if tgt.kind == "cpu" and not ctx.measure:
            ctx.note(f"on a CPU, half precision is kept only where it measures faster, and target '{tgt.name}' is not "
                     "this machine (or measure=False): every layer stays fp32")
            return []
        choice = str(ctx.option("precision_dtype"))
        half = half_dtype(tgt, choice)
        if half is None:
            ctx.note(f"target '{tgt.name}' has no {'half-precision' if choice == 'auto' else choice} "
                     f"{'tensor cores' if tgt.kind == 'gpu' else 'matrix or vector instructions'}: every layer stays fp32")
            return []
        gm = program.gm
        actions, plan = [], []
        for op in find_sites(gm, SITE, ctx, ctx.stats):
            seconds = plan_seconds(op.node, gm, op.kind, tgt)
            plan.append({"layer": ir.layer_name(op.node), "kind": op.kind, "seconds": seconds,
                         "fastest": min(seconds, key=seconds.get)})
            t32, t16 = seconds["fp32"], seconds[SHORT[half]]
            if t16 >= t32:
                ctx.stats.decline(RULE, op.node.name, f"no predicted gain in {half} on {tgt.name} "
                                  f"({t32 * 1e6:.1f} µs fp32, {t16 * 1e6:.1f} µs with the casts): memory-bound or small")
                continue
            actions.append(self._action(op, half, t32, t16, ctx.measure))
        self._report_plan(plan, tgt, ctx)
        return actions

    @staticmethod
    def _report_plan(plan: list[dict], tgt: Any, ctx: Any) -> None:
        """The whole precision plan on the target, from its data-sheet rates: every layer's roofline time in
        each precision it has, in the record (``measured["precision_plan"]``) and summed in a note."""
        if not plan:
            return
        totals = {p: sum(row["seconds"].get(p, 0.0) for row in plan) for p, _, _ in PLAN if p in plan[0]["seconds"]}
        ctx.record.measured["precision_plan"] = {"target": tgt.name, "layers": plan, "totals_s": totals}
        narrow = [p for p in ("fp8", "int8") if p in totals]
        ctx.note(f"precision plan on {tgt.name} (roofline, data-sheet rates), {len(plan)} GEMM/conv/attention layers: "
                 + ", ".join(f"{p} {t * 1e6:.1f} µs" for p, t in totals.items())
                 + "; fastest per layer: " + ", ".join(f"{p} ×{n}" for p, n in Counter(r["fastest"] for r in plan).most_common())
                 + (f". bf16/fp16 are applied under the budget; {'/'.join(narrow)} would need GPU kernels optic "
                    "does not build yet" if narrow and tgt.kind == "gpu" else ""))

    def _action(self, op: Op, half: str, t32: float, t16: float, measured_here: bool) -> Action:
        name = op.node.name
        short = SHORT[half]

        def apply(program: Any) -> None:
            gm = program.gm
            run_in(gm, next(n for n in gm.graph.nodes if n.name == name), DTYPES[half])
            ir.eliminate_dead_code(gm)
            ir.drop_unused_constants(gm)

        return Action(
            pass_name=self.name, group=name, layer=ir.layer_name(op.node),
            # the same group as quantize's int8 action on the layer, and milder: alternatives, int8 the stronger
            describe=f"{op.kind} in {short} (fp32 accumulation)", level=0.5, nodes=frozenset({name}),
            predicted_gain_s=t32 - t16, apply=apply, predicted_only=not measured_here,
            measured_together=True,  # each layer saves less than a whole model's timing noise: all at once
            info={"precision": short, "predicted_speedup": t32 / t16})

    def run(self, program: Any, ctx: Any) -> bool:
        """Without the allocator: every proposed layer in half precision (used by tests and by hand)."""
        actions = self.candidates(program, ctx)
        for a in actions:
            a.apply(program)
            ctx.stats.match(RULE)
        return bool(actions)
