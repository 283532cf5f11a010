"""The fxquant command line, run in-process through ``main([...])`` (plus one run of the installed
entry point): compile -> inspect -> export -> report, and one-line errors."""

import contextlib
import io as stdio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxquant
from fxquant.cli import BUILTIN, main
from fxquant.models import ideogram4_inputs, ideogram4_trajectory


def run(*argv):
    out, err = stdio.StringIO(), stdio.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(map(str, argv)))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def branches(tmp_path_factory):
    """The built-in reduced Ideogram 4, both CFG branches, compiled from the command line."""
    path = tmp_path_factory.mktemp("cli") / "ideogram4.safetensors"
    rc, out, err = run("compile", "--model", BUILTIN, "--branches", "cond,uncond", "--layers", 1, "--steps", 2,
                       "--recipe", "int8-w8a8", "--out", path)
    return path, rc, err


@pytest.fixture(scope="module")
def factory_q8(tmp_path_factory):
    """A model from a user factory (module:function), a recipe JSON and a calibration file."""
    d = tmp_path_factory.mktemp("factory")
    (d / "cli_factory_mod.py").write_text(textwrap.dedent("""
        from fxquant.models import reduced_ideogram4

        def make():
            return reduced_ideogram4(seed=7, num_layers=1)
    """))
    recipe = {"name": "my-q8", "weights": "q8_0", "activations": "none", "protect": ["final_layer.linear"]}
    (d / "recipe.json").write_text(json.dumps(recipe))
    torch.save(ideogram4_trajectory(steps=2, seed=4, text_len=4, image_hw=(2, 2)), d / "calib.pt")
    sys.path.insert(0, str(d))
    try:
        rc, out, err = run("compile", "--model", "cli_factory_mod:make", "--recipe", d / "recipe.json",
                           "--calibration", d / "calib.pt", "--out", d / "q8.safetensors", "--quiet")
    finally:
        sys.path.remove(str(d))
    return d / "q8.safetensors", rc, err


def test_compile_builtin_branches_with_progress(branches):
    path, rc, err = branches
    assert rc == 0, err
    assert "compiling branch 'cond'" in err and "compiling branch 'uncond'" in err and "saving" in err
    loaded = fxquant.load(path)
    assert list(loaded) == ["cond", "uncond"]
    counts = fxquant.summary(loaded).counts()  # 1 layer x 8 linears + 7 outside, per branch
    kinds = fxquant.summary(loaded).counts("kind")
    # int8-w8a8 protects by measured sensitivity within a 5% float budget: a few linears per branch
    assert sum(counts.values()) == 2 * 15 and counts["w8a8"] >= 2 * 11 and kinds["protected"] >= 2


def test_compile_from_factory_recipe_json_and_calibration_file(factory_q8):
    path, rc, err = factory_q8
    assert rc == 0, err
    assert err == ""  # --quiet
    gm = fxquant.load(path)
    assert gm.meta["fxquant"].recipe["name"] == "my-q8"
    counts = fxquant.summary(gm).counts()
    assert counts.get("q8_0", 0) > 0 and fxquant.summary(gm).counts("kind")["protected"] == 1


def test_inspect_prints_metadata_and_summary(branches):
    rc, out, err = run("inspect", branches[0])
    assert rc == 0, err
    assert "format version 2" in out and "branches: cond, uncond" in out and "sha256 verified" in out
    assert "layers.0.feed_forward.w2" in out and "int8-w8a8" in out and "protected" in out


def test_export_pt2_one_branch(branches, tmp_path):
    rc, out, err = run("export", branches[0], "--format", "pt2", "--branch", "uncond", "--out", tmp_path / "u.pt2")
    assert rc == 0, err
    assert out.strip() == str(tmp_path / "u.pt2")
    module = torch.export.load(tmp_path / "u.pt2").module()
    ex = ideogram4_inputs(batch=3, text_len=5, image_hw=(2, 3), seed=2)
    with torch.no_grad():
        torch.testing.assert_close(module(**ex).sample, fxquant.load(branches[0])["uncond"](**ex).sample, rtol=0, atol=0)


