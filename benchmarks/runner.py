"""The benchmark runner behind ``optic bench``: every system on every zoo model, timed together.

Per model and batch: the model is built once; every system prepares it (timed: trace, export,
compile, tune), its outputs are checked against eager (``optic.pipeline.verify.compare``), and then all
working systems are timed together with ``optic.pipeline.timing.compare``: alternated in blocks over several
rounds, so they share whatever the shared machine is doing, each block about ``BLOCK_S`` long (a
system's block repeats it as often as that takes) and at least ``MIN_CALLS`` timed calls each. A
timing whose spread is wide is repeated once and the tighter one kept. A system too slow for that
(untuned TVM takes seconds a call) is timed alone against eager with fewer rounds, or once when a
call takes over ``SINGLE_RUN_S``; the results say which.

A system that fails is recorded with its first error line and left out of the timing; it never ends
the run. With ``isolate=True`` (the CLI's default) each model and batch runs in its own process, so
that even a crash in native code (a segfault in a compiler) costs one system, not the run.

Results: ``bench.json`` (machine, versions, commit, every figure), ``bench.md`` (tables),
``bench.png`` (speed-up vs eager). See :mod:`benchmarks.render`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import render
from benchmarks import systems as systems_mod
from benchmarks.systems import System, first_line
from benchmarks.zoo import get as zoo_get
from optic.pipeline.timing import Timing
from optic.pipeline.timing import compare as time_compare
from optic.pipeline.verify import compare as compare_outputs
from optic.pipeline.verify import tolerance_for
from optic.progress import ENV as PROGRESS_ENV

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # zoo models come from configs; never reach the network

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCK_S = 0.05  # a block of calls lasts about this long, so thread pools settle between switches
MAX_BLOCK = 50
MIN_CALLS = 20  # timed calls per system at least
WIDE_SPREAD = 0.20  # interquartile range / median above which the timing is repeated once
SLOW_BUDGET_S = 20.0  # a system whose calls over all rounds would take longer is timed apart
SINGLE_RUN_S = 5.0  # a call longer than this is timed once
WARMUP_S = 2.0  # every system runs this long, alternated with the others, before any timing
WARMUP_ENV = "OPTIC_BENCH_WARMUP_S"  # another warm-up (optic bench --warmup S sets it; child processes inherit it)


def warmup_seconds() -> float:
    return float(os.environ.get(WARMUP_ENV, WARMUP_S))
ROW_TIMEOUT_S = 1800.0
PHASE = "bench-phase:"  # child → parent protocol on stderr: the phase the child is in
PROGRESS = "bench:"

Progress = Callable[[str], None] | None


def run(models: list[str], systems: list[str | System] | None = None, batches: Sequence[int] = (1, 8),
        rounds: int = 20, out_dir: str | Path = RESULTS, progress: Progress = None, *, threads: int | None = None,
        isolate: bool = False, timeout_s: float = ROW_TIMEOUT_S, readme: str | Path | None = None,
        steps: Callable[[str, int, int], None] | None = None) -> dict:
    """Benchmark ``systems`` on zoo ``models`` at each batch size; write bench.{json,md,png} to ``out_dir``.

    ``systems``: names from :data:`benchmarks.systems.SYSTEMS` or :class:`System` objects (in-process
    only); eager is always included (every ratio is against it). ``threads``: the thread count every
    system uses (default: $OMP_NUM_THREADS if set, else the cores this process may run on).
    ``readme``: a Markdown file whose ``<!-- bench:begin -->…<!-- bench:end -->`` block is replaced
    with the latest table and chart. ``steps``: called as ``steps(what, rows_done, rows)`` as the rows
    finish (optic bench draws its bar with it; ``progress`` gets the lines). Returns the results (what
    bench.json holds).
    """
    say = progress or (lambda _msg: None)
    if readme is not None:
        render.check_readme(Path(readme))  # now, not after hours of measuring
    chosen = _systems(systems)
    if isolate and any(not isinstance(s, str) for s in chosen):
        raise ValueError("isolate=True runs systems by name in child processes: pass names or "
                         "'package.module:ATTR' references, not System objects")
    threads = pin_threads(threads)
    started = time.time()
    settings = {"systems": [_system(s).name for s in chosen], "batches": list(batches), "rounds": rounds,
                "block_s": BLOCK_S, "min_calls": MIN_CALLS, "wide_spread": WIDE_SPREAD, "single_run_s": SINGLE_RUN_S,
                "warmup_s": warmup_seconds(),
                "isolated": isolate, "seconds": 0.0, "complete": False}
    results = {"machine": machine(threads), "settings": settings, "rows": []}
    rows = len(models) * len(batches)
    for name in models:
        for batch in batches:
            if steps is not None:
                steps("models x batches", len(results["rows"]), rows)
            say(f"{name} batch {batch}")
            t0 = time.perf_counter()
            if isolate:
                row = _row_in_child(name, batch, chosen, rounds, threads, timeout_s, say)
            else:
                row = _row_guarded(name, batch, [_system(s) for s in chosen], rounds, _phases_readable(say))
            row["seconds"] = time.perf_counter() - t0
            results["rows"].append(row)
            say(render.row_summary(row))
            settings["seconds"] = time.time() - started
            write(results, Path(out_dir))  # after every row: an interrupted run keeps what it measured
    if steps is not None:
        steps("models x batches", rows, rows)
    settings["complete"] = True
    write(results, Path(out_dir), readme)
    return results


def write(results: dict, out: Path, readme: str | Path | None = None) -> dict[str, Path]:
    """bench.json, bench.md and (with matplotlib) bench.png in ``out``; the README block if asked."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    paths["md"].write_text(render.markdown(results), encoding="utf-8")
    if not render.chart(results, paths["png"]):
        del paths["png"]
    if readme is not None:
        image = os.path.relpath(paths["png"], Path(readme).resolve().parent) if "png" in paths else None
        render.update_readme(Path(readme), results, image)
    return paths


