"""GGUF Q4_K / Q8_0 codecs, bit-exact (rtol=0, atol=0) against llama.cpp and gguf-py.

References (tests/data/gguf/README.md says where they come from):
    __qbytes   bytes from llama.cpp's quantize_row_{q4_K,q8_0}_ref, compiled unmodified
    __dequant  floats from llama.cpp's dequantize_row_{q4_K,q8_0}
    gguf-py    gguf.quants.dequantize on the same bytes (and gguf-py's own Q8_0 encoder)
"""

from __future__ import annotations

from pathlib import Path

import gguf  # a test dependency (pyproject's [test] extra): the second reference decoder
import numpy as np
import pytest
import torch

from fxquant.codecs import BLOCKS, bits_per_weight, dequantize, quantize, row_bytes
from fxquant.errors import FormatError

DATA = Path(__file__).parent / "data" / "gguf"
QTYPES = ("q4_k", "q8_0")
_GGUF_TYPE = {"q4_k": gguf.GGMLQuantizationType.Q4_K, "q8_0": gguf.GGMLQuantizationType.Q8_0}
_REFS = {q: np.load(DATA / f"{q}_reference.npz") for q in QTYPES}
CASES = [(q, str(name)) for q in QTYPES for name in _REFS[q]["case_names"]]


