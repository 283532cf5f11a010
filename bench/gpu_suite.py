"""Every CUDA path of fxquant checked, and one real-width Ideogram 4 block timed, in one run.

    PYTHONPATH=. .venv/bin/python bench/gpu_suite.py                  # checks + timings (< 8 min on one GPU)
    PYTHONPATH=. .venv/bin/python bench/gpu_suite.py --seq 1024       # one sequence length

On a CUDA machine:
  checks   W8A8 op (Triton vs the ``torch._int_mm`` reference: int32 sums equal, output <= 1 ulp),
           GGUF ops (Triton decode == ``fxquant.codecs`` bit for bit, output within bf16 rounding
           of decode-then-matmul), codecs on CUDA == on CPU, ``fxquant.compile`` of a reduced
           Ideogram 4 run on CUDA eager and under ``torch.compile(fullgraph=True)``, save / load.
  timings  one Ideogram 4 block at real widths (hidden 4608, SwiGLU 12288), batch 1, at 1024 and
           4096 tokens: bf16 eager and compiled, torchao int8 dynamic compiled, fxquant W8A8 with
           the Triton kernels and with ``torch._int_mm`` (eager and compiled), Q4_K and Q8_0 fused
           (Triton) and decode-then-matmul. Best of ``--reps`` after warm-up, CUDA-synchronized.
  targets  W8A8 compiled >= 1.5x bf16 compiled at 4096 tokens; Q4_K fused <= 1.15x bf16 eager.

Without CUDA it says so, runs the Triton kernels' correctness tests under the CPU interpreter
(``tests/interp`` with ``TRITON_INTERPRET=1``), compiles every kernel to a Hopper cubin
(``tests/test_triton_compile.py``: triton's compiler and ptxas need no device), runs the
compile/save checks on CPU, and writes no timings.
Writes a table to stdout and JSON to ``bench/results/gpu_suite.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

import fxquant
from fxquant import codecs
from fxquant.artifacts.common import atomic_write
from fxquant.models import ideogram4_inputs, reduced_ideogram4
from fxquant.ops import gguf, w8a8

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from bench_w8a8 import build_model, inputs, sample  # noqa: E402  (real-width Ideogram 4, as bench_w8a8 times it)

OUT = Path(__file__).parent / "results" / "gpu_suite.json"


# The reference paths as ops of their own, so a lowered module can be pointed at them.
@torch.library.custom_op("fxquant_bench::linear_w8a8_int_mm", mutates_args=())
def _w8a8_int_mm(x: Tensor, weight_int8: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                 smooth: Optional[Tensor]) -> Tensor:
    return w8a8.reference_linear_w8a8(x, weight_int8, weight_scale, bias, smooth)


@_w8a8_int_mm.register_fake
def _(x, weight_int8, weight_scale, bias, smooth):
    return x.new_empty(*x.shape[:-1], weight_int8.shape[0])


@torch.library.custom_op("fxquant_bench::linear_gguf_decode_matmul", mutates_args=())
def _gguf_decode_matmul(x: Tensor, qweight: Tensor, qtype: str, in_features: int, bias: Optional[Tensor]) -> Tensor:
    return gguf.reference_linear_gguf(x, qweight, qtype, in_features, bias)


@_gguf_decode_matmul.register_fake
def _(x, qweight, qtype, in_features, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def retarget(gm: torch.fx.GraphModule, old, new) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose ``old`` op calls call ``new`` (same arguments)."""
    gm = copy.deepcopy(gm)
    for node in gm.graph.nodes:
        if node.target == old:
            node.target = new
    gm.recompile()
    return gm


def ulps(a: Tensor, b: Tensor) -> int:
    bits = torch.int16 if a.element_size() == 2 else torch.int32
    return int((a.view(bits).long() - b.view(bits).long()).abs().max())


def check_w8a8(dev: str) -> str:
    g = torch.Generator().manual_seed(0)
    worst = 0
    for m, k, n in [(1, 4608, 4608), (77, 3072, 12288), (1024, 12288, 4608), (333, 1000, 515)]:
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(m, k, generator=g).to(dtype).to(dev)
            wq, ws = w8a8.quantize_weight_per_channel(torch.randn(n, k, generator=g))
            wq, ws = wq.to(dev), ws.to(dev)
            bias, smooth = torch.randn(n).to(dtype).to(dev), (torch.rand(k) + 0.5).to(dev)
            got = torch.ops.fxquant.linear_w8a8(x, wq, ws, bias, smooth)
            worst = max(worst, ulps(got, w8a8.reference_linear_w8a8(x, wq, ws, bias, smooth)))
            kern = w8a8.triton_kernels()
            xq, xs = kern.quantize_rows(x, smooth)
            acc = kern.int8_gemm(xq, torch.ones_like(xs), wq, torch.ones_like(ws), None, torch.float32)
            exact = torch._int_mm(xq, wq.t()).float()  # exact in float32 while |sum| < 2**24
            if k <= 1000 and not torch.equal(acc, exact):
                raise AssertionError(f"int32 sums differ from torch._int_mm at {(m, k, n)}")
    if worst > 1:
        raise AssertionError(f"W8A8 Triton output {worst} ulp from the _int_mm reference (allowed: 1)")
    return f"max {worst} ulp from the reference; int32 sums equal torch._int_mm"


