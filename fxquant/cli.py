"""The ``fxquant`` command line: compile, inspect, export and report saved artifacts.

    fxquant compile --model builtin:ideogram4-reduced --branches cond,uncond --recipe int8-w8a8 --out m.safetensors
    fxquant compile --model mypkg.models:make_transformer --recipe recipe.json --calibration calib.pt --out m.safetensors
    fxquant inspect m.safetensors
    fxquant export m.safetensors --format pt2 --out m.pt2        (one file per branch: m.cond.pt2, m.uncond.pt2)
    fxquant report m.safetensors --out report/

Progress goes to stderr. An error prints one line ``fxquant: error: ...`` and exits 1; add
``--traceback`` (or set ``FXQUANT_TRACEBACK=1``) for the Python traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

BUILTIN = "builtin:ideogram4-reduced"
# Libraries that log warnings on import or use (torchao's optional kernels, diffusers' dtype notes);
# the command line shows them only with --verbose, so an error stays one line.
NOISY_LOGGERS = ("torch", "torchao", "diffusers")


class CliError(Exception):
    """A user mistake on the command line (reported in one line, exit code 1)."""


class Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet, self.t0 = quiet, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"fxquant: [{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- compile

def _factory(spec: str) -> Callable[..., Any]:
    """``package.module:function`` or ``path/to/file.py:function``."""
    module, sep, func = spec.rpartition(":")
    if not sep or not module or not func:
        raise CliError(f"--model {spec!r}: expected {BUILTIN!r}, 'package.module:function' or 'file.py:function'")
    if module.endswith(".py"):
        if not os.path.isfile(module):
            raise CliError(f"--model {spec!r}: no such file {module!r}")
        loader_spec = importlib.util.spec_from_file_location(Path(module).stem, module)
        mod = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(mod)
    else:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise CliError(f"--model {spec!r}: cannot import {module!r} ({e})") from e
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise CliError(f"--model {spec!r}: {module!r} has no function {func!r}")
    return fn


def _models(args: argparse.Namespace, progress: Progress) -> Any:
    branches = [b for b in (args.branches or "").split(",") if b]
    if args.model == BUILTIN:
        from .models import reduced_ideogram4

        layers = args.layers or 2
        progress(f"building the reduced Ideogram 4 ({layers} layers, seeded random weights)")
        if not branches:
            return reduced_ideogram4(seed=1, num_layers=layers)
        return {b: reduced_ideogram4(seed=1 + i, num_layers=layers) for i, b in enumerate(branches)}
    if args.layers is not None:
        raise CliError("--layers applies to the built-in model only")
    fn = _factory(args.model)
    progress(f"building the model with {args.model}" + (f" for branches {', '.join(branches)}" if branches else ""))
    model = {b: fn(b) for b in branches} if branches else fn()
    items = model.values() if isinstance(model, dict) else [model]
    if not all(isinstance(m, torch.nn.Module) for m in items):
        raise CliError(f"--model {args.model!r} must return an nn.Module or a dict of branch name -> nn.Module")
    return model


def _calibration(args: argparse.Namespace, model: Any, progress: Progress) -> Any:
    names = list(model) if isinstance(model, dict) else None
    if args.calibration is None:
        if args.model != BUILTIN:
            raise CliError("--calibration FILE is required with a model factory (a torch.save'd list of input dicts)")
        from .models import ideogram4_trajectory

        progress(f"generating {args.steps} built-in calibration inputs per branch (a flow-matching trajectory)")
        if names is None:
            return ideogram4_trajectory(steps=args.steps, seed=10)
        return {b: ideogram4_trajectory(steps=args.steps, seed=10 + i) for i, b in enumerate(names)}
    if not os.path.isfile(args.calibration):
        raise CliError(f"--calibration {args.calibration!r}: no such file")
    try:
        data = torch.load(args.calibration, weights_only=True)  # tensors and containers only, never code
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise CliError(f"--calibration {args.calibration!r}: cannot read it with torch.load ({type(e).__name__}: {e})") from e
    if isinstance(data, dict) and data and all(isinstance(v, (list, tuple)) for v in data.values()):
        if names is None or sorted(data) != sorted(names):
            raise CliError(f"--calibration holds branches {sorted(data)} but the model has "
                           f"{sorted(names) if names else 'a single module'}")
        return data
    if not isinstance(data, (list, tuple)) or not data:
        raise CliError(f"--calibration {args.calibration!r}: expected a non-empty list of inputs (dicts of keyword "
                       f"tensors) or a dict of branch -> list, got {type(data).__name__}")
    progress(f"calibration: {len(data)} inputs from {args.calibration}" + (" (the same for every branch)" if names else ""))
    return {b: list(data) for b in names} if names else list(data)


def cmd_compile(args: argparse.Namespace, progress: Progress) -> None:
    import fxquant

    recipe = fxquant.recipe.resolve(args.recipe)
    model = _models(args, progress)
    calibration = _calibration(args, model, progress)
    if isinstance(model, dict):
        out = {}
        for name, m in model.items():
            progress(f"compiling branch {name!r} with recipe {recipe.name!r} ({len(calibration[name])} calibration inputs)")
            out.update(fxquant.compile({name: m}, recipe, calibration={name: calibration[name]}))
    else:
        progress(f"compiling with recipe {recipe.name!r} ({len(calibration)} calibration inputs)")
        out = fxquant.compile(model, recipe, calibration=calibration)
    progress(f"saving {args.out}")
    fxquant.save(out, args.out)
    counts = fxquant.summary(out).counts()
    progress(f"done: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}; {os.path.getsize(args.out) / 2**20:.2f} MiB")


# ---------------------------------------------------------------- inspect / export / report

def _load(path: str, progress: Progress) -> Any:
    import fxquant

    progress(f"loading and verifying {path}")
    return fxquant.load(path)


def _select(loaded: Any, branch: Optional[str]) -> dict[str, Any]:
    """Branch name -> module ("" for a single module)."""
    if not isinstance(loaded, dict):
        if branch:
            raise CliError(f"--branch {branch!r}: the artifact holds a single module, not branches")
        return {"": loaded}
    if branch is None:
        return loaded
    if branch not in loaded:
        raise CliError(f"--branch {branch!r}: the artifact has branches {', '.join(loaded)}")
    return {branch: loaded[branch]}


def _per_branch(out: str, branch: str, several: bool) -> str:
    if not several:
        return out
    p = Path(out)
    return str(p.with_name(f"{p.stem}.{branch}{p.suffix}"))


def cmd_inspect(args: argparse.Namespace, progress: Progress) -> None:
    import fxquant
    from .manifest import read_manifest

    m = read_manifest(args.path)
    loaded = _load(args.path, progress)
    print(f"{args.path}: fxquant artifact, format version {m['format_version']}, written by fxquant "
          f"{m['fxquant_version']} with torch {m['torch_version']}")
    n = sum(len(b["tensors"]) for b in m["branches"].values())
    what = "a single module" if m["kind"] == "module" else f"branches: {', '.join(m['order'])}"
    print(f"{what}; {n} tensors (sha256 verified); {os.path.getsize(args.path) / 2**20:.2f} MiB")
    print(f"recipe: {json.dumps(next(iter(m['branches'].values()))['graph']['recipe'], sort_keys=True)}")
    print()
    print(fxquant.summary(loaded))


def cmd_export(args: argparse.Namespace, progress: Progress) -> None:
    import fxquant

    if args.format == "gguf" and getattr(fxquant, "save_gguf", None) is None:
        raise CliError("--format gguf: this fxquant has no fxquant.save_gguf (GGUF export is not available)")
    targets = _select(_load(args.path, progress), args.branch)
    for name, gm in targets.items():
        out = _per_branch(args.out, name, len(targets) > 1)
        progress(f"exporting {('branch ' + repr(name)) if name else 'the module'} to {out} ({args.format})")
        if args.format == "pt2":
            fxquant.save_pt2(gm, out)
        else:
            fxquant.save_gguf(gm, out)
        print(out)


def cmd_report(args: argparse.Namespace, progress: Progress) -> None:
    import fxquant

    report = getattr(fxquant, "report", None)
    if report is None:
        raise CliError("report: this fxquant has no fxquant.report (the analysis report is not available)")
    targets = _select(_load(args.path, progress), args.branch)
    progress(f"writing the report to {args.out}")
    written = report(targets[""] if "" in targets else targets, args.out)  # report takes a dict of branches too
    for path in written.values():
        print(path)


# ---------------------------------------------------------------- parser and entry point


def build_parser() -> argparse.ArgumentParser:
    def flags(default: Any) -> argparse.ArgumentParser:
        f = argparse.ArgumentParser(add_help=False)
        f.add_argument("--traceback", action="store_true", default=default, help="print the Python traceback on errors")
        f.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress messages on stderr")
        f.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="show warnings from torch, torchao and diffusers")
        return f

    # The flags work before and after the command; a subcommand's default must not reset a flag
    # given before it, hence SUPPRESS there.
    common = flags(argparse.SUPPRESS)
    p = argparse.ArgumentParser(prog="fxquant", description="Post-training quantization compiler for diffusion transformers.",
                                parents=[flags(False)])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", parents=[common], help="quantize a model and save the artifact",
                       description="Trace, calibrate, quantize and save a model (or its CFG branches) to one file.")
    c.add_argument("--model", required=True, help=f"{BUILTIN!r}, 'package.module:function' or 'file.py:function'; the "
                   "function returns an nn.Module or a dict of branch -> nn.Module (called with the branch name if --branches is given)")
    c.add_argument("--recipe", required=True, help="a preset (int8-w8a8, w8a8-naive, q4_k, q8_0) or a recipe JSON file")
    c.add_argument("--calibration", help="torch.save'd list of input dicts, or a dict of branch -> list "
                   "(default for the built-in model: a generated trajectory)")
    c.add_argument("--branches", help="comma-separated CFG branch names, e.g. cond,uncond (each its own weights)")
    c.add_argument("--layers", type=int, help="layers of the built-in model (default 2)")
    c.add_argument("--steps", type=int, default=4, help="built-in calibration inputs per branch (default 4)")
    c.add_argument("--out", required=True, help="artifact path, e.g. model.safetensors")
    c.set_defaults(func=cmd_compile)

    i = sub.add_parser("inspect", parents=[common], help="verify a saved artifact and print its summary",
                       description="Verify every checksum of a saved artifact and print its metadata and per-layer summary.")
    i.add_argument("path")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("export", parents=[common], help="export a saved artifact to .pt2 or .gguf",
                       description="Export a saved artifact: pt2 (torch.export.save; reload with torch.export.load after "
                       "`import fxquant`) or gguf (fxquant.save_gguf).")
    e.add_argument("path")
    e.add_argument("--format", required=True, choices=("pt2", "gguf"))
    e.add_argument("--out", required=True, help="output file; with several branches, one file per branch (OUT.<branch>.pt2 / .gguf)")
    e.add_argument("--branch", help="export only this branch")
    e.set_defaults(func=cmd_export)

    r = sub.add_parser("report", parents=[common], help="write the analysis report of a saved artifact",
                       description="Write fxquant.report's JSON, Markdown and plots for a saved artifact.")
    r.add_argument("path")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--branch", help="report only this branch")
    r.set_defaults(func=cmd_report)
    return p


@contextlib.contextmanager
def _quiet_libraries(enabled: bool):
    """Raise the noisy libraries' log level to ERROR and ignore Python warnings, restoring both after."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    env = os.environ.get("DIFFUSERS_VERBOSITY")
    os.environ["DIFFUSERS_VERBOSITY"] = "error"  # diffusers resets its level when first imported
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if env is None:
            os.environ.pop("DIFFUSERS_VERBOSITY", None)
        else:
            os.environ["DIFFUSERS_VERBOSITY"] = env


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help and usage errors
        return int(e.code or 0)
    show_tb = args.traceback or os.environ.get("FXQUANT_TRACEBACK", "") not in ("", "0")
    try:
        with _quiet_libraries(not args.verbose):
            args.func(args, Progress(args.quiet))
        return 0
    except KeyboardInterrupt:
        print("fxquant: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one line (or a traceback on request)
        if show_tb:
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        from .errors import FxquantError

        kind = "" if isinstance(e, (CliError, FxquantError)) else f"{type(e).__name__}: "
        print(f"fxquant: error: {kind}{msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
