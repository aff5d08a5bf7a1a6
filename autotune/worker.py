"""The measurement worker: a child process that builds, checks and times candidates.

Started by :class:`optic.autotune.measure.Runner` as ``python -m optic.autotune.worker``; it reads
requests from stdin and writes replies to stdout, each a length-prefixed pickle of plain data
(dicts, lists, numbers, strings), and never prints on the channel (stdout is moved to stderr on
start, so that a library that prints cannot corrupt it). A candidate that hangs or crashes this
process costs the parent one ``timeout`` or ``crash`` record and a new worker, never the run.

Requests (``kind``):

- ``hello``: the toolchain's versions.
- ``rpc_ping``: a session with a device of the RPC tracker (so that an unreachable tracker is one
  error, not a failure charged to every candidate).
- ``measure``: build ``config`` for ``operator`` with ``builder`` ("module:function"), compile it
  for this CPU (LLVM), run it once on seeded inputs and compare the output with the reference
  (``optic.pipeline.verify.compare``); only a correct candidate is timed, with TVM's evaluator (one
  warm-up call, then ``repeat`` repeats of ``number`` calls, at least ``min_repeat_ms`` each;
  the median repeat counts). With ``rpc`` (host, port, key) the library is sent to a device of
  the TVM RPC tracker and checked and timed there.
- ``final``: a few configurations (the finalists of a tuning run) and, if asked, PyTorch's own
  call for the same operator (the vendor-library baseline), alternated in one run by
  ``optic.pipeline.timing.compare``.
"""

from __future__ import annotations

import importlib
import os
import pickle
import struct
import sys
import tempfile
import time
import traceback
from typing import Any, BinaryIO

__all__ = ["Worker", "load_builder", "main", "recv", "send"]

HEADER = struct.Struct("<Q")