def pin_threads(threads: int | None = None) -> int:
    """Use ``threads`` threads in PyTorch (and, through the adapters, ONNX Runtime and TVM)."""
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else _cores()
    torch.set_num_threads(threads)
    os.environ["TVM_NUM_THREADS"] = str(threads)
    return threads


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _systems(systems: list[str | System] | None) -> list[str | System]:
    chosen = list(systems or systems_mod.DEFAULT)
    names = [_system(s).name for s in chosen]  # KeyError naming the known systems
    if "eager" not in names:
        chosen.insert(0, "eager")
    elif names[0] != "eager":
        chosen.insert(0, chosen.pop(names.index("eager")))
    return chosen


def _system(s: str | System) -> System:
    """A System, a registered name, or ``package.module:ATTR`` naming a System (one's own adapter)."""
    if isinstance(s, System):
        return s
    if ":" in s:
        module, _, attr = s.partition(":")
        found = getattr(importlib.import_module(module), attr)
        if not isinstance(found, System):
            raise TypeError(f"{s} is a {type(found).__name__}, not a benchmarks.systems.System")
        return found
    return systems_mod.get(s)


# -- one model at one batch size ------------------------------------------------------------------------
def _row_guarded(name: str, batch: int, systems: list[System], rounds: int, say: Callable[[str], None]) -> dict:
    try:
        return bench_row(name, batch, systems, rounds, say)
    except Exception as e:  # the model itself (build, eager, timing): reported, never ends the run
        return {"model": name, "batch": batch, "error": first_line(e), "systems": {}}
    finally:
        gc.collect()


def bench_row(name: str, batch: int, systems: list[System], rounds: int, say: Callable[[str], None]) -> dict:
    """Prepare, check and time every system on zoo model ``name`` at ``batch``; one result row."""
    entry = zoo_get(name)
    phase(say, "build")
    model, inputs = entry.factory(), entry.inputs(batch)
    with torch.no_grad():  # inference: every system is prepared, checked and timed without autograd
        return _bench_row(model, inputs, entry, name, batch, systems, rounds, say)


