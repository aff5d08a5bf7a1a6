"""The ``optic`` command line, run as users run it (the console script, in a subprocess), and the
model loader behind it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optic import OpticError, cli, modelref

ROOT = Path(__file__).resolve().parents[1]
MLP = "examples/tiny_mlp.py:Model"
RESNET = "examples/resnet_bn.py:build"


def optic_command() -> list[str]:
    script = shutil.which("optic", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "optic.cli"]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPTIC_DISABLE": ""}
    return subprocess.run([*optic_command(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr


# -- the console script --------------------------------------------------------------------------------
def test_dump_text_is_valid_python():
    done = run("dump", MLP)
    assert done.returncode == 0, done.stderr
    compile(done.stdout, "<optic dump>", "exec")
    assert done.stdout.startswith("# optic graph dump") and "self.fc1(x)" in done.stdout
    assert done.stderr == ""  # not a terminal, no --progress: no progress lines


def test_dump_json_has_nodes_with_shapes():
    done = run("dump", RESNET, "--format", "json", "--capture", "fx")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    nodes = {n["name"]: n for n in data["nodes"]}
    assert data["capture"] == "fx"
    assert nodes["x"]["shape"] == [1, 3, 64, 64]
    assert nodes["layers_0_bn1"]["shape"] == [1, 16, 32, 32] and nodes["layers_0_bn1"]["module"] == "BatchNorm2d"
    assert all(n["shape"] for n in data["nodes"] if n["op"] != "output")


def test_each_pass_writes_ordered_files_and_marks_what_fold_norm_erased(tmp_path):
    out = tmp_path / "dumps"
    done = run("dump", RESNET, "--each-pass", "--format", "dot", "-o", str(out), "--no-measure", "--progress")
    assert done.returncode == 0, done.stderr
    expected = ["000_capture.dot", "001_cleanup.dot", "002_fold_norm.dot", "003_fuse.dot", "004_cleanup.dot",
                "005_cpu_tactics.dot"]
    assert [Path(p).name for p in done.stdout.split()] == expected
    assert sorted(p.name for p in out.iterdir()) == expected
    assert "optic: pass fold_norm: changed" in done.stderr  # --progress
    fold = (out / "002_fold_norm.dot").read_text()
    erased = re.findall(r'^  "(\w+)" \[[^\n]*class="erased"', fold, re.M)
    bn = {"stem_1", *(f"layers_{i}_bn{j}" for i in range(3) for j in (1, 2)), "layers_1_shortcut_1",
          "layers_2_shortcut_1"}
    assert bn <= set(erased), erased  # every BatchNorm went (with the conv it folded into)
    assert 'class="created"' in fold and "pass: fold_norm" in fold
    assert 'class="erased"' not in (out / "000_capture.dot").read_text()


def test_optimize_prints_the_report():
    done = run("optimize", RESNET, "--target", "cpu", "--no-measure")
    assert done.returncode == 0, done.stderr
    assert "fold_norm" in done.stdout and "bn_into_conv_or_linear: 9" in done.stdout
    assert done.stdout.startswith("optic report: ResNetBN on target 'cpu'")


def test_unknown_target_exits_2_and_lists_the_known_ones():
    done = run("optimize", MLP, "--target", "a1000")
    assert done.returncode == 2
    no_traceback(done)
    assert "unknown target 'a1000'" in done.stderr
    assert "a100, cpu, h100, h200" in done.stderr and "Did you mean 'a100'" in done.stderr


def test_bad_model_path_exits_2_with_a_helpful_message(tmp_path):
    done = run("dump", "no/such/model.py:build")
    assert done.returncode == 2
    no_traceback(done)
    assert "model file 'no/such/model.py' not found" in done.stderr


def test_svg_draws_or_names_graphviz(tmp_path):
    done = run("dump", MLP, "-o", str(tmp_path / "g.svg"))  # format from the extension
    no_traceback(done)
    if shutil.which("dot"):
        assert done.returncode == 0, done.stderr
        assert "<svg" in (tmp_path / "g.svg").read_text()
    else:
        assert done.returncode == 2
        assert "Graphviz, which is not installed" in done.stderr and "apt-get install graphviz" in done.stderr
        assert not (tmp_path / "g.svg").exists()


# -- the same entry point in-process (fast) ---------------------------------------------------------------
def test_targets_and_passes_listings(capsys):
    assert cli.main(["targets"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^h100\s+gpu\s+132\s+67\.0\s+989\.5\s+3,350\s+227 KiB\s+50 MiB$", out, re.M), out
    assert re.search(r"^cpu\s+cpu\s+\d+", out, re.M)
    assert cli.main(["targets", "--json"]) == 0
    rows = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert rows["a100"]["sm_count"] == 108 and isinstance(rows["cpu"]["isa"], list)

    assert cli.main(["passes"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^fold_norm\s+yes\s+fold BatchNorm", out, re.M)
    assert "exact: cleanup → fold_norm → fuse → cleanup → cpu_tactics" in out
    assert "tvm: tvm_kernels before cpu_tactics else before early_exit, else last (cpu targets)" in out
    assert cli.main(["passes", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "fold_norm" in {p["name"] for p in data["passes"]}
    gpu = {"name": "gpu_tactics", "before": ["early_exit"], "kinds": ["gpu"]}
    assert data["backend_steps"] == {"torch": [gpu], "tvm": [{"name": "tvm_kernels", "before": ["cpu_tactics", "early_exit"],
                                                              "kinds": ["cpu"]}, gpu]}


def test_dump_after_a_pass_diffs_against_the_step_before(capsys):
    assert cli.main(["dump", RESNET, "--after", "fold_norm", "--format", "dot", "--passes", "cleanup,fold_norm"]) == 0
    out = capsys.readouterr().out
    assert "after pass 2 'fold_norm': changed" in out and 'class="erased"' in out
    assert cli.main(["dump", MLP, "--after", "7"]) == 2
    assert "the pipeline has passes 1..5: 1 cleanup, 2 fold_norm" in capsys.readouterr().err


def test_dump_tvmscript_lowers_the_graph_and_shows_one_kernel_scheduled(capsys):
    pytest.importorskip("tvm")
    assert cli.main(["dump", MLP, "--format", "tvmscript"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# optic TVMScript dump: captured graph") and "def part_0(" in text
    kernels = re.findall(r"^#   (fused_\w+): matmul", text, re.M)
    assert kernels, text
    assert cli.main(["dump", MLP, "--format", "tvmscript", "--kernel", kernels[0]]) == 0
    one = capsys.readouterr().out
    assert f"# kernel {kernels[0]}" in one and "def part_0(" not in one
    assert "# scheduled by optic's matmul template for cpu" in one and one.count("def main(") == 2


def test_optimize_json_and_save(tmp_path, capsys):
    path = tmp_path / "mlp.pt2"
    assert cli.main(["optimize", MLP, "--json", "--no-measure", "--disable", "cpu_tactics", "-o", str(path)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["target"] == "cpu" and [p["name"] for p in report["passes"]][:2] == ["cleanup", "fold_norm"]
    assert "saved the optimized model" in captured.err
    _, (x,) = modelref.load_model(MLP)
    loaded = torch.export.load(str(path)).module()
    assert loaded(x).shape == (2, 4) and bool(torch.isfinite(loaded(x)).all())


def test_usage_errors_exit_2_without_traceback(capsys):
    assert cli.main(["dump", MLP, "--each-pass"]) == 2
    assert "give a directory with -o DIR" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["optimize", MLP, "--passes", "fold_nrom"]) == 2
    assert "Did you mean 'fold_norm'" in capsys.readouterr().err


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("optic: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the command loads or optimizes the model: a bad argument must stop it before."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the command started working before it checked its arguments")
    monkeypatch.setattr(cli, "_load", forbidden)
    monkeypatch.setattr("optic.api.optimize", forbidden)


@pytest.mark.parametrize("argv, reason", [
    (["dump", MLP, "-o", "{tmp}/missing/g.py"], "folder {tmp}/missing does not exist"),
    (["dump", MLP, "-o", "{tmp}/afile/g.py"], "{tmp}/afile is a file, not a folder"),
    (["dump", MLP, "-o", "{tmp}"], "{tmp} is a folder"),
    (["dump", MLP, "-o", "/proc/optic-g.py"], "cannot write into folder /proc"),
    (["dump", MLP, "--each-pass", "-o", "{tmp}/afile"], "{tmp}/afile is a file: --each-pass writes"),
    (["dump", MLP, "--each-pass", "-o", "{tmp}/missing/dumps"], "folder {tmp}/missing does not exist"),
    (["dump", MLP, "--each-pass", "-o", "/proc/optic-dumps"], "cannot write into folder /proc"),
    (["optimize", MLP, "-o", "{tmp}/missing/x.pt2"], "folder {tmp}/missing does not exist"),
    (["optimize", MLP, "-o", "{tmp}/afile/x.pt2"], "{tmp}/afile is a file, not a folder"),
    (["optimize", MLP, "-o", "{tmp}"], "{tmp} is a folder"),
])
def test_output_paths_are_checked_before_any_work(argv, reason, tmp_path, capsys, no_work):
    if "/proc" in reason and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc, where nobody (root included) can create files")
    (tmp_path / "afile").write_text("")
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = _one_line_error(capsys)
    assert f"-o {argv[-1].format(tmp=tmp_path)}" in err and reason.format(tmp=tmp_path) in err


@pytest.mark.parametrize("argv, reason", [
    (["dump", MLP, "--kernel", "fused_matmul"], "--kernel NAME shows one fused kernel"),
    (["dump", MLP, "--format", "tvmscript", "--kernel", "k", "--each-pass", "-o", "{tmp}"], "without --each-pass"),
    (["dump", MLP, "--after", "fold_nrom"], "--after fold_nrom: no such pass in the pipeline"),
])
def test_dump_arguments_are_checked_before_any_work(argv, reason, tmp_path, capsys, no_work):
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert reason in _one_line_error(capsys)


def test_optimize_overwrites_an_existing_output_file(tmp_path, capsys):
    path = tmp_path / "mlp.pt2"
    path.write_text("an older save")
    assert cli.main(["optimize", MLP, "--no-measure", "--disable", "cpu_tactics", "-o", str(path)]) == 0
    assert "saved the optimized model" in capsys.readouterr().err
    assert torch.export.load(str(path)).module()(torch.randn(2, 16)).shape == (2, 4)


@pytest.mark.parametrize("value, got", [("5", "a value of type int"), ("lambda: None", "None")])
def test_calibration_that_is_not_an_iterable_is_refused_before_optimizing(value, got, tmp_path, capsys, monkeypatch):
    src = tmp_path / "cal.py"
    src.write_text(f"batches = {value}\n")
    monkeypatch.setattr("optic.api.optimize", lambda *a, **k: pytest.fail("optimized with unusable calibration data"))
    assert cli.main(["optimize", MLP, "--budget", "0.01", "--calibration", f"{src}:batches"]) == 2
    err = _one_line_error(capsys)
    assert f"--calibration {src}:batches gave {got}, not an iterable of batches" in err


def test_generic_gpu_names_list_the_gpu_targets(capsys):
    assert cli.main(["optimize", MLP, "--target", "NVIDIA"]) == 2
    err = _one_line_error(capsys)
    assert "unknown target 'NVIDIA'" in err and "a100, h100, h200, l4, rtx4090, t4, v100" in err
    assert "Did you mean 'cpu'" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: 'cuda' resolves to it")
def test_cuda_without_a_gpu_names_the_gpus_to_plan_for(capsys):
    for name in ("cuda", "gpu", "cuda:0"):
        assert cli.main(["optimize", MLP, "--target", name]) == 2
        err = _one_line_error(capsys)
        assert "target 'cuda' means this machine's GPU" in err and "sees no CUDA GPU" in err
        assert "a100, h100, h200, l4, rtx4090, t4, v100" in err


# -- the model loader ---------------------------------------------------------------------------------------
def test_load_from_file_and_from_module():
    model, inputs = modelref.load_model(RESNET)
    assert not model.training and isinstance(inputs, tuple) and inputs[0].shape == (1, 3, 64, 64)
    assert float(model.layers[0].bn1.running_var.min()) != 1.0  # non-trivial statistics
    model, inputs = modelref.load_model(MLP)
    assert type(model).__name__ == "Model" and inputs[0].shape == (2, 16)
    model, inputs = modelref.load_model("torch.nn:Identity")
    assert isinstance(model, torch.nn.Identity) and inputs is None


def test_input_shapes_override_and_parse_dtypes():
    x, ids = modelref.inputs_from_shapes(["2,3", "1,128:int64"])
    assert x.shape == (2, 3) and x.dtype == torch.float32
    assert ids.dtype == torch.int64 and ids.shape == (1, 128) and 0 <= int(ids.min()) and int(ids.max()) < 100
    _, inputs = modelref.load(MLP, ["4,16"])
    assert inputs[0].shape == (4, 16)
    for bad in ("2,x", "1,2:floaty", "-1,2"):
        with pytest.raises(OpticError, match="--input-shape"):
            modelref.inputs_from_shapes([bad])


def test_loader_errors_say_what_to_do(tmp_path):
    src = tmp_path / "models.py"
    src.write_text("import torch.nn as nn\n\n"
                   "def build():\n    raise ValueError('no weights here')\n\n"
                   "def plain():\n    return nn.Linear(2, 2)\n\n"
                   "class Net(nn.Linear):\n    pass\n")
    with pytest.raises(OpticError, match=r"has no attribute 'buld'\. Callables it defines: build, plain, Net"):
        modelref.load_model(f"{src}:buld")
    with pytest.raises(OpticError, match=rf"calling {re.escape(str(src))}:build\(\) raised ValueError: no weights "
                                         rf"here\n  at {re.escape(str(src))}:4"):
        modelref.load_model(f"{src}:build")
    with pytest.raises(OpticError, match="needs arguments"):
        modelref.load_model(f"{src}:Net")
    with pytest.raises(OpticError, match="(?i)pass --input-shape"):
        modelref.load(f"{src}:plain")
    with pytest.raises(OpticError, match="should be path/to/file.py:factory.*Callables it defines: build"):
        modelref.load_model(str(src))


def test_weights_load_only_tensors(tmp_path):
    model, _ = modelref.load_model(MLP)
    good = tmp_path / "w.pt"
    torch.save({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, good)
    modelref.load_weights(model, str(good))
    assert float(model.fc1.weight.detach().abs().sum()) == 0.0
    evil = tmp_path / "evil.pt"
    torch.save({"fc1.weight": object()}, evil)  # an arbitrary pickled object is refused, never run
    with pytest.raises(OpticError, match="never unpickles"):
        modelref.load_weights(model, str(evil))
