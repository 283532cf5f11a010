"""Peak memory of `fxquant.compile` by phase, at Ideogram 4's real widths in bfloat16.

    .venv/bin/python bench/bench_memory.py                    # 2 and 4 layers, int8-w8a8, shared and consume
    .venv/bin/python bench/bench_memory.py --layers 2 --recipes int8-w8a8 w8a8-naive

Each configuration runs in a fresh subprocess (peak RSS is a per-process number): build a seeded
`Ideogram4Transformer2DModel` with `fxquant.models.IDEOGRAM4_FULL` widths (hidden 4608, SwiGLU
12288, LLM features 53248) and ``--layers`` blocks directly in bfloat16, make ``--items``
calibration inputs of ``--tokens`` tokens (batch 1), then call the real ``fxquant.compile``
(top-k protection ranked by fragility unless ``--protect-by`` says otherwise: ranking by
sensitivity runs 1 + L forwards of the model, which is time, not a different memory pattern).
A sampling thread reads the process RSS every millisecond; the phase it is charged to is the pass
running (each pass's ``__call__`` is wrapped to name itself), and ``peak_at`` in the JSON says where
in fxquant the main thread was at each phase's peak (innermost frames first):

    trace      torch.export until the first pass
    stats      find_linears, collect_stats, score_fragility, score_sensitivity, select_schemes
    smoothing  fold_smoothing
    gptq       round_gptq (presets with GPTQ rounding)
    lowering   lower_w8a8 / lower_gguf, materialize_folds, and owning what stays float

Numbers are RSS above the process's RSS just before the model was built (Python, torch, the
calibration inputs, and, unless ``--no-warmup``, the code compile loads on its first call: a
compile of a one-layer reduced Ideogram 4 first imports torch.export / dynamo / sympy / torchao,
about 0.2 GB of RSS that does not depend on the model; ``warmup_rss`` in the JSON), so they
compare with tensor bytes: ``input`` is the float model's parameter
and buffer bytes, ``output`` the compiled module's. Targets (issue 10): ``shared`` peak <=
input + output + 10% of input; ``consume`` peak <= 1.25 x input. The 34-layer line extrapolates
linearly from the 2- and 4-layer runs (every block is the same size). Time per billion parameters
is the whole ``compile`` over the model's parameter count; the machine is shared with other jobs
(load average recorded), so times are indicative.

Prints a table and writes ``bench/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
PHASES = {"find_linears": "stats", "collect_stats": "stats", "score_fragility": "stats", "select_protected": "stats",
          "score_sensitivity": "stats", "select_schemes": "stats", "fold_smoothing": "smoothing", "round_gptq": "gptq"}
COLUMNS = ("trace", "stats", "smoothing", "gptq", "lowering")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _where(frame, depth: int = 3) -> str:
    """The innermost ``depth`` fxquant frames of a stack, innermost first ("file.py:line function")."""
    out = []
    while frame is not None and len(out) < depth:
        code = frame.f_code
        if "fxquant" in code.co_filename.replace("\\", "/").split("/site-packages/")[-1]:
            out.append(f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return " < ".join(out)


class Sampler(threading.Thread):
    """Per phase: the peak RSS and where the main thread was when it was sampled (``peak_at``)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase, self.peaks, self.where, self.stop = "setup", {}, {}, False
        self.main = threading.get_ident()

    def _sample(self) -> None:
        r = _rss()
        if r > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = r
            self.where[self.phase] = _where(sys._current_frames().get(self.main))

    def run(self) -> None:
        while not self.stop:
            self._sample()
            time.sleep(0.001)

    def enter(self, phase: str) -> None:
        self._sample()
        self.phase = phase
        self._sample()


def build(layers: int, seed: int = 0):
    import torch
    from diffusers.models.transformers.transformer_ideogram4 import Ideogram4Transformer2DModel

    from fxquant.models import IDEOGRAM4_FULL

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never a float32 copy of the weights
    try:
        torch.manual_seed(seed)
        model = Ideogram4Transformer2DModel(**{**IDEOGRAM4_FULL, "num_layers": layers})
    finally:
        torch.set_default_dtype(old)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1 and not name.endswith(("norm_q.weight", "norm_k.weight")):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen).abs())
    return model.eval()