def check_gguf(dev: str) -> str:
    for qtype in ("q4_k", "q8_0"):
        w = torch.randn(1536, 4608) * 0.02
        qw = torch.from_numpy(codecs.quantize(w.numpy(), qtype)).to(dev)
        if not torch.equal(gguf.triton_kernels().dequantize(qw, qtype, 4608), codecs.dequantize(qw, qtype)):
            raise AssertionError(f"{qtype}: Triton decode differs from fxquant.codecs")
        x = torch.randn(1000, 4608, dtype=torch.bfloat16, device=dev)
        got = torch.ops.fxquant.linear_gguf(x, qw, qtype, 4608, None)
        torch.testing.assert_close(got, gguf.reference_linear_gguf(x, qw, qtype, 4608, None), rtol=2**-7, atol=2e-2)
    return "decode bit-exact with codecs; GEMM within bf16 rounding of decode-then-matmul (q4_k, q8_0)"


def check_codecs(dev: str) -> str:
    import numpy as np

    for qtype in ("q4_k", "q8_0"):
        z = np.load(ROOT / "tests" / "data" / "gguf" / f"{qtype}_reference.npz")
        for name in z["case_names"]:
            qb = torch.from_numpy(z[f"{name}__qbytes"])
            a, b = codecs.dequantize(qb.to(dev), qtype).cpu(), codecs.dequantize(qb, qtype)
            if not bool(((a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())).all()):
                raise AssertionError(f"{qtype}/{name}: decode on {dev} differs from CPU")
    return "llama.cpp vectors decode to the same bits as on CPU"


def check_compile_and_io(dev: str) -> str:
    model, ex = reduced_ideogram4(seed=1, num_layers=2), ideogram4_inputs(batch=2, text_len=6, image_hw=(4, 4), seed=0)
    ex_dev = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in ex.items()}
    notes = []
    for recipe in ("w8a8-naive", "q4_k", "q8_0"):
        gm = fxquant.compile(model, recipe, calibration=[ex])
        with torch.no_grad():
            ref = sample(gm(**ex)).float()
            gm_dev = gm.to(dev)
            eager = sample(gm_dev(**ex_dev)).float().cpu()
            compiled = sample(torch.compile(gm_dev, fullgraph=True)(**ex_dev)).float().cpu()
        rel = float((eager - ref).norm() / ref.norm())
        if rel > 1e-2 or not torch.allclose(compiled, eager, rtol=1e-2, atol=1e-3):
            raise AssertionError(f"{recipe}: {dev} eager vs CPU rel err {rel:.2e}, or compiled differs from eager")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{recipe}.safetensors")
            fxquant.save(gm.cpu(), path, example=ex)
            loaded = fxquant.load(path).to(dev)
            with torch.no_grad():
                again = sample(loaded(**ex_dev)).float().cpu()
        if not torch.equal(again, eager):
            raise AssertionError(f"{recipe}: save/load changed the output on {dev}")
        notes.append(f"{recipe} rel {rel:.1e}")
    return "compile (eager + torch.compile fullgraph) and save/load: " + ", ".join(notes)


