"""Throughput of the GGUF codecs on one DiT-sized weight, optionally next to llama.cpp's C reference.

    .venv/bin/python bench/bench_codecs.py                      # fxquant only
    .venv/bin/python bench/bench_codecs.py --c-reference DIR    # + llama.cpp's C, same run

Encode: ``fxquant.codecs.quantize`` (NumPy, single-threaded). Decode: ``fxquant.codecs.dequantize``
(torch eager and ``torch.compile``'d on CPU with ``--threads`` intra-op threads, and eager on CUDA
when there is one).

``--c-reference DIR``: a folder holding C source (``*.c``) that defines llama.cpp's
``quantize_row_q4_K_ref`` / ``quantize_row_q8_0_ref`` (and optionally ``dequantize_row_q4_K`` /
``dequantize_row_q8_0``), copied from ``ggml/src/ggml-quants.c``. It is compiled here with the
flags of llama.cpp's Release build of ggml-base (``gcc -O3 -DNDEBUG -std=gnu11``, no ``-march``),
called single-threaded through ctypes on the same array, and its bytes are compared with ours.
fxquant ships no llama.cpp code; the folder stays outside the repository.

The machine is shared and noisy: compare the ratios within one run, not absolute numbers across runs.
Writes a table to stdout and JSON to ``bench/results/codecs.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fxquant.codecs import BLOCKS, dequantize, quantize

CFLAGS = ["-O3", "-DNDEBUG", "-std=gnu11", "-shared", "-fPIC"]
_C_SYMBOLS = {"q4_k": ("quantize_row_q4_K_ref", "dequantize_row_q4_K"),
              "q8_0": ("quantize_row_q8_0_ref", "dequantize_row_q8_0")}


def _timed(fn, repeats: int):
    """(result of the last call, (best wall seconds, best CPU seconds of this process)) over
    ``repeats`` calls. On a shared machine the CPU time of a single-threaded call is the steadier
    number: it does not count the time other processes held the core."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        if isinstance(out, torch.Tensor) and out.is_cuda:
            torch.cuda.synchronize()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return out, (wall, cpu)


def _build_c_reference(src_dir: Path, build_dir: Path) -> ctypes.CDLL:
    sources = sorted(str(p) for p in src_dir.glob("*.c"))
    if not sources:
        raise SystemExit(f"--c-reference {src_dir}: no *.c files there")
    lib = build_dir / "libggml_ref.so"
    subprocess.run(["gcc", *CFLAGS, "-o", str(lib), *sources, "-lm"], check=True)
    return ctypes.CDLL(str(lib))