def _bench_row(model: torch.nn.Module, inputs: tuple, entry: Any, name: str, batch: int, systems: list[System],
               rounds: int, say: Callable[[str], None]) -> dict:
    ref = model(*inputs)
    tol = tolerance_for(ref, None)
    row: dict[str, Any] = {"model": name, "batch": batch, "family": entry.family, "source": entry.source,
                           "expected_capture": entry.capture, "systems": {}}
    row["tolerance"] = tol
    ready: dict[str, systems_mod.Prepared] = {}
    single: dict[str, Timing] = {}
    for system in systems:
        rec = row["systems"][system.name] = {"status": "pending"}
        reason = system.available()
        if reason:
            rec.update(status="unavailable", error=reason)
            continue
        got = _prepare_and_check(system, model, inputs, ref, tol, rec, say)
        if got is not None:
            ready[system.name], single[system.name] = got
    if "eager" not in ready:
        raise RuntimeError(f"eager PyTorch fails: {row['systems']['eager'].get('error')}")
    row["coverage"] = row["systems"].get("optic", {}).pop("coverage", None)
    phase(say, "time")
    row["timing"] = _time_all(ready, single, rounds, row["systems"])
    return row


def _prepare_and_check(system: System, model: torch.nn.Module, inputs: tuple, ref: Any, tol: float, rec: dict,
                       say: Callable[[str], None]) -> tuple[systems_mod.Prepared, Timing] | None:
    """Prepare (timed), check against eager, and time one call; fill ``rec``; None when it fails."""
    stage = "prepare"
    try:
        phase(say, stage, system.name)
        subject = model if system.name == "eager" else copy.deepcopy(model)  # no system sees another's edits
        t0 = time.perf_counter()
        prepared = system.prepare(subject, inputs)
        rec["prepare_s"] = time.perf_counter() - t0
        rec.update(prepared.info)
        stage = "check"
        phase(say, stage, system.name)
        out: list[Any] = []
        first = time_compare({system.name: lambda: out.append(prepared.outputs())}, rounds=1, block=1,
                             warmup=0)[system.name]
        c = compare_outputs(ref, out[0], tol)
        rec.update(max_rel_error=c.rel, within_tolerance=c.ok)
        if not c.ok:
            rec["check"] = str(c)
        stage = "run"
        if first.median <= SINGLE_RUN_S:  # else the first call is its only one (untuned TVM: a minute)
            phase(say, "probe", system.name)
            first = time_compare({system.name: prepared.call}, rounds=1, block=1, warmup=0)[system.name]
    except Exception as e:
        rec.update(status="failed", stage=stage, error=first_line(e))
        return None
    rec["status"] = "ok"
    return prepared, first


def _time_all(ready: dict, single: dict[str, Timing], rounds: int, recs: dict) -> dict:
    """Time the ready systems; fill each record with median/quartiles/speed-up; the row's timing facts."""
    per_call = {k: single[k].median for k in ready}
    apart = [k for k in ready if k != "eager" and per_call[k] * rounds > SLOW_BUDGET_S]
    together = [k for k in ready if k not in apart]
    reps = {k: max(1, min(MAX_BLOCK, round(BLOCK_S / max(per_call[k], 1e-7)))) for k in ready}
    n_rounds = max(rounds, max(math.ceil(MIN_CALLS / reps[k]) for k in together))
    fns = {k: _repeat(ready[k].call, reps[k]) for k in together}
    warmed = warm_up({k: ready[k].call for k in ready if per_call[k] <= SINGLE_RUN_S}, warmup_seconds())
    first = time_compare(fns, rounds=n_rounds, block=1, warmup=1)
    spreads = [_max_spread(first)]
    best = first
    if spreads[0] > WIDE_SPREAD:  # the machine was busy: once more, keep the tighter
        again = time_compare(fns, rounds=n_rounds, block=1, warmup=1)
        spreads.append(_max_spread(again))
        best = again if spreads[1] < spreads[0] else first
    eager = _per_call(best["eager"], reps["eager"])
    for k in together:
        _record(recs[k], _per_call(best[k], reps[k]), reps[k], eager, "alternated")
    for k in apart:
        if per_call[k] > SINGLE_RUN_S:
            _record(recs[k], single[k], 1, eager, "single run")  # the first call, see _prepare_and_check
            continue
        n = max(3, min(n_rounds, int(SLOW_BUDGET_S / per_call[k])))
        t = time_compare({"eager": fns["eager"], k: ready[k].call}, rounds=n, block=1, warmup=0)
        _record(recs[k], t[k], 1, _per_call(t["eager"], reps["eager"]), f"apart, {n} rounds with eager")
    return {"rounds": n_rounds, "spreads": spreads, "repeated": len(spreads) > 1, "calls_per_block": reps,
            "warmup_s": warmed}


