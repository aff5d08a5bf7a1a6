"""The runner: a graph run piece by piece, with early exits between the pieces.

A graph is cut after *stream* values: the one value of the model's main data flow that crosses a
cut. Everything else that may cross it is a *side* value, computed from the inputs and constants
by parameter-free ops (attention masks, ``x.shape``, position indices): side values are computed
in the first segment that reads them and passed along.

- :func:`side_nodes` classifies the nodes; :func:`split` cuts a GraphModule after given stream
  nodes into sequential segments (each a GraphModule over the original's submodules and
  constants: shared, never copied; the original is not modified);
- :class:`EarlyExitRunner` runs the segments and, after each cut, its exit head
  (:class:`~optic.passes.early_exit.heads.ExitHead`); it returns a head's logits as soon as the head
  is confident (max softmax probability ≥ its threshold). At batch 1 that is a real early return.
  At batch > 1 the samples that exited stop being computed when the graph accepts a smaller
  batch (:meth:`EarlyExitRunner.probe_subbatch` checks that on data); otherwise all samples
  continue until every one of them has exited;
- :func:`make_runner` builds one for a Program whose output is ``[N, K]`` logits
  (:func:`classifier_output` says why not otherwise).

A sample's output is the logits of the first head it is confident at, else the model's own: the
same whichever way the batch is run.

``optic.save`` pickles the runner: its classes are found by module path (``segments`` is the
path results saved before this module was split out name; it stays as an alias).
"""

from __future__ import annotations

import bisect
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from optic.ir.graph import dtype as dtype_of
from optic.ir.graph import fetch_attr, is_shape_query
from optic.ir.opview import kind_of
from optic.pipeline.verify import compare, run_seeded

from .heads import ExitHead

# Ops that apply learned weights: their results are the model's data flow, never side values.
_LEARNED_KINDS = frozenset({"conv", "linear", "matmul", "sdpa", "batch_norm", "layer_norm", "rms_norm",
                            "group_norm"})