def same_bits(a, b) -> bool:
    """Bitwise float32 equality; NaN matches NaN, -0.0 does not match +0.0."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and bool(np.all((a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))))


def _case(qtype: str, name: str):
    z = _REFS[qtype]
    return z[f"{name}__input"], z[f"{name}__qbytes"], z[f"{name}__dequant"]


def test_reference_files_are_the_documented_ones():
    for q, z in _REFS.items():
        assert str(z["qtype"]).lower() == q
        assert (int(z["block_elems"]), int(z["block_bytes"])) == BLOCKS[q]
        assert str(z["upstream_llama_cpp_commit"]) == "d3cf1f14a2e16fbd7ebad34b12cb71b8af345c43"
    # The Q4_K set holds blocks whose bytes change under FMA contraction, so an encoder that
    # fuses multiply-adds (or sums in another order) fails it.
    z = _REFS["q4_k"]
    assert sum(int(z[f"{n}__fma_sensitive"].sum()) for n in z["case_names"]) > 0


@pytest.mark.parametrize("qtype,name", CASES, ids=[f"{q}-{n}" for q, n in CASES])
def test_bit_exact_against_llama_cpp_and_gguf_py(qtype, name):
    x, qbytes, deq = _case(qtype, name)
    x_before = x.copy()

    got = quantize(x, qtype)
    assert got.dtype == np.uint8 and got.shape == qbytes.shape
    bad = np.flatnonzero((got.reshape(-1, BLOCKS[qtype][1]) != qbytes.reshape(-1, BLOCKS[qtype][1])).any(axis=1))
    assert bad.size == 0, f"{name}: {bad.size} blocks differ from llama.cpp, first block {bad[:5]}"
    assert same_bits(x, x_before), "quantize wrote into its input"

    y = dequantize(torch.from_numpy(qbytes), qtype)
    assert y.dtype == torch.float32 and tuple(y.shape) == deq.shape
    assert same_bits(y.numpy(), deq), f"{name}: decode differs from llama.cpp's dequantize_row"
    with np.errstate(invalid="ignore"):  # the fp16-overflow cases decode inf * 0 on purpose
        ref = gguf.quants.dequantize(qbytes, _GGUF_TYPE[qtype]).reshape(deq.shape)
    assert same_bits(y.numpy(), ref), f"{name}: decode differs from gguf-py"


def test_q8_0_encoder_matches_gguf_py_encoder_on_fresh_data():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((16, 512)) * rng.lognormal(0, 3, (16, 1))).astype(np.float32)
    np.testing.assert_array_equal(quantize(x, "q8_0"), gguf.quants.quantize(x, _GGUF_TYPE["q8_0"]))


@pytest.mark.parametrize("qtype", QTYPES)
def test_round_trip_shapes_and_accepted_inputs(qtype):
    elems, nbytes = BLOCKS[qtype]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2 * elems)).astype(np.float32)
    q = quantize(x, qtype)
    assert q.shape == (3, row_bytes(qtype, 2 * elems)) == (3, 2 * nbytes) and q.dtype == np.uint8
    # Torch tensors, other float dtypes and the GGUF spelling give the same bytes.
    np.testing.assert_array_equal(quantize(torch.from_numpy(x), qtype.upper()), q)
    np.testing.assert_array_equal(quantize(x.astype(np.float64), _GGUF_TYPE[qtype]), q)
    np.testing.assert_array_equal(quantize(x[:0], qtype), np.zeros((0, 2 * nbytes), np.uint8))

    y = dequantize(q, qtype, cols=2 * elems)  # a NumPy array is accepted too
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and tuple(y.shape) == x.shape
    assert torch.equal(y, dequantize(torch.from_numpy(q), qtype.upper()))
    # Not a tautology: the decode is a lossy but close reconstruction of the input.
    err = np.abs(y.numpy() - x).max() / np.abs(x).max()
    assert 0 < err < (0.1 if qtype == "q4_k" else 0.01)


@pytest.mark.parametrize("qtype", QTYPES)
def test_blocks_are_independent_across_encoder_chunks(qtype):
    # The encoders work in chunks of blocks; a weight larger than one chunk must encode exactly
    # like its rows one by one (llama.cpp's blocks do not see each other).
    elems = BLOCKS[qtype][0]
    n_blocks = 1100 if qtype == "q4_k" else 17000  # > one chunk of q4_k (1024) / q8_0 (16384)
    rows = 4
    x = np.random.default_rng(3).standard_t(3, (rows, n_blocks // rows * elems)).astype(np.float32)
    whole = quantize(x, qtype)
    np.testing.assert_array_equal(whole, np.concatenate([quantize(x[i:i + 1], qtype) for i in range(rows)]))


def test_size_table():
    assert BLOCKS == {"q4_k": (256, 144), "q8_0": (32, 34)}
    assert bits_per_weight("q4_k") == 4.5 and bits_per_weight("Q8_0") == 8.5
    assert row_bytes("q4_k", 4608) == 2592 and row_bytes("Q8_0", 4608) == 4896


@pytest.mark.parametrize("qtype,cols", [("q4_k", 300), ("q4_k", 32), ("q8_0", 48)])
def test_quantize_rejects_partial_blocks(qtype, cols):
    with pytest.raises(FormatError, match=rf"block size {BLOCKS[qtype][0]}.*cols={cols}"):
        quantize(np.ones((2, cols), np.float32), qtype)
    with pytest.raises(FormatError, match=rf"cols={cols}"):
        row_bytes(qtype, cols)


@pytest.mark.parametrize("shape", [(256,), (2, 2, 256)])
def test_quantize_rejects_wrong_ndim(shape):
    with pytest.raises(FormatError, match=rf"2-D.*{tuple(shape)}".replace("(", r"\(").replace(")", r"\)")):
        quantize(np.ones(shape, np.float32), "q4_k")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_rejects_non_finite(qtype, bad):
    x = np.zeros((2, 256), np.float32)
    x[1, 7] = bad
    with pytest.raises(FormatError, match=r"non-finite.*\[1, 7\]"):
        quantize(x, qtype)


def test_quantize_rejects_unknown_qtype_and_dtype():
    with pytest.raises(FormatError, match="unknown qtype 'q4_0'"):
        quantize(np.zeros((1, 256), np.float32), "q4_0")
    with pytest.raises(FormatError, match="dtype complex64"):
        quantize(np.zeros((1, 256), np.complex64), "q4_k")


def test_dequantize_rejects_malformed_bytes():
    good = torch.zeros(2, 144, dtype=torch.uint8)
    with pytest.raises(FormatError, match="uint8"):
        dequantize(good.to(torch.int8), "q4_k")
    with pytest.raises(FormatError, match=r"2-D.*\(288,\)"):
        dequantize(good.reshape(-1), "q4_k")
    with pytest.raises(FormatError, match="whole 34-byte blocks, got row_bytes=144"):
        dequantize(torch.zeros(2, 144, dtype=torch.uint8), "q8_0")
    with pytest.raises(FormatError, match="hold 256 values, but cols=512"):
        dequantize(good, "q4_k", cols=512)


@pytest.mark.parametrize("qtype,name", [("q4_k", "mixed_subblocks"), ("q8_0", "edge_fp16_scale_overflow_1e7")])
def test_decode_under_torch_compile_fullgraph(qtype, name):
    # One case per codec: Inductor compiles take seconds each on CI's 2 cores.
    _, qbytes, deq = _case(qtype, name)
    torch._dynamo.reset()
    fn = torch.compile(lambda b: dequantize(b, qtype), fullgraph=True)
    assert same_bits(fn(torch.from_numpy(qbytes)).numpy(), deq)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", QTYPES)
def test_decode_on_cuda(qtype):
    z = _REFS[qtype]
    for name in z["case_names"]:
        _, qbytes, deq = _case(qtype, str(name))
        y = dequantize(torch.from_numpy(qbytes).cuda(), qtype)
        assert y.is_cuda
        assert same_bits(y.cpu().numpy(), deq), f"{name}: CUDA decode differs from llama.cpp"


# ---- fixed grids (round_gptq): headers cut from the bytes, codes chosen by the caller


@pytest.mark.parametrize("qtype,name", CASES, ids=[f"{q}-{n}" for q, n in CASES])
def test_grid_values_are_what_llama_cpp_decodes(qtype, name):
    """step * code - offset, from the headers alone, is llama.cpp's dequantization of the codes."""
    from fxquant.codecs import grid, grid_values

    x, qbytes, deq = _case(qtype, name)
    rows, cols = x.shape
    elems, nbytes = BLOCKS[qtype]
    step, offset = grid_values(grid(qbytes, qtype), qtype, cols)
    b = qbytes.reshape(-1, nbytes)
    if qtype == "q8_0":
        codes = b[:, 2:].view(np.int8).astype(np.float32)
    else:  # the nibbles back in element order: byte 32g+l holds q[64g+l] | q[64g+32+l] << 4
        qs = b[:, 16:].reshape(-1, 4, 1, 32)
        codes = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.float32)
    want = deq if np.isfinite(deq).all() else None
    if want is None:
        pytest.skip("a block whose fp16 scale overflows: llama.cpp decodes it to inf/NaN")
    got = (torch.tensor(step) * torch.from_numpy(codes.reshape(rows, cols)) - torch.tensor(offset)).numpy()
    assert same_bits(got, deq)


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_on_grid_keeps_the_headers_and_decodes_to_the_grid_values(qtype):
    from fxquant.codecs import code_range, grid, grid_values, quantize_on_grid

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((16, 512)) * np.logspace(-3, 1, 16)[:, None]).astype(np.float32)
    x[3] = 0
    g = grid(quantize(x, qtype), qtype)
    step, offset = grid_values(g, qtype, 512)
    lo, hi = code_range(qtype)
    codes = np.where(step != 0, rng.integers(lo, hi + 1, size=x.shape), 0).astype(np.float32)  # step 0: code 0
    values = (torch.from_numpy(step) * torch.from_numpy(codes) - torch.from_numpy(offset)).numpy()
    b = quantize_on_grid(values, g, qtype)
    assert np.array_equal(grid(b, qtype), g)
    assert same_bits(gguf.quants.dequantize(b, _GGUF_TYPE[qtype]), values)  # gguf-py, not fxquant's decoder
    # each code is the nearest grid value: never farther from x than the reference encoder's
    near = dequantize(quantize_on_grid(x, g, qtype), qtype).numpy()
    ref = dequantize(quantize(x, qtype), qtype).numpy()
    assert np.all(np.abs(near - x) <= np.abs(ref - x) * (1 + 1e-6) + 1e-30)
    with pytest.raises(FormatError, match="grid"):
        quantize_on_grid(x, g[:, :-1], qtype)


@pytest.mark.parametrize("name", [str(n) for n in _REFS["q4_k"]["case_names"]])
def test_q4_k_on_its_own_grid_is_the_reference_encoder(name):
    """Q4_K's last step re-quantizes on the packed scales: the same bytes as llama.cpp, except codes
    of sub-blocks whose d*sc is 0 (every code decodes to the same value there)."""
    from fxquant.codecs import grid, grid_values, quantize_on_grid

    x, qbytes, deq = _case("q4_k", name)
    g = grid(qbytes, "q4_k")
    got = quantize_on_grid(x, g, "q4_k")
    live = (grid_values(g, "q4_k", x.shape[1])[0] != 0).reshape(-1, 256).all(axis=1)  # no d*sc == 0
    assert np.array_equal(got.reshape(-1, 144)[live], qbytes.reshape(-1, 144)[live])
    assert same_bits(dequantize(got, "q4_k").numpy(), dequantize(qbytes, "q4_k").numpy())
