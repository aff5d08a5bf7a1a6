"""Pass options are declared: a typo or a wrong type is an error naming what was meant, every option
a pass reads is declared on it, and ``optic passes`` lists them."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import optic
from optic.cli import main
from optic.pipeline import registry
from optic.pipeline.registry import Option
from optic.pipeline.runner import PassContext

ROOT = Path(__file__).resolve().parents[2]


def _model():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval(), (torch.randn(2, 8),)


def test_a_misspelt_option_names_the_one_meant():
    model, x = _model()
    with pytest.raises(optic.UnknownOptionError, match="lowrank_levels"):
        optic.optimize(model, x, passes=["fold_norm"], options={"lowrank_levle": 2}, measure=False)


def test_an_option_of_the_wrong_type_says_which_type():
    model, x = _model()
    with pytest.raises(optic.UnknownOptionError, match="exit_points.*int"):
        optic.optimize(model, x, passes=["fold_norm"], options={"exit_points": "three"}, measure=False)
    with pytest.raises(optic.UnknownOptionError, match="'activation', 'svd'"):
        optic.optimize(model, x, passes=["fold_norm"], options={"lowrank_method": "qr"}, measure=False)


def test_the_check_comes_before_any_work(monkeypatch):
    monkeypatch.setattr("optic.api.capture_program", lambda *a, **k: pytest.fail("captured despite a bad option"))
    model, x = _model()
    with pytest.raises(optic.UnknownOptionError):
        optic.optimize(model, x, options={"no_such_option": 1}, measure=False)


def test_an_int_is_a_float_but_a_bool_is_not_an_int():
    opt = Option("x", float, 1.0, "a float")
    assert opt.check(2) == 2
    with pytest.raises(optic.UnknownOptionError):
        Option("n", int, 1, "an int").check(True)


def test_a_pass_reads_the_declared_default_and_the_users_value():
    ctx = PassContext(target=None, options={"exit_points": 5})
    assert ctx.option("exit_points") == 5
    assert ctx.option("exit_steps") == registry.declared_options()["exit_steps"].default
    with pytest.raises(KeyError, match="declared by no pass"):
        ctx.option("undeclared_option")


def test_a_pass_without_declared_options_is_refused_at_registration():
    class Bare:
        name, exact, description = "bare_test_pass", True, "nothing"

        def run(self, program, ctx):
            return False

    with pytest.raises(TypeError, match="options"):
        registry.register(Bare)
    assert "bare_test_pass" not in registry.names()


def _reads(path: Path) -> set[str]:
    """The option names a source file reads with ``ctx.option("name")``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "option"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.add(node.args[0].value)
    return out


def _family(module: str) -> str:
    """optic.passes.prune.channels -> optic.passes.prune; optic.backend.vendor -> optic.backend."""
    parts = module.split(".")
    return ".".join(parts[:3] if parts[:2] == ["optic", "passes"] else parts[:2])


def test_every_option_read_is_declared_by_a_pass_of_the_same_module():
    declared_by: dict[str, set[str]] = {}
    for p in map(registry.get, registry.names()):
        declared_by.setdefault(_family(type(p).__module__), set()).update(o.name for o in p.options)
    pipeline = {o.name for o in registry.PIPELINE_OPTIONS}
    read_anywhere = set()
    for top, pkg in (("passes", "optic.passes"), ("optic", "optic")):
        for path in ROOT.joinpath(top).rglob("*.py"):
            names = _reads(path)
            read_anywhere |= names
            rel = path.relative_to(ROOT).with_suffix("")
            family = _family(".".join([pkg, *[x for x in rel.parts[1:] if x != "__init__"]]))
            stray = names - declared_by.get(family, set()) - pipeline
            assert not stray, f"{path.relative_to(ROOT)} reads options its pass does not declare: {sorted(stray)}"
    unread = set(registry.declared_options()) - read_anywhere
    assert not unread, f"declared but read nowhere (remove them): {sorted(unread)}"


def test_two_passes_that_read_one_option_declare_it_alike():
    seen: dict[str, Option] = {o.name: o for o in registry.PIPELINE_OPTIONS}
    for p in map(registry.get, registry.names()):
        for o in p.options:
            if o.name in seen:
                assert (o.type, o.default, o.choices) == (seen[o.name].type, seen[o.name].default, seen[o.name].choices), o.name
            seen[o.name] = o
    for o in seen.values():
        if o.default is not None:
            assert o.check(o.default) == o.default, f"{o.name}'s default does not fit its own declaration"


def test_optic_passes_lists_every_option(capsys):
    assert main(["passes", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    by_pass = {p["name"]: {o["name"] for o in p["options"]} for p in listed["passes"]}
    for p in map(registry.get, registry.names()):
        assert by_pass[p.name] == {o.name for o in p.options}
    assert main(["passes"]) == 0
    text = capsys.readouterr().out
    assert "lowrank_levels" in text and "final_measure_s" in text
