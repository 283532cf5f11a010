"""Merge-before-quantize: fold a LoRA into a float model's weights (the reference, and the
``lora=`` option of `fxquant.compile`).

    nn.Linear W  ->  W + scale * factor * (up @ down)      computed in float32, cast back to W's dtype

The input model is never written: the result is a deep copy with new weight tensors.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Union

import torch

from ..branches import as_branches, unless_dict
from ..errors import LoraError
from .apply import check_scale
from .files import LoraSource, load_lora
from .targets import prefix_table, single_prefix

Model = Union[torch.nn.Module, Mapping[str, torch.nn.Module]]


def merge_lora(model: Model, lora: LoraSource, scale: float = 1.0, *,
               prefixes: Union[str, Mapping[str, str], None] = None, config: Any = None) -> Model:
    """A copy of a float model (or dict of CFG branches) with the LoRA merged into its linears.

    Args:
        model: an ``nn.Module`` (key prefix ``transformer`` unless ``prefixes`` is a str) or a
            dict of branches (``cond`` -> ``transformer``, ``uncond`` -> ``unconditional_transformer``
            unless ``prefixes`` maps them).
        lora, scale, config: as for `fxquant.apply_lora`.

    Returns:
        A new module (or dict); ``model`` is unchanged.

    Raises:
        LoraError: as `fxquant.apply_lora` (unmatched keys, shape mismatches, ...).

    Example:
        >>> merged = fxquant.merge_lora(transformer, "style.safetensors", scale=0.8)  # doctest: +SKIP
    """
    scale = check_scale(scale, "merge_lora")
    weights = load_lora(lora, config)
    models, is_dict = as_branches(model, "merge_lora", error=LoraError)
    if is_dict:
        table = prefix_table(list(models), prefixes, "merge_lora")
        parts = {k: (m, table[k], f"branch {k!r}") for k, m in models.items()}
    else:
        parts = {k: (m, single_prefix(prefixes), "model") for k, m in models.items()}
    if not weights.layers:
        raise LoraError(f"merge_lora: {weights.source} has no LoRA layers; nothing to merge")
    claimed = {comp for _, comp, _ in parts.values()}
    for comp, layer in weights.layers:
        if comp not in claimed:
            raise LoraError(f"merge_lora: {weights.source}: key {layer.key!r} is for component {comp!r}, which none of "
                            f"the branches is (their key prefixes: {sorted(claimed)})")
    out = {k: _merge_one(m, weights, comp, where, scale) for k, (m, comp, where) in parts.items()}
    return unless_dict(out, is_dict)


def _merge_one(model: torch.nn.Module, weights, comp: str, where: str, scale: float) -> torch.nn.Module:
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    layers = weights.for_component(comp, linears, f"{where} (key prefix {comp!r})")
    merged = copy.deepcopy(model)
    for name, layer in layers.items():
        lin = merged.get_submodule(name)
        w = lin.weight
        if tuple(layer.down.shape) != (layer.rank, w.shape[1]) or tuple(layer.up.shape) != (w.shape[0], layer.rank):
            raise LoraError(f"merge_lora: key {layer.key!r}: down {tuple(layer.down.shape)} / up {tuple(layer.up.shape)} "
                            f"do not fit linear {name!r} ({w.shape[1]} -> {w.shape[0]})")
        delta = (scale * layer.factor) * (layer.up.float() @ layer.down.float())
        new = (w.detach().float() + delta.to(w.device)).to(w.dtype)
        lin.weight = torch.nn.Parameter(new, requires_grad=w.requires_grad)
    return merged
