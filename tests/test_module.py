"""`QuantizedModule`: the diffusers model's attributes, call signature and ``.to()`` on what
`fxquant.compile` and `fxquant.load` return (a one-layer reduced Ideogram 4)."""

import pytest
import torch
import torch.fx as fx
from diffusers.models.modeling_outputs import Transformer2DModelOutput

import fxquant
from fxquant import meta
from fxquant.models import ideogram4_inputs, reduced_ideogram4
from fxquant.module import quantization_tensors

X = ideogram4_inputs(batch=2, text_len=4, image_hw=(2, 2))


@pytest.fixture(scope="module")
def model():
    return reduced_ideogram4(num_layers=1)


@pytest.fixture(scope="module")
def gm(model):
    # calibrated the way a pipeline calls it: return_dict=False and attention_kwargs=None recorded
    return fxquant.compile(model, "w8a8-naive", calibration=[{**X, "return_dict": False, "attention_kwargs": None}])


def test_is_an_inspectable_graph_module_with_the_models_attributes(gm, model):
    assert isinstance(gm, fx.GraphModule) and isinstance(gm, fxquant.QuantizedModule)
    assert "fxquant.linear_w8a8" in gm.code and meta.records(gm)
    assert gm.config == model.config and gm.config.in_channels == 16
    assert gm.dtype == torch.float32 and gm.device == torch.device("cpu")
    assert "_fxquant_compute" not in gm.state_dict()  # state-dict keys are the lowered model's
    assert gm.eval() is gm
    with pytest.raises(fxquant.FxquantError, match="inference only"):
        gm.train()


def test_keyword_positional_and_return_dict(gm, model):
    with torch.no_grad():
        ref = model(**X).sample
        out = gm(**X)
        assert type(out) is Transformer2DModelOutput
        torch.testing.assert_close(out.sample, ref, rtol=0.05, atol=0.05)
        tup = gm(*X.values(), return_dict=False)
        assert type(tup) is tuple and len(tup) == 1 and torch.equal(tup[0], out.sample)
        assert torch.equal(gm(X["hidden_states"], X["timestep"], **{k: v for k, v in list(X.items())[2:]},
                              attention_kwargs={}, return_dict=True).sample, out.sample)


@pytest.mark.parametrize("call, match", [
    (lambda gm: gm(**X, attention_kwargs={"scale": 0.5}), "argument 'attention_kwargs'"),
    (lambda gm: gm(**X, guidance=1.0), "unexpected argument 'guidance'"),
    (lambda gm: gm(**{k: v for k, v in X.items() if k != "indicator"}), "missing argument 'indicator'"),
    (lambda gm: gm(*X.values(), None, True, 1), "takes 8 positional arguments but 9"),
    (lambda gm: gm(X["hidden_states"], hidden_states=X["hidden_states"]), "multiple values for argument 'hidden_states'"),
])
def test_bad_calls_name_the_argument(gm, call, match):
    with pytest.raises(fxquant.FxquantError, match=match):
        call(gm)


def test_calibration_items_in_either_form(model):
    items = [X, {**X, "return_dict": False}, tuple(X.values())]
    gm = fxquant.compile(model, "w8a8-naive", calibration=items)
    with torch.no_grad():
        assert gm(**X).sample.shape == X["hidden_states"].shape
    with pytest.raises(fxquant.CalibrationError, match=r"calibration\[1\].*'attention_kwargs'"):
        fxquant.compile(model, "w8a8-naive", calibration=[X, {**X, "attention_kwargs": {"scale": 2.0}}])


def test_to_bfloat16_keeps_quantization_tensors_and_runs(gm, model):
    import copy

    g = copy.deepcopy(gm)
    kept = {id(t): t.dtype for t in quantization_tensors(g)}
    assert {torch.int8, torch.float32} <= set(kept.values())
    g.to(torch.bfloat16)
    assert g.dtype == torch.bfloat16
    assert all(t.dtype == (torch.int8 if t.dtype == torch.int8 else torch.float32) for t in quantization_tensors(g))
    assert g.input_proj.bias.dtype == torch.bfloat16  # float buffers follow
    xb = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in X.items()}
    with torch.no_grad():
        out = g(**xb).sample.float()
        ref = model(**X).sample
    assert (out - ref).norm() / ref.norm() < 0.1
    g.half().float()  # every cast but the quantization tensors'
    assert all(t.dtype in (torch.int8, torch.float32) for t in quantization_tensors(g))
    g.type(torch.float16)
    assert any(t.dtype == torch.int8 for t in quantization_tensors(g))


def test_load_restores_config_signature_and_dtype(gm, tmp_path):
    g = __import__("copy").deepcopy(gm).to(torch.bfloat16)
    fxquant.save(g, tmp_path / "m.safetensors")
    loaded = fxquant.load(tmp_path / "m.safetensors")
    assert isinstance(loaded, fxquant.QuantizedModule)
    assert loaded.config.in_channels == 16 and loaded.dtype == torch.bfloat16
    xb = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in X.items()}
    with torch.no_grad():
        assert torch.equal(loaded(*xb.values(), return_dict=False)[0], g(**xb).sample)
    with pytest.raises(fxquant.FxquantError, match="attention_kwargs"):
        loaded(**xb, attention_kwargs={"scale": 0.5})


class Plain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 64)

    def forward(self, x, scale: float = 1.0):
        return self.a(x) * scale


def test_a_plain_module_has_no_config_and_frozen_non_tensor_arguments():
    torch.manual_seed(0)
    m = Plain().eval()
    x = torch.randn(2, 8, 64)
    gm = fxquant.compile(m, "w8a8-naive", calibration=[(x, 2.0)])
    with pytest.raises(AttributeError, match="config"):  # a plain model has none
        gm.config
    with torch.no_grad():
        torch.testing.assert_close(gm(x, scale=2.0), m(x, 2.0), rtol=0.05, atol=0.05)
    with pytest.raises(fxquant.FxquantError, match=r"argument 'scale'.*traced with scale=2.0"):
        gm(x)


def test_summary_and_report_count_a_recipe_that_quantizes_nothing(tmp_path):
    m = Plain().eval()
    x = torch.randn(2, 8, 64)
    gm = fxquant.compile(m, "q4_k", calibration=[(x,)])  # 64 inputs: below one Q4_K block
    s = fxquant.summary(gm)
    assert s.quantized == 0 and "no linear is quantized" in str(s)
    md = open(fxquant.report(gm, tmp_path)["markdown"]).read()
    assert "float 1 of 1 linears; kept in float: 1;" in md
    q8 = fxquant.compile(m, "q8_0", calibration=[(x,)])
    assert fxquant.summary(q8).quantized == 1
    assert "q8_0 1 of 1 linears; kept in float: 0;" in open(fxquant.report(q8, tmp_path / "q8")["markdown"]).read()
