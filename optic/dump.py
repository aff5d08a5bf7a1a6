"""Graph dumps: a Program as fx source, JSON, Graphviz DOT or SVG, and one file per pass.

- ``text``: ``gm.code``, valid Python, under a comment header; a comment footer gives the
  provenance (captured origin, source line, pass) of every node a pass created.
- ``json``: ``{"capture", "title", "nodes": [{name, op, target, args, kwargs, shape, dtype, origin,
  source, pass}]}``; node inputs appear as their names, literals as their Python spelling.
- ``dot``: one Graphviz node per fx node, edges from inputs. Given the ``previous`` Program, nodes
  the pass created (names absent before) are green and bold (``class="created"``), and nodes it
  erased are drawn as red dashed ghosts (``class="erased"``) with their old edges. Tooltips carry
  the provenance.
- ``svg``: the DOT drawn by Graphviz's ``dot`` program.
- ``tvmscript``: the Program as TVM sees it (a view from :func:`optic.backend.inspect.tvm_view`): the
  Relax module, one function per partition, under a comment header that lists the fused kernels and the
  ops kept in PyTorch; or, for a view of one kernel, that fused TIR kernel and its schedule.

This module only records and renders; it runs nothing. :class:`Recorder` is a pipeline instrument
(``optimize(..., instruments=[recorder])``) that keeps the Program after every pass, and
:func:`write_steps` writes ``000_capture.<ext>``, ``001_<pass>.<ext>``, ... one file per step, in order;
a DOT or SVG file shows what its pass changed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name

from .errors import OpticError
from .ir.program import Program
from .pipeline.report import PassRecord

FORMATS = {"text": "py", "json": "json", "dot": "dot", "svg": "svg", "tvmscript": "py"}


def render(program: Program, fmt: str, previous: Program | None = None, title: str | None = None, *,
           tvm: Any = None) -> str:
    """``program``'s graph in ``fmt`` (text, json, dot, svg, tvmscript); dot/svg mark changes from
    ``previous``; tvmscript renders ``tvm``, the Program's view from :func:`optic.backend.inspect.tvm_view`."""
    if fmt == "tvmscript":
        if tvm is None:
            raise OpticError("the tvmscript format renders the Program as TVM lowered it: pass "
                             "tvm=optic.backend.inspect.tvm_view(program, target).")
        return render_tvmscript(tvm, title)
    if fmt == "text":
        return render_text(program, title)
    if fmt == "json":
        return json.dumps(graph_dict(program, title), indent=2, ensure_ascii=False)
    if fmt == "dot":
        return render_dot(program, previous, title)
    if fmt == "svg":
        return dot_to_svg(render_dot(program, previous, title))
    raise OpticError(f"unknown dump format '{fmt}'; choose one of {', '.join(FORMATS)}.")


# -- text -------------------------------------------------------------------------------------------
def render_text(program: Program, title: str | None = None) -> str:
    gm = program.gm
    head = [f"# optic graph dump{': ' + title if title else ''}",
            f"# class {type(gm).__name__}, captured with {program.capture}; {program.node_count()} op nodes",
            f"# inputs: {_describe_inputs(program)}",
            "# the source below is torch.fx's generated code (GraphModule.code)"]
    created = [n for n in gm.graph.nodes if _prov(n).get("pass") not in (None, "capture", "constant")]
    foot = []
    if created:
        foot = ["", "# provenance of the nodes passes created (node <- captured nodes @ source [pass]):"]
        foot += [f"#   {n.name} <- {', '.join(_prov(n).get('origin') or []) or '-'}"
                 f" @ {_prov(n).get('source') or '?'} [{_prov(n).get('pass')}]" for n in created]
    return "\n".join(head) + "\n" + gm.code.strip("\n").rstrip() + "\n" + "\n".join(foot) + ("\n" if foot else "")


def _describe_inputs(program: Program) -> str:
    parts = []
    for n in program.gm.graph.nodes:
        if n.op == "placeholder":
            shape, dtype = _shape_dtype(n)
            parts.append(f"{n.name}: {dtype}{shape}" if shape is not None else n.name)
    return ", ".join(parts) or "none"


