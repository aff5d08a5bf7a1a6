"""The benchmark (``python -m benchmarks``, also ``optic bench`` from a checkout): results written, failures
reported not fatal, figures consistent; how ``optic bench`` finds it.

Only tiny_cnn, one thread, few rounds: these check the runner, not the speed of anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import render, runner
from benchmarks.__main__ import main as bench_main
from benchmarks.systems import Prepared, System
from optic import cli

ROOT = Path(__file__).resolve().parents[1]


def _broken(model, inputs):
    raise RuntimeError("no kernel for this model\nsecond line that the table never shows")


def _off_by_one_percent(model, inputs):
    return Prepared(call=lambda: model(*inputs), outputs=lambda: model(*inputs) * 1.01)


def _segfault(model, inputs):
    os.kill(os.getpid(), signal.SIGSEGV)


def _sleeping(seconds):
    def prepare(model, inputs):
        def call():
            time.sleep(seconds)
            return model(*inputs)
        return Prepared(call=call, outputs=call)
    return prepare


@pytest.fixture(autouse=True)
def _short_warmup(monkeypatch):
    """What these tests check is not the warm-up (one test below is about it): 0.1 s of it, not 2."""
    monkeypatch.setenv(runner.WARMUP_ENV, "0.1")


BROKEN = System("broken", "raises while preparing", _broken)
WRONG = System("wrong", "computes something else", _off_by_one_percent)
MISSING = System("missing", "needs a package that is not here", _broken, lambda: "frobnicate is not installed")
CRASHING = System("crashing", "dies in native code", _segfault)  # these two: by name, in a child process
HANGING = System("hanging", "its first call never returns", _sleeping(600))


@contextlib.contextmanager
def threads_restored():
    """run() pins threads for the whole process; give the other tests theirs back."""
    threads, tvm_threads = torch.get_num_threads(), os.environ.get("TVM_NUM_THREADS")
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if tvm_threads is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = tvm_threads


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with threads_restored(), pytest.MonkeyPatch.context() as mp:
        mp.setenv(runner.WARMUP_ENV, "0.1")
        results = runner.run(["tiny_cnn"], ["eager", "optic", BROKEN, WRONG, MISSING], [1], rounds=3,
                             out_dir=out, threads=1)
    return results, out


def test_json_has_machine_settings_and_rows(bench):
    results, out = bench
    data = json.loads((out / "bench.json").read_text())
    assert set(data) == {"machine", "settings", "rows"}
    m = data["machine"]
    assert {"cpu", "cores", "threads", "python", "versions", "commit", "date"} <= set(m)
    assert {"torch", "onnxruntime", "apache-tvm"} <= set(m["versions"]) and m["threads"] == 1
    assert data["settings"]["systems"] == ["eager", "optic", "broken", "wrong", "missing"]
    assert data["settings"]["complete"] and data["settings"]["seconds"] > 0
    (row,) = data["rows"]
    assert row["model"] == "tiny_cnn" and row["batch"] == 1 and "error" not in row
    assert row["systems"]["optic"]["status"] == "ok" and row["systems"]["optic"]["within_tolerance"]


def test_a_failing_system_is_reported_with_its_first_line_and_the_run_goes_on(bench):
    results, out = bench
    rec = results["rows"][0]["systems"]
    assert rec["broken"] == {"status": "failed", "stage": "prepare", "error": "RuntimeError: no kernel for this model"}
    assert rec["missing"] == {"status": "unavailable", "error": "frobnicate is not installed"}
    assert rec["wrong"]["within_tolerance"] is False and rec["wrong"]["max_rel_error"] > 1e-3
    md = (out / "bench.md").read_text()
    assert "fails (prepare)" in md and "tiny_cnn (batch 1), broken, prepare: RuntimeError: no kernel" in md
    assert "second line" not in md
    assert "tiny_cnn (batch 1), wrong: outside tolerance" in md and "⚠ error" in md
    assert "- missing: frobnicate is not installed" in md


def test_markdown_has_the_latency_table_and_coverage_rows(bench):
    results, out = bench
    md = (out / "bench.md").read_text()
    assert "| model | batch | eager ms | optic | broken | wrong |" in md
    assert re.search(r"^\| tiny_cnn \| 1 \| [\d.]+ \[[\d.]+–[\d.]+\] \| \*\*[\d.]+×\*\*", md, re.M)
    cov = md.split("## Capture coverage")[1]
    assert re.search(r"^\| tiny_cnn \| 1 \| fx \| fold_norm \(bn_into_conv_or_linear 3\)", cov, re.M), cov
    if (out / "bench.png").exists() is False:
        pytest.importorskip("matplotlib")
        raise AssertionError("matplotlib is installed but no chart was written")


def test_speedups_come_from_the_medians_and_every_system_had_20_calls(bench):
    results, out = bench
    row = results["rows"][0]
    eager = row["systems"]["eager"]
    md = (out / "bench.md").read_text()
    for name in ("eager", "optic", "wrong"):
        rec = row["systems"][name]
        assert rec["timing"] == "alternated" and rec["calls"] >= runner.MIN_CALLS
        assert rec["eager_ms"] == eager["median_ms"]
        assert rec["speedup"] == pytest.approx(eager["median_ms"] / rec["median_ms"], rel=1e-12)
        assert rec["q1_ms"] <= rec["median_ms"] <= rec["q3_ms"]
        if name != "eager":
            assert f"**{rec['speedup']:.2f}×**" in md
    assert row["timing"]["rounds"] >= 3


def test_losses_and_verdicts_are_computed_from_the_data():
    def rec(ms, spread=0.02, **kw):
        return {"status": "ok", "median_ms": ms, "q1_ms": ms, "q3_ms": ms, "spread": spread, "eager_ms": 10.0,
                "speedup": 10.0 / ms, "noise": spread, "within_tolerance": True, "slower_than_eager": ms > 10.0 * 1.02, **kw}

    rows = [{"model": m, "batch": 1, "systems": {"eager": rec(10.0), "optic": rec(o), "compile": rec(c)}}
            for m, o, c in [("fast", 5.0, 8.0), ("tie", 8.0, 8.05), ("lost", 9.0, 5.0), ("slow", 12.0, 9.0)]]
    rows.append({"model": "nocompile", "batch": 1, "systems": {
        "eager": rec(10.0), "optic": rec(5.0), "compile": {"status": "failed", "error": "X: y"}}})
    # the verdict is against the fastest peer: ONNX Runtime here, though optic beats torch.compile
    rows.append({"model": "ortwins", "batch": 1, "systems": {
        "eager": rec(10.0), "optic": rec(6.0), "compile": rec(8.0), "ort": rec(4.0)}})
    results = {"settings": {"systems": ["eager", "optic", "compile", "ort"], "batches": [1]}, "rows": rows}
    v = render.verdicts(results, 1)
    assert v == {"faster": ["fast"], "tie": ["tie"], "slower": ["lost", "slow", "ortwins"],
                 "peers fail": ["nocompile"], "optic fails": []}
    lost = render.losses(results)
    assert [x.split(":")[0] for x in lost] == ["lost (batch 1)", "slow (batch 1)", "slow (batch 1)", "ortwins (batch 1)"]
    assert "slower than eager" in lost[1] and "slower than torch.compile" in lost[2]
    assert "slower than ONNX Runtime: 0.67× its speed" in lost[3]


def test_optic_bench_console_script_writes_the_files(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPTIC_DISABLE": ""}
    script = shutil.which("optic", path=str(Path(sys.executable).parent))
    assert script, "the optic console script is not installed beside this python (pip install -e .)"
    done = subprocess.run([script, "bench", "--models", "tiny_cnn", "--systems", "eager,optic", "--batch",
                           "1", "--rounds", "3", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert {"bench.json", "bench.md"} <= {p.name for p in out.iterdir()}
    data = json.loads((out / "bench.json").read_text())
    assert data["settings"]["isolated"] and data["rows"][0]["systems"]["optic"]["status"] == "ok"
    assert "| tiny_cnn | 1 |" in done.stdout


@pytest.mark.slow
def test_a_system_that_crashes_or_hangs_its_process_costs_that_system_only(tmp_path):
    started = time.perf_counter()
    with threads_restored():
        results = runner.run(["tiny_cnn"], ["eager", "tests.test_bench:CRASHING", "optic", "tests.test_bench:HANGING"],
                             [1], rounds=3, out_dir=tmp_path, threads=1, isolate=True, timeout_s=20)
    assert time.perf_counter() - started < 60
    rec = results["rows"][0]["systems"]
    assert list(rec) == ["eager", "crashing", "optic", "hanging"]
    assert rec["crashing"] == {"status": "failed", "stage": "prepare", "error": "crashed (SIGSEGV)"}
    assert rec["hanging"] == {"status": "failed", "stage": "check", "error": "timed out after 20 s"}
    assert rec["optic"]["status"] == "ok" and rec["optic"]["calls"] >= runner.MIN_CALLS


@pytest.mark.parametrize("argv, reason", [
    (["--models", "no_such_model"], "--models: no_such_model not in the zoo here"),
    (["--systems", "eager,tensorrt"], "--systems: unknown tensorrt"),
    (["--target", "h100"], "--target h100 is not supported"),
    (["--batch", "1,x"], "--batch 1,x: give batch sizes as integers"),
])
def test_bench_rejects_what_it_cannot_do(argv, reason, capsys, monkeypatch):
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("benchmarked despite a bad argument"))
    assert bench_main(argv) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("optic bench: error: ") and reason in err and err.count("\n") == 1, err


def test_python_m_benchmarks_is_the_command_and_optic_bench_runs_it_in_a_checkout():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    direct = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout.startswith("usage: optic bench") and "--models A,B" in direct.stdout
    script = shutil.which("optic", path=str(Path(sys.executable).parent))
    via = subprocess.run([script, "bench", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert via.returncode == 0 and via.stdout == direct.stdout, via.stderr
    bad = subprocess.run([script, "bench", "--target", "h100"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == cli.EXIT_ERROR and "--target h100 is not supported" in bad.stderr, bad.stderr


def test_optic_bench_outside_a_checkout_says_how_to_run_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--models", "tiny_cnn"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "optic bench runs the benchmarks of a checkout" in err and "python -m benchmarks" in err, err
    (tmp_path / "benchmarks").mkdir()  # a checkout, but not the one this optic is installed from
    (tmp_path / "benchmarks" / "__main__.py").write_text("raise SystemExit(0)\n")
    assert cli.main(["bench"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert f"installed from ({ROOT})" in err and f"not of {tmp_path}" in err, err


def test_a_registered_bench_command_runs_in_this_process(tmp_path, monkeypatch):
    seen = []

    class Registered:  # what importlib.metadata finds where a distribution registers optic.commands: bench
        def load(self):
            return lambda argv: seen.append(argv) or 3

    def entry_points(group, name):
        assert (group, name) == ("optic.commands", "bench")
        return [Registered()]

    monkeypatch.setattr(cli, "entry_points", entry_points)
    monkeypatch.chdir(tmp_path)  # no checkout needed then
    assert cli.main(["bench", "--models", "resnet18", "--batch", "1"]) == 3
    assert seen == [["--models", "resnet18", "--batch", "1"]]


def test_git_commit_is_read_without_git(tmp_path):
    (tmp_path / ".git" / "refs" / "heads").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert runner.git_commit(tmp_path) is None
    (tmp_path / ".git" / "packed-refs").write_text("# pack-refs\n" + "a" * 40 + " refs/heads/main\n")
    assert runner.git_commit(tmp_path) == "a" * 40
    (tmp_path / ".git" / "refs" / "heads" / "main").write_text("b" * 40 + "\n")
    assert runner.git_commit(tmp_path) == "b" * 40
    assert runner.git_commit(Path("/nonexistent")) is None


def test_readme_block_is_replaced_and_the_rest_kept(bench, tmp_path):
    results, _ = bench
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{render.README_BEGIN}\nold table\n{render.README_END}\n\nafter\n")
    runner.write(results, tmp_path / "benchmarks" / "results", readme)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n<!-- bench:begin -->") and text.endswith("<!-- bench:end -->\n\nafter\n")
    assert "old table" not in text and "| tiny_cnn | 1 |" in text and "Where optic loses:" in text
    if (tmp_path / "benchmarks" / "results" / "bench.png").exists():
        assert "![speed-up vs eager](benchmarks/results/bench.png)" in text
    readme.write_text("no block here\n")
    with pytest.raises(ValueError, match="no '<!-- bench:begin -->'"):
        runner.run(["tiny_cnn"], ["eager"], [1], out_dir=tmp_path, readme=readme)


def test_slow_systems_are_timed_apart_or_once(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "SLOW_BUDGET_S", 0.05)  # stand-ins for seconds-long calls (untuned TVM)
    monkeypatch.setattr(runner, "SINGLE_RUN_S", 0.2)
    slow, slower = System("slow", "30 ms a call", _sleeping(0.03)), System("slower", "250 ms", _sleeping(0.25))
    with threads_restored():
        results = runner.run(["tiny_cnn"], ["eager", slow, slower], [1], rounds=3, out_dir=tmp_path, threads=1)
    rec = results["rows"][0]["systems"]
    assert rec["slow"]["timing"] == "apart, 3 rounds with eager" and rec["slow"]["samples"] == 3
    assert rec["slow"]["speedup"] == pytest.approx(rec["slow"]["eager_ms"] / rec["slow"]["median_ms"])
    assert rec["slower"]["timing"] == "single run" and rec["slower"]["calls"] == 1
    assert 250 <= rec["slower"]["median_ms"] < 1000
    assert rec["slower"]["speedup"] == pytest.approx(rec["eager"]["median_ms"] / rec["slower"]["median_ms"])
    md = (tmp_path / "bench.md").read_text()
    assert "(apart, 3 rounds with eager)" in md and "(single run)" in md


def test_every_system_is_warmed_up_in_turn_and_timed_without_autograd(tmp_path, monkeypatch):
    calls: list[str] = []
    grad_seen: list[bool] = []

    def spy(name, seconds):
        def call():
            calls.append(name)
            grad_seen.append(torch.is_grad_enabled())
            time.sleep(seconds)
        return call

    spent = runner.warm_up({"a": spy("a", 0.01), "b": spy("b", 0.05)}, 0.2)
    assert spent["a"] >= 0.2 and spent["b"] >= 0.2
    assert calls[:2] == ["a", "b"]  # alternated, not one after the other
    assert calls.count("a") > calls.count("b")  # each until it has run long enough, not a fixed count

    grad_seen.clear()

    def prepare(model, inputs):
        grad_seen.append(torch.is_grad_enabled())
        return Prepared(call=lambda: grad_seen.append(torch.is_grad_enabled()) or model(*inputs),
                        outputs=lambda: model(*inputs))

    monkeypatch.delenv(runner.WARMUP_ENV)  # the default: 2 s
    with threads_restored():
        results = runner.run(["tiny_cnn"], ["eager", System("spy", "records grad mode", prepare)], [1], rounds=3,
                             out_dir=tmp_path, threads=1)
    assert grad_seen and not any(grad_seen)
    assert results["rows"][0]["timing"]["warmup_s"]["spy"] >= runner.WARMUP_S == 2.0
    assert "had run 2 s" in (tmp_path / "bench.md").read_text()


def test_int8_systems_are_on_request_and_calibrate_on_inputs_shaped_like_the_example():
    from benchmarks import systems

    assert {"ort-int8", "optic-int8"} <= set(systems.SYSTEMS) and not {"ort-int8", "optic-int8"} & set(systems.DEFAULT)
    cal = systems.calibration_like((torch.randn(1, 3, 8, 8), torch.randint(0, 50, (1, 7))), batches=3, batch=4)
    assert len(cal) == 3 and all(len(c) == 2 for c in cal)
    x, ids = cal[0]
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and ids.shape == (4, 7) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 50 and not torch.equal(cal[0][0], cal[1][0])


def test_ort_int8_quantizes_the_convs_and_stays_near_eager():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from benchmarks import systems

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1)).eval()
    x = torch.randn(1, 3, 12, 12)
    p = systems.get("ort-int8").prepare(model, (x,))
    assert "quantize_static" in p.info["export"]
    with torch.no_grad():
        ref = model(x)
    got = p.outputs()[0]
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.1  # int8: not the float result, but close to it
