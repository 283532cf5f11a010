"""The Triton kernels compile for a Hopper GPU (sm_90: H100 / H200) on a machine without one.

The interpreter (tests/interp) checks what the kernels compute, but accepts code a GPU compile
rejects (non-constexpr globals, unsupported casts, dot shapes). Here triton's own compiler lowers
every kernel to PTX and, with the ptxas triton ships, to a cubin; no device is needed. The PTX is
also checked for the two properties the bit-exactness rests on: the W8A8 epilogue has no fused
multiply-add (``enable_fp_fusion=False``), and the quantization divides with IEEE rounding.
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the kernels are interpreted in this process", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fxquant.ops import triton_gguf, triton_w8a8  # noqa: E402

pytestmark = pytest.mark.slow  # a few seconds to a minute per kernel
HOPPER = GPUTarget("cuda", 90, 32)


def compile_ptx(fn, signature: dict, constexprs: dict, **options) -> str:
    for name in constexprs:
        signature[name] = "constexpr"
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=HOPPER,
                            options=options)
    assert kernel.asm.get("cubin"), "no cubin: ptxas did not run"
    return kernel.asm["ptx"]


def test_w8a8_quantize_kernel_divides_with_ieee_rounding():
    ptx = compile_ptx(triton_w8a8._quantize_kernel,
                      {"x_ptr": "*bf16", "smooth_ptr": "*fp32", "q_ptr": "*i8", "s_ptr": "*fp32", "K": "i32",
                       "stride_xm": "i32"}, {"HAS_SMOOTH": True, "BLOCK": 1024})
    assert "div.rn.f32" in ptx and "div.approx" not in ptx and "div.full" not in ptx


@pytest.mark.parametrize("out", ["bf16", "fp16", "fp32"])
def test_w8a8_gemm_compiles_without_fma_in_the_epilogue(out):
    cfg = triton_w8a8._DIT_CONFIGS[0]
    ptx = compile_ptx(triton_w8a8._gemm_kernel,
                      {"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": f"*{out}", "as_ptr": "*fp32", "bs_ptr": "*fp32",
                       "bias_ptr": f"*{out}", "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32",
                       "stride_cm": "i32"}, {"HAS_BIAS": True, **cfg.kwargs},
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
    assert "mma" in ptx and ".s8" in ptx  # int8 tensor-core GEMM (wgmma / mma with s8 operands)
    assert "fma.rn.f32" not in ptx


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k"])
@pytest.mark.parametrize("act,precision", [("bf16", "tf32"), ("fp32", "ieee")])
def test_gguf_gemm_compiles(qtype, act, precision):
    cfg = triton_gguf._DIT_CONFIGS[0]
    ptx = compile_ptx(triton_gguf._gemm_kernel,
                      {"x_ptr": f"*{act}", "w_ptr": "*u8", "c_ptr": f"*{act}", "bias_ptr": f"*{act}", "M": "i32",
                       "N": "i32", "K": "i32", "M_BUCKET": "i32", "stride_xm": "i32", "stride_cm": "i32",
                       "row_bytes": "i32"},
                      {"QTYPE": triton_gguf._QTYPES[qtype], "HAS_BIAS": True, "DOT_PRECISION": precision,
                       "DOT_IN_FP32": False, **cfg.kwargs}, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # bf16: tensor cores; float32 with IEEE precision: plain fma loops (no TF32), by design
    assert ("mma" in ptx) == (act == "bf16")


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k"])
def test_gguf_dequant_kernel_compiles(qtype):
    compile_ptx(triton_gguf._dequant_kernel, {"w_ptr": "*u8", "out_ptr": "*fp32", "N": "i32", "K": "i32",
                                              "row_bytes": "i32"},
                {"QTYPE": triton_gguf._QTYPES[qtype], "BLOCK_N": 64, "BLOCK_K": 256})