def child(args: argparse.Namespace) -> dict:
    import torch

    import fxquant
    from fxquant.models import ideogram4_inputs
    from fxquant.passes.base import FxquantPass

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    text = max(1, args.tokens - 196)
    calib = [ideogram4_inputs(batch=1, text_len=text, image_hw=(14, 14), timestep=(i + 0.5) / args.items, seed=i,
                              in_channels=128, llm_features_dim=53248, dtype=torch.bfloat16) for i in range(args.items)]
    before_warmup = _rss()
    if args.warmup:  # load the code compile runs (torch.export, dynamo, sympy, torchao) before the baseline
        from fxquant.models import reduced_ideogram4
        tiny = reduced_ideogram4(seed=0, num_layers=1)
        fxquant.compile(tiny, args.recipe, calibration=[ideogram4_inputs(batch=1, text_len=4, image_hw=(2, 2), seed=0)])
        del tiny
        from fxquant import memory
        memory.trim()
    sampler = Sampler()
    base = _rss()
    sampler.start()
    t0 = time.perf_counter()
    sampler.enter("build")
    model = build(args.layers)
    t_build = time.perf_counter() - t0
    nparams = sum(p.numel() for p in model.parameters())
    input_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))

    original = FxquantPass.__call__

    gptq = {}

    def named_call(self, gm):
        sampler.enter(PHASES.get(self.name, "lowering"))
        out = original(self, gm)
        if self.name == "round_gptq":  # its own time, forwards and cache of settled values (fxquant.frontier)
            gptq.update(seconds=self.seconds, forwards=self.forwards, from_cache=self.cached, nodes=self.computed,
                        frontier_peak=self.frontier_peak, left_out=self.left_out,
                        hessian_budget=self.budget)
        return out

    FxquantPass.__call__ = named_call
    sampler.enter("trace")
    t0 = time.perf_counter()
    recipe = fxquant.Recipe.preset(args.recipe)
    if args.protect_by and recipe.protect_top_k:
        recipe = recipe.replace(protect_by=args.protect_by)
    gm = fxquant.compile(model, recipe, calibration=calib, consume=args.mode == "consume")
    t_compile = time.perf_counter() - t0
    sampler.enter("done")
    time.sleep(0.01)
    sampler.stop = True
    sampler.join()
    FxquantPass.__call__ = original
    output_bytes = sum(t.numel() * t.element_size() for t in list(gm.parameters()) + list(gm.buffers()))
    counts = fxquant.summary(gm).counts()
    peaks = {k: v - base for k, v in sampler.peaks.items()}
    compile_peak = max(peaks.get(p, 0) for p in COLUMNS)
    return dict(layers=args.layers, recipe=args.recipe, protect_by=str(getattr(recipe.protect_by, "value", "")), mode=args.mode, tokens=args.tokens, items=args.items,
                params=nparams, input_bytes=input_bytes, output_bytes=output_bytes, baseline_rss=base,
                peaks=peaks, peak_at=sampler.where, compile_peak=compile_peak, warmup_rss=base - before_warmup if args.warmup else None, build_s=t_build, compile_s=t_compile,
                s_per_billion=t_compile / (nparams / 1e9), counts=counts, loadavg=os.getloadavg(), gptq=gptq or None)


def target(r: dict) -> tuple[float, bool]:
    if r["mode"] == "consume":
        limit = 1.25 * r["input_bytes"]
    else:
        limit = r["input_bytes"] + r["output_bytes"] + 0.10 * r["input_bytes"]
    return limit, r["compile_peak"] <= limit


