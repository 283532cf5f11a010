"""fxquant::linear_w8a8 on its own: numerics against a float64 model of the same quantization math
and against torchao's primitives, the CPU slicing, smoothing, registration (opcheck, fake shapes),
torch.export round trip and torch.compile, and CUDA when there is one.

    y = ((q(x * smooth) @ W_int8.T) * x_scale * w_scale + bias).to(x.dtype)
"""

import pytest
import torch

import fxquant  # noqa: F401 - registers fxquant::linear_w8a8
from fxquant.ops import w8a8
from fxquant.ops.w8a8 import quantize_act_per_token, quantize_weight_per_channel

OP = torch.ops.fxquant.linear_w8a8.default


def reference64(x, w, b=None, smooth=None):
    """float64 model of the scheme, written from the docstring's formulas, sharing no code with the op."""
    x, w = x.double(), w.double()
    if smooth is not None:
        x = x * smooth.double()
    eps = torch.finfo(torch.float32).eps
    ws = (w.abs().amax(1, keepdim=True) / 127).clamp(min=eps)
    xs = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=eps)
    wq = torch.round(w / ws).clamp(-127, 127)
    xq = torch.round(x / xs).clamp(-127, 127)
    y = (xq @ wq.T) * xs * ws.T
    return y + b.double() if b is not None else y