def warm_up(fns: dict[str, Callable[[], Any]], seconds: float) -> dict[str, float]:
    """Call every system in turn until each has run for ``seconds``; the seconds each one ran.

    A fresh process's first seconds on these virtual machines run up to 10x slower (cold pages, thread
    pools, lazily packed weights), and a system that was only just prepared has not paid that yet.
    """
    spent = dict.fromkeys(fns, 0.0)
    while any(t < seconds for t in spent.values()):
        for k, fn in fns.items():
            if spent[k] < seconds:
                t0 = time.perf_counter()
                fn()
                spent[k] += time.perf_counter() - t0
    return spent


def _repeat(fn: Callable[[], Any], n: int) -> Callable[[], None]:
    if n == 1:
        return fn

    def block() -> None:
        for _ in range(n):
            fn()

    return block


def _per_call(t: Timing, reps: int) -> Timing:
    return Timing(t.median / reps, t.q1 / reps, t.q3 / reps, t.samples)


def _max_spread(times: dict[str, Timing]) -> float:
    return max(t.spread for t in times.values())


def _record(rec: dict, t: Timing, reps: int, eager: Timing, how: str) -> None:
    noise = max(t.spread, eager.spread)
    rec.update(median_ms=t.median * 1e3, q1_ms=t.q1 * 1e3, q3_ms=t.q3 * 1e3, spread=t.spread,
               samples=t.samples, calls=t.samples * reps, timing=how, eager_ms=eager.median * 1e3,
               speedup=eager.median / t.median, noise=noise,
               slower_than_eager=t.median > eager.median * (1 + noise))


def _phases_readable(say: Callable[[str], None]) -> Callable[[str], None]:
    return lambda msg: say(f"  {msg[len(PHASE):].strip()}" if msg.startswith(PHASE) else msg)


def phase(say: Callable[[str], None], what: str, system: str = "") -> None:
    """Announce a phase (a child process's parent learns from it which system was running)."""
    say(f"{PHASE} {what} {system}".rstrip())


# -- isolation: one child process per model and batch ---------------------------------------------------
def _row_in_child(name: str, batch: int, systems: list[str], rounds: int, threads: int, timeout_s: float,
                  say: Callable[[str], None]) -> dict:
    """Run one row in a child process; a system that crashes or hangs it is recorded and left out."""
    spec = {_system(s).name: s for s in systems}
    crashed: dict[str, dict] = {}
    remaining = list(systems)
    while True:
        row, failure = _child(name, batch, remaining, rounds, threads, timeout_s, say)
        if failure is None:
            break
        what, system, message = failure
        if not system or system == "eager":
            row = {"model": name, "batch": batch, "error": f"{message} while {what} {system}".rstrip(), "systems": {}}
            break
        crashed[system] = {"status": "failed", "stage": what, "error": message}
        remaining.remove(spec[system])
        say(f"{system} {message} while {what}; running {name} batch {batch} again without it")
    recs = row.get("systems", {})
    if recs:  # requested order
        row["systems"] = {s: recs.get(s) or crashed[s] for s in spec if s in recs or s in crashed}
    return row


