"""Measuring candidates: build, check against the reference, time, in a worker process with a timeout.

The habits are Triton's and TVM's (``runner/config.py`` ``EvaluatorConfig``): a candidate is timed
only after its output matched the reference (Kernel Tuner's ``answer``/``verify``); timing is a
warm-up call, then ``repeat`` repeats of ``number`` calls (at least ``min_repeat_ms`` each) and the
median repeat; everything runs in a child process (:mod:`optic.autotune.worker`), so a candidate
that fails to build, fails to run, computes a wrong result, hangs past ``timeout_s`` or crashes the
process is a :class:`Measurement` with ``seconds = inf`` and a status saying which, never an
exception in the tuner. A worker that hung or died is replaced before the next candidate.

With ``rpc=(host, port, key)`` the worker builds here and sends each library to a device of a TVM
RPC tracker, where it is checked and timed (``python -m tvm.exec.rpc_tracker`` and
``python -m tvm.exec.rpc_server --tracker host:port --key KEY`` on the device).
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from optic.errors import OpticError
from optic.threads import GOMP_SPIN_COUNT, TVM_SPIN_COUNT

from . import worker as _wire
from .operator import Operator

__all__ = ["DEFAULT_BUILDER", "Baseline", "EvaluatorConfig", "Final", "Measurement", "Runner", "parse_rpc"]

log = logging.getLogger(__name__)

DEFAULT_BUILDER = "optic.backend.codegen_cpu:build"
STATUSES = ("ok", "build_error", "run_error", "wrong", "timeout", "crash")
_EXITING: list[subprocess.Popen] = []  # stopped workers still tearing down


def _reap(wait_s: float = 0.0) -> None:
    """Collect stopped workers that have exited; with ``wait_s``, give the others that long, then kill them."""
    deadline = time.monotonic() + wait_s
    for proc in list(_EXITING):
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()) if wait_s else 0.0)
        except subprocess.TimeoutExpired:
            if not wait_s:
                continue
            proc.kill()
            proc.wait()
        _EXITING.remove(proc)


atexit.register(_reap, 10.0)

SPIN_LIMITS = {"GOMP_SPINCOUNT": GOMP_SPIN_COUNT, "TVM_THREAD_POOL_SPIN_COUNT": TVM_SPIN_COUNT}


@dataclass(frozen=True)
class EvaluatorConfig:
    """How a candidate is timed and checked."""

    number: int = 1  # calls per repeat (raised by TVM until a repeat lasts min_repeat_ms)
    repeat: int = 3
    min_repeat_ms: int = 20
    cutoff: float = 2.0  # after one repeat, a candidate this many times slower than the best so far stops
    # LLVM's optimization level for the candidates measured while tuning: 1 builds the GEMM micro-kernels
    # 2-3x faster than 3, and they run within 2 % (the code is vectorized by the schedule, not by LLVM);
    # the finalists are built again at 3 (what optic deploys) and re-timed side by side
    search_opt_level: int = 1
    tolerance: float = 1e-4  # max |out - ref| / max |ref| (fp32, as optic.pipeline.verify)
    timeout_s: float = 60.0  # one candidate: build, check and time
    startup_timeout_s: float = 300.0  # a new worker: importing torch and TVM
    session_timeout: int = 600  # RPC session


@dataclass
class Measurement:
    """One candidate's result: ``seconds`` is the median per call, ``inf`` unless ``status == "ok"``."""

    config: dict[str, int]
    seconds: float
    status: str
    error: str = ""
    samples: list[float] = field(default_factory=list)
    build_seconds: float = 0.0
    max_error: float | None = None  # relative to the output scale, when the output was checked

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Baseline:
    """The chosen kernel and PyTorch's call for the same operator, alternated in one run."""

    kernel_seconds: float
    torch_seconds: float
    kernel_spread: float
    torch_spread: float
    threads: int

    @property
    def speedup(self) -> float:
        return self.torch_seconds / self.kernel_seconds


@dataclass(frozen=True)
class Final:
    """Configurations (and PyTorch's call) timed alternated in one run: medians per call."""

    kernel_seconds: list[float]
    kernel_spreads: list[float]
    torch_seconds: float | None
    torch_spread: float | None
    threads: int

    def baseline(self, i: int) -> Baseline | None:
        if self.torch_seconds is None:
            return None
        return Baseline(self.kernel_seconds[i], self.torch_seconds, self.kernel_spreads[i], self.torch_spread or 0.0,
                        self.threads)


