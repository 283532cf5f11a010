"""Quantize the transformers of a diffusers pipeline in place, save them, and load them back
into the pipeline without ever building their float weights.

    pipe = Ideogram4Pipeline.from_pretrained(local_dir, torch_dtype=torch.bfloat16)
    fxquant.quantize_pipeline(pipe, "int8-w8a8", prompts=prompts, num_inference_steps=8)
        runs pipe(prompt) for each prompt with `fxquant.observe` on each transformer (each CFG branch's
        statistics stream from the inputs it really sees; a couple of calls are kept), compiles them
        together, and swaps the lowered modules in:
        pipe.transformer, pipe.unconditional_transformer  ->  QuantizedModule
    fxquant.save_pipeline(pipe, "q/")         q/transformer.safetensors, q/unconditional_transformer.safetensors,
                                              q/fxquant_pipeline.json (which files hold which component)
    pipe = fxquant.load_pipeline(local_dir, "q/")
        DiffusionPipeline.from_pretrained(local_dir, transformer=None, unconditional_transformer=None)
        (diffusers skips those components: their float weights are never read or built), then
        each saved component is `fxquant.load`-ed and set on the pipeline.

Which attributes are transformers: `COMPONENTS` that the pipeline has and that are modules
(``transformer`` for Flux, SD3, PixArt, ...; both for Ideogram 4). ``pipe.save_pretrained`` cannot
write a quantized component (diffusers only saves its own and transformers' classes; it warns and
drops it from model_index.json): use `save_pipeline`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..api import compile as fxq_compile
from ..artifacts.common import PathLike, atomic_write, fspath
from ..artifacts.io import load, save
from ..errors import CalibrationError, FormatError, FxquantError, is_int
from ..module import QuantizedModule
from ..observe import Observed, observe
from ..passes.fold_smoothing import SmoothOptions
from ..recipe import resolve

COMPONENTS = ("transformer", "unconditional_transformer", "transformer_2")
MANIFEST = "fxquant_pipeline.json"
FORMAT = "fxquant-pipeline"


def transformers_of(pipe: Any, components: Optional[Sequence[str]] = None) -> dict[str, torch.nn.Module]:
    """The pipeline's transformers by attribute name (``components`` picks them; default: all of `COMPONENTS`).

    Raises:
        FxquantError: a named component that the pipeline lacks or that is not a module, or none found.
    """
    names = list(components) if components is not None else [c for c in COMPONENTS if getattr(pipe, c, None) is not None]
    found = {}
    for name in names:
        m = getattr(pipe, name, None)
        if not isinstance(m, torch.nn.Module):
            raise FxquantError(f"{type(pipe).__name__}: component {name!r} is {type(m).__name__}, not a transformer module")
        found[name] = m
    if not found:
        raise FxquantError(f"{type(pipe).__name__}: no transformer to quantize (looked for {', '.join(COMPONENTS)})")
    return found


def observe_pipeline(pipe: Any, modules: Mapping[str, torch.nn.Module], prompts: Sequence[str], keep_inputs: int,
                     step_stride: int, search_tokens: int, **call_kwargs: Any) -> dict[str, Observed]:
    """The calibration: run ``pipe(prompt, **call_kwargs)`` for each prompt with `fxquant.observe` on
    each module (every ``step_stride``-th call): statistics stream, ``keep_inputs`` calls are kept."""
    with contextlib.ExitStack() as stack:
        observed = {name: stack.enter_context(observe(m, search_tokens=search_tokens, keep_inputs=keep_inputs))
                    for name, m in modules.items()}
        for obs in observed.values():
            obs.stride = step_stride
        with torch.no_grad():
            for prompt in prompts:
                pipe(prompt, **call_kwargs)
    for name, obs in observed.items():
        if not obs.calls:
            raise CalibrationError(f"quantize_pipeline: {type(pipe).__name__}.{name} was never called while the "
                                   f"pipeline ran on {len(prompts)} prompt(s)")
    return observed


def quantize_pipeline(pipe: Any, recipe: Any, prompts: Union[str, Sequence[str]], num_inference_steps: int = 8,
                      step_stride: int = 1, *, keep_inputs: int = 2, components: Optional[Sequence[str]] = None,
                      seed: int = 0, **call_kwargs: Any) -> dict[str, QuantizedModule]:
    """Calibrate each transformer of ``pipe`` on the inputs the pipeline gives it, compile, and swap
    the quantized modules in (in place).

    Args:
        pipe: a diffusers pipeline (``Ideogram4Pipeline``, ``FluxPipeline``, ``PixArtSigmaPipeline``, ...).
        recipe: as for `fxquant.compile` (a preset name, a `Recipe` or a recipe file).
        prompts: the calibration prompts (a string is one prompt); each is the pipeline's first
            argument, so a class-conditional pipeline (DiT) takes lists of class labels here.
        num_inference_steps: denoising steps per prompt while calibrating.
        step_stride: observe every ``step_stride``-th call of each transformer (1: every step).
        keep_inputs: calls whose arguments are kept per transformer (evenly spread, see
            `fxquant.observe`): the tracing example and what sensitivity ranking and GPTQ re-run.
            Every other observed call only adds to running statistics, so memory does not grow
            with the number of prompts or steps.
        components: the attributes to quantize (default: every one of `COMPONENTS` the pipeline has).
        seed: the generator seed of the calibration runs.
        **call_kwargs: more arguments for ``pipe(...)`` (``height``, ``width``, ``guidance_scale``, ...).

    Returns:
        The quantized modules by attribute name (also set on ``pipe``).

    Raises:
        FxquantError: no transformer found; CalibrationError: no prompt, a bad stride, a transformer
        never called; and whatever `fxquant.compile` raises.

    Example:
        >>> fxquant.quantize_pipeline(pipe, "int8-w8a8", prompts=["a red bicycle"], num_inference_steps=8)  # doctest: +SKIP
    """
    if "max_items" in call_kwargs:
        raise CalibrationError("quantize_pipeline: max_items is gone: statistics now stream over every observed call "
                               "(fxquant.observe); keep_inputs says how many whole calls are kept (default 2)")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise CalibrationError("quantize_pipeline: give at least one calibration prompt")
    if not is_int(step_stride, 1):
        raise CalibrationError(f"quantize_pipeline: step_stride must be an integer >= 1, got {step_stride!r}")
    modules = transformers_of(pipe, components)
    for name, m in modules.items():
        if isinstance(m, QuantizedModule):
            raise FxquantError(f"quantize_pipeline: {type(pipe).__name__}.{name} is already quantized")
    if "output_type" in inspect.signature(type(pipe).__call__).parameters:
        call_kwargs.setdefault("output_type", "latent")  # the VAE decode calibrates nothing
    call_kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
    recipe = resolve(recipe)
    search = SmoothOptions().search_tokens if recipe.smoothquant and recipe.alpha_search else 0
    observed = observe_pipeline(pipe, modules, prompts, keep_inputs, step_stride, search,
                                num_inference_steps=num_inference_steps, **call_kwargs)
    quantized = fxq_compile(modules, recipe, calibration=observed)
    for name, gm in quantized.items():
        setattr(pipe, name, gm)
    return quantized


def save_pipeline(pipe: Any, directory: PathLike) -> list[str]:
    """Write the pipeline's quantized components to ``directory`` (created if missing): one fxquant
    artifact per component and ``fxquant_pipeline.json`` naming them. The float components are not
    written: `load_pipeline` takes them from the original pipeline folder.

    Returns:
        The paths written.

    Raises:
        FxquantError: the pipeline has no quantized component; FormatError: the folder cannot be written.
    """
    directory = fspath(directory, "save_pipeline")
    parts = {c: getattr(pipe, c) for c in COMPONENTS if isinstance(getattr(pipe, c, None), QuantizedModule)}
    if not parts:
        raise FxquantError(f"save_pipeline: {type(pipe).__name__} has no quantized component "
                           "(run fxquant.quantize_pipeline first)")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise FormatError(f"save_pipeline: cannot create {directory}: {e.strerror or e}") from None
    written = []
    for name, gm in parts.items():
        path = os.path.join(directory, f"{name}.safetensors")
        save(gm, path)
        written.append(path)
    manifest = {"format": FORMAT, "format_version": 1, "pipeline_class": type(pipe).__name__,
                "components": {name: f"{name}.safetensors" for name in parts}}
    path = atomic_write(os.path.join(directory, MANIFEST),
                        json.dumps(manifest, indent=1, sort_keys=True).encode(), "save_pipeline")
    return written + [path]


def load_pipeline(float_dir: PathLike, quant_dir: PathLike, **from_pretrained: Any) -> Any:
    """The pipeline in ``float_dir`` with its transformers replaced by the ones `save_pipeline` wrote
    to ``quant_dir``. The float transformers are passed to diffusers as None, so their weights are
    never read or built (``float_dir`` need not even hold them).

    Args:
        float_dir: the local folder of the original pipeline (``save_pretrained`` / a hub snapshot).
        quant_dir: the folder `save_pipeline` wrote.
        **from_pretrained: more arguments for ``DiffusionPipeline.from_pretrained`` (e.g. ``torch_dtype``,
            which applies to the float components only).

    Raises:
        FormatError: no or a malformed ``fxquant_pipeline.json``, a missing artifact, or another pipeline
        class than the one saved; and whatever `fxquant.load` raises.
    """
    from diffusers import DiffusionPipeline

    float_dir, quant_dir = fspath(float_dir, "load_pipeline"), fspath(quant_dir, "load_pipeline")
    path = os.path.join(quant_dir, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        parts = dict(manifest["components"]) if manifest.get("format") == FORMAT else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FormatError(f"load_pipeline: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not parts:
        raise FormatError(f"load_pipeline: {path} is not an fxquant pipeline manifest")
    modules = {}
    for name, file in parts.items():
        if name not in COMPONENTS or os.path.basename(file) != file:
            raise FormatError(f"load_pipeline: {path}: component {name!r} -> {file!r} is not one fxquant writes")
        modules[name] = load(os.path.join(quant_dir, file))
    pipe = DiffusionPipeline.from_pretrained(float_dir, **{**from_pretrained, **{n: None for n in modules}})
    if type(pipe).__name__ != manifest.get("pipeline_class"):
        raise FormatError(f"load_pipeline: {quant_dir} holds components of a {manifest.get('pipeline_class')}, "
                          f"but {float_dir} is a {type(pipe).__name__}")
    for name, gm in modules.items():
        setattr(pipe, name, gm)
    return pipe