# -- analysis ------------------------------------------------------------------------------------
def _applies_weights(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return any(True for _ in mod.parameters()) or any(True for _ in mod.buffers())
    kind = kind_of(node, gm)
    if kind in _LEARNED_KINDS:
        return True
    # an op the view does not know that reads a float constant (embedding lookups, fused kernels)
    return kind is None and any(
        a.op == "get_attr" and isinstance(t := fetch_attr(gm, a.target), torch.Tensor) and t.is_floating_point()
        for a in node.all_input_nodes)


def side_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes computed from the inputs and constants by parameter-free ops (and shape queries):
    values that may cross a cut beside the stream value."""
    side: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr") or is_shape_query(n):
            side.add(n)
        elif n.op != "output" and all(a in side for a in n.all_input_nodes) and not _applies_weights(n, gm):
            side.add(n)
    return side


def output_values(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes the graph returns, in output order."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return [a for a in pytree.tree_leaves(out.args[0]) if isinstance(a, fx.Node)]


def assign(gm: fx.GraphModule, cuts: Sequence[str], side: set[fx.Node] | None = None) -> dict[fx.Node, int]:
    """Segment index of every computing node when ``gm`` is cut after the stream nodes ``cuts``.

    Stream nodes go by position (a cut node ends its segment); side nodes go to the first segment
    that reads them, so that a sample that exits early never computes them."""
    side = side_nodes(gm) if side is None else side
    order = list(gm.graph.nodes)
    pos = {n.name: i for i, n in enumerate(order)}
    cut_pos = sorted(pos[c] for c in cuts)
    last = len(cut_pos)
    seg: dict[fx.Node, int] = {}
    for i, n in enumerate(order):
        if n.op not in ("placeholder", "get_attr", "output") and n not in side:
            seg[n] = bisect.bisect_left(cut_pos, i)
    # a shape query of a stream value too goes where it is read: passing on the (batch-sliced)
    # value keeps it right when exited samples leave the batch, passing on its shape would not
    for n in reversed(order):
        if n.op not in ("placeholder", "get_attr", "output") and n in side:
            seg[n] = min((last if u.op == "output" else seg[u] for u in n.users), default=0)
    return seg


class Segment(nn.Module):
    """One piece of the graph: reads ``inputs`` from the environment, adds ``outputs`` to it."""

    def __init__(self, gm: fx.GraphModule, inputs: list[str], outputs: list[str]):
        super().__init__()
        self.gm, self.inputs, self.outputs = gm, tuple(inputs), tuple(outputs)

    def forward(self, env: dict[str, Any]) -> None:
        # the graph's own forward: a segment is called once per segment per sample at batch 1,
        # where module-call overhead is a visible share of a small model's time
        env.update(zip(self.outputs, self.gm.forward(*[env[n] for n in self.inputs]), strict=True))


def split(gm: fx.GraphModule, cuts: Sequence[str]) -> list[Segment]:
    """``gm`` cut after each stream node in ``cuts`` (by name): ``len(cuts) + 1`` segments.

    Chained through one environment (placeholder name → value first), the last segment leaves the
    graph's output values in it under their node names."""
    side = side_nodes(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    for c in cuts:
        assert c in by_name and by_name[c] not in side, f"cut '{c}' is not a stream node"
    seg = assign(gm, cuts, side)
    count = len(cuts) + 1
    members: list[list[fx.Node]] = [[] for _ in range(count)]
    for n in gm.graph.nodes:
        if n in seg:
            members[seg[n]].append(n)
    segments = []
    for k, nodes in enumerate(members):
        own = set(nodes)
        inputs: list[fx.Node] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in own and a.op != "get_attr" and a not in inputs:
                    inputs.append(a)
        outputs = [n for n in nodes if any(u.op == "output" or seg[u] > k for u in n.users)]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {a: graph.placeholder(a.name) for a in inputs}

        def lookup(a: fx.Node, env=env, graph=graph) -> fx.Node:
            if a not in env:  # a constant: the segment reads the original's tensor
                env[a] = graph.node_copy(a)
            return env[a]

        for n in nodes:
            env[n] = graph.node_copy(n, lookup)
        graph.output(tuple(env[n] for n in outputs))
        segments.append(Segment(fx.GraphModule(gm, graph), [a.name for a in inputs], [n.name for n in outputs]))
    return segments


# -- the runner ------------------------------------------------------------------------------------
def float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (what a comparison with a float32 tensor uses)."""
    # numpy, not a torch tensor: a tensor made here would land on the caller's default device (meta, cuda)
    return float(np.float32(value))


@dataclass(frozen=True)
class _DumpedSpec:
    """A pytree spec as :func:`torch.utils._pytree.treespec_dumps` wrote it (see EarlyExitRunner.__getstate__)."""

    text: str


class EarlyExitRunner(nn.Module):
    """Runs ``segments`` in order; after segment k, ``heads[k]`` reads the stream value ``cuts[k]``
    and the samples whose confidence reaches ``thresholds[k]`` take its logits as their output.

    Called like the graph it was split from. ``exit_counts[k]`` counts the samples that exited at
    head k (the last entry: those that ran to the end); :meth:`reset_counts` clears them."""

    def __init__(self, segments: list[Segment], heads: list[ExitHead], cuts: list[str], thresholds: list[float],
                 *, input_names: list[str], logits: str, out_spec: Any, out_dtype: torch.dtype, capture: str,
                 signature: inspect.Signature | None):
        super().__init__()
        assert len(segments) == len(heads) + 1 == len(cuts) + 1 == len(thresholds) + 1
        self.segments, self.heads = nn.ModuleList(segments), nn.ModuleList(heads)
        self.cuts, self.thresholds = list(cuts), [float(t) for t in thresholds]
        self.input_names, self.logits, self.out_spec, self.out_dtype = list(input_names), logits, out_spec, out_dtype
        self.capture, self.signature = capture, signature
        self.subset = False  # exited samples leave the batch (set by probe_subbatch)
        self.batch_values: frozenset[str] = frozenset()  # environment values with the batch as dim 0
        needed: set[str] = {logits}
        self._keep: list[frozenset[str]] = [frozenset()] * len(segments)
        for k in range(len(segments) - 1, -1, -1):  # values still read after segment k
            self._keep[k] = frozenset(needed)
            needed |= set(segments[k].inputs)
        self.exit_counts = [0] * len(segments)

    def reset_counts(self) -> None:
        self.exit_counts = [0] * len(self.segments)

    def __getstate__(self) -> dict:
        """The output's pytree spec travels as pytree's own serialized form where it has one (a pickled
        TreeSpec leans on classes torch is deprecating); a spec it cannot write (a node type without a
        serialization name) is pickled as it is."""
        state = dict(super().__getstate__())
        try:
            state["out_spec"] = _DumpedSpec(pytree.treespec_dumps(self.out_spec))
        except Exception:  # noqa: BLE001 - pickled as the TreeSpec itself
            pass
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state.get("out_spec"), _DumpedSpec):
            state = dict(state, out_spec=pytree.treespec_loads(state["out_spec"].text))
        super().__setstate__(state)

    def flat_inputs(self, args: tuple, kwargs: dict) -> list[Any]:
        if self.capture == "export":
            return list(pytree.tree_leaves((args, kwargs)))
        if not kwargs and len(args) == len(self.input_names):
            return list(args)
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return list(bound.arguments.values())

    def _threshold32(self, k: int) -> float:
        """Threshold ``k`` rounded to float32: ``confidence >= threshold`` on a float32 tensor compares in float32,
        so a Python comparison of the confidence with this value decides exactly as the tensor comparison does
        (at batch 1 that saves the comparison, the sum and their dispatches: about a third of a head's cost)."""
        key, cached = self.__dict__.get("_thresholds32", (None, None))
        if key != self.thresholds:  # set again since (tests and searches do)
            key, cached = list(self.thresholds), [float32(t) for t in self.thresholds]
            self.__dict__["_thresholds32"] = (key, cached)
        return cached[k]

    def _wrap(self, logits: torch.Tensor) -> Any:
        return pytree.tree_unflatten([logits], self.out_spec)

    def forward(self, *args, **kwargs):
        env = dict(zip(self.input_names, self.flat_inputs(args, kwargs), strict=True))
        out: torch.Tensor | None = None  # [N, K]: filled as samples exit
        rows: torch.Tensor | None = None  # subset mode: the rows of ``out`` still computed
        done: torch.Tensor | None = None  # otherwise: the samples that have exited
        segments, heads, keep = self._modules["segments"], self._modules["heads"], self._keep
        last = len(segments) - 1
        for k, seg in enumerate(segments):
            seg(env)
            if k == last:
                break
            env = {name: v for name, v in env.items() if name in keep[k]}
            logits, conf = heads[k].scores(env[self.cuts[k]])
            if out is None and logits.shape[0] == 1:  # batch 1: one number, compared as the tensors compare it
                if float(conf) >= self._threshold32(k):
                    self.exit_counts[k] += 1
                    return self._wrap(logits.to(self.out_dtype))
                continue
            exits = conf >= self.thresholds[k]
            logits = logits.to(self.out_dtype)
            if done is not None:
                exits &= ~done
            m = int(exits.sum())
            self.exit_counts[k] += m
            if m == 0:
                continue
            n = logits.shape[0]
            if out is None:
                if m == n:  # everyone exits here (batch 1: a real early return)
                    return self._wrap(logits)
                out = torch.empty_like(logits)
            if self.subset:
                idx = rows if rows is not None else torch.arange(n, device=logits.device)
                out[idx[exits]] = logits[exits]
                if m == n:
                    return self._wrap(out)
                stay = ~exits
                rows = idx[stay]
                env = {name: v[stay] if name in self.batch_values else v for name, v in env.items()}
            else:
                out[exits] = logits[exits]
                done = exits if done is None else done | exits
                if bool(done.all()):
                    return self._wrap(out)
        final = env[self.logits]
        if out is None:
            self.exit_counts[-1] += final.shape[0]
            return self._wrap(final)
        if self.subset:
            self.exit_counts[-1] += final.shape[0]
            out[rows] = final
        else:
            self.exit_counts[-1] += int((~done).sum())
            out[~done] = final[~done]
        return self._wrap(out)

    # -- checks ------------------------------------------------------------------------------------
    def run_segments(self, env: dict[str, Any], start: int = 0) -> list[dict[str, Any]]:
        """Every segment from ``start`` on the whole batch; the environment after each one."""
        env = dict(env)
        after = []
        for seg in self.segments[start:]:
            seg(env)
            after.append(dict(env))
        return after

    def probe_subbatch(self, flat: list[Any], tolerance: float) -> str | None:
        """Check on one batch of inputs (≥ 2 samples) that the segments after every cut compute the
        same rows on a slice of the batch as on the whole; then exited samples may leave the batch
        (``subset``). Returns why not, or None."""
        self.subset, self.batch_values = False, frozenset()
        with torch.no_grad():
            env0 = dict(zip(self.input_names, flat, strict=True))
            full = self.run_segments(env0)
            ref = full[-1][self.logits]
            n = ref.shape[0]
            if n < 2:
                return "no calibration batch with two samples to check it on"
            idx = torch.arange(0, n, 2, device=ref.device)

            def take(v: Any) -> Any:
                return v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v

            try:
                small = self.run_segments({k: take(v) for k, v in env0.items()})
            except Exception as e:
                return f"the graph does not run on a smaller batch ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
            batch = {name for name, v in full[-1].items()
                     if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n
                     and isinstance(s := small[-1].get(name), torch.Tensor) and s.dim() > 0 and s.shape[0] == len(idx)}
            c = compare(ref[idx], small[-1][self.logits], tolerance)
            if not c.ok:
                return f"a smaller batch computes other values ({c})"
            for k in range(len(self.cuts)):
                env = {name: v[idx] if name in batch else v for name, v in full[k].items()}
                try:
                    got = self.run_segments(env, k + 1)[-1][self.logits]
                except Exception as e:
                    return (f"the graph after '{self.cuts[k]}' does not run on part of the batch "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                c = compare(ref[idx], got, tolerance)
                if not c.ok:
                    return f"the graph after '{self.cuts[k]}' computes other values on part of the batch ({c})"
        self.subset, self.batch_values = True, frozenset(batch)
        return None


# -- a runner for a Program ------------------------------------------------------------------------
def classifier_output(program: Any) -> tuple[Any, str | None]:
    """The output's pytree spec when the model returns only [N, K] float logits, else why not."""
    out = run_seeded(program.gm, program.example_args, program.example_kwargs)
    leaves, spec = pytree.tree_flatten(out)
    if len(leaves) != 1 or len(output_values(program.gm)) != 1:
        return None, (f"the model returns {len(leaves)} values; early exit serves models whose output is only "
                      "[N, K] logits")
    t = leaves[0]
    if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2 and t.shape[1] > 1):
        what = f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor) else type(t).__name__
        return None, f"the output is {what}, not [N, K] float logits of a classifier"
    return spec, None


def make_runner(program: Any, cuts: list[str], heads: list[ExitHead], thresholds: list[float],
                out_spec: Any = None) -> EarlyExitRunner:
    """An ``EarlyExitRunner`` for ``program`` with ``heads`` reading the stream nodes ``cuts``."""
    gm = program.gm
    if out_spec is None:
        out_spec, why = classifier_output(program)
        assert why is None, why
    logits = output_values(gm)[0]
    return EarlyExitRunner(
        split(gm, cuts), heads, cuts, thresholds,
        input_names=[n.name for n in gm.graph.nodes if n.op == "placeholder"], logits=logits.name,
        out_spec=out_spec, out_dtype=dtype_of(logits), capture=program.capture,
        signature=inspect.signature(gm.forward) if program.capture != "export" else None)