def _c_call(fn, src: np.ndarray, dst: np.ndarray, k: int) -> np.ndarray:
    fn(src.ctypes.data_as(ctypes.c_void_p), dst.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(k))
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4608)
    ap.add_argument("--cols", type=int, default=12288)
    ap.add_argument("--qtypes", default="q4_k,q8_0")
    ap.add_argument("--repeats", type=int, default=1, help="best of N (encode); decode uses max(N, 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the CPU decode")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip the torch.compile'd CPU decode (compiling takes ~10 s per qtype)")
    ap.add_argument("--c-reference", type=Path, default=None, metavar="DIR")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "codecs.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    # A DiT linear weight: N(0, 0.02), like the reference vectors' gauss_sigma0.02 case.
    w = (rng.standard_normal((args.rows, args.cols), dtype=np.float32) * np.float32(0.02))
    n = w.size
    tmp = tempfile.TemporaryDirectory()
    lib = _build_c_reference(args.c_reference, Path(tmp.name)) if args.c_reference else None

    rows = []

    def record(qtype, op, impl, seconds, **extra):
        wall, cpu = seconds
        rows.append({"qtype": qtype, "op": op, "impl": impl, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
                     "mweights_per_s_wall": round(n / wall / 1e6, 2),
                     "mweights_per_s_cpu": round(n / max(cpu, 1e-9) / 1e6, 2), **extra})

    # Bound for any decoder that returns a new CPU tensor: allocating and filling one (page faults
    # included). The C reference writes into malloc'd memory that glibc reuses between calls.
    _, t = _timed(lambda: torch.ones(args.rows, args.cols), 3)
    record("-", "alloc", "torch.ones (allocation bound)", t)

    for qtype in args.qtypes.split(","):
        q, t = _timed(lambda: quantize(w, qtype), args.repeats)
        record(qtype, "encode", "fxquant numpy (1 thread)", t)
        qt = torch.from_numpy(q)
        y, t = _timed(lambda: dequantize(qt, qtype), max(args.repeats, 3))
        record(qtype, "decode", f"fxquant torch cpu ({args.threads} thread)", t)
        if args.compile:
            fn = torch.compile(lambda b, _q=qtype: dequantize(b, _q), fullgraph=True, dynamic=False)
            fn(qt)  # compile outside the timing
            yk, t = _timed(lambda: fn(qt), max(args.repeats, 3))
            record(qtype, "decode", f"fxquant torch.compile cpu ({args.threads} thread)", t,
                   bits_equal_eager=bool(torch.equal(yk.view(torch.int32), y.view(torch.int32))))
        if torch.cuda.is_available():
            qc = qt.cuda()
            dequantize(qc, qtype)  # warm-up: CUDA context and kernels
            yc, t = _timed(lambda: dequantize(qc, qtype), 10)
            record(qtype, "decode", "fxquant torch cuda", t, bits_equal_cpu=bool(torch.equal(
                yc.cpu().view(torch.int32), y.view(torch.int32))))
        if lib is not None:
            enc_name, dec_name = _C_SYMBOLS[qtype]
            # Fresh output buffers inside the timing, like fxquant's functions, which return new arrays.
            qc_bytes, t = _timed(lambda: _c_call(getattr(lib, enc_name), w, np.empty_like(q), n), args.repeats)
            record(qtype, "encode", "llama.cpp C ref (gcc -O3, 1 thread)", t,
                   bytes_equal_fxquant=bool(np.array_equal(qc_bytes, q)))
            if hasattr(lib, dec_name):
                yc, t = _timed(lambda: _c_call(getattr(lib, dec_name), q, np.empty(w.shape, np.float32), n),
                               max(args.repeats, 3))
                record(qtype, "decode", "llama.cpp C ref (gcc -O3, 1 thread)", t,
                       bits_equal_fxquant=bool(np.array_equal(yc.view(np.uint32), y.numpy().view(np.uint32))))

    # Throughput ratio to the C reference of the same qtype and op, measured in this run, on CPU
    # time (both sides single-threaded); CUDA rows have no meaningful CPU time and get none.
    for r in rows:
        c = [o for o in rows if o["qtype"] == r["qtype"] and o["op"] == r["op"] and o["impl"].startswith("llama.cpp")]
        ok = c and "cuda" not in r["impl"]
        r["vs_c_reference_cpu"] = round(r["mweights_per_s_cpu"] / c[0]["mweights_per_s_cpu"], 3) if ok else None

    print(f"GGUF codecs on a [{args.rows}, {args.cols}] float32 weight ({n / 1e6:.1f} M weights)")
    print(f"| {'qtype':5} | {'op':6} | {'implementation':38} | {'M w/s (wall)':>12} | {'M w/s (CPU)':>11} "
          f"| {'wall s':>7} | {'vs C (CPU)':>10} |")
    print(f"|{'-' * 7}|{'-' * 8}|{'-' * 40}|{'-' * 14}|{'-' * 13}|{'-' * 9}|{'-' * 12}|")
    for r in rows:
        vs = f"{r['vs_c_reference_cpu']:.2f}" if r["vs_c_reference_cpu"] is not None else "-"
        cpu = f"{r['mweights_per_s_cpu']:11.1f}" if "cuda" not in r["impl"] else f"{'-':>11}"
        print(f"| {r['qtype']:5} | {r['op']:6} | {r['impl']:38} | {r['mweights_per_s_wall']:12.1f} | {cpu} "
              f"| {r['wall_s']:7.3f} | {vs:>10} |")
    for r in rows:
        for key in ("bytes_equal_fxquant", "bits_equal_fxquant", "bits_equal_cpu", "bits_equal_eager"):
            if key in r and not r[key]:
                print(f"WARNING: {r['qtype']} {r['op']} {r['impl']}: {key} is False", file=sys.stderr)

    result = {
        "benchmark": "bench/bench_codecs.py", "command": " ".join(["bench/bench_codecs.py", *(argv or sys.argv[1:])]),
        "shape": [args.rows, args.cols], "weights": n, "init": "N(0, 0.02) float32, seed 0",
        "blocks": {q: BLOCKS[q] for q in args.qtypes.split(",")},
        "torch_threads": args.threads, "torch": torch.__version__, "numpy": np.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "c_reference": {"cflags": " ".join(CFLAGS), "measured": True} if lib is not None else
                       {"measured": False, "note": "not measured in this run; the issue quotes ~15 M weights/s "
                                                   "single-threaded for Q4_K on its machine"},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
