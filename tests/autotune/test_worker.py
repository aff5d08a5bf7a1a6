"""The measurement worker (``optic.autotune.worker``) and the parent's side of its channel
(``optic.autotune.measure.Runner``), below what ``test_tune.py`` covers through whole tuning runs:

- the wire: length-prefixed pickles, and what a closed or cut channel reads as;
- the worker process: a handler that prints cannot corrupt the channel, an unknown request and a
  handler that raises are replies (the worker keeps serving), ``stop`` ends it;
- a candidate: a builder that raises is a ``build_error`` (built once, however often asked), a kernel
  that writes nothing or the wrong values is ``wrong`` and never timed, a timer that fails is a
  ``run_error``, a slow candidate is timed once;
- the parent: a worker that never answers is a ``timeout``, one that dies or cuts a reply short a
  ``crash``, and a reply's status and samples become the Measurement.

Stand-in workers are a few lines of Python speaking the wire format, so these run in seconds.
"""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict

import pytest
import torch

from optic.autotune import worker
from optic.autotune.measure import EvaluatorConfig, Runner
from optic.autotune.operator import Operator

SMALL = Operator("matmul", (8, 8, 8))
BUILDS: list[dict] = []  # configurations the counting builder was asked to build (in this process)


# -- builders the worker imports ("test_worker:NAME") --------------------------------------------------------


def raising_builder(operator, config):
    BUILDS.append(dict(config))
    raise ValueError("deliberately unbuildable")


def silent_builder(operator, config):
    """A kernel with the operator's parameters that writes nothing to its output."""
    import tvm
    from tvm import te

    params = [te.placeholder(s, name=f"p{i}") for i, s in enumerate([*operator.input_shapes(), operator.out_shape])]
    return tvm.IRModule({"main": te.create_prim_func(params)})


# -- the wire ------------------------------------------------------------------------------------------------


def test_messages_are_length_prefixed_pickles_read_back_in_order():
    stream = io.BytesIO()
    messages = [{"kind": "hello"}, {"status": "ok", "samples": [1e-3, 2e-3]}, {"nested": {"a": [1, (2, 3)]}}]
    for m in messages:
        worker.send(stream, m)
    data = stream.getvalue()
    (n,) = struct.unpack("<Q", data[:8])
    assert pickle.loads(data[8:8 + n]) == messages[0]
    stream.seek(0)
    assert [worker.recv(stream) for _ in messages] == messages
    assert worker.recv(stream) is None  # the parent closed the channel: the worker's loop ends
    assert worker.recv(io.BytesIO(data[:5])) is None  # a header cut short


def test_an_error_keeps_its_first_and_last_lines():
    lines = [f"line {i}" for i in range(40)]
    text = worker._error(RuntimeError("\n".join(lines)))
    assert text.splitlines() == ["RuntimeError: line 0", "line 1", "line 2", "...", "line 38", "line 39"]
    assert worker._error(ValueError("short")) == "ValueError: short"
    assert len(worker._error(ValueError("x" * 5000))) == 2000


# -- the worker process --------------------------------------------------------------------------------------

_NOISY_WORKER = textwrap.dedent("""
    import sys
    from optic.autotune import worker

    def shout(self, msg):
        print("a library printing on stdout")
        sys.stdout.flush()
        return {"status": "ok", "echo": msg["payload"]}

    worker.Worker.shout = shout
    sys.exit(worker.main())
""")


def test_the_worker_loop_answers_every_request_and_printing_cannot_corrupt_the_channel():
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", _NOISY_WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err)
        try:
            def ask(msg):
                worker.send(proc.stdin, msg)
                return worker.recv(proc.stdout)

            assert ask({"kind": "shout", "payload": [1, 2]}) == {"status": "ok", "echo": [1, 2]}
            unknown = ask({"kind": "teleport"})
            assert unknown["status"] == "run_error" and "unknown request" in unknown["error"]
            broken = ask({"kind": "measure"})  # a request without its fields: our bug, reported, not fatal
            assert broken["status"] == "run_error" and "KeyError" in broken["error"]
            assert "Traceback" in broken["traceback"]
            assert ask({"kind": "shout", "payload": "still serving"})["echo"] == "still serving"
            worker.send(proc.stdin, {"kind": "stop"})
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        assert b"a library printing on stdout" in err.read()  # moved to stderr


# -- a candidate, in this process ----------------------------------------------------------------------------


def _request(builder: str, config: dict[str, int], **evaluator) -> dict:
    ev = {**asdict(EvaluatorConfig(repeat=2, min_repeat_ms=1, **evaluator)), "best_seconds": None}
    return {"kind": "measure", "operator": SMALL.as_dict(), "config": config, "builder": builder, "evaluator": ev,
            "opt_level": 1}


def test_a_builder_that_raises_is_a_build_error_built_once():
    pytest.importorskip("tvm")
    BUILDS.clear()
    w = worker.Worker()
    first = w.measure(_request("test_worker:raising_builder", {"MR": 1}))
    again = w.measure(_request("test_worker:raising_builder", {"MR": 1}))
    other = w.measure(_request("test_worker:raising_builder", {"MR": 2}))
    assert first["status"] == again["status"] == other["status"] == "build_error"
    assert first["error"] == "ValueError: deliberately unbuildable"
    assert BUILDS == [{"MR": 1}, {"MR": 2}]  # the failure is remembered like a library
    assert "samples" not in first


def test_a_kernel_that_writes_nothing_is_wrong_and_never_timed():
    pytest.importorskip("tvm")
    reply = worker.Worker().measure(_request("test_worker:silent_builder", {}))
    assert reply["status"] == "wrong" and "samples" not in reply
    assert reply["max_error"] == float("inf") and "NaN" in reply["error"]


