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
- ``tvmscript``: the Program lowered to TVM (``optic.lower``) as TVMScript: the Relax module, one
  function per partition, under a comment header that lists the fused kernels and the ops kept in
  PyTorch; or, with ``kernel=NAME``, that one fused TIR kernel. Needs TVM (``optic[tvm]``).

:func:`dump_each_pass` writes ``000_capture.<ext>``, ``001_<pass>.<ext>``, ... one file per pass
of the pipeline, in order; a DOT or SVG file shows what its pass changed.
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
from .pipeline.report import PassRecord, Report

FORMATS = {"text": "py", "json": "json", "dot": "dot", "svg": "svg", "tvmscript": "py"}


def render(program: Program, fmt: str, previous: Program | None = None, title: str | None = None, *,
           target: Any = "cpu", kernel: str | None = None) -> str:
    """``program``'s graph in ``fmt`` (text, json, dot, svg, tvmscript); dot/svg mark changes from
    ``previous``; tvmscript lowers for ``target`` and shows one ``kernel`` when named."""
    if fmt == "tvmscript":
        return render_tvmscript(program, target, kernel, title)
    if kernel is not None:
        raise OpticError("a kernel can be chosen only with the tvmscript format.")
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
def render_tvmscript(program: Program, target: Any = "cpu", kernel: str | None = None,
                     title: str | None = None) -> str:
    """The Program lowered to TVM as TVMScript: the Relax module, or one fused kernel."""
    from .backend.lower import lower  # TVM loads only when this format is asked for

    lowered = lower(program, target)
    head = [f"# optic TVMScript dump{': ' + title if title else ''}",
            f"# target {lowered.target}; {len(lowered.partitions)} partition(s) in TVM, "
            f"{len(lowered.fallbacks)} op(s) kept in PyTorch"]
    if kernel is not None:
        k = lowered.kernel(kernel)
        head.append(f"# kernel {k}")
        head.append("# as TVM fused it (unscheduled loop nest):")
        text = "\n".join(head) + "\n" + k.script().strip("\n") + "\n"
        return text + "\n" + scheduled_kernel(k, target)

    head.append("# fused kernels (show one with kernel=NAME):")
    head += [f"#   {k}" for k in lowered.kernels] or ["#   none"]
    if lowered.fallbacks:
        head.append("# ops kept in PyTorch:")
        head += [f"#   {f}" for f in lowered.fallbacks]
    head.append("# the Relax module as imported (one function per partition), before fusion:")
    return "\n".join(head) + "\n" + lowered.script().strip("\n") + "\n"


def scheduled_kernel(k: Any, target: Any = "cpu") -> str:
    """The kernel scheduled by optic's template for ``target``: the tuning database's best configuration
    (else the cost model's choice; nothing is measured), as TVMScript; or why there is none."""
    from . import targets
    from .autotune import Operator, tune
    from .autotune.space import SpaceError

    op = Operator.from_workload(k.workload)
    if op is None:
        return "# no optic template covers this kernel: it runs with the schedule above\n"
    t = targets.get(target)
    try:
        if t.kind == "cpu":
            from .backend.codegen_cpu import build

            result = tune(op, t, 0)
            config, how = result.config, ("the tuning database's best" if result.measured
                                          else "the cost model's choice (not tuned yet: optic tune / optic kernel)")
            mod = build(op, config)
        else:
            from .backend.codegen_cuda import build, model_config

            config = model_config(op, t)
            how, mod = "the cost model's choice (GPU: nothing is measured here)", build(op, config)
    except (SpaceError, OpticError) as e:
        return f"# optic's {op.op} template cannot schedule it for {t.name}: {str(e).splitlines()[0]}\n"
    cfg = " ".join(f"{n}={v}" for n, v in config.items())
    return (f"# scheduled by optic's {op.op} template for {t.name} ({op}), {how}:\n# {cfg}\n"
            + mod.script().strip("\n") + "\n")


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


class _Recorder:
    """Pipeline instrument: keeps the Program before and after every pass."""

    def __init__(self) -> None:
        self.steps: list[tuple[PassRecord, Program, Program]] = []

    def after_pass(self, record: PassRecord, before: Program, after: Program) -> None:
        self.steps.append((record, before, after))


def trace_passes(model: Any, example_inputs: Any, passes: str | list = "exact", target: Any = "cpu", *,
                 on_pass: Callable[[PassRecord], None] | None = None,
                 **optimize_kwargs: Any) -> tuple[list[PassStep], Report]:
    """Run ``optic.optimize`` and keep the Program after capture and after every pass.

    Same pipeline, checks and roll-backs as ``optimize`` (keyword arguments go to it); a pass
    that was rolled back, skipped or changed nothing leaves the Program as it was.
    """
    from .api import optimize  # the pipeline and passes load only when a dump runs them

    rec = _Recorder()
    result = optimize(model, example_inputs, target, passes, on_pass=on_pass, instruments=[rec], **optimize_kwargs)
    report = result.report
    first = rec.steps[0][1] if rec.steps else result.program  # no pass ran: the result is the capture
    steps = [PassStep(0, "capture", first, None, None)]
    for i, (record, before, after) in enumerate(rec.steps, start=1):
        steps.append(PassStep(i, record.name, after, before, record))
    return steps, report


def dump_each_pass(model: Any, example_inputs: Any, passes: str | list, out_dir: str | Path, fmt: str = "text",
                   target: Any = "cpu", *, on_pass: Callable[[PassRecord], None] | None = None,
                   **optimize_kwargs: Any) -> tuple[list[Path], Report]:
    """Write ``NNN_<step>.<ext>`` into ``out_dir`` for the capture and every pass; return the paths and report.

    DOT and SVG files mark the nodes each pass created and erased. Existing files of the same
    names are overwritten.
    """
    if fmt not in FORMATS:
        raise OpticError(f"unknown dump format '{fmt}'; choose one of {', '.join(FORMATS)}.")
    if fmt == "svg":
        dot_executable()  # fail before the work, not after it
    steps, report = trace_passes(model, example_inputs, passes, target, on_pass=on_pass, **optimize_kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for step in steps:
        path = out / f"{step.filename_stem}.{FORMATS[fmt]}"
        path.write_text(render(step.program, fmt, step.previous, title=step.title, target=target), encoding="utf-8")
        paths.append(path)
    return paths, report