def send(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(HEADER.pack(len(data)) + data)
    stream.flush()


def recv(stream: BinaryIO) -> Any:
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (n,) = HEADER.unpack(head)
    return pickle.loads(stream.read(n))  # noqa: S301 - from our own parent process


CPU_COMPILER = "optic.backend.codegen_cpu:compile_module"  # TVM's pipeline for what a builder built


def load_builder(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # TVM's errors carry the whole IR; the first and last lines say what went wrong.
    return "\n".join(lines if len(lines) <= 6 else [*lines[:3], "...", *lines[-2:]])[:2000]


class Worker:
    """Request handlers; caches the inputs and reference of the last operators it saw."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[Any, Any]] = {}
        self._libs: dict[str, Any] = {}  # the libraries built last (the final round re-times them unbuilt)
        self._build_seconds: dict[str, float] = {}  # of configurations built ahead by a build request

    def hello(self, msg: dict[str, Any]) -> dict[str, Any]:
        from .toolchain import toolchain

        return {"status": "ok", "toolchain": toolchain(), "pid": os.getpid()}

    def rpc_ping(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Reach the tracker and get a session with a device of ``key``, once, before any candidate."""
        from tvm import rpc

        host, port, key = msg["rpc"]
        try:
            remote = rpc.connect_tracker(host, int(port)).request(key, priority=1, session_timeout=60)
            remote.cpu()
        except Exception as e:
            return {"status": "run_error", "error": _error(e)}
        return {"status": "ok"}

    def _operator_data(self, operator: Any) -> tuple[Any, Any]:
        key = operator.key
        if key not in self._data:
            if len(self._data) > 4:
                self._data.clear()
            inputs = operator.make_inputs(seed=0)
            self._data[key] = (inputs, operator.reference(inputs))
        return self._data[key]

    @staticmethod
    def _kernel_args(msg: dict[str, Any], operator: Any, inputs: list) -> list:
        """The built function's arguments before its output: the builder's module says how the operator's
        inputs become them (``kernel_args``: weights packed for the configuration), else they are the inputs."""
        convert = getattr(importlib.import_module(msg["builder"].partition(":")[0]), "kernel_args", None)
        return list(inputs) if convert is None else convert(operator, msg["config"], list(inputs))

    def _compile(self, msg: dict[str, Any]) -> tuple[Any, Any, float]:
        """``(operator, built, seconds)``: ``built`` is ``(library, jitted module)`` with its ``main`` looked
        up (which is when LLVM generates the code), or the exception the build raised; cached."""
        from optic.tvm_compat import host_target

        from .operator import Operator

        operator = Operator.from_dict(msg["operator"])
        opt_level = msg.get("opt_level")
        key = repr((msg["operator"], sorted(msg["config"].items()), msg["builder"], opt_level))
        if key in self._libs:
            return operator, self._libs[key], 0.0
        start = time.perf_counter()
        try:
            mod = load_builder(msg["builder"])(operator, msg["config"])
            # autotune names its code generator, never imports it: the builder's module compiles what it
            # built when it can (compile_module), else the CPU code generator's pipeline does
            compile_module = getattr(importlib.import_module(msg["builder"].partition(":")[0]), "compile_module",
                                     None) or load_builder(CPU_COMPILER)
            lib = compile_module(mod, host_target(opt_level))  # TVM's pipeline + dynamic macro tiles
            module = lib.jit()
            module["main"]  # noqa: B018 - the lookup makes LLVM generate the code (lazily, else on first call)
            built: Any = (lib, module)
        except Exception as e:
            built = e
        if len(self._libs) >= 64:
            self._libs.pop(next(iter(self._libs)))
        self._libs[key] = built
        return operator, built, time.perf_counter() - start

    def build(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Build several configurations at once, on ``threads`` threads (TVM's compiler releases the GIL),
        into the cache the measure requests then read: nothing is timed while they build."""
        from concurrent.futures import ThreadPoolExecutor

        def one(config: dict[str, int]) -> float:
            _, built, seconds = self._compile({**msg, "config": config})
            self._build_seconds[repr((sorted(config.items()), msg.get("opt_level")))] = seconds
            return seconds

        with ThreadPoolExecutor(max(1, int(msg.get("threads") or 1))) as pool:
            seconds = list(pool.map(one, msg["configs"]))
        return {"status": "ok", "seconds": seconds}

    def measure(self, msg: dict[str, Any]) -> dict[str, Any]:
        operator, built, build_s = self._compile(msg)
        build_s = self._build_seconds.pop(repr((sorted(msg["config"].items()), msg.get("opt_level"))), build_s)
        if isinstance(built, Exception):
            return {"status": "build_error", "error": _error(built), "build_seconds": build_s}
        lib, module = built
        if msg.get("rpc"):
            return self._measure_remote(msg, operator, lib, build_s)
        import torch
        import tvm


        ev = msg["evaluator"]
        try:
            inputs, ref = self._operator_data(operator)
            out = torch.full(operator.out_shape, float("nan"))  # a kernel that writes nothing fails the check
            args = [tvm.runtime.from_dlpack(t) for t in (*self._kernel_args(msg, operator, inputs), out)]
            module["main"](*args)
        except Exception as e:
            return {"status": "run_error", "error": _error(e), "build_seconds": build_s}
        return _check_then_time(module, tvm.cpu(), args, ref, out, ev, build_s)

    def _measure_remote(self, msg: dict[str, Any], operator: Any, lib: Any, build_s: float) -> dict[str, Any]:
        import torch
        import tvm
        from tvm import rpc


        host, port, key = msg["rpc"]
        ev = msg["evaluator"]
        try:
            remote = rpc.connect_tracker(host, int(port)).request(key, priority=1,
                                                                 session_timeout=int(ev["session_timeout"]))
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "candidate.so")
                lib.export_library(path)
                remote.upload(path)
            rlib = remote.load_module("candidate.so")
            dev = remote.cpu()
            inputs, ref = self._operator_data(operator)
            out = torch.full(operator.out_shape, float("nan"))
            args = [tvm.runtime.tensor(t.numpy(), dev) for t in (*self._kernel_args(msg, operator, inputs), out)]
            rlib["main"](*args)
            got = torch.from_numpy(args[-1].numpy())
        except Exception as e:
            return {"status": "run_error", "error": _error(e), "build_seconds": build_s}
        return _check_then_time(rlib, dev, args, ref, got, ev, build_s)

    def final(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Several configurations (and, with ``torch``, PyTorch's call) timed alternated in one run."""
        import torch
        import tvm

        from optic.pipeline.timing import calls_per_block, compare

        threads = msg.get("threads")
        if threads:
            torch.set_num_threads(threads)
        fns = {}
        for i, config in enumerate(msg["configs"]):
            operator, built, _ = self._compile({**msg, "config": config})
            if isinstance(built, Exception):
                raise built
            fn = built[1]["main"]
            inputs, _ = self._operator_data(operator)
            kernel_inputs = self._kernel_args({**msg, "config": config}, operator, inputs)
            args = [tvm.runtime.from_dlpack(t) for t in (*kernel_inputs, torch.empty(operator.out_shape))]
            fns[i] = lambda fn=fn, args=args: fn(*args)
        if msg.get("torch"):
            fns["torch"] = operator.torch_call(inputs)
        # Warm everything up first (thread pools started, buffers allocated, clocks up): the first
        # rounds of a fresh process are slower for whichever runs first.
        end = time.perf_counter() + msg.get("warmup_s", 0.3)
        while time.perf_counter() < end:
            for f in fns.values():
                f()
        block = calls_per_block(fns[0], target_s=0.02, cap=50)
        timings = compare(fns, rounds=msg.get("rounds", 9), block=block, warmup=2, budget_s=msg.get("budget_s"))
        out = {"status": "ok", "threads": torch.get_num_threads(),
               "kernels": [timings[i].median for i in range(len(msg["configs"]))],
               "spreads": [timings[i].spread for i in range(len(msg["configs"]))]}
        if "torch" in timings:
            out.update(torch=timings["torch"].median, torch_spread=timings["torch"].spread)
        return out


def main() -> int:
    channel_in = sys.stdin.buffer
    channel_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed from here on goes to stderr, not into the channel
    sys.stdout = sys.stderr
    worker = Worker()
    while True:
        msg = recv(channel_in)
        if msg is None or msg.get("kind") == "stop":
            return 0
        handler = getattr(worker, msg.get("kind", ""), None)
        try:
            reply = handler(msg) if handler else {"status": "run_error", "error": f"unknown request {msg!r}"}
        except Exception as e:  # a bug of ours, not the candidate's: say so, keep serving
            reply = {"status": "run_error", "error": _error(e), "traceback": traceback.format_exc()[-4000:]}
        send(channel_out, reply)


def _check_then_time(module: Any, dev: Any, args: list, ref: Any, got: Any, ev: dict[str, Any],
                     build_s: float) -> dict[str, Any]:
    """A candidate's output against the reference first; only a correct one is timed (warm-up,
    number × repeat), locally or on an RPC device alike."""
    from optic.pipeline.verify import compare

    check = compare(ref, got, ev["tolerance"])
    if not check.ok:
        return {"status": "wrong", "error": str(check), "max_error": check.rel, "build_seconds": build_s}
    try:
        # one repeat first: a candidate already ``cutoff`` times slower than the best so far is not
        # worth the others (it cannot be chosen; its one sample is its record)
        timer = module.time_evaluator("main", dev, number=ev["number"], repeat=1, min_repeat_ms=ev["min_repeat_ms"])
        samples = list(timer(*args).results)
        best = ev.get("best_seconds")
        if ev["repeat"] > 1 and not (best and samples[0] > ev.get("cutoff", 2.0) * best):
            timer = module.time_evaluator("main", dev, number=ev["number"], repeat=ev["repeat"] - 1,
                                          min_repeat_ms=ev["min_repeat_ms"])
            samples += list(timer(*args).results)
    except Exception as e:
        return {"status": "run_error", "error": _error(e), "build_seconds": build_s}
    return {"status": "ok", "samples": samples, "max_error": check.rel, "build_seconds": build_s}


if __name__ == "__main__":
    sys.exit(main())
