"""Byte-reproducible artifacts, and writers that leave the caller's module as it was.

The same model, recipe and calibration must give byte-identical ``.safetensors``, ``.pt2`` and
``.gguf`` files: saved twice, compiled twice in one process, and compiled in another process.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
import textwrap

import pytest

import fxquant

from .conftest import W8A8_RECIPE, gguf_calibration, gguf_model, gguf_recipe, w8a8_calibration, w8a8_model

WRITERS = {"safetensors": fxquant.save, "pt2": fxquant.save_pt2, "gguf": fxquant.save_gguf}


def _snapshot(gm):
    """Everything a writer could change in place: attributes, graph-level and node metadata, tensors."""
    return (sorted(gm.__dict__), copy.deepcopy(gm.meta),
            [(n.name, copy.deepcopy(n.meta.get("custom"))) for n in gm.graph.nodes],
            {k: v.clone() for k, v in gm.state_dict().items()})


def _same(a, b):
    assert a[:3] == b[:3]
    assert a[3].keys() == b[3].keys() and all(a[3][k].equal(b[3][k]) for k in a[3])


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_all(w8a8, q8, folder):
    folder.mkdir(exist_ok=True)
    out = {}
    for ext, save in WRITERS.items():
        path = folder / f"m.{ext}"
        save(q8 if ext == "gguf" else w8a8, path)
        out[ext] = _digest(path)
    return out


def test_writers_do_not_touch_the_callers_module(w8a8, q8, tmp_path):
    before = {"w8a8": _snapshot(w8a8), "q8": _snapshot(q8)}
    _save_all(w8a8, q8, tmp_path)
    fxquant.export_program(w8a8)
    _same(before["w8a8"], _snapshot(w8a8))
    _same(before["q8"], _snapshot(q8))
    assert not any(k.startswith("_torchdynamo") for n in w8a8.graph.nodes for k in (n.meta.get("custom") or {}))


def test_saving_twice_gives_the_same_bytes(w8a8, q8, tmp_path):
    assert _save_all(w8a8, q8, tmp_path / "a") == _save_all(w8a8, q8, tmp_path / "b")


def _first_difference(a, b):
    x, y = a.read_bytes(), b.read_bytes()
    i = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
    return f"{a.name}: first difference at byte {i}:\n{x[max(0, i - 300):i + 80]!r}\n{y[max(0, i - 300):i + 80]!r}"


def test_compiling_twice_in_one_process_gives_the_same_bytes(w8a8, q8, tmp_path):
    again = fxquant.compile(w8a8_model(), W8A8_RECIPE, calibration=w8a8_calibration())
    q8_again = fxquant.compile(gguf_model(), gguf_recipe(), calibration=gguf_calibration())
    first, second = _save_all(w8a8, q8, tmp_path / "a"), _save_all(again, q8_again, tmp_path / "b")
    for ext in WRITERS:
        assert first[ext] == second[ext], _first_difference(tmp_path / "a" / f"m.{ext}", tmp_path / "b" / f"m.{ext}")


@pytest.mark.slow
def test_another_process_gives_the_same_bytes(w8a8, q8, tmp_path):
    script = textwrap.dedent(f"""
        import json, pathlib, sys
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parents[2])!r})
        import fxquant
        from tests.bad_inputs.conftest import (W8A8_RECIPE, gguf_calibration, gguf_model, gguf_recipe, w8a8_calibration,
                                               w8a8_model)
        from tests.bad_inputs.test_reproducible import _save_all
        w8a8 = fxquant.compile(w8a8_model(), W8A8_RECIPE, calibration=w8a8_calibration())
        q8 = fxquant.compile(gguf_model(), gguf_recipe(), calibration=gguf_calibration())
        print(json.dumps(_save_all(w8a8, q8, pathlib.Path(sys.argv[1]))))
    """)
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "other")], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    other = json.loads(run.stdout.strip().splitlines()[-1])
    assert other == _save_all(w8a8, q8, tmp_path / "here")