def outlier_acts(tokens, features, seed=0):
    """Activations with a few loud channels, as DiT activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g)
    x[:, :: max(1, features // 5)] *= 20
    return x


def weights(out, inp, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) / inp**0.5, 0.1 * torch.randn(out, generator=g)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(7,), (2, 5), (1, 1)])
def test_matches_a_float64_reference(bias, lead):
    w, b = weights(48, 40)
    x = outlier_acts(int(torch.tensor(lead).prod()), 40).reshape(*lead, 40)
    wq, wsc = quantize_weight_per_channel(w)
    y = OP(x, wq, wsc, b if bias else None, None)
    assert y.shape == (*lead, 48) and y.dtype == torch.float32
    ref = reference64(x, w, b if bias else None)
    # float32 scales and rescale: ~1e-7 relative; 1e-5 also absorbs a rare round-half tie that
    # float32 and float64 division break differently (one int8 step of one element).
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_weight_quantization_is_per_output_channel_symmetric():
    w, _ = weights(16, 64)
    w[3] *= 1000  # one loud row must not change the others' scales
    q, s = quantize_weight_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (16,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    torch.testing.assert_close(s.double(), w.double().abs().amax(1) / 127, rtol=1e-7, atol=0)
    assert float(((q.float() * s[:, None] - w).abs() / s[:, None]).max()) <= 0.5 + 1e-4  # half a step


def test_activation_quantization_matches_torchao_primitives():
    """Per-token symmetric int8 with a [-127, 127] range against torchao's choose_qparams/quantize_affine."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    x = outlier_acts(64, 96, seed=3)
    x[5] = 0  # an all-zero token takes the eps floor, not NaN
    q, s = quantize_act_per_token(x)
    s_ao, zp = choose_qparams_affine(x, MappingType.SYMMETRIC, (1, 96), torch.int8, quant_min=-127, quant_max=127,
                                     eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32,
                                     zero_point_dtype=torch.int8, keepdim=True)
    q_ao = quantize_affine(x, (1, 96), s_ao, zp, torch.int8, quant_min=-127, quant_max=127)
    assert int(zp.abs().max()) == 0
    torch.testing.assert_close(s, s_ao.reshape(64, 1), rtol=0, atol=0)
    # torchao multiplies by 1/scale, we divide: the two may round a tie differently, never by more than 1.
    diff = (q.int() - q_ao.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3
    assert int(q[5].abs().max()) == 0


def test_extremes_quantize_to_plus_minus_127_without_a_clamp():
    x = outlier_acts(32, 64, seed=4)
    x[:, 7] = x.abs().amax(1) * torch.where(torch.arange(32) % 2 == 0, 1.0, -1.0)  # the row max, both signs
    x[3] = 1e-30  # below the scale floor
    x[4, 0] = 3e38  # near float32 max
    q, s = quantize_act_per_token(x)
    assert int(q.max()) == 127 and int(q.min()) == -127
    rows = [r for r in range(32) if r not in (3, 4)]
    assert torch.equal(q[rows, 7].abs(), torch.full((30,), 127, dtype=torch.int8))
    assert int(q[4, 0]) == 127
    assert int(q[3].abs().max()) == 0 and torch.isfinite(s).all()


def test_matmul_and_rescale_match_torchao_int_scaled_matmul():
    from torchao.kernel.intmm import int_scaled_matmul

    w, _ = weights(64, 128)
    x = outlier_acts(40, 128)
    wq, wsc = quantize_weight_per_channel(w)
    xq, xs = quantize_act_per_token(x)
    want = int_scaled_matmul(xq, wq.t(), xs) * wsc  # torchao: (acc * x_scale) * w_scale in float32
    torch.testing.assert_close(OP(x, wq, wsc, None, None), want, rtol=0, atol=0)


def test_cpu_slicing_changes_no_bit():
    """Shapes that take several row blocks and a ragged last column block give exactly the
    unsliced formula (quantize all, one _int_mm, rescale all)."""
    tokens, k, n = 600, 4608, 4000
    rows = w8a8.CPU_SLICE_ELEMS // k
    cols = max(w8a8.MIN_COLUMN_BLOCK, w8a8.CPU_SLICE_ELEMS // tokens // w8a8.MIN_COLUMN_BLOCK * w8a8.MIN_COLUMN_BLOCK)
    assert tokens > rows and n > cols and n % cols != 0  # the test is about slices: make sure there are some
    x = outlier_acts(tokens, k).to(torch.bfloat16)
    w, b = weights(n, k)
    wq, wsc = quantize_weight_per_channel(w)
    xf = x.float()
    xs = (xf.abs().amax(1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).eps)
    xq = torch.round(xf / xs).clamp(-127, 127).to(torch.int8)
    whole = ((torch._int_mm(xq, wq.t()).float() * xs * wsc) + b.to(torch.bfloat16).float()).to(torch.bfloat16)
    torch.testing.assert_close(OP(x, wq, wsc, b.to(torch.bfloat16), None), whole, rtol=0, atol=0)


def test_smooth_multiplies_input_channels_before_quantization():
    w, b = weights(32, 24)
    x = outlier_acts(9, 24)
    smooth = torch.linspace(0.25, 4.0, 24)
    wq, wsc = quantize_weight_per_channel(w)
    y = OP(x, wq, wsc, b, smooth)
    torch.testing.assert_close(y, OP(x * smooth, wq, wsc, b, None), rtol=0, atol=0)
    ref = reference64(x, w, b, smooth)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_low_precision_input_gives_that_dtype_back():
    w, b = weights(40, 32)
    x = outlier_acts(6, 32)
    wq, wsc = quantize_weight_per_channel(w)
    for dt in (torch.bfloat16, torch.float16):
        y = OP(x.to(dt), wq, wsc, b.to(dt), None)
        assert y.dtype == dt
        ref = reference64(x.to(dt), w, b.to(dt))
        torch.testing.assert_close(y.double(), ref, rtol=2**-7, atol=2**-7 * float(ref.abs().max()))


def test_zero_tokens_and_zero_rows():
    w, _ = weights(8, 16)
    wq, wsc = quantize_weight_per_channel(w)
    assert OP(torch.randn(0, 3, 16), wq, wsc, None, None).shape == (0, 3, 8)
    y = OP(torch.zeros(4, 16), wq, wsc, None, None)
    assert torch.equal(y, torch.zeros(4, 8))


def test_registration_passes_opcheck_and_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    w, b = weights(24, 16)
    wq, wsc = quantize_weight_per_channel(w)
    x = outlier_acts(10, 16).reshape(2, 5, 16)
    torch.library.opcheck(OP, (x, wq, wsc, b, torch.rand(16) + 0.5))
    torch.library.opcheck(OP, (x.to(torch.bfloat16), wq, wsc, None, None))
    xb = x.to(torch.bfloat16)
    with FakeTensorMode() as mode:
        fx_ = mode.from_tensor(xb)
        out = OP(fx_, mode.from_tensor(wq), mode.from_tensor(wsc), None, None)
        assert out.shape == (2, 5, 24) and out.dtype == torch.bfloat16


class W8A8Linear(torch.nn.Module):
    """A module that holds int8 weights and calls the op, as a lowered graph does."""

    def __init__(self, inp=32, out=48):
        super().__init__()
        w, b = weights(out, inp)
        q, s = quantize_weight_per_channel(w)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", s)
        self.register_buffer("bias", b)

    def forward(self, x):
        return torch.relu(OP(x, self.weight_int8, self.weight_scale, self.bias, None)) * 2


def test_reexports_and_round_trips_through_torch_export_save_load(tmp_path):
    m = W8A8Linear().eval()
    x = outlier_acts(6, 32).reshape(2, 3, 32)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: batch},), strict=False)
    assert sum(n.target is OP for n in ep.graph.nodes) == 1
    torch.export.save(ep, tmp_path / "w8a8.pt2")
    loaded = torch.export.load(tmp_path / "w8a8.pt2").module()
    assert "fxquant.linear_w8a8" in str(loaded.graph)
    x5 = outlier_acts(15, 32).reshape(5, 3, 32)
    torch.testing.assert_close(loaded(x5), m(x5), rtol=0, atol=0)


def test_runs_under_torch_compile_fullgraph():
    m = W8A8Linear().eval()
    x = outlier_acts(8, 32).reshape(2, 4, 32)
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True, dynamic=False)  # inductor: the op stays a fallback call
        torch.testing.assert_close(compiled(x), m(x), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_including_shapes_int_mm_pads():
    # 5 tokens (CUDA _int_mm needs > 16) and 20 input / 44 output features (needs multiples of 8)
    for tokens, k, n in ((5, 20, 44), (64, 256, 128)):
        w, b = weights(n, k)
        x = outlier_acts(tokens, k).to(torch.bfloat16)
        wq, wsc = quantize_weight_per_channel(w)
        cpu = OP(x, wq, wsc, b, None)
        gpu = OP(x.cuda(), wq.cuda(), wsc.cuda(), b.cuda(), None)
        assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)
