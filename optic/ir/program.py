"""Program: the one object every pass reads and writes.

A Program is an fx GraphModule plus what the pipeline needs around it: which capture path
produced it, the example inputs it was specialized to, the shape and dtype of every value
(``node.meta["tensor_meta"]``) and the provenance of every node (``node.meta["optic"]``).

Passes never mutate a tensor or module that an earlier Program holds: they add new constants
(``ir.add_constant``) and rewire the graph. That makes ``clone`` cheap (a new graph and module
hierarchy that shares leaf tensors), which is what makes roll-back cheap.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

# Attributes that exported GraphModules keep beside the graph and read from generated code.
_CODEGEN_ATTRS = ("_in_spec", "_out_spec")


@dataclass
class Program:
    """A captured model: graph, capture path, example inputs, per-node shapes and provenance."""

    gm: fx.GraphModule
    capture: str  # "fx" or "export"
    example_args: tuple
    example_kwargs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Set by passes that change how the graph is executed (early exit runs it in segments and may
    # return early): a module called instead of ``gm`` with the same inputs. ``gm`` stays the whole
    # graph (for counting and dumps); no pass may rewrite ``gm`` once a runner is set.
    runner: Any = None
    # The original's call contract (optic.ir.contract): how a user's call maps onto the graph's inputs,
    # and, when the graph returns another container type than the model did, the structure to rebuild.
    signature: Any = None
    out_structure: Any = None
    # The dynamic dimensions of the graph's flat inputs (optic.ir.dynamic.Dims; empty: the example's shapes,
    # or an fx graph, which takes what the model's Python takes)
    dims: Any = None
    # Inputs at other sizes of those dimensions (or of an fx graph's batch), checked against eager at capture:
    # the pipeline verifies every pass on them too
    size_checks: list = field(default_factory=list)

    @property
    def static_batch(self) -> bool:
        """Whether the graph runs only at the example's batch (an export graph without a dynamic batch)."""
        return self.capture == "export" and not any(0 in d for d in (self.dims.per_input.values() if self.dims else ()))

    # -- running -------------------------------------------------------------------------
    def flat_inputs(self, args: tuple | None = None, kwargs: dict | None = None) -> list[Any]:
        """The graph's placeholder values for a call with ``args``/``kwargs`` (default: the examples)."""
        args = self.example_args if args is None else args
        kwargs = self.example_kwargs if kwargs is None else kwargs
        if self.capture == "export":
            return list(pytree.tree_leaves((args, kwargs)))
        bound = inspect.signature(self.gm.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        return list(bound.arguments.values())

    def __call__(self, *args, **kwargs):
        return (self.runner or self.gm)(*args, **kwargs)

    def run(self, args: tuple | None = None, kwargs: dict | None = None):
        args = self.example_args if args is None else args
        kwargs = self.example_kwargs if kwargs is None else kwargs
        with torch.no_grad():
            return self(*args, **kwargs)

    # -- copies ----------------------------------------------------------------------------
    def clone(self) -> Program:
        """A Program with its own graph and module hierarchy; leaf tensors/modules are shared."""
        with warnings.catch_warnings():  # torch's pytree specs warn when deep-copied
            warnings.simplefilter("ignore", FutureWarning)
            graph = copy.deepcopy(self.gm.graph)
        gm = fx.GraphModule(self.gm, graph, class_name=type(self.gm).__name__)
        for attr in _CODEGEN_ATTRS:
            if hasattr(self.gm, attr):
                setattr(gm, attr, getattr(self.gm, attr))
        gm.meta = dict(getattr(self.gm, "meta", {}))
        return Program(gm, self.capture, self.example_args, dict(self.example_kwargs), list(self.notes), self.runner,
                       self.signature, self.out_structure, self.dims, list(self.size_checks))

    # -- analysis ----------------------------------------------------------------------------
    def annotate_shapes(self) -> None:
        """Record shape and dtype of every value (``node.meta['tensor_meta']``) by running the examples."""
        # ShapeProp prints the traceback of a failing node before raising; the caller reports it
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(self.gm).propagate(*self.flat_inputs())

    def node_count(self) -> int:
        """Op nodes: what the graph computes, not its inputs, constants or output."""
        return _op_count(self.gm)

    def param_count(self) -> int:
        """Elements of the distinct tensors the graph reads (tied weights count once)."""
        from .graph import live_tensors

        return sum(t.numel() for t in live_tensors(self.gm).values())

    def recompile(self) -> None:
        self.gm.graph.lint()
        self.gm.recompile()


def _op_count(gm) -> int:
    """Op nodes of ``gm``; a module that runs a graph of its own (the backend's compiled whole graph,
    which exposes it as ``graph_module``) counts as the ops of that graph."""
    count = 0
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method"):
            count += 1
        elif n.op == "call_module":
            inner = getattr(gm.get_submodule(n.target), "graph_module", None)
            count += _op_count(inner) if inner is not None else 1
    return count