# -- tvmscript ----------------------------------------------------------------------------------------
def render_tvmscript(view: Any, title: str | None = None) -> str:
    """A :class:`optic.backend.inspect.TVMView` as TVMScript: the Relax module, or its one fused kernel,
    unscheduled and then as optic's template schedules it."""
    lowered = view.lowered
    head = [f"# optic TVMScript dump{': ' + title if title else ''}",
            f"# target {lowered.target}; {len(lowered.partitions)} partition(s) in TVM, "
            f"{len(lowered.fallbacks)} op(s) kept in PyTorch"]
    if view.kernel is not None:
        head.append(f"# kernel {view.kernel}")
        head.append("# as TVM fused it (unscheduled loop nest):")
        text = "\n".join(head) + "\n" + view.kernel.script().strip("\n") + "\n"
        return text + "\n" + (view.schedule or "")

    head.append("# fused kernels (show one with kernel=NAME):")
    head += [f"#   {k}" for k in lowered.kernels] or ["#   none"]
    if lowered.fallbacks:
        head.append("# ops kept in PyTorch:")
        head += [f"#   {f}" for f in lowered.fallbacks]
    head.append("# the Relax module as imported (one function per partition), before fusion:")
    text = "\n".join(head) + "\n" + lowered.script().strip("\n") + "\n"
    if getattr(view, "program", None):
        text += ("\n# the whole graph as one program of optic's kernels (optic.backend.tvm_graph), as the CPU "
                 "step builds it:\n" + view.program)
    return text


# -- json ---------------------------------------------------------------------------------------------
def graph_dict(program: Program, title: str | None = None) -> dict[str, Any]:
    """The graph as plain data: one entry per node, in graph order."""
    gm = program.gm
    nodes = []
    for n in gm.graph.nodes:
        shape, dtype = _shape_dtype(n)
        prov = _prov(n)
        entry = {
            "name": n.name, "op": n.op, "target": target_name(n),
            "args": [_arg_text(a) for a in n.args],
            "kwargs": {k: _arg_text(v) for k, v in n.kwargs.items()},
            "shape": shape, "dtype": dtype,
            "origin": list(prov.get("origin") or []), "source": prov.get("source"), "pass": prov.get("pass"),
        }
        if n.op == "call_module":
            entry["module"] = type(gm.get_submodule(n.target)).__name__
        nodes.append(entry)
    return {"capture": program.capture, "title": title, "op_nodes": program.node_count(), "nodes": nodes}


def target_name(node: fx.Node) -> str:
    """A readable, qualified name of what a node calls (``torch.relu``, ``aten.convolution.default``)."""
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(t)
    try:
        name = _get_qualified_name(t)
    except Exception:  # fx cannot name some callables (lambdas, bound methods)
        name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    return name.removeprefix("_operator.").removeprefix("builtins.")


def _arg_text(a: Any) -> str:
    """Node inputs as their names; literals (nested lists too) as Python spells them."""
    return str(fx.node.map_arg(a, lambda n: _Name(n.name)))


class _Name(str):
    def __repr__(self) -> str:  # so that names inside lists print bare, not quoted
        return str(self)


def _shape_dtype(node: fx.Node) -> tuple[Any, Any]:
    """(shape, dtype) of a node's value; lists of them for nodes with several tensor outputs."""
    meta = node.meta.get("tensor_meta")
    if meta is None:
        meta = node.meta.get("val")
    return _meta_shape(meta), _meta_dtype(meta)


def _meta_shape(m: Any) -> Any:
    if hasattr(m, "shape") and hasattr(m, "dtype"):
        try:
            return [int(s) for s in m.shape]
        except TypeError:  # symbolic sizes
            return [str(s) for s in m.shape]
    if isinstance(m, list | tuple):
        return [_meta_shape(x) for x in m]
    if isinstance(m, dict):
        return {k: _meta_shape(v) for k, v in m.items()}
    return None


def _meta_dtype(m: Any) -> Any:
    if hasattr(m, "shape") and hasattr(m, "dtype"):
        return str(m.dtype).removeprefix("torch.")
    if isinstance(m, list | tuple):
        return [_meta_dtype(x) for x in m]
    if isinstance(m, dict):
        return {k: _meta_dtype(v) for k, v in m.items()}
    return None


def _prov(node: fx.Node) -> dict[str, Any]:
    return node.meta.get("optic") or {}


