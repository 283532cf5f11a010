"""save_gguf -> gguf-py's GGUFReader (bytes, types, shapes, metadata) -> diffusers' GGUF loader.

References are outside fxquant: gguf-py reads the file back, and diffusers' own
``from_single_file`` + ``GGUFQuantizationConfig`` path loads it and runs the model.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import fxquant
from fxquant.errors import FormatError, FxquantError
from fxquant.artifacts.gguf import gguf_metadata, save_gguf
from fxquant.models import ideogram4_inputs, reduced_ideogram4

gguf = pytest.importorskip("gguf")
# diffusers' GGUF quantizer needs accelerate (in the test extras); only the loading tests do.
needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate not installed")
from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES  # noqa: E402
from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, dequantize_gguf_tensor  # noqa: E402

from fxquant.integrations.diffusers import load_gguf, single_file_support  # noqa: E402

# The q4_k_m preset: most linears 256-aligned (Q4_K); input_proj (32), llm_cond_proj (96), adaLN (64)
# become Q8_0 under misaligned="q8_0", and a protected FFN down-projection is stored Q8_0 too, so one
# file holds Q4_K, Q8_0 and F32 tensors. (A protect rule instead of the fragility top-k: deterministic.)
CFG = dict(attention_head_dim=64, num_attention_heads=4, intermediate_size=512, mrope_section=(12, 10, 10), in_channels=32)
RECIPE = fxquant.Recipe.preset("q4_k_m").replace(name="q4_k_m-rule", protect_top_k=0,
                                                 protect=(fxquant.LayerRule("layers.0.feed_forward.w2"),))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = reduced_ideogram4(seed=4, **CFG)
    gm = fxquant.compile(model, RECIPE, calibration=[ideogram4_inputs(in_channels=32, seed=6)])
    path = str(tmp_path_factory.mktemp("gguf") / "ideogram4.gguf")
    return model, gm, path, save_gguf(gm, path)


def expected_tensors(gm):
    """GGUF name -> (GGML type, bytes) from the lowered module's own buffers and op arguments."""
    out = {}
    qtypes = {str(n.args[1].target): n.args[2] for n in gm.graph.nodes if n.target is torch.ops.fxquant.linear_gguf.default}
    for key, t in gm.state_dict().items():
        if key in qtypes:
            out[key[: -len(".qweight")] + ".weight"] = (qtypes[key].upper(), t.numpy().tobytes())
        else:
            out[key] = ({torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[t.dtype],
                        t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def test_reader_gives_identical_bytes_types_and_shapes(exported):
    model, gm, path, report = exported
    want = expected_tensors(gm)
    reader = gguf.GGUFReader(path)
    assert {t.name for t in reader.tensors} == set(want) == set(model.state_dict())  # diffusers' names
    for t in reader.tensors:
        ty, data = want[t.name]
        assert t.tensor_type.name == ty, t.name
        assert t.data.tobytes() == data, t.name
        logical = tuple(int(d) for d in reversed(t.shape))  # GGUF stores ne0 (columns) first
        assert logical == tuple(model.state_dict()[t.name].shape), t.name
    assert {t.tensor_type.name for t in reader.tensors} == {"Q4_K", "Q8_0", "F32"}


def test_metadata(exported):
    model, gm, path, _ = exported
    md = gguf_metadata(path)
    assert md["general.architecture"] == "Ideogram4Transformer2DModel"
    assert md["fxquant.version"] == fxquant.__version__
    assert md["fxquant.recipe"] == json.loads(json.dumps(RECIPE.to_dict())) and md["fxquant.recipe"]["misaligned"] == "q8_0"
    assert md["fxquant.model_config"]["intermediate_size"] == model.config.intermediate_size == 512
    notes = {d["name"]: d for d in md["fxquant.linears"]}
    assert notes["input_proj"]["scheme"] == "q8_0" and "stored as Q8_0" in notes["input_proj"]["note"]
    w2 = notes["layers.0.feed_forward.w2"]
    assert (w2["scheme"], w2["selection"]) == ("q8_0", "protected")  # a mixed-precision protected layer
    assert notes["layers.0.feed_forward.w1"]["scheme"] == "q4_k"


def test_report_bits_and_bytes(exported):
    _, gm, path, report = exported
    assert report.bits_per_weight("Q4_K") == 4.5 and report.bits_per_weight("Q8_0") == 8.5
    assert report.file_bytes == os.path.getsize(path)
    assert sum(t.nbytes for t in report.tensors) < report.file_bytes  # + header, metadata, alignment
    by_name = {t.name: t for t in report.tensors}
    for row in fxquant.summary(gm):  # summary and export agree on every linear's bytes and bits
        assert by_name[row.name + ".weight"].nbytes == row.weight_bytes, row.name
        assert by_name[row.name + ".weight"].bits_per_weight == row.bits_per_weight, row.name
    assert "Q4_K" in str(report) and "4.50 bits/weight" in str(report)


def test_bf16_linear_weights_stay_bf16_other_bf16_tensors_widen_to_f32(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(torch.bfloat16)
    gm = fxquant.compile(m, "q4_k", calibration=[(torch.randn(2, 3, 256, dtype=torch.bfloat16),)])
    report = save_gguf(gm, tmp_path / "bf16.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "bf16.gguf").tensors}
    assert {k: t.tensor_type.name for k, t in tensors.items()} == {
        "0.weight": "Q4_K", "0.bias": "F32", "2.weight": "BF16", "2.bias": "F32"}
    want = expected_tensors(gm)
    for name in ("0.weight", "2.weight"):
        assert tensors[name].data.tobytes() == want[name][1], name
    for name in ("0.bias", "2.bias"):  # lossless: every bf16 is a float32
        assert np.array_equal(tensors[name].data, gm.state_dict()[name].float().numpy()), name
    assert {t.ggml_type for t in report.tensors} == {"Q4_K", "BF16", "F32"}


def test_cfg_branches_one_file_each(tmp_path):
    torch.manual_seed(0)
    branches = {b: torch.nn.Sequential(torch.nn.Linear(64, 32)) for b in ("cond", "uncond")}
    calib = {b: [(torch.randn(2, 3, 64),)] for b in branches}
    reports = save_gguf(fxquant.compile(branches, "q8_0", calibration=calib), tmp_path / "out")
    assert set(reports) == {"cond", "uncond"}
    for b, rep in reports.items():
        assert rep.path == str(tmp_path / "out" / f"{b}.gguf")
        assert gguf_metadata(rep.path)["fxquant.branch"] == b
        data = {t.name: t.data for t in gguf.GGUFReader(rep.path).tensors}
        assert np.array_equal(data["0.weight"], fxquant.codecs.quantize(branches[b][0].weight.detach().numpy(), "q8_0"))


def test_bad_inputs(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with pytest.raises(FxquantError, match="expected a GraphModule from fxquant.compile"):
        save_gguf(m, tmp_path / "x.gguf")
    with pytest.raises(FxquantError, match="no fxquant records"):
        save_gguf(torch.fx.symbolic_trace(m), tmp_path / "x.gguf")
    w8 = fxquant.compile(m, "w8a8-naive", calibration=[(torch.randn(2, 3, 64),)])
    with pytest.raises(FxquantError, match=r"layer '0' is lowered to fxquant::linear_w8a8, which GGUF cannot store"):
        save_gguf(w8, tmp_path / "x.gguf")
    other = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(other, arch="llama")
    w.add_tensor("t", np.zeros(4, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(FormatError, match="not written by fxquant.save_gguf"):
        load_gguf(other)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(FormatError, match="junk.gguf: not a GGUF file"):
        gguf_metadata(tmp_path / "junk.gguf")
    with pytest.raises(FxquantError, match="cannot be file names"):
        save_gguf({"a/b": w8}, tmp_path / "d")
    q8 = fxquant.compile(m, "q8_0", calibration=[(torch.randn(2, 3, 64),)])
    with pytest.raises(FormatError, match=r"save_gguf: cannot write .*no/such/x\.gguf: the folder .* does not exist"):
        save_gguf(q8, tmp_path / "no" / "such" / "x.gguf")


# ------------------------------------------------------------------ diffusers

def test_diffusers_dequant_vs_gguf_py(exported):
    """diffusers dequantizes in float16 (its scales' dtype): Q8_0 is gguf-py's float32 value rounded
    once to fp16 (exact product, one rounding); Q4_K rounds d*sc, dmin*m and d*sc*q - dmin*m each
    to fp16, so it is off by at most a few fp16 ulps of the tensor's magnitude."""
    _, _, path, _ = exported
    for t in gguf.GGUFReader(path).tensors:
        if t.tensor_type.name not in ("Q4_K", "Q8_0"):
            continue
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        got = dequantize_gguf_tensor(GGUFParameter(torch.from_numpy(t.data.copy()), quant_type=t.tensor_type))
        if t.tensor_type.name == "Q8_0":
            assert torch.equal(got, ref.half()), t.name
        else:
            ulp = torch.finfo(torch.float16).eps * float(ref.abs().max())
            assert float((got.float() - ref).abs().max()) <= 4 * ulp, t.name


@needs_accelerate
@pytest.mark.slow
@pytest.mark.parametrize("config_from", ["file", "dir"])
def test_diffusers_loads_and_matches_fxquant(exported, tmp_path, config_from):
    model, gm, path, _ = exported
    config = None
    if config_from == "dir":
        model.save_config(tmp_path / "cfg")
        config = str(tmp_path / "cfg")
    dm = load_gguf(path, config=config)
    assert "Ideogram4Transformer2DModel" not in SINGLE_FILE_LOADABLE_CLASSES  # registration undone
    assert isinstance(dm.layers[0].feed_forward.w2, GGUFLinear) and isinstance(dm.input_proj, GGUFLinear)
    assert dm.layers[0].feed_forward.w1.weight.quant_type.name == "Q4_K"
    assert dm.layers[0].feed_forward.w2.weight.quant_type.name == "Q8_0"  # protected, stored Q8_0
    assert dm.input_proj.weight.quant_type.name == "Q8_0"
    assert not any(t.is_meta for t in dm.state_dict().values())  # every tensor came from the file
    assert torch.equal(dm.layers[1].ffn_norm1.weight, model.layers[1].ffn_norm1.weight)
    ex = ideogram4_inputs(in_channels=32, seed=12, text_len=5, image_hw=(4, 3))
    with torch.no_grad():
        got, want, flt = dm(**ex).sample, gm(**ex).sample, model(**ex).sample
    # Not bit-exact: diffusers' weights are fp16 (see test above), ~2^-11 relative per weight.
    # Measured ~5e-4; the quantization error itself is ~100x larger.
    rel = float((got - want).norm() / want.norm())
    assert rel < 2e-3 and rel < 0.1 * float((want - flt).norm() / flt.norm())


@needs_accelerate
def test_diffusers_refuses_foreign_names(exported, tmp_path):
    model, _, path, _ = exported
    cfg = {**model.config, "num_layers": 5}  # one more layer than the file holds
    type(model).from_config(cfg).save_config(tmp_path / "cfg5")
    with pytest.raises(FormatError, match=r"not the model's state-dict keys \(missing \['layers.4"):
        load_gguf(path, config=str(tmp_path / "cfg5"))
    with pytest.raises(FormatError, match="not a local directory with a config.json"):
        load_gguf(path, config=str(tmp_path / "nowhere"))


def test_single_file_support_is_scoped():
    assert "Ideogram4Transformer2DModel" not in SINGLE_FILE_LOADABLE_CLASSES
    with single_file_support():
        assert "Ideogram4Transformer2DModel" in SINGLE_FILE_LOADABLE_CLASSES
    assert "Ideogram4Transformer2DModel" not in SINGLE_FILE_LOADABLE_CLASSES
    with pytest.raises(FormatError, match="no single-file support for 'FluxTransformer2DModel'"):
        with single_file_support("FluxTransformer2DModel"):
            pass


@needs_accelerate
@pytest.mark.slow
def test_diffusers_loads_a_bf16_model(tmp_path):
    """BF16 model: kept-float linear weights stay BF16 (diffusers wraps them in GGUFLinear too),
    biases and norm gains are written F32 (diffusers cannot use BF16 bytes outside GGUFLinear)."""
    model = reduced_ideogram4(seed=5, dtype=torch.bfloat16, **CFG)
    ex = ideogram4_inputs(in_channels=32, seed=7, dtype=torch.bfloat16)
    gm = fxquant.compile(model, "q4_k", calibration=[ex])
    save_gguf(gm, tmp_path / "bf16.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "bf16.gguf").tensors}
    assert types["input_proj.weight"] == "BF16" and types["input_proj.bias"] == "F32" and types["layers.0.attention.to_q.weight"] == "Q4_K"
    dm = load_gguf(tmp_path / "bf16.gguf", compute_dtype=torch.bfloat16)
    assert torch.equal(dequantize_gguf_tensor(dm.input_proj.weight), model.input_proj.weight)  # lossless
    assert torch.equal(dm.input_proj.bias, model.input_proj.bias)
    # diffusers rounds Q4_K weights to fp16 then to bf16; fxquant decodes in float32 and rounds once:
    # at most one bf16 ulp apart (about a fifth of the weights are).
    w_fx = fxquant.codecs.dequantize(gm.state_dict()["layers.0.attention.to_q.qweight"], "q4_k").to(torch.bfloat16)
    w_df = dequantize_gguf_tensor(dm.layers[0].attention.to_q.weight).to(torch.bfloat16)
    assert float((w_fx.float() - w_df.float()).abs().max()) <= 2 ** -7 * float(w_fx.float().abs().max())
    with torch.no_grad():
        got, want, flt = (m(**ex).sample.float() for m in (dm, gm, model))
    # Those 1-ulp flips move the bf16 output ~2% (measured); quantization moves it ~6%.
    assert float((got - want).norm() / want.norm()) < 0.5 * float((want - flt).norm() / flt.norm())


def test_reloaded_module_exports_the_same_file(tmp_path):
    """compile -> fxquant.save -> fxquant.load -> save_gguf writes the same bytes as straight from compile."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    gm = fxquant.compile(m, "q4_k", calibration=[(torch.randn(2, 3, 256),)])
    fxquant.save(gm, tmp_path / "m.fxq.safetensors")
    save_gguf(gm, tmp_path / "a.gguf")
    save_gguf(fxquant.load(tmp_path / "m.fxq.safetensors"), tmp_path / "b.gguf")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