def _child(name: str, batch: int, systems: list[str], rounds: int, threads: int, timeout_s: float,
           say: Callable[[str], None]) -> tuple[dict, tuple[str, str, str] | None]:
    with tempfile.TemporaryDirectory(prefix="optic-bench-") as tmp:
        result = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "benchmarks.runner", "--row", name, "--batch", str(batch), "--systems",
               ",".join(systems), "--rounds", str(rounds), "--threads", str(threads), "--result", str(result)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        state = {"phase": ("build", ""), "tail": []}
        reader = threading.Thread(target=_read_child, args=(proc, state, say), daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        except BaseException:  # Ctrl-C reaches only this process: its own session shields the child
            _kill(proc)
            raise
        if timed_out:
            _kill(proc)
        reader.join(timeout=10)
        what, system = state["phase"]
        if timed_out:
            return {}, (what, system, f"timed out after {timeout_s:.0f} s")
        if proc.returncode == 0 and result.exists():
            return json.loads(result.read_text(encoding="utf-8")), None
        if proc.returncode < 0:
            message = f"crashed ({signal.Signals(-proc.returncode).name})"
        else:
            last = next((ln for ln in reversed(state["tail"]) if ln.strip()), "no output")
            message = f"exited with status {proc.returncode} ({last.strip()[:200]})"
        return {}, (what, system, message)


def _kill(proc: subprocess.Popen) -> None:
    """End the child's session: the child and its compile workers."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read_child(proc: subprocess.Popen, state: dict, say: Callable[[str], None]) -> None:
    for line in proc.stderr:
        line = line.rstrip("\n")
        if line.startswith(PHASE):
            what, _, system = line[len(PHASE):].strip().partition(" ")
            state["phase"] = (what, system)
            say(f"  {what} {system}".rstrip())
        elif line.startswith(PROGRESS):
            say(line[len(PROGRESS):].strip())
        else:
            state["tail"] = (state["tail"] + [line])[-20:]


def _child_main(args: argparse.Namespace) -> int:
    pin_threads(args.threads)
    os.environ[PROGRESS_ENV] = "0"  # stderr is the parent's protocol channel: no bars in it

    def say(msg: str) -> None:
        print(msg if msg.startswith(PHASE) else f"{PROGRESS} {msg}", file=sys.stderr, flush=True)

    systems = [_system(s) for s in args.systems.split(",") if s]
    row = _row_guarded(args.row, args.batch, systems, args.rounds, say)
    Path(args.result).write_text(json.dumps(row, default=str), encoding="utf-8")
    return 0


# -- the machine ----------------------------------------------------------------------------------------
VERSIONED = ["torch", "onnxruntime", "onnx", "onnxscript", "apache-tvm", "apache-tvm-ffi", "transformers", "numpy"]


def machine(threads: int) -> dict:
    """What the figures were measured on: CPU, cores, threads, versions, commit, date."""
    import optic

    host = optic.targets.host()
    versions = {}
    for pkg in VERSIONED:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": host.description, "cores": host.cores, "threads": threads, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions, "optic": optic.__version__,
            "commit": git_commit(ROOT), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def git_commit(root: Path) -> str | None:
    """The checked-out commit, read from .git (no git process); None outside a checkout."""
    git = root / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        common = git / "commondir"
        base = (git / common.read_text().strip()).resolve() if common.exists() else git
        for d in (git, base):
            if (d / ref).exists():
                return (d / ref).read_text().strip()
        packed = base / "packed-refs"
        for line in packed.read_text().splitlines() if packed.exists() else []:
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    """The child process entry point (``python -m benchmarks.runner --row MODEL ...``); use ``optic bench``."""
    ap = argparse.ArgumentParser(description="one row of `optic bench`, in its own process")
    ap.add_argument("--row", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--systems", required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--result", required=True)
    return _child_main(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
