"""fxquant.save / fxquant.load: round trips on a seeded reduced Ideogram 4, and every bad file.

    compile(2 branches, int8-w8a8) --save--> one .safetensors --load--> dict of GraphModules
    outputs compared bit for bit (rtol = atol = 0) with the compiled modules, on shapes other than
    the tracing example's; every corrupted file must raise FormatError naming the file and the key.
"""

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fxquant
from fxquant import meta
from fxquant.artifacts import export
from fxquant.artifacts import manifest as fmt
from fxquant.models import ideogram4_inputs, ideogram4_trajectory, reduced_ideogram4

W8A8 = torch.ops.fxquant.linear_w8a8.default
Q_KEY = "cond/buffers/layers.0.attention.to_q.weight_int8"


@pytest.fixture(scope="module")
def compiled():
    models = {"cond": reduced_ideogram4(seed=1, num_layers=2), "uncond": reduced_ideogram4(seed=2, num_layers=2)}
    calib = {b: ideogram4_trajectory(steps=2, seed=i, text_len=6, image_hw=(4, 4)) for i, b in enumerate(models)}
    return fxquant.compile(models, "int8-w8a8", calibration=calib)


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory):
    path = tmp_path_factory.mktemp("io") / "ideogram4.safetensors"
    fxquant.save(compiled, path)
    return path


def _inputs(batch=3, text_len=5, hw=(3, 3), seed=7):
    return ideogram4_inputs(batch=batch, text_len=text_len, image_hw=hw, seed=seed, timestep=0.4)


def test_dict_round_trip_is_bit_identical_on_new_shapes(compiled, saved):
    loaded = fxquant.load(saved)
    assert isinstance(loaded, dict) and list(loaded) == ["cond", "uncond"]
    for name, gm in compiled.items():
        for batch, text_len, hw in [(3, 5, (3, 3)), (1, 9, (2, 4)), (1, 12, (8, 8))]:  # not the tracing shape
            ex = _inputs(batch, text_len, hw)
            with torch.no_grad():
                ref, out = gm(**ex), loaded[name](**ex)
            assert type(out) is type(ref)
            torch.testing.assert_close(out.sample, ref.sample, rtol=0, atol=0)


def test_loaded_module_keeps_records_summary_and_int8_weights(compiled, saved):
    loaded = fxquant.load(saved)
    assert fxquant.summary(loaded).rows == fxquant.summary(compiled).rows
    assert "protected" in fxquant.summary(loaded).counts("kind")  # fragility-based protection survived
    for name, gm in loaded.items():
        assert gm.meta["fxquant"] == compiled[name].meta["fxquant"]
        ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is W8A8]
        assert len(ops) == sum(1 for n in compiled[name].graph.nodes if n.target is W8A8) > 0
        sd = gm.state_dict()
        # Tensors straight from safetensors are only 8-byte aligned; CPU GEMMs take another path on
        # them and round differently (seen: 1-ulp output differences at batch 1).
        assert all(t.data_ptr() % 64 == 0 for t in sd.values() if t.numel())
        assert sd["layers.0.attention.to_q.weight_int8"].dtype == torch.int8
        assert "layers.0.attention.to_q.weight" not in sd  # no float copy came back
        torch.testing.assert_close(sd["layers.0.attention.to_q.weight_int8"],
                                   compiled[name].state_dict()["layers.0.attention.to_q.weight_int8"], rtol=0, atol=0)


def test_metadata_holds_versions_recipe_layers_and_checksums(saved, compiled):
    with safe_open(saved, framework="pt") as f:
        manifest = json.loads(f.metadata()["fxquant"])
        keys = set(f.keys())
    assert manifest["format_version"] == fmt.FORMAT_VERSION
    assert manifest["fxquant_version"] == fxquant.__version__ and manifest["torch_version"] == torch.__version__
    cond = manifest["branches"]["cond"]
    assert cond["graph"]["recipe"]["name"] == "int8-w8a8"
    layer = cond["layers"]["layers.0.attention.to_q"]
    assert layer["lowering"]["scheme"] in ("w8a8", "float") and "fragility" in layer and "smoothing" in layer
    assert set(cond["tensors"]) | set(manifest["branches"]["uncond"]["tensors"]) == keys
    assert len(cond["tensors"][Q_KEY]["sha256"]) == 64


