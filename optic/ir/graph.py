"""Graph helpers shared by every pass: constants, node replacement, provenance, dead code.

Passes never write loops of bookkeeping themselves; they call these. Provenance lives in
``node.meta["optic"]``: ``{"origin": [names of captured nodes], "source": "file:line", "pass": name}``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx

CONST_PREFIX = "_optic_c"
_GUARDS = (torch.fx._symbolic_trace._assert_is_none, torch._assert)


# -- constants ------------------------------------------------------------------------------
def fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def free_name(gm: fx.GraphModule, hint: str) -> str:
    """``hint_0``, ``hint_1``, ...: the first attribute name ``gm`` does not have yet."""
    i = 0
    while hasattr(gm, f"{hint}_{i}"):
        i += 1
    return f"{hint}_{i}"


def add_constant(gm: fx.GraphModule, tensor: torch.Tensor, hint: str = "w") -> str:
    """Register a new constant tensor on ``gm`` (never on a shared submodule); return its target."""
    hint = "".join(c if c.isalnum() else "_" for c in hint)[:40]
    i = len(gm.__dict__.get("_buffers", {}))
    while True:
        name = f"{CONST_PREFIX}{i}_{hint}"
        if not hasattr(gm, name):
            break
        i += 1
    gm.register_buffer(name, tensor.detach(), persistent=True)
    return name


def const_node(graph: fx.Graph, gm: fx.GraphModule, tensor: torch.Tensor, hint: str) -> fx.Node:
    """A get_attr node for a new constant, inserted at the current insertion point."""
    node = graph.get_attr(add_constant(gm, tensor, hint))
    node.meta["optic"] = {"origin": [], "source": None, "pass": "constant"}
    return node


def live_tensors(gm: fx.GraphModule) -> dict[int, torch.Tensor]:
    """The distinct tensors (by storage) the graph reads through get_attr or call_module."""
    found: dict[int, torch.Tensor] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            found.setdefault(_key(t), t)

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            add(fetch_attr(gm, node.target))
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            for t in list(mod.parameters()) + list(mod.buffers()):
                add(t)
    return found


def _key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr() ^ (t.storage_offset() << 1) ^ hash(tuple(t.shape))
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. mkldnn)
        return id(t)


def tensor_readers(gm: fx.GraphModule) -> dict[int, set[fx.Node]]:
    """For each constant tensor (by storage), the op nodes that read it: reveals tied weights."""
    readers: dict[int, set[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and isinstance(t := fetch_attr(gm, node.target), torch.Tensor):
            readers.setdefault(_key(t), set()).update(node.users)
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            for t in list(mod.parameters()) + list(mod.buffers()):
                readers.setdefault(_key(t), set()).add(node)
    return readers


def is_shared(gm: fx.GraphModule, tensor: torch.Tensor, reader: fx.Node, readers=None) -> bool:
    """True when ``tensor`` is read by an op other than ``reader`` (a tied weight)."""
    readers = tensor_readers(gm) if readers is None else readers
    return bool(readers.get(_key(tensor), set()) - {reader})


# -- provenance -------------------------------------------------------------------------------
def origins(nodes: Iterable[fx.Node]) -> list[str]:
    out: list[str] = []
    for n in nodes:
        for o in n.meta.get("optic", {}).get("origin", [n.name]):
            if o not in out:
                out.append(o)
    return out


def stamp(new: fx.Node, replaced: Iterable[fx.Node], pass_name: str) -> None:
    """Give ``new`` the provenance of the nodes it replaces."""
    replaced = list(replaced)
    source = next((r.meta.get("optic", {}).get("source") for r in replaced if r.meta.get("optic")), None)
    new.meta["optic"] = {"origin": origins(replaced), "source": source, "pass": pass_name}


def layer_name(node: fx.Node) -> str:
    """The name a user knows a node by: the module path it came from (``layer1.0.conv1``) when the
    capture recorded one, else the node's name."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        path = path[0] if isinstance(path, tuple) else path
        if path:
            return str(path).removeprefix("L['self'].").removeprefix("L__self___")
    origin = node.meta.get("optic", {}).get("origin")
    return origin[0] if origin else node.name


def init_provenance(gm: fx.GraphModule) -> None:
    """At capture: every node is its own origin; source line from the recorded stack trace."""
    for n in gm.graph.nodes:
        n.meta["optic"] = {"origin": [n.name], "source": source_line(n), "pass": "capture"}


def source_line(node: fx.Node) -> str | None:
    trace = node.meta.get("stack_trace") or getattr(node, "stack_trace", None)
    if not trace:
        return None
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    if not lines:
        return None
    # last frame is the user's line (frames are outermost first)
    parts = lines[-1].split(",")
    file = parts[0].replace("File ", "").strip().strip('"')
    line = parts[1].replace("line", "").strip() if len(parts) > 1 else "?"
    return f"{file}:{line}"