def parse_rpc(text: str) -> tuple[str, int, str]:
    """``host:port:key`` -> ``(host, port, key)``."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[0] or not parts[2]:
        raise OpticError(f"--rpc takes host:port:key (a TVM RPC tracker and a device key), not {text!r}")
    return parts[0], int(parts[1]), parts[2]


class Runner:
    """Measures candidates in a worker process; use as a context manager (the worker is closed after).

    ``builder`` ("module:function") turns ``(operator, config)`` into a TIR module; tests pass
    builders that fail, hang or compute the wrong thing.
    """

    def __init__(self, evaluator: EvaluatorConfig | None = None, *, rpc: tuple[str, int, str] | None = None,
                 builder: str = DEFAULT_BUILDER, threads: int | None = None):
        self.evaluator = evaluator or EvaluatorConfig()
        self.threads = threads
        self.rpc = rpc
        self.builder = builder
        self._proc: subprocess.Popen | None = None
        self._stderr: Any = None
        self.toolchain: dict[str, Any] | None = None
        self.restarts = 0
        self._greeted = False

    # -- the worker -----------------------------------------------------------------------------------
    def _start(self) -> None:
        self._start_process()
        self._handshake()

    def _start_process(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the caller's modules (builders)
        if self.threads:  # TVM's thread pool reads TVM_NUM_THREADS, else OMP_NUM_THREADS; PyTorch the latter
            env["TVM_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(self.threads)
        # Idle threads of both runtimes spin briefly, then sleep: libgomp's default (300k pause loops,
        # ~20 ms on Sapphire Rapids) would keep PyTorch's threads on the cores well into the kernel's
        # turn when the baseline alternates them, and TVM's pool likewise into PyTorch's.
        for name in SPIN_LIMITS:
            env.setdefault(name, SPIN_LIMITS[name])
        if self._stderr is not None:
            self._stderr.close()
        self._stderr = tempfile.TemporaryFile()  # the worker's log: its last line explains a crash
        self._proc = subprocess.Popen([sys.executable, "-m", "optic.autotune.worker"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        self._greeted = False

    def spawn(self) -> None:
        """Start the worker process without waiting for it (its imports take seconds): the caller can
        solve and rank the space meanwhile. ``ensure_started`` (or the first request) waits for it."""
        if self._proc is None or self._proc.poll() is not None:
            self._stop(kill=True)
            self._start_process()

    def _handshake(self) -> None:
        self._greeted = True
        reply = self._call({"kind": "hello"}, self.evaluator.startup_timeout_s)
        if reply.get("status") != "ok":
            raise OpticError(f"the measurement worker did not start: {reply.get('error', reply)}")
        self.toolchain = reply["toolchain"]
        if self.rpc:
            reply = self._call({"kind": "rpc_ping", "rpc": self.rpc}, self.evaluator.timeout_s)
            if reply.get("status") != "ok":
                self._stop(kill=True)
                host, port, key = self.rpc
                raise OpticError(f"no device {key!r} at the RPC tracker {host}:{port}: "
                                 f"{reply.get('error', reply.get('status'))}. Start one with python -m "
                                 f"tvm.exec.rpc_server --tracker {host}:{port} --key {key} (the tracker and "
                                 "the server need pip install 'optic[rpc]' where they run)")

    def _stop(self, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        kill = kill or not self._greeted  # spawned and never used: do not wait for its imports to finish
        if not kill:
            try:
                _wire.send(proc.stdin, {"kind": "stop"})
                proc.stdin.close()
            except OSError:
                kill = True
            else:
                # It exits by itself (tearing down torch and TVM takes ~0.8 s here): the caller does not
                # wait for that; the process is reaped later, or at interpreter exit.
                _EXITING.append(proc)
                _reap()
                return
        if kill:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - 1500))
        return self._stderr.read().decode(errors="replace").strip()

    def _call(self, msg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send one request and wait for its reply; ``{"status": "timeout" | "crash"}`` when none comes."""
        proc = self._proc
        assert proc is not None
        try:
            _wire.send(proc.stdin, msg)
        except OSError:
            return self._lost("crash")
        deadline = time.monotonic() + timeout_s
        fd = proc.stdout.fileno()
        chunks, need, header = [], _wire.HEADER.size, None
        while need:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return self._lost("timeout", timeout_s)
            data = os.read(fd, need)
            if not data:
                return self._lost("crash")
            chunks.append(data)
            need -= len(data)
            if not need and header is None:
                header = b"".join(chunks)
                (need,) = _wire.HEADER.unpack(header)
                chunks = []
        return pickle.loads(b"".join(chunks))  # noqa: S301 - our own worker

    def _lost(self, status: str, timeout_s: float = 0.0) -> dict[str, Any]:
        proc = self._proc
        code = None
        if proc is not None and status == "crash":
            try:
                code = proc.wait(timeout=5)  # the pipe closed: the process is ending
            except subprocess.TimeoutExpired:
                pass
        tail = self._stderr_tail()
        self._stop(kill=True)
        self.restarts += 1
        if status == "timeout":
            error = f"no result within {timeout_s:g} s; the worker was killed"
        else:
            error = f"the worker died (exit status {code})" + (f": {tail.splitlines()[-1]}" if tail else "")
        return {"status": status, "error": error}

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._stop()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def ensure_started(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._stop(kill=True)
            self._start()
        elif not self._greeted:
            self._handshake()

    # -- requests -------------------------------------------------------------------------------------
    def measure(self, operator: Operator, config: Mapping[str, int], best_seconds: float | None = None) -> Measurement:
        """Build, check and time one configuration; failures are Measurements with ``seconds = inf``.
        ``best_seconds``: the best time so far; a candidate ``evaluator.cutoff`` times slower after its first
        repeat is not timed further (its record then has one sample)."""
        config = {k: int(v) for k, v in config.items()}
        self.ensure_started()
        ev = self.evaluator
        evaluator = {**asdict(ev), "best_seconds": best_seconds if best_seconds and best_seconds < float("inf") else None}
        reply = self._call({"kind": "measure", "operator": operator.as_dict(), "config": config,
                            "builder": self.builder, "rpc": self.rpc, "evaluator": evaluator,
                            "opt_level": ev.search_opt_level}, ev.timeout_s)
        status = reply.get("status", "run_error")
        samples = [float(x) for x in reply.get("samples", [])]
        seconds = statistics.median(samples) if status == "ok" and samples else float("inf")
        if status != "ok":
            log.info("candidate %s: %s: %s", config, status, reply.get("error", ""))
        return Measurement(config, seconds, status if status in STATUSES else "run_error", reply.get("error", ""),
                           samples, float(reply.get("build_seconds", 0.0)), reply.get("max_error"))

    def prebuild(self, operator: Operator, configs: list[Mapping[str, int]], deployed: bool = False) -> bool:
        """Build ``configs`` in the worker at once, on every core (nothing is timed meanwhile), so that
        the ``measure`` requests that follow only check and time. False when the batch failed as a whole
        (a build that hung or crashed the worker): then each configuration is built by its own request."""
        if len(configs) < 2:
            return False
        self.ensure_started()
        threads = max(1, min(len(configs), os.cpu_count() or 1))
        level = None if deployed else self.evaluator.search_opt_level  # None: LLVM's default (3), as deployed
        reply = self._call({"kind": "build", "operator": operator.as_dict(), "builder": self.builder,
                            "configs": [{k: int(v) for k, v in c.items()} for c in configs], "threads": threads,
                            "opt_level": level},
                           self.evaluator.timeout_s * -(-len(configs) // threads))
        return reply.get("status") == "ok"

    def final(self, operator: Operator, configs: list[Mapping[str, int]], *, torch: bool = True,
              budget_s: float = 20.0) -> Final | None:
        """Time ``configs`` (already checked) and, with ``torch``, PyTorch's call for the operator,
        alternated in one run; None if that fails, or when measuring remotely (PyTorch runs here)."""
        if self.rpc or not configs:
            return None
        self.ensure_started()
        self.prebuild(operator, configs, deployed=True)  # as deployed (LLVM's default level), in parallel
        reply = self._call({"kind": "final", "operator": operator.as_dict(), "configs": [dict(c) for c in configs],
                            "builder": self.builder, "threads": self.threads, "torch": torch,
                            "budget_s": budget_s}, budget_s * 3 + self.evaluator.timeout_s * len(configs))
        if reply.get("status") != "ok":
            log.warning("the final round failed: %s", reply.get("error", reply))
            return None
        return Final(reply["kernels"], reply["spreads"], reply.get("torch"), reply.get("torch_spread"),
                     reply["threads"])

    def baseline(self, operator: Operator, config: Mapping[str, int], *, budget_s: float = 20.0) -> Baseline | None:
        """The kernel of ``config`` against PyTorch's call, alternated in one run; None if it fails."""
        final = self.final(operator, [config], budget_s=budget_s)
        return None if final is None else final.baseline(0)