def time_block(seqs: list[int], reps: int) -> list[dict]:
    """Best-of-``reps`` CUDA time of one real-width Ideogram 4 block per variant and sequence length."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    bf16_cpu = build_model(1, torch.bfloat16)
    calib = [inputs(256, torch.bfloat16)]
    w8 = fxquant.compile(bf16_cpu, "w8a8-naive", calibration=calib).cuda()
    q4 = fxquant.compile(bf16_cpu, "q4_k", calibration=calib).cuda()
    q8 = fxquant.compile(bf16_cpu, "q8_0", calibration=calib).cuda()
    bf16 = bf16_cpu.cuda()
    ao = copy.deepcopy(bf16)
    quantize_(ao, Int8DynamicActivationInt8WeightConfig())
    w8_ref = retarget(w8, torch.ops.fxquant.linear_w8a8.default, torch.ops.fxquant_bench.linear_w8a8_int_mm.default)
    gguf_op, gguf_ref = torch.ops.fxquant.linear_gguf.default, torch.ops.fxquant_bench.linear_gguf_decode_matmul.default
    variants = {
        "bf16 eager": bf16, "bf16 compiled": torch.compile(bf16), "torchao int8 dyn compiled": torch.compile(ao),
        "w8a8 triton eager": w8, "w8a8 triton compiled": torch.compile(w8),
        "w8a8 _int_mm eager": w8_ref, "w8a8 _int_mm compiled": torch.compile(w8_ref),
        "q4_k fused": q4, "q4_k decode+matmul": retarget(q4, gguf_op, gguf_ref),
        "q8_0 fused": q8, "q8_0 decode+matmul": retarget(q8, gguf_op, gguf_ref),
    }
    rows = []
    for seq in seqs:
        ex = {k: v.cuda() if isinstance(v, Tensor) else v for k, v in inputs(seq, torch.bfloat16).items()}
        with torch.no_grad():
            ref = sample(bf16(**ex)).float()
            for name, fn in variants.items():
                out = sample(fn(**ex)).float()  # warm-up (compiles, autotunes)
                fn(**ex)
                best = float("inf")
                for _ in range(reps):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn(**ex)
                    end.record()
                    torch.cuda.synchronize()
                    best = min(best, start.elapsed_time(end))
                rows.append({"variant": name, "tokens": seq, "ms": best,
                             "rel_err_vs_bf16": float((out - ref).norm() / ref.norm())})
                print(f"  {name:28} {seq:5d} tokens {best:8.2f} ms", flush=True)
    for r in rows:
        base = {v["variant"]: v["ms"] for v in rows if v["tokens"] == r["tokens"]}
        r["vs_bf16_eager"], r["vs_bf16_compiled"] = base["bf16 eager"] / r["ms"], base["bf16 compiled"] / r["ms"]
    return rows


def pytest_check(paths: list[str], interpret: bool) -> dict:
    """Run test files in a subprocess; ``interpret``: under the Triton CPU interpreter (set before import)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return {"ok": False, "detail": "triton is not installed (pip install -e '.[gpu]'): nothing to check"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    return {"ok": proc.returncode == 0, "detail": tail}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    t0 = time.perf_counter()
    result: dict = {"torch": torch.__version__, "checks": {}, "timings": []}
    if not torch.cuda.is_available():
        print("No CUDA device: the GPU checks and timings cannot run on this machine. Running the Triton "
              "kernels' tests under the CPU interpreter, their sm_90 compile, and the compile/save checks "
              "on CPU instead.")
        result["device"] = None
        result["checks"]["triton interpreter (tests/interp)"] = pytest_check(["tests/interp"], interpret=True)
        result["checks"]["sm_90 compile, no GPU (tests/test_triton_compile.py)"] = pytest_check(
            ["tests/test_triton_compile.py", "tests/test_triton_kernels.py", "-k", "not under_the_triton"], interpret=False)
        dev = "cpu"
        names = [("compile + save/load (CPU)", check_compile_and_io)]
    else:
        result["device"] = torch.cuda.get_device_name()
        dev = "cuda"
        names = [("w8a8 op", check_w8a8), ("gguf ops", check_gguf), ("codecs on cuda", check_codecs),
                 ("compile + save/load", check_compile_and_io)]
    for name, fn in names:
        try:
            result["checks"][name] = {"ok": True, "detail": fn(dev)}
        except Exception as e:  # a failed check is reported, and the others still run
            result["checks"][name] = {"ok": False, "detail": f"{type(e).__name__}: {e}"}
    print(f"\n{'check':40} result")
    for name, c in result["checks"].items():
        print(f"{name:40} {'PASS' if c['ok'] else 'FAIL'}  {c['detail']}")
    if dev == "cuda":
        result["timings"] = time_block(args.seq, args.reps)
        print(f"\n{'variant':28} {'tokens':>6} {'ms':>9} {'vs bf16':>8} {'vs bf16 compiled':>17} {'rel err':>8}")
        for r in result["timings"]:
            print(f"{r['variant']:28} {r['tokens']:6d} {r['ms']:9.2f} {r['vs_bf16_eager']:7.2f}x "
                  f"{r['vs_bf16_compiled']:16.2f}x {r['rel_err_vs_bf16']:8.4f}")
    result["wall_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=1).encode(), "gpu_suite")
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")
    return 0 if all(c["ok"] for c in result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