# -- rewriting --------------------------------------------------------------------------------
def replace(old: fx.Node, new: fx.Node, pass_name: str, replaced: Iterable[fx.Node] | None = None) -> None:
    """Route every use of ``old`` to ``new`` and record where ``new`` came from."""
    stamp(new, replaced if replaced is not None else [old], pass_name)
    if "tensor_meta" in old.meta and "tensor_meta" not in new.meta:
        new.meta["tensor_meta"] = old.meta["tensor_meta"]
    old.replace_all_uses_with(new)


def is_inplace(node: fx.Node) -> bool:
    """In-place ops (``x.relu_()``, ``torch.relu_``, ``operator.iadd``, ``inplace=True``) have effects."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem):
            return True
        if isinstance(node.target, torch._ops.OpOverload):
            return node.target._schema.is_mutable
        return (name.endswith("_") and not name.endswith("__")) or node.kwargs.get("inplace") is True
    return False


def is_guard(node: fx.Node) -> bool:
    """A check that protects a specialization (fx's ``_assert_is_none`` on an argument fixed to its
    default, ``torch._assert``): its value is never read, but it must stay."""
    return node.op == "call_function" and node.target in _GUARDS


def _impure(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op in ("placeholder", "output") or is_guard(node):
        return True
    if is_inplace(node):
        return True
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False)) or node.is_impure()
    return node.is_impure()


def eliminate_dead_code(gm: fx.GraphModule) -> int:
    """Remove nodes whose value nobody reads and that have no effect; return how many went."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and not _impure(node, gm):
            gm.graph.erase_node(node)
            removed += 1
    return removed


def erase_replaced(nodes: Iterable[fx.Node]) -> None:
    """Erase the nodes a rewrite replaced (in graph order) once nobody reads them: dead-code removal keeps an
    in-place op (``nn.ReLU(inplace=True)``) because it mutates its input, so the ops a kernel took over would
    otherwise still run beside it."""
    for n in reversed(list(nodes)):
        if not n.users and n.graph is not None and n.op not in ("placeholder", "output"):
            n.graph.erase_node(n)


def drop_unused_constants(gm: fx.GraphModule) -> None:
    """Forget constants and submodules nothing reads any more (only what ``gm`` itself owns)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in list(gm._buffers):
        if name.startswith(CONST_PREFIX) and name not in used:
            del gm._buffers[name]
    gm.delete_all_unused_submodules()


def is_shape_query(node: fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()``: reads the metadata of a value, not the value."""
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel")
    if node.op == "call_function":
        if node.target is getattr:
            return node.args[1] in ("shape", "dtype", "device", "ndim")
        return getattr(node.target, "__name__", "") in (
            "sym_size", "sym_size.int", "size", "dim", "_assert_tensor_metadata.default")
    return False


def value_users(node: fx.Node) -> list[fx.Node]:
    """Users that read the value of ``node`` (shape queries and metadata asserts excluded)."""
    return [u for u in node.users if not is_shape_query(u)]


def users_in_order(node: fx.Node) -> list[fx.Node]:
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(node.users, key=order.__getitem__)


def tensor_meta(node: Any):
    """Shape/dtype record of a node's value, or None (non-tensor or not annotated)."""
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tm
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val
    return None


def shape(node: Any) -> tuple[int, ...] | None:
    tm = tensor_meta(node)
    return tuple(int(s) for s in tm.shape) if tm is not None else None


def dtype(node: Any) -> torch.dtype | None:
    tm = tensor_meta(node)
    return tm.dtype if tm is not None else None


def subgraph_callable(gm: fx.GraphModule, nodes: list[fx.Node], x: fx.Node | Sequence[fx.Node]):
    """A callable ``f(value_of_x, ...)`` running ``nodes`` (in order) as they are in ``gm``; for timing a
    piece of the graph on its own. ``x``: its input node, or several (then one argument each, in order).
    Constants are shared, not copied."""
    graph = fx.Graph()
    inputs = [x] if isinstance(x, fx.Node) else list(x)
    env: dict[fx.Node, fx.Node] = {n: graph.placeholder(f"x{i}" if i else "x") for i, n in enumerate(inputs)}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op != "get_attr":
                raise ValueError(f"subgraph reads '{n.name}', which is neither its input nor a constant")
            env[n] = graph.node_copy(n)
        return env[n]

    for n in nodes:
        env[n] = graph.node_copy(n, lookup)
    graph.output(env[nodes[-1]])
    return fx.GraphModule(gm, graph)
