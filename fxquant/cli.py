"""The ``fxquant`` command line: compile, inspect, export and report saved artifacts.

    fxquant compile --model builtin:ideogram4-reduced --branches cond,uncond --recipe int8-w8a8 --out m.safetensors
    fxquant compile --model mypkg.models:make_transformer --recipe recipe.json --calibration calib.pt --out m.safetensors
    fxquant inspect m.safetensors
    fxquant export m.safetensors --format pt2 --out m.pt2        (one file per branch: m.cond.pt2, m.uncond.pt2)
    fxquant report m.safetensors --out report/

Progress goes to stderr. An error prints one line ``fxquant: error: ...`` and exits 1; add
``--traceback`` (or set ``FXQUANT_TRACEBACK=1``) for the Python traceback.

This file is the parser and the entry point; the command bodies are `commands.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
import warnings
from typing import Any, Optional, Sequence

from .commands import BUILTIN, CliError, Progress, cmd_compile, cmd_export, cmd_inspect, cmd_report

# Libraries that log warnings on import or use (torchao's optional kernels, diffusers' dtype notes);
# the command line shows them only with --verbose, so an error stays one line.
NOISY_LOGGERS = ("torch", "torchao", "diffusers")


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
    c.add_argument("--recipe", required=True, help="a preset (int8-w8a8, int8-w8a8-paper, w8a8-naive, q4_k, q8_0) or a recipe JSON file")
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
    e.add_argument("--out", required=True, help="output file; with several branches, one file per branch "
                   "(OUT.<branch>.pt2 / .gguf); a folder (ending in /) gets <branch>.pt2 / .gguf")
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


class _ToProgress(logging.Handler):
    """The library's ``fxquant`` logger (each pass, each calibration input) shown as progress lines."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress(record.getMessage().removeprefix("fxquant: "))


@contextlib.contextmanager
def _library_progress(progress: Progress, verbose: bool):
    """Progress from the library comes through `logging`; per-input lines only with --verbose."""
    lg = logging.getLogger("fxquant")
    handler, level = _ToProgress(progress), lg.level
    handler.addFilter(lambda r: verbose or "calibration inputs" not in r.getMessage())
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        lg.removeHandler(handler)
        lg.setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help and usage errors
        return int(e.code or 0)
    show_tb = args.traceback or os.environ.get("FXQUANT_TRACEBACK", "") not in ("", "0")
    progress = Progress(args.quiet)
    try:
        with _quiet_libraries(not args.verbose), _library_progress(progress, args.verbose):
            args.func(args, progress)
        return 0
    except KeyboardInterrupt:
        print("fxquant: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one line (or a traceback on request)
        if show_tb:
            traceback.print_exc()
        from .errors import FxquantError, first_line

        msg = first_line(e)

        kind = "" if isinstance(e, (CliError, FxquantError)) else f"{type(e).__name__}: "
        print(f"fxquant: error: {kind}{msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