def test_single_module_and_gguf_scheme_round_trip(tmp_path):
    gm = fxquant.compile(reduced_ideogram4(seed=3, num_layers=1), "q8_0",
                         calibration=[ideogram4_inputs(batch=2, text_len=4, image_hw=(2, 2), seed=1)])
    assert "q8_0" in fxquant.summary(gm).counts()
    fxquant.save(gm, tmp_path / "q8.safetensors")
    loaded = fxquant.load(tmp_path / "q8.safetensors")
    assert isinstance(loaded, torch.fx.GraphModule)
    ex = _inputs(2, 6, (3, 2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ex).sample, gm(**ex).sample, rtol=0, atol=0)
    # a loaded module saves again to an equivalent file
    fxquant.save(loaded, tmp_path / "again.safetensors")
    again = fxquant.load(tmp_path / "again.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(again(**ex).sample, gm(**ex).sample, rtol=0, atol=0)


def test_save_leaves_the_module_alone(compiled, tmp_path):
    before = {k: v.clone() for k, v in compiled["cond"].state_dict().items()}
    code = compiled["cond"].code
    fxquant.save(compiled["cond"], tmp_path / "one.safetensors")
    assert compiled["cond"].code == code
    after = compiled["cond"].state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_load_in_a_fresh_process_needs_only_fxquant(compiled, saved, tmp_path):
    """No model class, no weights, no calibration: a new interpreter that imports only fxquant."""
    ex = _inputs(2, 4, (2, 3))
    torch.save(ex, tmp_path / "ex.pt")
    with torch.no_grad():
        torch.save(compiled["uncond"](**ex).sample, tmp_path / "ref.pt")
    script = (
        "import sys, torch, fxquant\n"
        f"m = fxquant.load({str(saved)!r})['uncond']\n"
        f"ex = torch.load({str(tmp_path / 'ex.pt')!r})\n"
        f"ok = torch.equal(m(**ex).sample, torch.load({str(tmp_path / 'ref.pt')!r}))\n"
        "print('OK' if ok and 'fxquant.models' not in sys.modules else 'MISMATCH')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "OK"


def test_example_description_round_trips():
    ex = {"x": torch.ones(2, 3, dtype=torch.bfloat16), "ids": [torch.zeros(4, dtype=torch.long), None], "flag": True}
    desc = export.describe_inputs(ex)
    assert json.loads(json.dumps(desc)) == desc
    back = export.example_from(desc, "ex")
    assert back["x"].shape == (2, 3) and back["x"].dtype == torch.bfloat16
    assert back["ids"][0].dtype == torch.long and back["ids"][1] is None and back["flag"] is True


def test_save_refuses_modules_fxquant_did_not_compile(tmp_path):
    plain = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    with pytest.raises(fxquant.FxquantError, match="no fxquant records"):
        fxquant.save(plain, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- bad files

def _rewrite(src, dst, edit_manifest=None, edit_tensors=None, redigest=True):
    """Copy an artifact through safetensors, editing its manifest and/or tensors."""
    tensors = load_file(src)
    with safe_open(src, framework="pt") as f:
        md = dict(f.metadata())
    manifest = json.loads(md["fxquant"])
    if edit_manifest:
        edit_manifest(manifest)
    md["fxquant"] = json.dumps(manifest, sort_keys=True)
    if redigest:  # keep the digests consistent, so that the check under test is the one that fires
        md["fxquant.digests"] = json.dumps(fmt.digests(manifest), sort_keys=True)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, dst, metadata=md)
    return dst


def _bad(path, *fragments):
    with pytest.raises(fxquant.FormatError) as e:
        fxquant.load(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


@pytest.mark.parametrize("keep", [4, 100, 0.5, -1])
def test_truncated_file(saved, tmp_path, keep):
    data = saved.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) - 1 if keep == -1 else keep)
    (tmp_path / "cut.safetensors").write_bytes(data[:n])
    _bad(tmp_path / "cut.safetensors", "truncated")


def test_wrong_format_version(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "v9.safetensors", lambda m: m.update(format_version=9))
    _bad(bad, "format_version", "9")


def test_format1_artifacts_still_load():
    """A file written by fxquant 0.1 (format 1: no per-layer scheme, graph facts under "extra"),
    made once with that version and kept in tests/data/legacy, loads and runs bit-identically."""
    here = os.path.join(os.path.dirname(__file__), "data", "legacy")
    gm = fxquant.load(os.path.join(here, "format1_int8-w8a8.safetensors"))
    io_ = torch.load(os.path.join(here, "format1_int8-w8a8.io.pt"), weights_only=True)
    with torch.no_grad():
        out = gm(**io_["inputs"]).sample
    torch.testing.assert_close(out, io_["output"], rtol=0, atol=0)
    s = fxquant.summary(gm)
    assert s.counts() == {"w8a8": 13, "float": 2} and s.counts("kind") == {"quantize": 13, "protected": 2}
    g = meta.graph_record(gm)
    assert g.model_class == "Ideogram4Transformer2DModel" and g.model_config["num_layers"] == 1


def test_tampered_layer_scheme_is_named(saved, tmp_path):
    def edit(m):
        m["branches"]["cond"]["layers"]["layers.1.feed_forward.w1"]["lowering"]["scheme"] = "q4_k"

    bad = _rewrite(saved, tmp_path / "scheme.safetensors", edit, redigest=False)
    _bad(bad, "branches/cond/layers/layers.1.feed_forward.w1", "modified")


def test_tampered_tensor_shape_in_metadata_is_named(saved, tmp_path):
    def edit(m):
        m["branches"]["cond"]["tensors"][Q_KEY]["shape"] = [64, 128]

    _bad(_rewrite(saved, tmp_path / "shape_md.safetensors", edit, redigest=False), f"branches/cond/tensors/{Q_KEY}")
    # even with recomputed digests, the shape no longer matches the tensor in the file
    _bad(_rewrite(saved, tmp_path / "shape_md2.safetensors", edit), Q_KEY, "[64, 128]")


def test_metadata_that_disagrees_with_the_graph_is_caught(saved, tmp_path):
    def edit(m):
        m["branches"]["uncond"]["layers"]["layers.0.attention.to_v"]["lowering"]["scheme"] = "float"

    _bad(_rewrite(saved, tmp_path / "graph.safetensors", edit), "layers.0.attention.to_v", "uncond")
    # a layer dropped from the metadata is caught too
    dropped = _rewrite(saved, tmp_path / "dropped.safetensors", lambda m: m["branches"]["cond"]["layers"].pop("adaln_proj"))
    _bad(dropped, "adaln_proj", "cond")


def test_manifest_fields_of_the_wrong_type_with_consistent_digests(saved, tmp_path):
    _bad(_rewrite(saved, tmp_path / "tv.safetensors", lambda m: m.pop("torch_version")), "'torch_version' is malformed")
    bad = _rewrite(saved, tmp_path / "graph.safetensors", lambda m: m["branches"]["cond"]["graph"].update(extra=5))
    _bad(bad, "'branches/cond/graph' is malformed")


def test_missing_tensor(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "missing.safetensors", edit_tensors=lambda t: t.pop(Q_KEY))
    _bad(bad, Q_KEY, "missing")


def test_mis_shaped_tensor(saved, tmp_path):
    def edit(t):
        t[Q_KEY] = t[Q_KEY][:, :64].contiguous()

    _bad(_rewrite(saved, tmp_path / "shape.safetensors", edit_tensors=edit), Q_KEY, "shape")


def test_extra_tensor(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "extra.safetensors", edit_tensors=lambda t: t.update({"cond/params/evil": torch.ones(3)}))
    _bad(bad, "cond/params/evil", "not listed")


@pytest.mark.parametrize("key", [Q_KEY, "uncond/program"])
def test_flipped_bytes_in_tensor_data(saved, tmp_path, key):
    data = bytearray(saved.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8:8 + n])[key]["data_offsets"]
    data[8 + n + (start + end) // 2] ^= 0x5A
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    _bad(tmp_path / "flip.safetensors", key, "sha256")


def test_not_an_fxquant_file_and_missing_file(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors")
    _bad(tmp_path / "plain.safetensors", "not an fxquant artifact")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    _bad(tmp_path / "junk.safetensors", "not a safetensors file")
    _bad(tmp_path / "nope.safetensors", "cannot read")
    (tmp_path / "m.pt2").write_bytes(b"PK\x03\x04" + bytes(100))
    _bad(tmp_path / "m.pt2", "fxquant.load_pt2")
    assert not os.path.exists(tmp_path / "nope.safetensors")


def _edit_header(src, dst, edit):
    """Copy an artifact byte for byte with its JSON header edited in place (no safetensors writer)."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return dst


def test_header_offsets_that_do_not_add_up(saved, tmp_path):
    def edit(h):
        start, end = h[Q_KEY]["data_offsets"]
        h[Q_KEY]["data_offsets"] = [0, end - start]  # overlaps the first tensor

    _bad(_edit_header(saved, tmp_path / "offsets.safetensors", edit), Q_KEY)


@pytest.mark.parametrize("offsets", [["0", "x"], [0.5, 64], None, [64], [64, 0], [-1, 64], [True, 64]])
def test_header_offsets_that_are_not_two_ordered_integers(saved, tmp_path, offsets):
    bad = _edit_header(saved, tmp_path / "offsets.safetensors", lambda h: h[Q_KEY].update(data_offsets=offsets))
    _bad(bad, Q_KEY, "data_offsets", repr(offsets))


@pytest.mark.parametrize("key, value, fragment", [(Q_KEY, "int8", "header entry"),
                                                  ("__metadata__", "fxquant", "'__metadata__' is malformed"),
                                                  ("__metadata__", {"fxquant": 5}, "'__metadata__' is malformed")])
def test_header_entries_of_the_wrong_type(saved, tmp_path, key, value, fragment):
    _bad(_edit_header(saved, tmp_path / "types.safetensors", lambda h: h.update({key: value})), fragment)


def test_header_length_past_the_end_a_directory_and_not_a_path(tmp_path):
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 2**63) + b"{}")
    _bad(tmp_path / "long.safetensors", "truncated")
    (tmp_path / "a_dir.safetensors").mkdir()
    _bad(tmp_path / "a_dir.safetensors", "cannot read", "directory")
    with pytest.raises(fxquant.FxquantError, match="load: path must be a str or os.PathLike, got NoneType"):
        fxquant.load(None)


def test_save_into_a_missing_folder_or_onto_a_directory(compiled, tmp_path):
    gm = compiled["cond"]
    with pytest.raises(fxquant.FormatError, match="cannot write .*/no/such/x.safetensors: the folder .* does not exist"):
        fxquant.save(gm, tmp_path / "no" / "such" / "x.safetensors")
    assert not (tmp_path / "no").exists()  # save does not create folders
    with pytest.raises(fxquant.FormatError, match=f"cannot write {tmp_path}: it is a directory"):
        fxquant.save(gm, tmp_path)
    with pytest.raises(fxquant.FxquantError, match="save: path must be a str or os.PathLike, got int"):
        fxquant.save(gm, 3)
    assert list(tmp_path.iterdir()) == []  # no .partial left behind


@pytest.mark.parametrize("make, fragment", [
    (lambda c: torch.nn.Linear(4, 4), "model is a Linear"), (lambda c: torch.ones(2), "model is a Tensor"),
    (lambda c: None, "model is a NoneType"), (lambda c: [c["cond"]], "model is a list"),
    (lambda c: {"cond": torch.nn.Linear(4, 4)}, "branch 'cond' of the dict is a Linear"),
    (lambda c: {"cond": c["cond"], "uncond": "m.safetensors"}, "branch 'uncond' of the dict is a str")])
def test_save_refuses_what_is_not_a_graph_module(compiled, tmp_path, make, fragment):
    with pytest.raises(fxquant.FxquantError, match=fragment + "; expected the GraphModule returned by fxquant.compile"):
        fxquant.save(make(compiled), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
