"""The CPU path of ``fxquant::linear_gguf`` (``fxquant.ops.gguf_cpu``): each tile decoder (the C
one of ``gguf_native``, its portable C loops, the torch passes) is bit-exact with ``fxquant.codecs``
(llama.cpp's vectors, random bytes with inf / NaN / subnormal scales, every activation dtype), the
op stays within a rounding of decode-then-matmul (``reference_linear_gguf``), and the op falls back
to the torch passes, saying so, where the C decoder cannot be built."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fxquant import codecs
from fxquant.errors import FormatError
from fxquant.ops import gguf, gguf_cpu, gguf_native

DATA = Path(__file__).parent / "data" / "gguf"
QTYPES = ("q4_k", "q8_0")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DECODERS = ("native", "portable", "torch")
HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None
# fp16 scales that stress the decoders: +-inf, NaN, subnormals, +-0, the largest finite
SPECIAL_FP16 = [0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x0001, 0x8001, 0x03FF, 0x0000, 0x8000, 0x7BFF, 0x0400]


def decode(decoder: str, qbytes: torch.Tensor, qtype: str, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight through one decoder; the C ones must build where there is a compiler."""
    if decoder == "torch":
        return gguf_cpu.dequantize(qbytes, qtype, cols, dtype, native=False)
    if not HAS_CC:
        pytest.skip("no C compiler on this machine")
    lib = gguf_native.library() if decoder == "native" else gguf_native.load(portable=True)
    assert lib is not None, "the C decoder did not build (see the fxquant warning)"
    out = torch.empty(qbytes.shape[0] * cols, dtype=dtype)
    blocks = qbytes.reshape(-1, codecs.BLOCKS[qtype][1])
    return gguf_native.decode_into(lib, blocks, qtype, out).view(qbytes.shape[0], cols)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        ((a.view(ints) == b.view(ints)) | (a.isnan() & b.isnan())).all())


