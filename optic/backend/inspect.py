"""What the backend makes of a graph, for reading: the Program lowered to TVM, and a fused kernel scheduled by
optic's template. ``optic dump --format tvmscript`` prints these views with :func:`optic.dump.render_tvmscript`.

Nothing here changes the Program or measures anything: a kernel's schedule is the tuning database's best
configuration, else the cost model's choice. Needs TVM (``optic[tvm]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import OpticError
from ..ir.program import Program
from .kernels import Kernel
from .lower import Lowered, lower


@dataclass
class TVMView:
    """A Program as TVM sees it: the lowered module and, when one was asked for, one fused kernel with the
    schedule optic's template gives it."""

    lowered: Lowered
    kernel: Kernel | None = None
    schedule: str | None = None  # the kernel scheduled by optic's template, as TVMScript, or why it is not
    program: str | None = None  # the whole program of optic's kernels (a CPU target), or why it is not built


def tvm_view(program: Program, target: Any = "cpu", kernel: str | None = None) -> TVMView:
    """``program`` lowered for ``target``; with ``kernel`` (a fused kernel's name), that kernel and its schedule;
    without, for a CPU target, also the whole program of optic's kernels the CPU step would offer
    (:func:`.tvm_graph.program_script`)."""
    from .. import targets

    lowered = lower(program, target)
    if kernel is None:
        whole = None
        if targets.get(target).kind == "cpu":
            from .tvm_graph import program_script

            whole = program_script(program)
        return TVMView(lowered, program=whole)
    k = lowered.kernel(kernel)
    return TVMView(lowered, k, scheduled_kernel(k, target))


def scheduled_kernel(k: Kernel, target: Any = "cpu") -> str:
    """The kernel scheduled by optic's template for ``target``: the tuning database's best configuration
    (else the cost model's choice; nothing is measured), as TVMScript; or why there is none."""
    from .. import targets
    from ..autotune import Operator, tune
    from ..autotune.space import SpaceError

    op = Operator.from_workload(k.workload)
    if op is None:
        return "# no optic template covers this kernel: it runs with the schedule above\n"
    t = targets.get(target)
    try:
        if t.kind == "cpu":
            from .codegen_cpu import build

            result = tune(op, t, 0)
            config, how = result.config, ("the tuning database's best" if result.measured
                                          else "the cost model's choice (not tuned yet: optic tune / optic kernel)")
            mod = build(op, config)
        else:
            from .codegen_cuda import build, model_config

            config = model_config(op, t)
            how, mod = "the cost model's choice (GPU: nothing is measured here)", build(op, config)
    except (SpaceError, OpticError) as e:
        return f"# optic's {op.op} template cannot schedule it for {t.name}: {str(e).splitlines()[0]}\n"
    cfg = " ".join(f"{n}={v}" for n, v in config.items())
    return (f"# scheduled by optic's {op.op} template for {t.name} ({op}), {how}:\n# {cfg}\n"
            + mod.script().strip("\n") + "\n")
