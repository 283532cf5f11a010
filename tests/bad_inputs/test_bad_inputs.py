"""The project's own bad-input matrix: models, recipes, calibration, runtime calls and the CLI.

Each case asserts the specific `FxquantError` subclass and that the message names what is wrong
(the layer, key, argument or file), or asserts the correct result; the inputs given are checked to
be unchanged afterwards. Artifact corruption cases are in test_gguf_files.py / test_pt2_files.py,
write failures in test_atomic_writes.py.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io as stdio
import json

import pytest
import torch

import fxquant
from fxquant import CalibrationError, FormatError, FxquantError, MissingDependencyError, RecipeError, TraceError
from fxquant.cli import main

from .conftest import inputs, w8a8_calibration, w8a8_model


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class VarArgs(Tiny):
    def forward(self, *args):
        return super().forward(args[0])


class DataDependent(Tiny):
    def forward(self, x):
        return self.a(x) if x.sum() > 0 else x.repeat(1, 1, 2)


def cal(n=2, shape=(2, 6, 32)):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(shape, generator=g),) for _ in range(n)]


def raises(cls, *fragments, fn, **kw):
    with pytest.raises(cls) as e:
        fn(**kw)
    assert type(e.value) is cls or isinstance(e.value, cls)
    for frag in fragments:
        assert frag in str(e.value), str(e.value)
    return e.value


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: m.training for n, m in model.named_modules()}


def unchanged(model, before):
    sd, flags = state(model)
    assert sd.keys() == before[0].keys() and all(torch.equal(sd[k], before[0][k]) for k in sd)
    assert flags == before[1]


# ---------------------------------------------------------------- models

def test_model_that_is_not_a_module():
    raises(TraceError, "expected an nn.Module", "function", fn=lambda: fxquant.compile(lambda x: x, "w8a8-naive", cal()))


def test_meta_device_model_names_the_parameter_and_the_fix():
    with torch.device("meta"):
        m = Tiny()
    for recipe in ("w8a8-naive", "int8-w8a8-paper", "q8_0"):
        raises(TraceError, "parameter 'a.weight' is on the meta device", "load the weights first",
               fn=lambda: fxquant.compile(m, recipe, cal()))


def test_untraceable_model_names_the_module_and_prints_no_graph(capsys):
    m = DataDependent()
    err = raises(TraceError, "cannot trace DataDependent", "'<root DataDependent>'",
                 fn=lambda: fxquant.compile(m, "w8a8-naive", cal()))
    assert "def forward" not in capsys.readouterr().err
    assert "def forward" in str(err.partial_graph)  # kept for debugging, not printed


def test_varargs_forward_is_supported_and_correct():
    m, x = VarArgs(), cal()
    before = state(m)
    gm = fxquant.compile(m, "w8a8-naive", x)
    probe = torch.randn(3, 5, 32)
    with torch.no_grad():
        ref, out = m(probe), gm(probe)
    assert out.shape == ref.shape and float((out - ref).norm() / ref.norm()) < 0.05
    unchanged(m, before)


def test_keyword_inputs_to_a_varargs_forward_name_the_signature():
    raises(CalibrationError, "calibration[0]", "VarArgs.forward(*args)", "unexpected keyword argument 'x'",
           fn=lambda: fxquant.compile(VarArgs(), "w8a8-naive", [{"x": torch.randn(2, 6, 32)}]))


def test_compile_leaves_the_model_as_it_was():
    m = w8a8_model()
    m.train()
    before = state(m)
    fxquant.compile(m, "int8-w8a8-paper", calibration=w8a8_calibration())
    unchanged(m, before)


# ---------------------------------------------------------------- recipes

@pytest.mark.parametrize("recipe, cls, fragments", [
    ("no-such-preset", RecipeError, ["no-such-preset"]),
    ({"name": "x", "wieghts": "int8"}, RecipeError, ["wieghts"]),
    ({"name": "x", "protect_top_k": -1}, RecipeError, ["protect_top_k"]),
    ({"name": "x", "alpha": 3.0}, RecipeError, ["alpha"]),
    ({"name": "x", "default": "int4"}, RecipeError, ["default", "int4"]),
])
def test_bad_recipe_names_the_key(recipe, cls, fragments):
    def make():
        r = fxquant.Recipe.from_dict(recipe) if isinstance(recipe, dict) else recipe
        fxquant.compile(Tiny(), r, cal())
    raises(cls, *fragments, fn=make)


def test_recipe_file_that_is_not_json_names_the_problem(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("{not json")
    raises(RecipeError, "invalid JSON", fn=lambda: fxquant.compile(Tiny(), p, cal()))


# ---------------------------------------------------------------- calibration

@pytest.mark.parametrize("calibration, fragments", [
    (None, ["calibration inputs are required"]),
    ([], ["calibration is empty"]),
    ([42], ["calibration[0]", "int"]),
    ({"cond": []}, ["calibration is a dict but model is a single module"]),
    ([(torch.empty(2, 6, 32, device="meta"),)], ["calibration[0][0]", "meta device"]),
])
def test_bad_calibration_names_the_item(calibration, fragments):
    raises(CalibrationError, *fragments, fn=lambda: fxquant.compile(Tiny(), "int8-w8a8-paper", calibration))


def test_branch_keys_that_do_not_match_are_named():
    raises(CalibrationError, "['uncond']", "['cond']",
           fn=lambda: fxquant.compile({"cond": Tiny()}, "w8a8-naive", {"uncond": cal()}))


def test_calibration_is_not_mutated():
    x = cal()
    kept = [tuple(t.clone() for t in item) for item in x]
    fxquant.compile(Tiny(), "int8-w8a8-paper", x)
    assert all(torch.equal(a, b) for item, k in zip(x, kept) for a, b in zip(item, k))


# ---------------------------------------------------------------- runtime calls

@pytest.fixture(scope="module")
def tiny_gm():
    return fxquant.compile(Tiny(), "w8a8-naive", cal())


@pytest.mark.parametrize("call, cls, fragments", [
    (lambda gm: fxquant.summary(Tiny()), FxquantError, ["summary", "got Tiny"]),
    (lambda gm: fxquant.export_program(Tiny()), FxquantError, ["export", "got a Tiny", "fxquant.compile"]),
    (lambda gm: fxquant.save(Tiny(), "x.safetensors"), FxquantError, ["save", "Tiny"]),
    (lambda gm: fxquant.save({}, "x.safetensors"), FxquantError, ["dict of branches is empty"]),
    (lambda gm: fxquant.save_gguf(gm, "x.gguf"), FxquantError, ["save_gguf", "layer", "GGUF cannot store"]),
    (lambda gm: fxquant.save_gguf(Tiny(), "x.gguf"), FxquantError, ["save_gguf", "Tiny"]),
    (lambda gm: fxquant.save(gm, 42), FxquantError, ["save: path must be a str or os.PathLike, got int"]),
    (lambda gm: fxquant.save_pt2(gm, 3.5), FxquantError, ["save_pt2: path must be a str or os.PathLike, got float"]),
    (lambda gm: fxquant.load_pt2(None), FxquantError, ["load_pt2: path must be a str or os.PathLike"]),
])
def test_bad_runtime_call_is_named(tiny_gm, call, cls, fragments, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raises(cls, *fragments, fn=lambda: call(tiny_gm))
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("writer, name", [(fxquant.save, "save"), (fxquant.save_pt2, "save_pt2")])
def test_missing_folder_and_directory_are_named(tiny_gm, tmp_path, writer, name):
    raises(FormatError, f"{name}: cannot write {tmp_path / 'no' / 'm'}", "does not exist",
           fn=lambda: writer(tiny_gm, tmp_path / "no" / "m"))
    raises(FormatError, f"{name}: cannot write {tmp_path}", "is a directory", fn=lambda: writer(tiny_gm, tmp_path))
    assert not (tmp_path / "no").exists()


def test_report_of_a_module_without_records(tmp_path):
    raises(FxquantError, "no fxquant records", fn=lambda: fxquant.report(torch.fx.symbolic_trace(Tiny()), tmp_path))


def test_load_gguf_without_accelerate_names_it(gguf_file, monkeypatch):
    from fxquant.integrations import diffusers as integration

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    raises(MissingDependencyError, "load_gguf needs accelerate", "pip install accelerate",
           fn=lambda: integration.load_gguf(gguf_file))


def test_saved_module_is_still_the_same_after_every_writer(tiny_gm, tmp_path):
    before = copy.deepcopy([n.meta.get("custom") for n in tiny_gm.graph.nodes])
    fxquant.save(tiny_gm, tmp_path / "m.safetensors")
    fxquant.save_pt2(tiny_gm, tmp_path / "m.pt2")
    assert [n.meta.get("custom") for n in tiny_gm.graph.nodes] == before
    x = (torch.randn(2, 6, 32),)
    with torch.no_grad():
        torch.testing.assert_close(fxquant.load(tmp_path / "m.safetensors")(*x), tiny_gm(*x), rtol=0, atol=0)
        # A plain .pt2 module takes the traced keyword form (fxquant.load's drop-in module takes both).
        torch.testing.assert_close(fxquant.load_pt2(tmp_path / "m.pt2").module()(x=x[0]), tiny_gm(*x), rtol=0, atol=0)


# ---------------------------------------------------------------- the command line

def run(*argv):
    out, err = stdio.StringIO(), stdio.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


BUILTIN = ("compile", "--model", "builtin:ideogram4-reduced", "--recipe", "w8a8-naive")


@pytest.mark.parametrize("argv, fragment", [
    (BUILTIN + ("--layers", 0), "--layers 0: the built-in model needs at least 1 layer"),
    (BUILTIN + ("--layers", -2), "--layers -2"),
    (BUILTIN + ("--steps", 0), "--steps 0: give at least 1"),
    (("compile", "--model", "nomodule", "--recipe", "w8a8-naive"), "--model 'nomodule'"),
    (("compile", "--model", "no_such_pkg_xyz:make", "--recipe", "w8a8-naive"), "cannot import 'no_such_pkg_xyz'"),
    (BUILTIN + ("--recipe", "no-such-preset"), "no-such-preset"),
])
def test_cli_mistake_is_one_line_naming_the_argument(tmp_path, argv, fragment):
    rc, out, err = run(*argv, "--out", tmp_path / "m.safetensors", "-q")
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and fragment in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_cli_untraceable_model_error_is_one_line(tmp_path):
    (tmp_path / "dd_model.py").write_text("from tests.bad_inputs.test_bad_inputs import DataDependent\n"
                                          "def make():\n    return DataDependent()\n")
    torch.save([{"x": torch.randn(2, 4, 32)}], tmp_path / "cal.pt")
    rc, out, err = run("compile", "--model", f"{tmp_path / 'dd_model.py'}:make", "--recipe", "w8a8-naive",
                       "--calibration", tmp_path / "cal.pt", "--out", tmp_path / "m.safetensors", "-q")
    assert rc == 1 and err.strip().splitlines() == [err.strip()] and "cannot trace DataDependent" in err, err


@pytest.fixture(scope="module")
def cli_branches(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "b.safetensors"
    rc, _, err = run(*BUILTIN, "--branches", "cond,uncond", "--layers", 1, "--steps", 1, "--out", path, "-q")
    assert rc == 0, err
    return path


def test_cli_export_names_per_branch_files_with_their_extension(cli_branches, tmp_path):
    """One real export into a folder (each file a verified .pt2); the naming rule for the other
    --out forms is the same function, checked directly (a real export costs two torch.exports)."""
    from fxquant.commands import _per_branch

    (tmp_path / "outdir").mkdir()
    rc, stdout, err = run("export", cli_branches, "--format", "pt2", "--out", f"{tmp_path}/outdir/", "-q")
    assert rc == 0, err
    expected = [tmp_path / "outdir" / "cond.pt2", tmp_path / "outdir" / "uncond.pt2"]
    assert stdout.split() == [str(e) for e in expected]
    for e in expected:
        fxquant.load_pt2(e)  # each one a verified .pt2
    for out, names in (("noext", ["noext.cond.pt2", "noext.uncond.pt2"]), ("m.pt2", ["m.cond.pt2", "m.uncond.pt2"]),
                       ("outdir", ["outdir/cond.pt2", "outdir/uncond.pt2"])):  # an existing folder without "/"
        assert [_per_branch(f"{tmp_path}/{out}", b, True, "pt2") for b in ("cond", "uncond")] == \
            [str(tmp_path / n) for n in names]
    assert _per_branch(f"{tmp_path}/one.gguf", "", False, "gguf") == f"{tmp_path}/one.gguf"


def test_cli_export_into_a_missing_folder_is_named(cli_branches, tmp_path):
    rc, _, err = run("export", cli_branches, "--format", "pt2", "--out", f"{tmp_path}/nope/", "-q")
    assert rc == 1 and "--out" in err and "nope" in err and "does not exist" in err, err


def test_cli_report_onto_a_file_and_inspect_of_a_corrupt_file(cli_branches, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    rc, _, err = run("report", cli_branches, "--out", taken, "-q")
    assert rc == 1 and f"{taken}: it is a file" in err and taken.read_text() == "mine", err
    bad = tmp_path / "bad.safetensors"
    data = bytearray(cli_branches.read_bytes())
    data[-5] ^= 0xFF
    bad.write_bytes(bytes(data))
    rc, _, err = run("inspect", bad, "-q")
    assert rc == 1 and str(bad) in err and "sha256" in err, err
