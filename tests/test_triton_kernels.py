"""The Triton paths of ``fxquant::linear_w8a8`` / ``fxquant::linear_gguf``.

- ``tests/interp``: the kernels under Triton's CPU interpreter, run here in a subprocess with
  ``TRITON_INTERPRET=1`` (it must be set before triton is imported; this session may have
  imported triton already through torch).
- The ops stay single opaque nodes under ``torch.compile`` (fullgraph, one graph, one call).
- On a CUDA machine: the ops dispatch to the kernels and match the reference paths.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fxquant import codecs
from fxquant.ops import gguf, w8a8

ROOT = Path(__file__).resolve().parent.parent
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.slow  # about a minute of interpreted kernels
def test_kernels_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(ROOT / "tests" / "interp")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_interpreter_tests_are_not_collected_without_the_variable():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this session runs with the interpreter")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "interp")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert "no tests collected" in proc.stdout or proc.returncode == 5, proc.stdout[-2000:]


class _Gguf(torch.nn.Module):
    def __init__(self, qtype: str, k: int, n: int):
        super().__init__()
        self.qtype, self.k = qtype, k
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
        self.register_buffer("qweight", torch.from_numpy(codecs.quantize(w.numpy(), qtype)))
        self.register_buffer("bias", torch.randn(n))

    def forward(self, x):
        return torch.ops.fxquant.linear_gguf(torch.relu(x), self.qweight, self.qtype, self.k, self.bias) * 2


class _W8A8(torch.nn.Module):
    def __init__(self, k: int, n: int):
        super().__init__()
        wq, ws = w8a8.quantize_weight_per_channel(torch.randn(n, k))
        self.register_buffer("wq", wq)
        self.register_buffer("ws", ws)
        self.register_buffer("smooth", torch.rand(k) + 0.5)

    def forward(self, x):
        return torch.ops.fxquant.linear_w8a8(torch.relu(x), self.wq, self.ws, None, self.smooth) * 2


def _compiled_once(module, x):
    counter = CompileCounterWithBackend("aot_eager")
    out = torch.compile(module, backend=counter, fullgraph=True)(x)
    assert counter.frame_count == 1
    # Dynamo's graph calls the op packet (torch.ops.fxquant.x), not one of its overloads.
    targets = [getattr(n.target, "default", n.target) for g in counter.graphs for n in g.graph.nodes
               if n.op == "call_function"]
    return out, targets


@pytest.mark.parametrize("qtype", ["q4_k", "q8_0"])
def test_gguf_op_is_one_opaque_node_under_compile(qtype):
    m = _Gguf(qtype, 256, 24)
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    out, targets = _compiled_once(m, x)
    assert targets.count(torch.ops.fxquant.linear_gguf.default) == 1
    assert torch.equal(out, m(x))


def test_w8a8_op_is_one_opaque_node_under_compile():
    m = _W8A8(96, 40)
    x = torch.randn(7, 96, dtype=torch.bfloat16)
    out, targets = _compiled_once(m, x)
    assert targets.count(torch.ops.fxquant.linear_w8a8.default) == 1
    assert torch.equal(out, m(x))


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between same-dtype tensors (same-sign values)."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return int((a.view(bits).long() - b.view(bits).long()).abs().max())


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_w8a8_on_cuda_dispatches_to_triton(dtype):
    pytest.importorskip("triton")
    assert w8a8.triton_kernels() is not None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(333, 1000, generator=g).to(dtype).cuda()
    wq, ws = w8a8.quantize_weight_per_channel(torch.randn(515, 1000, generator=g))
    bias, smooth = torch.randn(515).to(dtype).cuda(), (torch.rand(1000) + 0.5).cuda()
    got = torch.ops.fxquant.linear_w8a8(x, wq.cuda(), ws.cuda(), bias, smooth)
    ref = w8a8.reference_linear_w8a8(x, wq.cuda(), ws.cuda(), bias, smooth)
    assert _ulps(got, ref) <= 1
    xq, xs = w8a8.triton_kernels().quantize_rows(x, smooth)
    acc = w8a8.triton_kernels().int8_gemm(xq, torch.ones_like(xs), wq.cuda(), torch.ones(515, device="cuda"),
                                          None, torch.float32)
    assert torch.equal(acc, torch._int_mm(xq, wq.cuda().t().contiguous().t()).float())


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["q4_k", "q8_0"])
def test_gguf_on_cuda_dispatches_to_triton(qtype):
    pytest.importorskip("triton")
    assert gguf.triton_kernels() is not None
    w = torch.randn(515, 1024) * 0.05
    qw = torch.from_numpy(codecs.quantize(w.numpy(), qtype)).cuda()
    assert torch.equal(gguf.triton_kernels().dequantize(qw, qtype, 1024), codecs.dequantize(qw, qtype))
    x = torch.randn(333, 1024, dtype=torch.bfloat16, device="cuda")
    got = torch.ops.fxquant.linear_gguf(x, qw, qtype, 1024, None)
    ref = gguf.reference_linear_gguf(x, qw, qtype, 1024, None)
    torch.testing.assert_close(got, ref, rtol=2 ** -7, atol=1e-2)
