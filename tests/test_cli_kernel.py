"""``optic kernel`` and ``optic db``: tune one operator from the command line, show the database."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tvm")

from optic.cli import main  # noqa: E402

REQUIRED = {"config", "seconds", "gflops", "measurements", "invalid", "space_size", "valid", "tune_seconds"}


def test_kernel_json_then_db(tmp_path, capsys):
    db = str(tmp_path / "tuning.db")
    argv = ["kernel", "matmul", "64x64x64", "--trials", "4", "--json", "--db", db, "--threads", "1"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert REQUIRED <= set(out)
    assert out["measurements"] == 4 and out["invalid"] == 0 and out["valid"] <= out["space_size"]
    assert out["seconds"] > 0 and out["gflops"] == pytest.approx(2 * 64**3 / out["seconds"] / 1e9)
    assert set(out["config"]) == {"MR", "NR", "KC", "MC", "NC", "UNROLL", "PARALLEL"}
    base = out["baseline"]  # PyTorch's matmul, alternated with the kernel in the same run
    assert base["torch_seconds"] > 0 and base["kernel_seconds"] > 0 and out["torch_seconds"] == base["torch_seconds"]
    assert out["seconds"] == base["kernel_seconds"]  # the finalists' side-by-side run decided

    assert main([*argv, "--no-baseline"]) == 0  # the second run: everything is in the database
    again = json.loads(capsys.readouterr().out)
    assert again["measurements"] == 0 and again["config"] == out["config"] and again["baseline"] is None

    assert main(["db", "--db", db, "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["workloads"]
    assert entry["records"] == 4 and entry["best_config"] == out["config"] and entry["key"] == out["key"]
    assert main(["db", "--db", db]) == 0
    text = capsys.readouterr().out
    assert "matmul 64x64x64" in text and "4 record(s)" in text and "llvm" in text


def test_kernel_text_on_a_gpu_target_is_the_cost_models_choice(tmp_path, capsys):
    assert main(["kernel", "conv2d", "8x64x56x56,64x64x3x3,pad=1", "--target", "a100", "--trials", "8",
                 "--db", str(tmp_path / "t.db")]) == 0
    text = capsys.readouterr().out
    assert "conv2d 8x64x56x56,64x64x3x3" in text and "measured: nothing" in text and "predicted" in text
    assert "BM=" in text and "valid" in text


@pytest.mark.parametrize("argv, message", [
    (["kernel", "matmul", "64x64", "--trials", "2"], "MxNxK"),
    (["kernel", "matmul", "64x64x64", "--target", "z80"], "unknown target"),
    (["kernel", "matmul", "64x64x64", "--rpc", "nowhere"], "host:port:key"),
    (["kernel", "matmul", "4x4x4,dtype=float16"], "float32"),
    (["kernel", "matmul", "-4x4x4"], "SHAPE '-4x4x4': matmul sizes must be positive"),
    (["kernel", "elementwise", "abc"], "SHAPE 'abc': bad size 'abc'"),
])
def test_kernel_errors_are_one_line(argv, message, tmp_path, capsys):
    assert main([*argv, "--db", str(tmp_path / "t.db")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("optic: error:") and err.count("\n") == 1


def test_db_on_a_missing_file_creates_nothing(tmp_path, capsys):
    path = tmp_path / "none.db"
    assert main(["db", "--db", str(path)]) == 0
    assert "no tuning database yet" in capsys.readouterr().out and not path.exists()
