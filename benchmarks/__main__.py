"""``python -m benchmarks``: time optic against eager, torch.compile, ONNX Runtime and TVM on the zoo.

The command ``optic bench`` runs, with the same arguments: from a checkout of the optic repository it
runs this module (``optic bench`` finds it through the ``optic.commands`` entry point group where a
distribution registers one, else in the current directory). See :mod:`benchmarks.runner` for what is
measured and how.

    python -m benchmarks --models resnet18,hf_bert --batch 1
    python -m benchmarks --readme README.md --progress    # the README's table and chart
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from optic.cli import PROGRESS_HELP, run_command
from optic.errors import OpticError
from optic.progress import CommandProgress as Progress  # the optic command line's progress lines and bars

PROG = "optic bench"


def build_parser() -> argparse.ArgumentParser:
    bench = argparse.ArgumentParser(
        prog=PROG, description="Benchmark systems on the model zoo (benchmarks/zoo/): preparation time, max error "
                               "vs eager and steady-state latency, all systems alternated in blocks over several "
                               "rounds; a failing system is reported, never ends the run. Writes bench.json, "
                               "bench.md and bench.png. Runs from a checkout of the optic repository (also as "
                               "python -m benchmarks) after pip install -e '.[bench]'.")
    bench.add_argument("--models", metavar="A,B", help="zoo entries (default: every entry usable here)")
    bench.add_argument("--systems", metavar="A,B", default="eager,optic,optic-tvm,compile,ort,tvm-default",
                       help="systems to compare (default: %(default)s; also fx-ofi: torch.fx's "
                            "optimize_for_inference), or package.module:ATTR naming a benchmarks.systems.System "
                            "of your own; eager is always included")
    bench.add_argument("--batch", metavar="1,8", default="1,8", help="batch sizes (default: %(default)s)")
    bench.add_argument("--target", default="cpu", help="where to measure: only cpu, this machine (default)")
    bench.add_argument("--rounds", type=int, default=20, metavar="N",
                       help="alternation rounds per timing, at least (default: %(default)s)")
    bench.add_argument("--warmup", type=float, metavar="S",
                       help="seconds every system runs, alternated with the others, before timing (default: 2; "
                            "a fresh process's first seconds run up to 10x slower on these machines)")
    bench.add_argument("--threads", type=int, metavar="N",
                       help="threads for every system (default: $OMP_NUM_THREADS if set, else all cores here)")
    bench.add_argument("--out", metavar="DIR", help="folder for the results (default: benchmarks/results)")
    bench.add_argument("--readme", metavar="README.md",
                       help="also replace the <!-- bench:begin -->…<!-- bench:end --> block of this file")
    bench.add_argument("--in-process", action="store_true",
                       help="run every model in this process (default: one child process per model and batch, "
                            "so that a crash costs one system, not the run)")
    bench.add_argument("--timeout", type=float, default=1800, metavar="S",
                       help="seconds per model and batch before the system in progress is given up "
                            "(default: %(default)s)")
    bench.add_argument("--progress", action="store_true", help=PROGRESS_HELP)
    bench.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    return bench


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark command; return the exit status (2 for a bad argument, said in one line)."""
    return run_command(build_parser(), argv, bench, PROG)


def bench(args: argparse.Namespace) -> int:
    try:
        from benchmarks import render, runner, systems, zoo
    except ImportError as e:
        raise OpticError(f"optic bench needs {e.name}: pip install -e '.[bench]' ({e})") from None

    if args.target != "cpu":
        raise OpticError(f"optic bench measures on this machine's CPU; --target {args.target} is not supported "
                         "(use --target cpu).")
    known = zoo.names()
    models = _csv(args.models) or known
    unknown = [m for m in models if m not in known]
    if unknown:
        raise OpticError(f"--models: {', '.join(unknown)} not in the zoo here (known: {', '.join(known)}; the hf_* "
                         "entries need transformers).")
    names = _csv(args.systems)
    bad = [s for s in names if s not in systems.SYSTEMS and ":" not in s]
    if bad:
        raise OpticError(f"--systems: unknown {', '.join(bad)}; systems are {', '.join(systems.SYSTEMS)}.")
    try:
        batches = [int(b) for b in _csv(args.batch)]
    except ValueError:
        raise OpticError(f"--batch {args.batch}: give batch sizes as integers, e.g. 1,8.") from None
    if not batches or min(batches) < 1 or args.rounds < 1 or (args.threads is not None and args.threads < 1):
        raise OpticError("--batch, --rounds and --threads take positive integers.")
    if args.warmup is not None:
        if not args.warmup >= 0:
            raise OpticError("--warmup takes a number of seconds >= 0.")
        os.environ[runner.WARMUP_ENV] = str(args.warmup)  # the rows' child processes inherit it
    if args.readme:
        try:
            render.check_readme(Path(args.readme))
        except ValueError as e:
            raise OpticError(f"--readme: {e}") from None
    progress = Progress(args)
    results = runner.run(models, names, batches, args.rounds, args.out or runner.RESULTS, progress.line,
                         threads=args.threads, isolate=not args.in_process, timeout_s=args.timeout,
                         readme=args.readme, steps=progress.bars)
    progress.close()
    print(render.markdown(results), end="")
    out = Path(args.out or runner.RESULTS)
    print(f"optic: wrote {out / 'bench.json'}, {out / 'bench.md'}" + (
        f", {out / 'bench.png'}" if (out / "bench.png").exists() else " (no chart: pip install matplotlib)"),
        file=sys.stderr)
    return 0


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


if __name__ == "__main__":
    raise SystemExit(main())
