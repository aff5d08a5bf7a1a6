"""The ``optic`` command line: dump graphs, optimize a model, list targets and passes.

    optic dump examples/resnet_bn.py:build                         # the captured graph, as fx source
    optic dump examples/resnet_bn.py:build --after fold_norm --format dot -o g.dot
    optic dump examples/resnet_bn.py:build --each-pass --format dot -o dumps/
    optic optimize examples/resnet_bn.py:build --target cpu [--json] [-o resnet.pt2]
    optic targets [--json]
    optic passes [--json]
    optic bench [--models resnet18,hf_bert] [--systems eager,optic,compile] [--batch 1,8]   # in a checkout:
                                                                    # python -m benchmarks
    optic kernel matmul 512x512x512 --target cpu --trials 32 [--json] [--db PATH]   # tune one operator
    optic db [--db PATH] [--json]                                   # what the tuning database holds

MODEL is ``path/to/file.py:factory`` (a function or nn.Module class called with no arguments) or
``package.module:attr``; example inputs come from ``example_inputs`` beside it or from
``--input-shape``. Errors optic expects (bad model reference, unknown target, capture failures, an
output path that cannot be written) print one message on stderr and exit with status 2; output
paths are checked before any work. ``-o`` overwrites an existing file, and a folder only when it
holds an earlier artifact (``--backend tvm`` on a GPU target).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .errors import OpticError
from .progress import CommandProgress

EXIT_ERROR = 2
COMMANDS = "optic.commands"  # entry point group: commands other distributions add (optic bench looks there)
PROGRESS_HELP = ("progress lines on stderr where it is not a terminal (on a terminal: bars; OPTIC_PROGRESS=0 or 1 "
                 "turns them off or on)")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark parses its own arguments
        return _run(cmd_bench, argv[1:])
    return run_command(build_parser(), argv, lambda args: args.func(args))


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None, command: Any, prog: str = "optic") -> int:
    """Parse ``argv`` with ``parser``, set logging from ``-v``, run ``command(args)``; the exit status. A usage
    error is argparse's message and its status; an error optic expects is one line on stderr and status 2.
    (``python -m benchmarks`` runs through here too.)"""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already printed
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    logging.basicConfig(level={0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG),
                        format="%(name)s: %(levelname)s: %(message)s", stream=sys.stderr)
    return _run(command, args, prog)


def _run(command: Any, args: Any, prog: str = "optic") -> int:
    """``command(args)``'s exit status; an error optic expects is one line on stderr and status 2."""
    try:
        return command(args)
    except OpticError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `optic dump ... | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optic", description="A compiler-style graph optimizer for PyTorch models.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="MODEL: path/to/file.py:factory or package.module:attr "
                                            "(e.g. examples/resnet_bn.py:build)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dump = sub.add_parser("dump", help="print the captured graph, or the graph after a pass or after every pass",
                          description="Print the captured graph (or the graph after --after PASS), or write one "
                                      "file per pass with --each-pass -o DIR (NNN_<pass>.<ext>; DOT/SVG files "
                                      "mark the nodes each pass created and erased).")
    _model_args(dump)
    dump.add_argument("--format", choices=("text", "json", "dot", "svg", "tvmscript"),
                      help="text: fx source (default); json; dot: Graphviz; svg: drawn with Graphviz; "
                           "tvmscript: lowered to TVM Relax (needs optic[tvm]) "
                           "(default: from the -o extension, else text)")
    dump.add_argument("--kernel", metavar="NAME", help="with --format tvmscript: one fused TIR kernel")
    when = dump.add_mutually_exclusive_group()
    when.add_argument("--after", metavar="PASS",
                      help="the graph after this pass: a name (its first run) or a step number as in "
                           "--each-pass file names (1 = first pass)")
    when.add_argument("--each-pass", action="store_true", help="write one file per pass into -o DIR")
    _pipeline_args(dump)
    dump.add_argument("-o", "--output", metavar="PATH", help="file to write (a directory with --each-pass)")
    dump.set_defaults(func=cmd_dump)

    opt = sub.add_parser("optimize", help="optimize a model for a target and print the report",
                         description="Optimize MODEL for --target and print the report. With -o, save the "
                                     "optimized model with torch.export (load it with torch.export.load(path)"
                                     ".module()).")
    _model_args(opt)
    _pipeline_args(opt)
    opt.add_argument("--tolerance", type=float, metavar="T",
                     help="max error relative to the output scale (default by dtype; fp32: 1e-4)")
    opt.add_argument("--json", action="store_true", help="print the report as JSON")
    opt.add_argument("-o", "--output", metavar="OUT.pt2", help="save the optimized model (torch.export.save; with "
                     "--backend tvm and a GPU target: the artifact directory, e.g. model.artifact)")
    opt.add_argument("--budget", type=float, metavar="DROP",
                     help="let lossy passes (low-rank, pruning, 2:4, early exit) lose at most DROP of the metric "
                          "on held-out calibration data, e.g. 0.01 for 1%%; implies --passes default")
    opt.add_argument("--metric", default="auto", choices=("auto", "top1", "agreement", "rel_error"),
                     help="what the budget measures (default: top1 for classifiers, else relative error)")
    opt.add_argument("--calibration", metavar="FILE.py:ATTR",
                     help="calibration batches (default: the 'calibration' function beside the model's factory)")
    opt.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", type=_option_arg,
                     help="a pass option, e.g. --option lowrank_method=svd (repeatable; `optic passes` lists them)")
    _backend_args(opt)
    opt.set_defaults(func=cmd_optimize)

    tune = sub.add_parser("tune", help="tune the generated kernels of a model (backend tvm) and print what was chosen",
                          description="Tune every dense conv/linear kernel of MODEL (with its fused bias, "
                                      "activation and residual add) on this CPU, keep the results in the tuning "
                                      "database, and print per kernel the configuration, the measured times of the "
                                      "generated kernel and of PyTorch's, and which one the model runs. A second "
                                      "run measures nothing the database already holds.")
    _model_args(tune)
    tune.add_argument("--target", default="cpu", help="only cpu, this machine (default)")
    tune.add_argument("--trials", default="32", metavar="N",
                      help="measurements per kernel, or an effort level none|fast|full (default: %(default)s)")
    tune.add_argument("--passes", default="exact", help="passes that run before (default: exact)")
    tune.add_argument("--db", metavar="PATH", help="tuning database (default: $OPTIC_TUNING_DB, else "
                                                   "~/.cache/optic/tuning.db)")
    tune.add_argument("--json", action="store_true", help="print the kernel table as JSON")
    tune.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    tune.set_defaults(func=cmd_tune)

    tg = sub.add_parser("targets", help="list hardware targets and their key figures")
    tg.add_argument("--json", action="store_true", help="every figure of every target, as JSON")
    tg.set_defaults(func=cmd_targets)

    ps = sub.add_parser("passes", help="list registered passes and presets")
    ps.add_argument("--json", action="store_true", help="as JSON")
    ps.set_defaults(func=cmd_passes)

    # the benchmark parses its own arguments (main() hands them over before this parser sees them); listed
    # here for `optic --help`
    bench = sub.add_parser("bench", add_help=False,
                           help="time optic against eager, torch.compile, ONNX Runtime and TVM on the zoo "
                                "(from a checkout; optic bench --help)")
    bench.add_argument("arguments", nargs=argparse.REMAINDER)
    bench.set_defaults(func=lambda args: cmd_bench(args.arguments))

    kern = sub.add_parser("kernel", help="tune one operator on its own and print the chosen configuration",
                          description="Tune one operator (a template's kernel) for --target: solve the template's "
                                      "space, rank it with the cost model, build, check and time the --trials best "
                                      "candidates, and keep every result in the tuning database (a second run "
                                      "measures nothing). On a GPU target the cost model's choice is printed, "
                                      "unmeasured. SHAPE: matmul MxNxK[,b_layout=nk]; conv2d "
                                      "NxCxHxW,OxCxKHxKW[,stride=S][,pad=P][,dilation=D][,layout=NCHW]; "
                                      "elementwise NUMEL[,inputs=2][,fn=add]; reduction ROWSxCOLS[,kind=layernorm]; "
                                      "any of them [,epilogue=bias+relu] where the template has one.")
    kern.add_argument("op", metavar="OP", choices=("matmul", "conv2d", "elementwise", "reduction"),
                      help="matmul, conv2d, elementwise or reduction")
    kern.add_argument("shape", metavar="SHAPE", help="sizes and options, e.g. 512x512x512 or 1x64x56x56,64x64x3x3,pad=1")
    # "-4x4x4" is a SHAPE with a bad size, not an unknown option: the operator's parser then says
    # what is wrong with it (argparse alone would report SHAPE as missing).
    kern._negative_number_matcher = re.compile(r"^-\d")
    kern.add_argument("--target", default="cpu", help="target name (default: cpu, this machine)")
    kern.add_argument("--trials", type=int, default=32, metavar="N", help="candidates to measure (default: %(default)s)")
    kern.add_argument("--json", action="store_true", help="print one JSON object")
    kern.add_argument("--db", metavar="PATH", help="tuning database (default: $OPTIC_TUNING_DB, else "
                                                   "~/.cache/optic/tuning.db)")
    kern.add_argument("--threads", type=int, metavar="N",
                      help="threads for the kernel and for PyTorch's baseline (default: the target's cores)")
    kern.add_argument("--timeout", type=float, default=60.0, metavar="S",
                      help="seconds per candidate (build, check, time) before it counts as failed "
                           "(default: %(default)s)")
    kern.add_argument("--rpc", metavar="HOST:PORT:KEY", help="measure on a device of this TVM RPC tracker")
    kern.add_argument("--no-baseline", action="store_true",
                      help="do not time PyTorch's call for the same operator against the chosen kernel")
    kern.add_argument("--progress", action="store_true", help=PROGRESS_HELP + "; a line per measurement")
    kern.set_defaults(func=cmd_kernel)

    tdb = sub.add_parser("db", help="show what the tuning database holds",
                         description="List the workloads of the tuning database: operator, target, records (by "
                                     "status), the best configuration and its time, and the toolchain.")
    tdb.add_argument("--db", metavar="PATH", help="tuning database (default: $OPTIC_TUNING_DB, else "
                                                  "~/.cache/optic/tuning.db)")
    tdb.add_argument("--json", action="store_true", help="as JSON")
    tdb.set_defaults(func=cmd_db)

    for p in (dump, opt, tune, tg, ps, kern, tdb):
        p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="path/to/file.py:factory or package.module:attr")
    p.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="an example input: sizes, optional dtype (1,3,224,224 or 1,128:int64); repeat per "
                        "input; replaces the module's example_inputs")
    p.add_argument("--weights", metavar="FILE", help="a state dict to load (torch.load with weights_only=True)")
    p.add_argument("--capture", choices=("auto", "fx", "export"), default="auto",
                   help="capture path (default: auto, fx then export)")


def _backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("torch", "tvm"), default="torch",
                   help="torch: PyTorch's kernels; tvm: also generated kernels, kept where measured faster "
                        "(default: %(default)s)")
    p.add_argument("--tune", default="fast", metavar="LEVEL",
                   help="with --backend tvm: none|fast|full or measurements per kernel (default: %(default)s)")
    p.add_argument("--db", metavar="PATH", help="tuning database (default: $OPTIC_TUNING_DB, else "
                                                "~/.cache/optic/tuning.db)")


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="cpu", help="target name (see `optic targets`; default: cpu, this machine)")
    p.add_argument("--passes", default="exact", help="a preset or comma-separated pass names (default: exact)")
    p.add_argument("--disable", metavar="A,B", help="pass names to switch off")
    p.add_argument("--no-measure", action="store_true",
                   help="never time candidates on this machine (deterministic; the cost model decides)")
    p.add_argument("--progress", action="store_true", help=PROGRESS_HELP)


# -- commands -------------------------------------------------------------------------------------------
def cmd_dump(args: argparse.Namespace) -> int:
    from . import dump
    from .ir.capture import capture
    from .pipeline import registry

    fmt = args.format or _format_from_path(args.output) or "text"
    if args.each_pass and not args.output:
        raise OpticError("--each-pass writes one file per pass: give a directory with -o DIR.")
    if args.kernel is not None and (fmt != "tvmscript" or args.each_pass):
        raise OpticError("--kernel NAME shows one fused kernel of the lowered graph: it goes with --format "
                         "tvmscript, without --each-pass (kernel names differ from pass to pass).")
    if args.output:
        _check_output(args.output, folder=args.each_pass)
    if fmt == "svg":
        dump.dot_executable()  # fail before any work
    _check_target(args)
    pass_list = registry.resolve(args.passes)
    upto = _pass_position(pass_list, args.after) if args.after else None
    progress = CommandProgress(args)
    model, inputs = _load(args, progress)

    def render(step: dump.PassStep) -> str:
        view = None
        if fmt == "tvmscript":
            from .backend.inspect import tvm_view  # TVM loads only when this format is asked for

            view = tvm_view(step.program, args.target, args.kernel)
        return dump.render(step.program, fmt, step.previous, title=step.title, tvm=view)

    if args.each_pass:
        progress.line(f"running {len(pass_list)} passes, writing {fmt} files to {args.output}")
        paths = dump.write_steps(_trace_passes(model, inputs, pass_list, args, progress), args.output, fmt, render)
        print("\n".join(str(p) for p in paths))
        return 0
    if upto is not None:
        step = _trace_passes(model, inputs, pass_list[:upto], args, progress)[-1]
    else:
        step = dump.PassStep(0, "capture", capture(model, inputs, method=args.capture), None, None)
    _emit(render(step), args.output, progress)
    return 0


def _trace_passes(model: Any, inputs: Any, pass_list: list[Any], args: argparse.Namespace,
                  progress: CommandProgress) -> list[Any]:
    """Optimize with ``pass_list`` (the same pipeline, checks and roll-backs as ``optic optimize``) and keep
    the Program after the capture and after every pass (:class:`optic.dump.PassStep`)."""
    from .api import optimize
    from .dump import Recorder

    recorder = Recorder()
    result = optimize(model, inputs, args.target, pass_list, capture=args.capture, disable=args.disable,
                      measure=False if args.no_measure else None, on_pass=progress.pass_done,
                      instruments=[recorder])
    return recorder.steps(captured=result.program)


def cmd_optimize(args: argparse.Namespace) -> int:
    from . import targets
    from .api import optimize

    _check_target(args)
    if args.output:  # with --backend tvm, a GPU target saves an artifact directory (which may exist)
        _check_output(args.output, folder=None if args.backend == "tvm" and targets.get(args.target).kind == "gpu"
                      else False)
    progress = CommandProgress(args)
    model, inputs = _load(args, progress)
    budget, data, passes = None, None, args.passes
    if args.budget is not None:
        from .budget.calibration import Budget
        from .modelref import CALIBRATION_ATTR, load_calibration

        budget = Budget(max_drop=args.budget, metric=args.metric)
        data = load_calibration(args.model, args.calibration)
        if not isinstance(data, Iterable):  # checked here, where the option can be named, before the work
            where = (f"--calibration {args.calibration}" if args.calibration
                     else f"{args.model.rpartition(':')[0]}:{CALIBRATION_ATTR}")
            got = "None" if data is None else f"a value of type {type(data).__name__}"
            raise OpticError(f"{where} gave {got}, not an iterable of batches: give a list, generator or DataLoader of "
                             "inputs shaped like example_inputs (optionally (inputs, labels) pairs), or a function "
                             "that returns one.")
        passes = "default" if passes == "exact" else passes
    progress.line(f"optimizing {args.model} for {args.target}")
    result = optimize(model, inputs, args.target, passes, tolerance=args.tolerance, disable=args.disable,
                      capture=args.capture, measure=False if args.no_measure else None,
                      on_pass=progress.pass_done, budget=budget, calibration=data, progress=progress.work,
                      backend=args.backend, tune=args.tune, tuning_db=args.db, options=dict(args.option))
    progress.close()
    print(result.report.to_json() if args.json else result.report.table())
    if args.output and getattr(result, "artifact", None) is not None:
        path = result.artifact.save(args.output)
        print(f"optic: saved the {args.target} artifact to {path} (load it with optic.load_artifact({str(path)!r}); "
              "its CUDA kernels run where a CUDA device and a CUDA-enabled TVM runtime are present)", file=sys.stderr)
    elif args.output:
        _save(result, inputs, args.output)
        print(f"optic: saved the optimized model to {args.output} (load it with "
              f"torch.export.load({str(args.output)!r}).module())", file=sys.stderr)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .api import optimize

    _check_target(args)
    progress = CommandProgress(args, on=not args.quiet)
    model, inputs = _load(args, progress)
    progress.line(f"tuning the kernels of {args.model} on {args.target} ({args.trials} per kernel)")
    result = optimize(model, inputs, args.target, args.passes, capture=args.capture, on_pass=progress.pass_done,
                      progress=progress.work, backend="tvm", tune=args.trials, tuning_db=args.db)
    progress.close()
    rec = next((r for r in result.report.passes if r.name == "tvm_kernels"), None)
    kernels = (rec.measured.get("kernels") if rec else None) or []
    if args.json:
        print(json.dumps({"kernels": kernels, "tuning_measurements": rec.measured.get("tuning_measurements") if rec
                          else 0, "tuning_s": rec.measured.get("tuning_s") if rec else 0,
                          "latency_s": result.report.measured_latency_s}, indent=2, default=str))
        return 0
    if rec is None or not kernels:
        why = "; ".join(sorted({d["reason"] for d in rec.declined})) if rec else "the pass did not run"
        print(f"optic: no kernel to tune in {args.model} ({why or 'no dense conv/linear layer'})")
        return 0
    print(f"{'kernel':<58} {'layers':>6}  {'tuning':<22} {'generated ms':>12} {'PyTorch ms':>10}  runs")
    for k in kernels:
        times = k.get("times_ms") or {}
        vendor = min((v for n, v in times.items() if n != "tvm"), default=None)
        print(f"{k['operator'][:58]:<58} {len(k['layers']):>6}  {k['tuned'][:22]:<22} "
              f"{_ms(times.get('tvm')):>12} {_ms(vendor):>10}  {k['chosen']}")
    print(f"\n{rec.measured.get('tuning_measurements', 0)} measurement(s) in {rec.measured.get('tuning_s', 0)} s; "
          f"database {args.db or 'default'}")
    if result.report.measured_latency_s:
        print("whole model: " + result.report.measured_line())
    return 0


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def cmd_targets(args: argparse.Namespace) -> int:
    from . import targets

    rows = [targets.get(n) for n in targets.names()]
    if args.json:
        print(json.dumps([_plain(dataclasses.asdict(t)) for t in rows], indent=2))
        return 0
    head = ("target", "kind", "SMs/cores", "fp32 TFLOP/s", "fp16 TFLOP/s", "GB/s", "smem/block", "L2")
    table = [head] + [(t.name, t.kind, _num(t.sm_count if t.kind == "gpu" else t.cores),
                       _num(t.peak_fp32_flops, 1e12, 1), _num(t.peak_fp16_flops, 1e12, 1),
                       _num(t.mem_bandwidth, 1e9, 0), _bytes(t.smem_per_block), _bytes(t.l2_bytes)) for t in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for k, r in enumerate(table):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print("\nfp16: dense tensor-core rate on GPUs. L2: whole chip on GPUs, per core on CPUs. "
          "cpu is this machine, detected (`optic targets --json` shows how).")
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from .pipeline import registry

    rows = [registry.get(n) for n in registry.names()]

    def option_json(o: registry.Option) -> dict:
        default = o.default if isinstance(o.default, (str, int, float, bool, type(None))) else list(o.default)
        return {"name": o.name, "type": [t.__name__ for t in o.types], "default": default, "help": o.help,
                "choices": None if o.choices is None else list(o.choices)}

    if args.json:
        print(json.dumps({"passes": [{"name": p.name, "exact": bool(p.exact), "description": p.description,
                                      "options": [option_json(o) for o in p.options]} for p in rows],
                          "pipeline_options": [option_json(o) for o in registry.PIPELINE_OPTIONS],
                          "presets": registry.PRESETS,
                          "backend_steps": {b: [dataclasses.asdict(s) for s in steps]
                                            for b, steps in registry.BACKEND_STEPS.items()}}, indent=2))
        return 0
    width = max(len(p.name) for p in rows) if rows else 4
    print(f"{'pass'.ljust(width)}  {'exact':<5}  description")
    for p in rows:
        print(f"{p.name.ljust(width)}  {'yes' if p.exact else 'no':<5}  {p.description}")
        for o in p.options:
            print(f"{''.ljust(width)}         {_option_line(o)}")
    print("\npipeline options:")
    for o in registry.PIPELINE_OPTIONS:
        print(f"  {_option_line(o)}")
    print("\npresets (--passes):")
    for name, names in registry.PRESETS.items():
        print(f"  {name}: {' → '.join(names) if names else '(no passes)'}")
    print("\nbackend steps (--backend; added to any pass list):")
    for backend, steps in registry.BACKEND_STEPS.items():
        where = [f"{s.name} before {' else before '.join(s.before)}, else last ({'/'.join(s.kinds)} targets)"
                 for s in steps]
        print(f"  {backend}: {'; '.join(where) or '(none)'}")
    return 0


def _option_arg(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` -> (name, value): the value read as a Python literal (3, 0.5, True, (0.25, 0.5)),
    else kept as the string."""
    import ast

    name, eq, value = text.partition("=")
    if not eq or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=VALUE, e.g. lowrank_method=svd")
    try:
        return name.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return name.strip(), value.strip()


def _option_line(o) -> str:
    return f"{o.name} ({'|'.join(t.__name__ for t in o.types)}, default {o.default!r}): {o.help}"


def cmd_kernel(args: argparse.Namespace) -> int:
    from . import targets
    from .autotune.measure import EvaluatorConfig, parse_rpc
    from .autotune.operator import Operator
    from .autotune.tune import tune

    _check_target(args)
    try:
        operator = Operator.parse(args.op, args.shape)
    except OpticError as e:
        raise OpticError(str(e) if "SHAPE" in str(e) else f"SHAPE '{args.shape}': {e}") from None
    target = targets.get(args.target)
    progress = CommandProgress(args)

    def on_measured(done: int, total: int, best: float, last: Any) -> None:
        if progress.bars is not None:
            progress.work(f"best {best * 1e3:.3f} ms; measured", done, total)
            return
        what = f"{last.seconds * 1e3:.3f} ms" if last.ok else f"{last.status}: {last.error.splitlines()[0] if last.error else ''}"
        progress.line(f"{done}/{total} {last.config}: {what} (best {best * 1e3:.3f} ms)")

    progress.line(f"tuning {operator} on {target.name}")
    threads = args.threads or (target.cores if target.kind == "cpu" else None)
    result = tune(operator, target, args.trials, db=args.db, rpc=parse_rpc(args.rpc) if args.rpc else None,
                  evaluator=EvaluatorConfig(timeout_s=args.timeout), threads=threads,
                  baseline=not args.no_baseline, progress=on_measured)
    progress.close()
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.summary())
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from .autotune.db import TuningDB, default_path

    path = Path(args.db).expanduser() if args.db else default_path()
    if not path.exists():  # showing is not creating
        print(json.dumps({"db": str(path), "workloads": []}) if args.json else f"{path}: no tuning database yet")
        return 0
    with TuningDB(path) as db:
        rows = db.summary()
        path = db.path
    if args.json:
        print(json.dumps({"db": str(path), "workloads": rows}, indent=2))
        return 0
    print(f"{path}: {len(rows)} workload(s), {sum(r['records'] for r in rows)} record(s)")
    for r in rows:
        tc = r["toolchain"]
        status = ", ".join(f"{n} {k}" for k, n in sorted(r["by_status"].items()))
        best = (f"best {r['best_seconds'] * 1e3:.3f} ms ({r['best_gflops']:.1f} GFLOP/s) "
                + " ".join(f"{k}={v}" for k, v in r["best_config"].items()) if r["best_config"] else "no correct record")
        print(f"  {r['key'][:12]}  {r['description']} on {r['target']}: {r['records']} record(s) ({status or 'none'})")
        print(f"                {best}")
        print(f"                tvm {tc.get('tvm')}, llvm {tc.get('llvm')}, torch {tc.get('torch')}, "
              f"codegen {tc.get('codegen')}")
    return 0


def cmd_bench(argv: list[str]) -> int:
    """``optic bench ARGS``: the benchmark of the optic repository, ``python -m benchmarks ARGS``.

    ``benchmarks/`` is a folder of the checkout, not installed with optic, and optic imports nothing of it: a
    distribution that registers ``bench`` in the entry point group ``optic.commands`` runs in this process;
    else ``python -m benchmarks`` runs in the current directory when it is the checkout optic is installed
    from (``pip install -e '.[bench]'``)."""
    registered = entry_points(group=COMMANDS, name="bench")
    if registered:
        return int(next(iter(registered)).load()(argv) or 0)
    here = Path.cwd()
    if not (here / "benchmarks" / "__main__.py").is_file():
        raise OpticError("optic bench runs the benchmarks of a checkout of the optic repository (benchmarks/ is not "
                         "installed with optic): in the checkout, pip install -e '.[bench]', then run optic bench "
                         "(or python -m benchmarks) there.")
    installed = Path(__file__).resolve().parents[1]
    if installed != here.resolve():
        raise OpticError(f"optic bench runs the benchmarks of the checkout this optic is installed from "
                         f"({installed}), not of {here}: run it there, or install this checkout with "
                         "pip install -e '.[bench]'.")
    status = subprocess.call([sys.executable, "-m", "benchmarks", *argv], cwd=here)
    return status if status >= 0 else 128 - status  # killed by a signal: as a shell reports it


# -- helpers ----------------------------------------------------------------------------------------------
def _load(args: argparse.Namespace, progress: CommandProgress) -> tuple[Any, Any]:
    from .modelref import load

    progress.line(f"loading {args.model}")
    return load(args.model, args.input_shape, args.weights)


def _check_target(args: argparse.Namespace) -> None:
    from . import targets

    targets.get(args.target)  # UnknownTargetError names the known targets


def _pass_position(pass_list: list[Any], spec: str) -> int:
    """How many passes to run so that the last one is ``spec`` (a name or a 1-based step number)."""
    names = [p.name for p in pass_list]
    if spec.isdigit():
        if 1 <= int(spec) <= len(names):
            return int(spec)
        raise OpticError(f"--after {spec}: the pipeline has passes 1..{len(names)}: {_numbered(names)}.")
    if spec not in names:
        raise OpticError(f"--after {spec}: no such pass in the pipeline ({_numbered(names) or 'no passes'}); "
                         "choose the pipeline with --passes.")
    return names.index(spec) + 1


def _numbered(names: list[str]) -> str:
    return ", ".join(f"{i} {n}" for i, n in enumerate(names, start=1))


def _format_from_path(path: str | None) -> str | None:
    if not path:
        return None
    return {".py": "text", ".txt": "text", ".json": "json", ".dot": "dot", ".gv": "dot", ".svg": "svg"}.get(
        Path(path).suffix.lower())


def _check_output(output: str, folder: bool | None) -> None:
    """Fail before any work unless ``-o output`` can be written: the folder that holds it exists and takes
    new files, and ``output`` is not a folder where a file goes (``folder=False``), nor a file where a
    folder goes (``folder=True``; it is created if missing). ``folder=None``: either may be written."""
    path = Path(output)
    if folder is False and path.is_dir():
        raise OpticError(f"-o {output} is a folder: give a file name inside it.")
    if folder and path.exists() and not path.is_dir():
        raise OpticError(f"-o {output} is a file: --each-pass writes one file per pass into a folder; give a folder "
                         "(it is created if missing).")
    into = path if folder and path.is_dir() else path.parent
    if not into.is_dir():
        what = "is a file, not a folder" if into.exists() else "does not exist"
        raise OpticError(f"-o {output}: folder {into} {what}; give a path in an existing folder.")
    try:  # a real probe: permissions, read-only mounts and pseudo file systems such as /proc all show here
        with tempfile.TemporaryFile(dir=into):
            pass
    except OSError as e:
        raise OpticError(f"-o {output}: cannot write into folder {into} ({e.strerror or e}).") from None


def _emit(text: str, output: str | None, progress: CommandProgress) -> None:
    if not output:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as e:  # checked before the work; a full disk still shows only here
        raise OpticError(f"-o {output}: cannot write it ({e.strerror or e}).") from None
    progress.line(f"wrote {output}")


def _save(result: Any, inputs: Any, path: str) -> None:
    """Save with torch.export: a portable, pickle-free archive of the optimized graph."""
    import torch

    from .ir.capture import normalize_inputs

    args, kwargs = normalize_inputs(inputs)
    try:
        ep = torch.export.export(result, args, kwargs, strict=False)
        torch.export.save(ep, path)
    except OSError as e:
        raise OpticError(f"cannot write {path}: {e.strerror or e}") from None
    except Exception as e:
        if not Path(path).is_dir():  # an artifact directory was asked for, but none was built
            Path(path).unlink(missing_ok=True)  # never leave a half-written archive behind
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OpticError(f"the optimized model could not be saved with torch.export ({type(e).__name__}: {first}). "
                         "The report above stands; to save a model without optic's kernels, add "
                         "--disable cpu_tactics and leave --backend at torch.") from None


def _num(x: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if x is None else f"{x / scale:,.{digits}f}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:g} {unit}" if n % div == 0 else f"{n / div:.1f} {unit}"
    return f"{n} B"


def _plain(d: Any) -> Any:
    """JSON-ready: frozensets become sorted lists, tuples lists."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, frozenset | set):
        return sorted(d)
    if isinstance(d, list | tuple):
        return [_plain(v) for v in d]
    return d


if __name__ == "__main__":
    raise SystemExit(main())