def test_export_gguf(factory_q8, branches, tmp_path):
    rc, out, err = run("export", factory_q8[0], "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert rc == 0, err
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"
    # a W8A8 artifact cannot be written as GGUF: one clean line, exit 1
    rc, out, err = run("export", branches[0], "--format", "gguf", "--branch", "cond", "--out", tmp_path / "w.gguf")
    assert rc == 1 and err.strip().splitlines()[-1].startswith("fxquant: error: ") and "Traceback" not in err


def test_report(branches, tmp_path):
    rc, out, err = run("report", branches[0], "--out", tmp_path / "report", "--quiet")
    assert rc == 0, err
    written = out.split()
    assert written and all(Path(p).is_file() and Path(p).parent == tmp_path / "report" for p in written)
    assert any(p.endswith(".json") for p in written) and any(p.endswith(".md") for p in written)


@pytest.mark.parametrize("argv, missing", [(["report", "x.safetensors", "--out", "r"], "report"),
                                           (["export", "x.safetensors", "--format", "gguf", "--out", "x.gguf"], "save_gguf")])
def test_missing_backend_is_a_clean_error(monkeypatch, argv, missing):
    monkeypatch.delattr(fxquant, missing)
    rc, out, err = run(*argv, "--quiet")
    assert rc == 1 and err.strip().startswith("fxquant: error: ") and f"no fxquant.{missing}" in err


@pytest.mark.parametrize("argv, fragment", [
    (["inspect", "missing.safetensors"], "missing.safetensors: cannot read"),
    (["compile", "--model", BUILTIN, "--recipe", "no-such-recipe", "--out", "x.safetensors"], "no-such-recipe"),
    (["compile", "--model", "no_such_module_xyz:make", "--recipe", "w8a8-naive", "--calibration", __file__, "--out", "x"],
     "cannot import"),
    (["compile", "--model", "nocolon", "--recipe", "w8a8-naive", "--out", "x"], "expected"),
    (["compile", "--model", "no/such/file.py:make", "--recipe", "w8a8-naive", "--out", "x"], "no such file"),
    (["export", "missing.safetensors", "--format", "pt2", "--out", "x.pt2"], "missing.safetensors: cannot read"),
    (["compile", "--model", BUILTIN, "--recipe", "w8a8-naive", "--calibration", "nope.pt", "--out", "x"], "no such file"),
    (["compile", "--model", BUILTIN, "--recipe", "w8a8-naive", "--out", "/no/such/dir/x.safetensors"],
     "compile --out: cannot write /no/such/dir/x.safetensors: the folder /no/such/dir does not exist"),
    (["export", "missing.safetensors", "--format", "pt2", "--out", "/no/such/dir/x.pt2"], "/no/such/dir does not exist"),
])
def test_errors_are_one_line_without_traceback(argv, fragment):
    rc, out, err = run(*argv, "--quiet")
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxquant: error: ") and fragment in lines[0], err


def test_traceback_on_request(monkeypatch):
    rc, out, err = run("inspect", "missing.safetensors", "--traceback")
    assert rc == 1 and "Traceback (most recent call last)" in err and "FormatError" in err
    rc, out, err = run("--traceback", "inspect", "missing.safetensors")  # before the command works too
    assert rc == 1 and "Traceback (most recent call last)" in err
    monkeypatch.setenv("FXQUANT_TRACEBACK", "1")
    rc, out, err = run("inspect", "missing.safetensors")
    assert rc == 1 and "Traceback (most recent call last)" in err


@pytest.mark.parametrize("cmd", [[], ["compile"], ["inspect"], ["export"], ["report"]])
def test_help(cmd):
    rc, out, err = run(*cmd, "--help")
    assert rc == 0 and out.startswith(f"usage: fxquant {' '.join(cmd)}".rstrip())


def test_usage_error_exits_2():
    rc, out, err = run("export", "x.safetensors", "--format", "onnx", "--out", "y")
    assert rc == 2 and "invalid choice" in err


def test_installed_entry_point():
    exe = Path(sys.executable).with_name("fxquant")
    assert exe.exists(), "the fxquant console script is not installed (pip install -e .)"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("usage: fxquant")
