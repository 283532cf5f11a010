"""The bodies of the ``fxquant`` commands (argument parsing and the entry point are `cli.py`).

    compile   --model, --branches -> nn.Module(s); --calibration -> inputs; fxquant.compile -> fxquant.save
    inspect   fxquant.artifacts.manifest.read_manifest + fxquant.load -> metadata and fxquant.summary on stdout
    export    fxquant.load -> fxquant.save_pt2 / fxquant.save_gguf, one file per branch
    report    fxquant.load -> fxquant.report

Each ``cmd_*`` takes the parsed arguments and a `Progress` (messages to stderr); a user mistake
raises `CliError`, which `cli.main` prints as one line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .branches import as_branches

BUILTIN = "builtin:ideogram4-reduced"


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
    if args.layers is not None and args.layers < 1:
        raise CliError(f"--layers {args.layers}: the built-in model needs at least 1 layer")
    if args.model == BUILTIN:
        from .models import IDEOGRAM4_DEMO, reduced_ideogram4

        cfg = {**IDEOGRAM4_DEMO, "num_layers": IDEOGRAM4_DEMO["num_layers"] if args.layers is None else args.layers}
        progress(f"building the reduced Ideogram 4 ({cfg['num_layers']} layers of width "
                 f"{cfg['attention_head_dim'] * cfg['num_attention_heads']}, seeded random weights)")
        if not branches:
            return reduced_ideogram4(seed=1, **cfg)
        return {b: reduced_ideogram4(seed=1 + i, **cfg) for i, b in enumerate(branches)}
    if args.layers is not None:
        raise CliError("--layers applies to the built-in model only")
    fn = _factory(args.model)
    progress(f"building the model with {args.model}" + (f" for branches {', '.join(branches)}" if branches else ""))
    model = {b: fn(b) for b in branches} if branches else fn()
    parts, _ = as_branches(model, f"--model {args.model!r}", error=CliError)
    if not all(isinstance(m, torch.nn.Module) for m in parts.values()):
        raise CliError(f"--model {args.model!r} must return an nn.Module or a dict of branch name -> nn.Module")
    return model


def _calibration(args: argparse.Namespace, model: Any, progress: Progress) -> Any:
    branches, is_dict = as_branches(model, "--branches", error=CliError)
    names = list(branches) if is_dict else None
    if args.steps < 1:
        raise CliError(f"--steps {args.steps}: give at least 1 built-in calibration input per branch")
    if args.calibration is None:
        if args.model != BUILTIN:
            raise CliError("--calibration FILE is required with a model factory (a torch.save'd list of input dicts)")
        from .models import IDEOGRAM4_DEMO, ideogram4_trajectory

        progress(f"generating {args.steps} built-in calibration inputs per branch (a flow-matching trajectory)")
        widths = dict(in_channels=IDEOGRAM4_DEMO["in_channels"], llm_features_dim=IDEOGRAM4_DEMO["llm_features_dim"])
        if names is None:
            return ideogram4_trajectory(steps=args.steps, seed=10, **widths)
        return {b: ideogram4_trajectory(steps=args.steps, seed=10 + i, **widths) for i, b in enumerate(names)}
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
    from .artifacts.common import writable

    writable(args.out, "compile --out")  # before minutes of compiling, not after
    recipe = fxquant.recipe.resolve(args.recipe)
    model = _models(args, progress)
    calibration = _calibration(args, model, progress)
    models, is_dict = as_branches(model, "compile", error=CliError)
    if is_dict:
        out = {}
        for name, m in models.items():
            progress(f"compiling branch {name!r} with recipe {recipe.name!r} ({len(calibration[name])} calibration inputs)")
            out.update(fxquant.compile({name: m}, recipe, calibration={name: calibration[name]}))
    else:
        progress(f"compiling with recipe {recipe.name!r} ({len(calibration)} calibration inputs)")
        out = fxquant.compile(model, recipe, calibration=calibration)
    summary = fxquant.summary(out)
    if not summary.quantized and not args.allow_float:
        raise CliError(f"recipe {recipe.name!r} quantized none of the {len(summary)} linears ({_why_float(summary)}); "
                       "nothing written. Use another recipe, or --allow-float to write the float module anyway")
    progress(f"saving {args.out}")
    fxquant.save(out, args.out)
    counts = summary.counts()
    progress(f"done: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}; {os.path.getsize(args.out) / 2**20:.2f} MiB")


def _why_float(summary: Any) -> str:
    """The reason of the first row as an example (e.g. a width below the Q4_K block)."""
    first = next((r for r in summary.rows if r.reason), None)
    return f"e.g. {first.name}: {first.reason}" if first is not None else "every linear is float"


# ---------------------------------------------------------------- inspect / export / report

def _load(path: str, progress: Progress) -> Any:
    import fxquant

    progress(f"loading and verifying {path}")
    return fxquant.load(path)


def _select(loaded: Any, branch: Optional[str]) -> dict[str, Any]:
    """Branch name -> module ("" for a single module)."""
    branches, is_dict = as_branches(loaded, "--branch", error=CliError)
    if not is_dict and branch:
        raise CliError(f"--branch {branch!r}: the artifact holds a single module, not branches")
    if not is_dict or branch is None:
        return branches
    if branch not in loaded:
        raise CliError(f"--branch {branch!r}: the artifact has branches {', '.join(loaded)}")
    return {branch: loaded[branch]}


def _per_branch(out: str, branch: str, several: bool, ext: str) -> str:
    """``--out`` for one branch: OUT.<branch>.<ext>, or <branch>.<ext> inside OUT when OUT is a folder
    (ends with a separator or exists), as ``save_gguf(dict, folder)`` names its files."""
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        return os.path.join(out, f"{branch or 'model'}.{ext}")
    if not several:
        return out
    p = Path(out)
    return str(p.with_name(f"{p.stem}.{branch}{p.suffix or '.' + ext}"))


def cmd_inspect(args: argparse.Namespace, progress: Progress) -> None:
    import fxquant
    from .artifacts.manifest import read_manifest

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
    from .artifacts.common import writable

    if args.format == "gguf" and getattr(fxquant, "save_gguf", None) is None:
        raise CliError("--format gguf: this fxquant has no fxquant.save_gguf (GGUF export is not available)")
    if args.out.endswith(("/", os.sep)) or os.path.isdir(args.out):
        if not os.path.isdir(args.out):
            raise CliError(f"--out {args.out!r}: the folder does not exist (export does not create folders)")
    else:
        writable(args.out, "export --out")  # the folder of every per-branch file, checked before loading
    targets = _select(_load(args.path, progress), args.branch)
    for name, gm in targets.items():
        out = _per_branch(args.out, name, len(targets) > 1, args.format)
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