def extrapolate(rows: list[dict], layers: int = 34) -> list[dict]:
    out = []
    keys = {(r["recipe"], r["mode"]) for r in rows}
    for recipe, mode in sorted(keys):
        pts = sorted((r for r in rows if (r["recipe"], r["mode"]) == (recipe, mode)), key=lambda r: r["layers"])
        if len(pts) < 2 or pts[0]["layers"] == pts[-1]["layers"]:
            continue
        a, b = pts[0], pts[-1]

        def lin(key, sub=None):
            va = a[key] if sub is None else a[key][sub]
            vb = b[key] if sub is None else b[key][sub]
            return vb + (vb - va) / (b["layers"] - a["layers"]) * (layers - b["layers"])

        est = dict(layers=layers, recipe=recipe, mode=mode, params=lin("params"), input_bytes=lin("input_bytes"),
                   output_bytes=lin("output_bytes"), compile_peak=lin("compile_peak"),
                   peaks={p: lin("peaks", p) for p in COLUMNS if p in a["peaks"] and p in b["peaks"]},
                   s_per_billion=lin("compile_s") / (lin("params") / 1e9), extrapolated=True)
        # the peak may move between phases from 2 to 4 layers: the extrapolated peak is the largest
        # of the extrapolated phase peaks, not the line through two peaks of different phases
        est["compile_peak"] = max(est["compile_peak"], *est["peaks"].values())
        out.append(est)
    return out


def table(rows: list[dict]) -> str:
    gb = 1e9
    head = (f"{'layers':>6} {'recipe':<11} {'mode':<8} {'params':>7} {'input':>7} {'output':>7} {'trace':>7} "
            f"{'stats':>7} {'smooth':>7} {'gptq':>7} {'lower':>7} {'peak':>7} {'/input':>6} {'target':>7} {'met':>4} {'s/B':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        limit, ok = target(r)
        p = r["peaks"]
        lines.append(
            f"{r['layers']:>6} {r['recipe']:<11} {r['mode']:<8} {r['params'] / 1e9:>6.2f}B {r['input_bytes'] / gb:>6.2f}G "
            f"{r['output_bytes'] / gb:>6.2f}G " + " ".join(f"{p.get(k, 0) / gb:>6.2f}G" for k in COLUMNS)
            + f" {r['compile_peak'] / gb:>6.2f}G {r['compile_peak'] / r['input_bytes']:>5.2f}x {limit / gb:>6.2f}G"
            f" {'yes' if ok else 'NO':>4} {r['s_per_billion']:>6.1f}" + ("  (extrapolated)" if r.get("extrapolated") else ""))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--recipes", nargs="+", default=["int8-w8a8-paper"])
    ap.add_argument("--modes", nargs="+", default=["shared", "consume"], choices=["shared", "consume"])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--protect-by", default="fragility", help="ranking for top-k protection ('' keeps the preset's; "
                    "sensitivity costs 1 + L forwards, too slow for a shared machine at these widths)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="measure from before the first compile (the baseline then excludes the code compile loads)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", default="int8-w8a8", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="shared", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.layers = args.layers[0]
        print(json.dumps(child(args)))
        return
    rows = []
    for layers in args.layers:
        for recipe in args.recipes:
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--child", "--layers", str(layers), "--recipe", recipe, "--mode", mode,
                       "--tokens", str(args.tokens), "--items", str(args.items), "--protect-by", args.protect_by]
                cmd += [] if args.warmup else ["--no-warmup"]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                phase = max(COLUMNS, key=lambda k: r["peaks"].get(k, 0))
                print(f"  measured {layers} layers {recipe} {mode}: peak {r['compile_peak'] / 1e9:.2f} GB in {phase}, at "
                      f"{r['peak_at'].get(phase, '?')}", file=sys.stderr)
    rows += extrapolate(rows)
    for r in rows:
        r["target_bytes"], r["target_met"] = target(r)
    print(table(rows))
    print(f"load average {os.getloadavg()}; RSS above the pre-build baseline; G = 1e9 bytes")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from fxquant.artifacts.common import atomic_write

    atomic_write(args.out, json.dumps({"rows": rows, "loadavg": os.getloadavg(), "cpus": os.cpu_count()},
                                      indent=1).encode(), "bench_memory")


if __name__ == "__main__":
    main()
