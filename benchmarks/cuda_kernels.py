"""Every fused kernel of a BERT-style model as CUDA for A100 and H100, compiled with nvcc, checked by ptxas.

The model is the zoo's ``hf_bert`` (Hugging Face BertModel from a small config, random weights, eager
attention, sequence 32, batch 1). ``optic.lower(program, target)`` gives the fused kernels (fusion is
target-independent; lowering builds and checks on this CPU). For every kernel:

- a template covers it (``Workload.template_args``) and its space has valid configurations: the cost
  model's best configuration is scheduled by ``backend.codegen_cuda`` (matmul and reductions from the
  ``Operator``; an elementwise kernel is its own fused TIR scheduled with the template's variables);
- otherwise TVM's generic GPU rules (dlight) schedule the kernel's TIR, so it still compiles.

Each is compiled with ``nvcc -cubin -arch=sm_XX -Xptxas -v`` and ptxas's registers and shared memory
(static + TVM's dynamic) are compared with the limits the template's constraints used (the target's
for a dlight kernel). Results go to ``benchmarks/results/cuda_kernels.{json,md}``.

    OMP_NUM_THREADS=1 python -m benchmarks.cuda_kernels [--targets a100 h100]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import optic
from optic import autotune
from optic.autotune import cost_model
from optic.backend import codegen_cuda as cc

from .zoo import registry

ROOT = Path(__file__).resolve().parent.parent
MODEL = "hf_bert"


def _template_kernel(kernel: Any, target: str) -> tuple[cc.CompiledKernel, str, str] | None:
    """The kernel compiled from its template's best configuration, with a description of the schedule
    and a note; None when no template covers it or its space is empty."""
    op = autotune.Operator.from_workload(kernel.workload)
    if op is None or op.op not in cc.BUILDERS:
        return None
    space = cc.gpu_space(op, target)
    solved = autotune.solve(space)
    if not solved.rows:
        return None
    order, _ = cost_model.rank(space, solved.names, solved.rows, target)
    cfg = solved.configs[int(order[0])]
    note = ""
    if op.op == "elementwise":
        # The Operator would compute its own fn; the kernel's TIR (a reshape, a cast) is what runs.
        start = time.perf_counter()
        mod = cc.schedule_injective(kernel.func.with_attr("global_symbol", "main"), cfg)
        expected = {"threads": float(cfg["THREADS"]),
                    "regs_per_thread": float(space.evaluate(space.derived["regs_per_thread"], cfg))}
        result = cc.compile_module(mod, target, name=kernel.name, config=cfg, expected=expected)
        result.codegen_seconds += time.perf_counter() - start
        if result.compiled and result.threads != cfg["THREADS"]:
            result.violations.append(f"threads per block {result.threads} != THREADS={cfg['THREADS']}")
    else:
        result = cc.compile_cuda(op, cfg, target)
        if op.op == "reduction" and op.opts["kind"] == "layernorm" and len(kernel.workload.inputs) > 1:
            note = "compiled as the Operator's layer norm, without the affine weight and bias"
    return result, f"template {space.name.split('[')[0]} ({solved.valid:,} valid)", note


def _default_kernel(kernel: Any, target: str, why: str) -> tuple[cc.CompiledKernel, str, str]:
    start = time.perf_counter()
    mod, rule = cc.default_schedule(kernel.func, target)
    result = cc.compile_module(mod, target, name=kernel.name)
    result.codegen_seconds += time.perf_counter() - start
    return result, f"dlight {rule}", why


def _why_no_template(kernel: Any, target: str) -> str:
    spec = kernel.workload.template_args()
    if spec is None:
        return "no template covers this workload"
    op = autotune.Operator.from_workload(kernel.workload)
    if op is None:
        return f"the {spec[0]} template does not take it ({spec[2].get('dtype')})"
    if op.op not in cc.BUILDERS:
        return f"no CUDA code generator for {op.op}"
    return f"the {op.op} template has no valid configuration for {op} on {target}"


def run(targets: list[str]) -> dict[str, Any]:
    entry = registry.ENTRIES[MODEL]
    model, inputs = entry.factory(), entry.inputs(1)
    program = optic.capture(model, inputs, method="export")
    rows, summary = [], {}
    for target in targets:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lowered = optic.lower(program, target)
        lower_s = time.perf_counter() - start
        t_rows = []
        for kernel in lowered.kernels:
            try:
                done = _template_kernel(kernel, target)
            except optic.errors.OpticError as e:  # a template's build that failed: still compile the kernel
                done = None
                why = f"template build failed: {e}"
            else:
                why = _why_no_template(kernel, target) if done is None else ""
            result, schedule, note = done or _default_kernel(kernel, target, why)
            row = {"target": target, "kernel": kernel.name, "calls": kernel.calls, "workload": str(kernel.workload),
                   "schedule": schedule, "note": note, **result.as_dict()}
            row.pop("name")
            t_rows.append(row)
            print(_line(row), flush=True)
        rows += t_rows
        compiled = [r for r in t_rows if r["compiled"]]
        summary[target] = {
            "kernels": len(t_rows), "compiled": len(compiled),
            "within_limits": sum(1 for r in t_rows if r["within_limits"]),
            "from_template": sum(1 for r in t_rows if r["schedule"].startswith("template")),
            "max_registers": max((r["registers"] for r in compiled), default=0),
            "max_smem": max((r["smem"] for r in compiled), default=0),
            "limits": t_rows[0]["limits"] if t_rows else {},
            "lower_seconds": round(lower_s, 2),
            "codegen_seconds": round(sum(r["codegen_seconds"] for r in t_rows), 2),
            "nvcc_seconds": round(sum(r["nvcc_seconds"] for r in t_rows), 2),
        }
    return {"model": MODEL, "nvcc": cc.nvcc_version(), "summary": summary, "rows": rows}


def _line(r: dict[str, Any]) -> str:
    verdict = {True: "OK", False: "FAIL", None: "not compiled"}[r["within_limits"]]
    lim = r["limits"]
    return (f"{r['target']:5} {r['kernel']:60.60} {r['schedule']:34.34} regs {r['registers']:3}/{lim['regs_per_thread']}"
            f"  smem {r['smem']:6}/{lim['smem_per_block']}  threads {r['threads']:4}  {verdict}"
            + (f"  ({r['reason']})" if r["reason"] else ""))


def _config(cfg: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items()) or "-"


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# CUDA kernels of `{result['model']}` (BERT-style, sequence 32): nvcc and ptxas", "",
             f"nvcc: {result['nvcc'] or 'not installed'}. Registers and shared memory are ptxas's "
             "(`-Xptxas -v`; shared memory = static + the dynamic bytes TVM declares); the limits are the "
             "ones the templates' constraints use (the target's per-thread registers, shared memory per "
             "block, threads per block; and registers x threads <= registers per SM).", "",
             "| target | kernels | compiled | within limits | from a template | max registers | max smem (B) "
             "| lower (s) | TVM codegen (s) | nvcc (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for target, s in result["summary"].items():
        lim = s["limits"]
        lines.append(f"| {target} | {s['kernels']} | {s['compiled']} | {s['within_limits']} | {s['from_template']} "
                     f"| {s['max_registers']} / {lim.get('regs_per_thread')} | {s['max_smem']} / "
                     f"{lim.get('smem_per_block')} | {s['lower_seconds']} | {s['codegen_seconds']} | "
                     f"{s['nvcc_seconds']} |")
    lines += ["", "| target | kernel | calls | workload | schedule | configuration | registers (template's estimate) "
              "| spills (B) | smem B (template's) | threads | verdict | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        exp = r["expected"]
        regs = f"{r['registers']}" + (f" ({exp['regs_per_thread']:g})" if "regs_per_thread" in exp else "")
        smem = f"{r['smem']}" + (f" ({exp['smem_bytes']:g})" if "smem_bytes" in exp else "")
        verdict = {True: "OK", False: "FAIL: " + "; ".join(r["violations"]), None: r["reason"]}[r["within_limits"]]
        note = "; ".join(x for x in [r["note"], *r["notes"]] if x)
        lines.append(f"| {r['target']} | `{r['kernel']}` | {r['calls']} | {r['workload']} | {r['schedule']} | "
                     f"{_config(r['config'])} | {regs} | {r['spills']} | {smem} | {r['threads']} | {verdict} | "
                     f"{note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["a100", "h100"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    logging.getLogger("optic").setLevel(logging.WARNING)
    result = run(args.targets)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_kernels.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / "cuda_kernels.md").write_text(markdown(result))
    for target, s in result["summary"].items():
        print(f"{target}: {s['kernels']} kernels, {s['compiled']} compiled, {s['within_limits']} within limits, "
              f"{s['from_template']} from a template; max registers {s['max_registers']}, max smem {s['max_smem']} B; "
              f"nvcc {s['nvcc_seconds']} s")


if __name__ == "__main__":
    main()