# -- dot ------------------------------------------------------------------------------------------------
_STYLE = {
    "placeholder": 'shape=ellipse, style=filled, fillcolor="#dbe9f6"',
    "output": 'shape=box, style="filled,rounded", fillcolor="#e6e6e6"',
    "get_attr": 'shape=note, fontcolor="#666666", color="#999999", fontsize=9',
    "call_module": 'shape=box, style=filled, fillcolor="#fff7d6"',
    "call_function": 'shape=box, style=filled, fillcolor="#ffffff"',
    "call_method": 'shape=box, style=filled, fillcolor="#ffffff"',
}
_CREATED = 'class="created", color="#1a7f37", penwidth=2.5, style="filled,bold", fillcolor="#d8f5dd"'
_ERASED = 'class="erased", color="#cf222e", fontcolor="#cf222e", style=dashed, penwidth=1.5'


def render_dot(program: Program, previous: Program | None = None, title: str | None = None) -> str:
    """Graphviz DOT of ``program``; with ``previous``, created nodes green/bold, erased ones red dashed."""
    gm = program.gm
    names = {n.name for n in gm.graph.nodes}
    before = {n.name: n for n in previous.gm.graph.nodes} if previous is not None else {}
    created = {n for n in names if n not in before} if previous is not None else set()
    erased = [n for name, n in before.items() if name not in names]

    lines = ["digraph optic {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];',
             '  edge [color="#555555", arrowsize=0.6];']
    caption = [title or f"captured with {program.capture}"]
    if previous is not None:
        caption.append(f"green bold: created by this step ({_count(gm.graph.nodes, created)}); "
                       f"red dashed: erased ({_count(erased, {n.name for n in erased})})")
    lines.append(f'  labelloc=t; label="{_esc_lines(caption)}";')
    for n in gm.graph.nodes:
        style = _STYLE.get(n.op, "shape=box") + (", " + _CREATED if n.name in created else "")
        lines.append(f'  "{_esc(n.name)}" [{style}, label="{_esc_lines(_label(n, gm))}", '
                     f'tooltip="{_esc_lines(_tooltip(n))}"];')
    for n in erased:
        label = ["erased: " + n.name] + _label(n, previous.gm)[1:]
        lines.append(f'  "{_esc(n.name)}" [shape=box, {_ERASED}, label="{_esc_lines(label)}", '
                     f'tooltip="{_esc_lines(_tooltip(n))}"];')
    for n in gm.graph.nodes:
        for i in n.all_input_nodes:
            lines.append(f'  "{_esc(i.name)}" -> "{_esc(n.name)}";')
    ghosts = {n.name for n in erased}
    old_edges = {(i.name, n.name) for n in erased for i in n.all_input_nodes}  # the wiring the pass removed
    old_edges |= {(n.name, u.name) for n in erased for u in n.users if u.name not in ghosts}
    for a, b in sorted(old_edges):
        lines.append(f'  "{_esc(a)}" -> "{_esc(b)}" [class="erased", style=dashed, color="#cf222e"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _count(nodes: Any, chosen: set[str]) -> str:
    picked = [n for n in nodes if n.name in chosen]
    consts = sum(n.op == "get_attr" for n in picked)
    ops = len(picked) - consts
    text = f"{ops} node{'s' if ops != 1 else ''}"
    return f"{text}, {consts} constant{'s' if consts != 1 else ''}" if consts else text


def _label(n: fx.Node, gm: fx.GraphModule) -> list[str]:
    out = [n.name]
    if n.op == "call_module":
        try:
            out.append(f"{n.target}: {type(gm.get_submodule(n.target)).__name__}")
        except AttributeError:  # a module a later pass deleted
            out.append(str(n.target))
    elif n.op == "call_method":
        out.append(f".{n.target}()")
    elif n.op == "call_function":
        overload = isinstance(n.target, torch._ops.OpOverload)
        out.append(n.target._schema.name.split("::")[-1] if overload else target_name(n).rsplit(".", 1)[-1])
    elif n.op == "get_attr":
        out.append(f"self.{n.target}")
    shape, dtype = _shape_dtype(n)
    if shape is not None and n.op != "output":
        if not shape or isinstance(shape[0], int | str):
            text = "×".join(str(s) for s in shape) or "scalar"
            out.append(text if dtype == "float32" else f"{text} {dtype}")
        else:
            out.append(f"{len(shape)} outputs")
    prov = _prov(n)
    if prov.get("pass") not in (None, "capture", "constant") and prov.get("origin"):
        out.append(f"from {', '.join(prov['origin'])}")
    return out


def _tooltip(n: fx.Node) -> list[str]:
    prov = _prov(n)
    return [f"{n.op} {target_name(n)}",
            f"origin: {', '.join(prov.get('origin') or []) or '-'}",
            f"source: {prov.get('source') or '?'}",
            f"pass: {prov.get('pass') or '?'}"]


def _esc(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def _esc_lines(lines: list[str]) -> str:
    return "\\n".join(_esc(x) for x in lines)


# -- svg ------------------------------------------------------------------------------------------------
def dot_executable() -> str:
    """The Graphviz ``dot`` program, or an OpticError that says how to get it."""
    dot = shutil.which("dot")
    if dot is None:
        raise OpticError("SVG output needs Graphviz, which is not installed (no 'dot' program on PATH). "
                         "Install it (apt-get install graphviz, brew install graphviz, or conda install "
                         "graphviz), or use --format dot and render the file elsewhere.")
    return dot


def dot_to_svg(dot_source: str, timeout_s: float = 120.0) -> str:
    """Draw DOT source as SVG with Graphviz."""
    try:
        done = subprocess.run([dot_executable(), "-Tsvg"], input=dot_source, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise OpticError(f"Graphviz 'dot' took more than {timeout_s:.0f} s to draw the graph; "
                         "use --format dot and render it with a faster layout (e.g. sfdp).") from None
    if done.returncode != 0:
        raise OpticError(f"Graphviz 'dot' failed (exit {done.returncode}): {done.stderr.strip()[:500]}")
    return done.stdout


# -- one file per pass -------------------------------------------------------------------------------
@dataclass
class PassStep:
    """The Program after one step of the pipeline: capture (index 0), then each pass in order."""

    index: int
    name: str
    program: Program
    previous: Program | None  # the Program the step started from (None for the capture)
    record: PassRecord | None  # the pass's report record (None for the capture)

    @property
    def title(self) -> str:
        if self.record is None:
            return "captured graph"
        r = self.record
        status = f"skipped ({r.skipped})" if r.skipped else r.status
        if r.rolled_back:
            status += f": {r.reason}"
        elif not r.skipped:
            status += f", {r.nodes_before}→{r.nodes_after} op nodes"
        return f"after pass {self.index} '{self.name}': {status}"

    @property
    def filename_stem(self) -> str:
        return f"{self.index:03d}_{self.name}"


class Recorder:
    """Pipeline instrument (``optimize(..., instruments=[recorder])``): keeps the Program before and after
    every pass. A pass that was rolled back, skipped or changed nothing leaves the Program as it was."""

    def __init__(self) -> None:
        self.records: list[tuple[PassRecord, Program, Program]] = []

    def after_pass(self, record: PassRecord, before: Program, after: Program) -> None:
        self.records.append((record, before, after))

    def steps(self, captured: Program | None = None) -> list[PassStep]:
        """The capture (index 0), then every pass in order. ``captured``: the captured Program, needed
        only when no pass ran (then nothing was recorded; the result of such a run is its capture)."""
        first = self.records[0][1] if self.records else captured
        if first is None:
            raise ValueError("no pass was recorded: pass the captured Program")
        out = [PassStep(0, "capture", first, None, None)]
        for i, (record, before, after) in enumerate(self.records, start=1):
            out.append(PassStep(i, record.name, after, before, record))
        return out


def write_steps(steps: list[PassStep], out_dir: str | Path, fmt: str = "text",
                render_step: Callable[[PassStep], str] | None = None) -> list[Path]:
    """Write ``NNN_<step>.<ext>`` into ``out_dir`` (created if missing) for every step; return the paths.

    ``render_step`` gives a step's text (default :func:`render` in ``fmt``; DOT and SVG mark the nodes
    each pass created and erased; tvmscript needs a ``render_step`` that lowers). Existing files of the
    same names are overwritten."""
    if fmt not in FORMATS:
        raise OpticError(f"unknown dump format '{fmt}'; choose one of {', '.join(FORMATS)}.")
    if render_step is None:
        def render_step(step: PassStep) -> str:
            return render(step.program, fmt, step.previous, title=step.title)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for step in steps:
        path = out / f"{step.filename_stem}.{FORMATS[fmt]}"
        path.write_text(render_step(step), encoding="utf-8")
        paths.append(path)
    return paths