class FakeModule:
    """A built candidate whose timer reports ``per_repeat`` seconds per repeat (or raises)."""

    def __init__(self, per_repeat: float | Exception):
        self.per_repeat, self.asked = per_repeat, []

    def time_evaluator(self, name, dev, number, repeat, min_repeat_ms):
        self.asked.append(repeat)

        def timer(*args):
            if isinstance(self.per_repeat, Exception):
                raise self.per_repeat
            return type("Result", (), {"results": [self.per_repeat] * repeat})()
        return timer


def _evaluator(**kw) -> dict:
    return {**asdict(EvaluatorConfig(repeat=4)), "best_seconds": None, **kw}


def test_only_a_correct_candidate_is_timed_and_a_slow_one_only_once():
    ref = torch.ones(3, 3)
    ok_module = FakeModule(2e-3)
    ok = worker._check_then_time(ok_module, None, [], ref, ref.clone(), _evaluator(), 0.25)
    assert ok == {"status": "ok", "samples": [2e-3] * 4, "max_error": 0.0, "build_seconds": 0.25}
    assert ok_module.asked == [1, 3]  # one repeat first, then the rest

    slow_module = FakeModule(2e-3)  # more than cutoff (2) x the best so far after its first repeat
    slow = worker._check_then_time(slow_module, None, [], ref, ref.clone(), _evaluator(best_seconds=0.5e-3), 0.0)
    assert slow["status"] == "ok" and slow["samples"] == [2e-3] and slow_module.asked == [1]
    close = worker._check_then_time(FakeModule(2e-3), None, [], ref, ref.clone(), _evaluator(best_seconds=1.5e-3), 0.0)
    assert len(close["samples"]) == 4

    wrong_module = FakeModule(2e-3)
    wrong = worker._check_then_time(wrong_module, None, [], ref, ref + 1.0, _evaluator(), 0.0)
    assert wrong["status"] == "wrong" and wrong["max_error"] == pytest.approx(1.0) and wrong_module.asked == []

    failed = worker._check_then_time(FakeModule(RuntimeError("device lost")), None, [], ref, ref, _evaluator(), 0.0)
    assert failed["status"] == "run_error" and failed["error"] == "RuntimeError: device lost"


# -- the parent's side, with stand-in workers ----------------------------------------------------------------


def _runner_with(script: str, timeout_s: float = 5.0) -> Runner:
    """A Runner whose worker is ``script`` (already greeted: no handshake is sent)."""
    runner = Runner(EvaluatorConfig(timeout_s=timeout_s))
    runner._stderr = tempfile.TemporaryFile()
    runner._proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=runner._stderr)
    runner._greeted = True
    return runner


_ANSWERS = textwrap.dedent("""
    import pickle, struct, sys
    head = struct.Struct("<Q")
    read, write = sys.stdin.buffer, sys.stdout.buffer
    for reply in {replies!r}:
        n = read.read(8)
        if len(n) < 8:
            break
        read.read(head.unpack(n)[0])
        data = pickle.dumps(reply)
        write.write(head.pack(len(data)) + data)
        write.flush()
    read.read()
""")


def test_a_reply_becomes_a_measurement_and_an_unknown_status_a_run_error():
    replies = [{"status": "ok", "samples": [3e-3, 1e-3, 2e-3], "build_seconds": 0.5, "max_error": 1e-7},
               {"status": "exploded", "error": "what is this"},
               {"status": "timeout", "error": "slow"}]
    with _runner_with(_ANSWERS.format(replies=replies)) as runner:
        ok = runner.measure(SMALL, {"MR": 2})
        odd = runner.measure(SMALL, {"MR": 4})
        late = runner.measure(SMALL, {"MR": 8})
    assert (ok.status, ok.seconds, ok.samples, ok.build_seconds, ok.max_error) == ("ok", 2e-3, [3e-3, 1e-3, 2e-3],
                                                                                  0.5, 1e-7)
    assert ok.config == {"MR": 2}
    assert (odd.status, odd.seconds, odd.error) == ("run_error", float("inf"), "what is this")
    assert (late.status, late.seconds) == ("timeout", float("inf"))
    assert runner.restarts == 0


def test_a_worker_that_never_answers_is_a_timeout_and_is_killed():
    runner = _runner_with("import time; time.sleep(120)")
    proc = runner._proc
    start = time.monotonic()
    reply = runner._call({"kind": "measure"}, 0.5)
    assert reply == {"status": "timeout", "error": "no result within 0.5 s; the worker was killed"}
    assert time.monotonic() - start < 10
    assert proc.poll() is not None and runner._proc is None and runner.restarts == 1
    runner.close()


@pytest.mark.parametrize(("script", "last_words"), [
    ("import sys; sys.stderr.write('segfault in the kernel\\n'); sys.exit(3)", "the worker died (exit status 3): segfault in the kernel"),
    # a header promising 100 bytes, then the process ends mid-reply
    ("import struct, sys; sys.stdin.buffer.read(8); sys.stdout.buffer.write(struct.pack('<Q', 100) + b'abc'); "
     "sys.stdout.buffer.flush()", "the worker died (exit status 0)"),
], ids=["exits", "cut-short"])
def test_a_worker_that_dies_or_cuts_its_reply_short_is_a_crash(script, last_words):
    runner = _runner_with(script)
    reply = runner._call({"kind": "measure"}, 20)
    assert reply["status"] == "crash" and last_words in reply["error"]
    assert runner._proc is None and runner.restarts == 1
    runner.close()
