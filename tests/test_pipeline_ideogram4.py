"""End to end on a real diffusers `Ideogram4Pipeline` (tiny components built in `tiny_pipeline`):
quantize both CFG branches in place, compare images with the float pipeline, bfloat16, save ->
a fresh process -> load (float transformer weights deleted first) -> the same image bit for bit,
and Q8_0 through the GGUF file and diffusers' own GGUF loader.

Measured (seed 0, 16x16, 4 steps, calibration on 2 prompts): int8-w8a8 57.4 dB PSNR against the
float pipeline, the bfloat16 pipeline 50.4 dB against the float32 one; Q8_0 through GGUF 64.3 dB
(bench/pipeline_quality.py, 3 prompts). The asserted bounds leave about 10 dB of margin.
"""

import os
import subprocess
import sys

import pytest
import torch

import fxquant
from fxquant.integrations.diffusers import load_gguf

from . import tiny_pipeline as tp

pytestmark = pytest.mark.slow
PROMPTS = ["a red bicycle", "a small dog in the house"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    pipe = tp.pipeline()
    ref = tp.image(pipe)
    float_dir = tmp_path_factory.mktemp("float")
    pipe.save_pretrained(float_dir)
    q = fxquant.quantize_pipeline(pipe, "int8-w8a8", prompts=PROMPTS, **tp.CALL)
    return pipe, ref, float_dir, q


def test_both_branches_swapped_in_and_close_to_float(quantized):
    pipe, ref, _, q = quantized
    assert set(q) == {"transformer", "unconditional_transformer"}
    for name in q:
        gm = getattr(pipe, name)
        assert isinstance(gm, fxquant.QuantizedModule) and gm is q[name]
        assert gm.config.in_channels == 16 and gm.dtype == torch.float32 and gm.device.type == "cpu"
    counts = fxquant.summary(q).counts()
    assert counts.get("w8a8", 0) >= 35, counts  # 46 linears, a few protected (39 w8a8 with the sensitivity budget)
    img = tp.image(pipe)
    assert img.shape == ref.shape
    assert 55 < tp.psnr(img, ref) < float("inf")  # measured 69.9 dB


LOAD = """
import sys, torch, fxquant
sys.path.insert(0, {tests!r})
import tiny_pipeline as tp
pipe = fxquant.load_pipeline({float_dir!r}, {quant_dir!r})
assert isinstance(pipe.transformer, fxquant.QuantizedModule)
assert isinstance(pipe.unconditional_transformer, fxquant.QuantizedModule)
torch.save(tp.image(pipe), {out!r})
"""


def test_save_fresh_process_load_bit_identical(quantized, tmp_path):
    pipe, _, float_dir, _ = quantized
    img = tp.image(pipe)
    written = fxquant.save_pipeline(pipe, tmp_path / "q")
    assert sorted(os.path.basename(p) for p in written) == [
        "fxquant_pipeline.json", "transformer.safetensors", "unconditional_transformer.safetensors"]
    for name in ("transformer", "unconditional_transformer"):  # load_pipeline must not need them
        for f in os.listdir(float_dir / name):
            os.remove(float_dir / name / f)
        os.rmdir(float_dir / name)
    out = tmp_path / "img.pt"
    code = LOAD.format(tests=os.path.dirname(__file__), float_dir=str(float_dir), quant_dir=str(tmp_path / "q"), out=str(out))
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert torch.equal(torch.load(out), img)


def test_q8_0_through_gguf(tmp_path):
    pipe = tp.pipeline()
    ref = tp.image(pipe)
    q = fxquant.quantize_pipeline(pipe, "q8_0", prompts=PROMPTS[:1], **tp.CALL)
    assert fxquant.summary(q).counts().get("q8_0", 0) >= 40
    direct = tp.image(pipe)
    for name, gm in q.items():
        fxquant.save_gguf(gm, tmp_path / f"{name}.gguf")
        setattr(pipe, name, load_gguf(tmp_path / f"{name}.gguf"))
    via_gguf = tp.image(pipe)
    assert 55 < tp.psnr(via_gguf, ref)
    assert 55 < tp.psnr(via_gguf, direct)


def test_model_cpu_offload_hooks(quantized):
    """accelerate's offload hooks wrap each component's forward and move it before every call (here
    to the CPU: no accelerator in CI; the device constants of the graph follow either way)."""
    pipe, _, _, _ = quantized
    img = tp.image(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    try:
        assert hasattr(pipe.transformer, "_hf_hook")
        assert torch.equal(tp.image(pipe), img)
    finally:
        pipe.remove_all_hooks()


def test_bfloat16_pipeline(quantized):  # last: the round trip to bfloat16 changes the float weights
    pipe, ref, _, _ = quantized
    pipe.to(torch.bfloat16)
    try:
        assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
        scales = [t for t in fxquant.module.quantization_tensors(pipe.transformer) if t.is_floating_point()]
        assert scales and all(t.dtype == torch.float32 for t in scales)  # never cast
        assert 40 < tp.psnr(tp.image(pipe), ref)  # measured 50.4 dB
    finally:
        pipe.to(torch.float32)
    pipe.to("cpu").transformer.eval()