def random_blocks(qtype: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    elems, nbytes = codecs.BLOCKS[qtype]
    b = g.integers(0, 256, size=(rows * cols // elems, nbytes), dtype=np.uint8)
    n_scales = 2 if qtype == "q4_k" else 1
    scales = (g.standard_normal((b.shape[0], n_scales)) * 0.01).astype(np.float16)
    b[:, : 2 * n_scales] = scales.view(np.uint8).reshape(b.shape[0], 2 * n_scales)
    return torch.from_numpy(b.reshape(rows, -1))


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_decode_bit_exact_on_llama_cpp_vectors(qtype, dtype, decoder):
    z = np.load(DATA / f"{qtype}_reference.npz")
    for name in z["case_names"]:
        qbytes = torch.from_numpy(z[f"{name}__qbytes"])
        deq = torch.from_numpy(z[f"{name}__dequant"])
        with np.errstate(all="ignore"):
            got = decode(decoder, qbytes, qtype, deq.shape[1], dtype)
        assert same_bits(got, deq.to(dtype)), name


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_decode_bit_exact_on_random_bytes(qtype, dtype, decoder):
    qbytes = random_blocks(qtype, 37, 768, seed=1)  # every scale-byte bit pattern occurs
    assert same_bits(decode(decoder, qbytes, qtype, 768, dtype), codecs.dequantize(qbytes, qtype).to(dtype))


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_decode_bit_exact_with_special_scales(qtype, dtype, decoder):
    """inf, NaN and subnormal d (and dmin): inf * 0 and inf - inf give NaN, subnormals stay exact."""
    qbytes = random_blocks(qtype, 2 * len(SPECIAL_FP16), 256, seed=6)
    blocks = qbytes.view(-1, codecs.BLOCKS[qtype][1])
    special = torch.tensor(SPECIAL_FP16, dtype=torch.int32).repeat(blocks.shape[0] // len(SPECIAL_FP16) + 1)
    d = special[: blocks.shape[0]]
    blocks[:, 0], blocks[:, 1] = (d & 255).to(torch.uint8), (d >> 8).to(torch.uint8)
    if qtype == "q4_k":  # dmin: the same values in another order, so every (d, dmin) pair differs
        m = special.roll(3)[: blocks.shape[0]]
        blocks[:, 2], blocks[:, 3] = (m & 255).to(torch.uint8), (m >> 8).to(torch.uint8)
        blocks[0, 4:16] = 0  # sc = m = 0 in one block: inf * 0
    ref = codecs.dequantize(qbytes, qtype).to(dtype)
    assert ref.isnan().any() and ref.isinf().any()
    assert same_bits(decode(decoder, qbytes, qtype, 256, dtype), ref)


@pytest.mark.parametrize("decoder", ("native", "portable"))
def test_c_decoder_writes_exactly_its_blocks(decoder):
    """A slice of blocks from the middle of a weight, into the middle of a larger buffer."""
    qbytes = random_blocks("q4_k", 7, 512, seed=7)  # 14 blocks
    lib = gguf_native.library() if decoder == "native" else gguf_native.load(portable=True)
    if lib is None:
        pytest.skip("no C compiler on this machine") if not HAS_CC else pytest.fail("the C decoder did not build")
    buf = torch.full((6 * 256,), 7.0, dtype=torch.bfloat16)
    got = gguf_native.decode_into(lib, qbytes.view(-1, 144)[5:9], "q4_k", buf[256:])
    assert got.numel() == 4 * 256 and bool((buf[:256] == 7).all() and (buf[5 * 256:] == 7).all())
    assert same_bits(got.view(4, 256), codecs.dequantize(qbytes.view(-1, 144)[5:9], "q4_k").to(torch.bfloat16))
    with pytest.raises(FormatError, match="contiguous"):
        gguf_native.decode_into(lib, qbytes.view(-1, 144)[::2], "q4_k", buf)


def test_decode_reads_unaligned_and_sliced_bytes():
    qbytes = random_blocks("q8_0", 12, 64, seed=2)
    storage = torch.zeros(qbytes.numel() + 1, dtype=torch.uint8)
    odd = storage[1:].view(qbytes.shape)  # odd storage offset: the fp16 scales cannot be read as int16 in place
    odd.copy_(qbytes)
    assert same_bits(gguf_cpu.dequantize(odd, "q8_0", 64, torch.float32), codecs.dequantize(qbytes, "q8_0"))


@pytest.mark.parametrize("native", [True, False], ids=["c", "torch"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_decode_to_float64_goes_through_float32(qtype, native):
    qbytes = random_blocks(qtype, 5, 512, seed=9)
    got = gguf_cpu.dequantize(qbytes, qtype, 512, torch.float64, native=native)
    assert got.dtype == torch.float64 and torch.equal(got, codecs.dequantize(qbytes, qtype).double())


@pytest.mark.parametrize("shape", [(37, 45), (64, 96), (7, 300)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("decoder", ("native", "portable"))
def test_transpose_into_a_column_slice(decoder, dtype, shape):
    """The C transpose (2-byte dtypes; torch's copy for others) writes exactly its columns, edges
    of the 32 x 32 and 8 x 8 blocks included."""
    lib = gguf_native.library() if decoder == "native" else gguf_native.load(portable=True)
    if lib is None:
        pytest.skip("no C compiler on this machine") if not HAS_CC else pytest.fail("the C decoder did not build")
    r, c = shape
    src = torch.randn(r, c, generator=torch.Generator().manual_seed(10)).to(dtype)  # distinct, non-zero
    out = torch.zeros(c, r + 63, dtype=dtype)
    gguf_native.transpose_into(lib, src, out[:, 50:50 + r])
    assert torch.equal(out[:, 50:50 + r], src.t()) and not out[:, :50].any() and not out[:, 50 + r:].any()


@pytest.mark.parametrize("native", ["1", "0"], ids=["c", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype,k", [("q4_k", 512), ("q8_0", 160)])
def test_op_within_rounding_of_decode_then_matmul(qtype, k, dtype, native, monkeypatch):
    monkeypatch.setenv(gguf_native.ENV_SWITCH, native)
    monkeypatch.setattr(gguf_cpu, "TILE_ELEMS", 16 * k)  # several tiles, and a short last one
    monkeypatch.setattr(gguf_cpu, "MIN_TILE_ROWS", 16)
    n = 53
    g = torch.Generator().manual_seed(3)
    qbytes = torch.from_numpy(codecs.quantize((torch.randn(n, k, generator=g) * 0.05).numpy(), qtype))
    x = torch.randn(3, 7, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    got = torch.ops.fxquant.linear_gguf(x, qbytes, qtype, k, bias)
    ref = gguf.reference_linear_gguf(x, qbytes, qtype, k, bias)
    assert got.dtype == dtype and got.shape == ref.shape == (3, 7, n)
    w = codecs.dequantize(qbytes, qtype).to(dtype).double()
    exact = F.linear(x.double(), w, bias.double())
    scale = F.linear(x.double().abs(), w.abs(), bias.double().abs())
    eps = torch.finfo(dtype).eps
    assert ((got.double() - exact).abs() <= eps * exact.abs() + 1e-5 * scale).all()
    assert ((got.double() - ref.double()).abs() <= 2 * eps * exact.abs() + 2e-5 * scale).all()


def test_op_on_empty_input_and_without_bias():
    qbytes = random_blocks("q4_k", 5, 256, seed=4)
    assert torch.ops.fxquant.linear_gguf(torch.zeros(0, 256), qbytes, "q4_k", 256, None).shape == (0, 5)
    x = torch.randn(4, 256)
    torch.testing.assert_close(torch.ops.fxquant.linear_gguf(x, qbytes, "Q4_K", 256, None),
                               gguf.reference_linear_gguf(x, qbytes, "q4_k", 256, None))


def test_op_rejects_bytes_that_do_not_fit():
    qbytes = random_blocks("q8_0", 5, 64, seed=5)
    with pytest.raises(FormatError, match="qweight has 68"):
        gguf.linear_gguf(torch.randn(2, 96), qbytes, "q8_0", 96, None)
    with pytest.raises(FormatError, match="unknown qtype"):
        gguf.linear_gguf(torch.randn(2, 64), qbytes, "q5_k", 64, None)
    with pytest.raises(FormatError, match="uint8"):
        gguf.linear_gguf(torch.randn(2, 64), qbytes.view(torch.int8), "q8_0", 64, None)


@pytest.fixture()
def fresh_native(monkeypatch, tmp_path):
    """gguf_native's loader with an empty cache directory, restored afterwards."""
    monkeypatch.setenv("FXQUANT_CACHE", str(tmp_path))
    gguf_native.load.cache_clear()
    yield tmp_path
    gguf_native.load.cache_clear()


@pytest.fixture()
def fxquant_log():
    """The records the ``fxquant`` logger emits during the test (without pytest's logging plugin)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("fxquant")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_op_falls_back_to_torch_with_one_warning_when_no_compiler_builds(fresh_native, monkeypatch, fxquant_log):
    monkeypatch.setenv("CC", str(fresh_native / "no-such-cc"))
    monkeypatch.delenv(gguf_native.ENV_SWITCH, raising=False)
    qbytes = random_blocks("q4_k", 9, 512, seed=8)
    x = torch.randn(5, 512, dtype=torch.bfloat16)
    first = torch.ops.fxquant.linear_gguf(x, qbytes, "q4_k", 512, None)
    again = torch.ops.fxquant.linear_gguf(x, qbytes, "q4_k", 512, None)
    warnings = [r for r in fxquant_log if "native GGUF decoder could not be built" in r.getMessage()]
    assert len(warnings) == 1 and "no-such-cc" in warnings[0].getMessage()
    assert gguf_native.library() is None
    assert torch.equal(first, again)
    assert torch.equal(first, gguf_cpu.linear_gguf(x, qbytes, "q4_k", 512, None, native=False))


def test_env_switch_chooses_the_torch_decoder_without_a_warning(fresh_native, monkeypatch, fxquant_log):
    monkeypatch.setenv("CC", str(fresh_native / "no-such-cc"))  # would warn if it were tried
    monkeypatch.setenv(gguf_native.ENV_SWITCH, "0")
    assert gguf_native.library() is None
    assert not fxquant_log


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine")
def test_build_is_cached_and_safe_when_two_builds_race(fresh_native):
    cc = shutil.which("cc") or shutil.which("gcc")
    paths, errors = [], []

    def build():
        try:
            paths.append(gguf_native.build(cc))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    assert [p.name for p in fresh_native.iterdir()] == [paths[0].name]  # no temporary file left
    mtime = paths[0].stat().st_mtime_ns
    assert gguf_native.build(cc) == paths[0] and paths[0].stat().st_mtime_ns == mtime  # not rebuilt
    lib = gguf_native.load()
    assert lib is not None and Path(lib._name) == paths[0]


def test_decode_into_names_bad_arguments_and_refuses_non_cpu_tensors():
    lib = gguf_native.library()
    if lib is None:
        pytest.skip("no C compiler on this machine") if not HAS_CC else pytest.fail("the C decoder did not build")
    blocks = torch.zeros(2, 34, dtype=torch.uint8)
    for args in ((blocks, "q8_0", torch.empty(64, dtype=torch.float64)), (blocks.view(-1), "q8_0", torch.empty(64)),
                 (blocks, "q5_k", torch.empty(64)), (blocks.to("meta"), "q8_0", torch.empty(64)),
                 (blocks, "q8_0", torch.empty(64, device="meta"))):
        with pytest.raises(FormatError, match="gguf_native.decode_into"):
            gguf_native.decode_into(lib, *args)


def test_cpu_path_refuses_a_weight_on_another_device():
    """A CPU x with a weight elsewhere (the op itself names both devices before this, on CUDA): the C
    decoder must not read a device pointer (it used to crash the process)."""
    if gguf_native.library() is None:
        pytest.skip("no C decoder here")
    with pytest.raises(FormatError, match="CPU tensors only"):
        gguf_cpu.linear_gguf(torch.randn(4, 256), torch.zeros(8, 144, dtype=torch.uint8, device="meta"),
                             "q4_k", 256, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_from_an_inf_scale_stays_nan(dtype):
    """inf * 0 = NaN: every decoder gives NaN exactly where codecs does; the NaN's bits may differ
    (torch's own bfloat16 conversion writes 0xFFFF in its vector loop and 0x7FC0 in its scalar one)."""
    q = torch.zeros(4, 34, dtype=torch.uint8)
    q[:, 0:2] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)  # fp16 +inf
    q[:, 2:] = torch.randint(0, 3, (4, 32), dtype=torch.uint8)  # codes 0, 1, 2: NaN, inf, inf
    ref = codecs.dequantize(q.view(1, -1), "q8_0", cols=128).to(dtype)
    for decoder in DECODERS:
        got = decode(decoder, q.view(1, -1), "q8_0", 128, dtype).view(-1)
        assert torch.equal(got.isnan(), ref.view(-1).isnan()), decoder
        finite = ~ref.view(-1).isnan()
        assert torch.equal(got[finite], ref.view(-1)[finite]), decoder
