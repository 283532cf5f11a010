"""Reading LoRA files into `LoraWeights`: the diffusers / PEFT layout and kohya's.

    transformer.<module>.lora_A.weight  [rank, in]     diffusers (``pipe.save_lora_weights``)
    transformer.<module>.lora_B.weight  [out, rank]
    <module>.lora_A.weight                             bare (``transformer.save_lora_adapter``)
    base_model.model.<module>.lora_A.weight            PEFT (``adapter_model.safetensors``)
    unconditional_transformer.<module>.lora_A.weight   Ideogram 4's unconditional (CFG) transformer
    lora_unet_<module_with_underscores>.lora_down.weight / .lora_up.weight / .alpha      kohya

Every key belongs to a component, the pipeline attribute it adapts: ``transformer`` (also bare,
``base_model.model.``, ``conditional_transformer.`` and kohya's ``lora_unet_``),
``unconditional_transformer``, or one fxquant does not compile (``text_encoder``, kohya's
``lora_te_``), which `apply_lora` reports instead of dropping.

Strength of a layer, ``factor`` in ``W + factor * B @ A``: its ``.alpha`` key if the file has one
(``alpha / rank``); else the adapter config, from the safetensors metadata diffusers writes
(``lora_adapter_metadata``, keys prefixed by the component when a pipeline saved it) or an
``adapter_config.json`` (``lora_alpha``, ``alpha_pattern``, ``rank_pattern``, ``use_rslora``:
``alpha / sqrt(rank)``); else 1, diffusers' default (alpha = rank).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

import torch

from ..errors import LoraError

TRANSFORMER, UNCONDITIONAL = "transformer", "unconditional_transformer"
# Key prefix -> component. Bare keys (none of these) belong to the transformer.
_PREFIXES = (("unconditional_transformer.", UNCONDITIONAL), ("conditional_transformer.", TRANSFORMER),
             ("transformer.", TRANSFORMER), ("base_model.model.", TRANSFORMER),
             ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"), ("unet.", "unet"))
_KOHYA = (("lora_unet_", TRANSFORMER), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
          ("lora_te_", "text_encoder"))
_DOWN, _UP = (".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight")
# Markers of layouts that are not plain low-rank pairs (DoRA, LoRA bias, LyCORIS, PEFT adapter names).
_UNSUPPORTED = ("lora_magnitude_vector", "dora_scale", "lora_B.bias", "lora_up.bias", "lora_mid", "hada_w", "lokr_w",
                "lora_embedding", ".lora_A.default", ".lora_B.default")
_WEIGHT_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

LoraSource = Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor], "LoraWeights"]


@dataclass(frozen=True)
class LoraLayer:
    """One adapted linear: ``W + factor * up @ down``."""

    key: str  # the file's key of the down (A) weight, named in errors
    module: str  # dotted module path, or kohya's underscored name (resolved against the model's linears)
    kohya: bool
    down: torch.Tensor  # A [rank, in]
    up: torch.Tensor  # B [out, rank]
    factor: float  # alpha / rank (alpha / sqrt(rank) with rsLoRA)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class LoraWeights:
    """A parsed LoRA file: its layers per component (see the module docstring)."""

    source: str
    layers: tuple[tuple[str, LoraLayer], ...]  # (component, layer)

    def components(self) -> set[str]:
        return {c for c, _ in self.layers}

    def for_component(self, component: str, linears: Iterable[str], where: str) -> dict[str, LoraLayer]:
        """The component's layers keyed by the module name they adapt, checked against ``linears``
        (the module names of the model's linears; kohya names resolved by underscores).

        Raises:
            LoraError: a key that matches no linear (naming the key and ``where``), a kohya name
                two linears share, two keys for one linear.
        """
        names = list(dict.fromkeys(linears))
        kohya: dict[str, list[str]] = {}
        for n in names:
            kohya.setdefault(n.replace(".", "_"), []).append(n)
        out: dict[str, LoraLayer] = {}
        for comp, layer in self.layers:
            if comp != component:
                continue
            target = layer.module
            if layer.kohya:
                found = kohya.get(layer.module, [])
                if len(found) > 1:
                    raise LoraError(f"{self.source}: key {layer.key!r}: kohya name {layer.module!r} fits linears {found} "
                                    f"of {where}; use the diffusers layout")
                target = found[0] if found else ""
            if target not in names:
                raise LoraError(f"{self.source}: key {layer.key!r} matches no linear of {where} (module {layer.module!r}; "
                                f"linears are e.g. {names[:3]})")
            if target in out:
                raise LoraError(f"{self.source}: keys {out[target].key!r} and {layer.key!r} both adapt {target!r}")
            out[target] = layer
        return out


def load_lora(source: LoraSource, config: Union[Mapping[str, Any], str, "os.PathLike[str]", None] = None,
              metadata: Optional[Mapping[str, str]] = None) -> LoraWeights:
    """Read a LoRA: a ``.safetensors`` file, a folder holding one (``pytorch_lora_weights`` or
    PEFT's ``adapter_model``, with its ``adapter_config.json``), or a state dict.

    Args:
        source: the file, folder, state dict, or an already loaded `LoraWeights` (returned as is).
        config: a PEFT adapter config (dict or path to ``adapter_config.json``); overrides the
            file's metadata.
        metadata: safetensors metadata for a state dict (``{"lora_adapter_metadata": json}``).

    Returns:
        `LoraWeights`.

    Raises:
        LoraError: a missing or unreadable file, an unsupported layout (DoRA, LoRA bias, LyCORIS,
            conv LoRA), a down without an up, a rank mismatch, an unknown key: each naming the key.

    Example:
        >>> lw = fxquant.load_lora("style.safetensors")  # doctest: +SKIP
    """
    if isinstance(source, LoraWeights):
        return source
    if isinstance(source, Mapping):
        state, meta, name = dict(source), dict(metadata or {}), "LoRA state dict"
    else:
        state, meta, name, folder_config = _read(os.fspath(source))
        config = config if config is not None else folder_config
    if isinstance(config, (str, os.PathLike)):
        config = _read_json(os.fspath(config))
    return parse(state, name, _configs(meta, config, name))


def _read(path: str) -> tuple[dict, dict, str, Optional[dict]]:
    from safetensors import safe_open

    config = None
    if os.path.isdir(path):
        cfg = os.path.join(path, "adapter_config.json")
        config = _read_json(cfg) if os.path.exists(cfg) else None
        files = [os.path.join(path, f) for f in _WEIGHT_FILES if os.path.exists(os.path.join(path, f))]
        if not files:
            raise LoraError(f"load_lora: folder {path} holds none of {list(_WEIGHT_FILES)}")
        path = files[0]
    if not os.path.isfile(path):
        raise LoraError(f"load_lora: no such file: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {}), path, config
    except Exception as e:  # noqa: BLE001 - safetensors' own errors, re-raised naming the file
        raise LoraError(f"load_lora: {path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LoraError(f"load_lora: cannot read adapter config {path}: {e}") from None
    if not isinstance(out, dict):
        raise LoraError(f"load_lora: adapter config {path} is not a JSON object")
    return out


def _configs(meta: Mapping[str, str], config: Optional[Mapping[str, Any]], name: str) -> dict[str, dict]:
    """Adapter config per component ("" for one that applies to all)."""
    if config is not None:
        return {"": dict(config)}
    raw = meta.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraError(f"{name}: metadata key {METADATA_KEY!r} is not JSON ({e})") from None
    out: dict[str, dict] = {}
    for k, v in flat.items():
        comp, _, field = k.rpartition(".") if k.rpartition(".")[0] in {c for _, c in _PREFIXES} else ("", "", k)
        out.setdefault(comp, {})[field] = v
    return out


def _component(key: str) -> tuple[str, str, bool]:
    """(component, key without its prefix, kohya?)"""
    for p, comp in _KOHYA:
        if key.startswith(p):
            return comp, key[len(p):], True
    for p, comp in _PREFIXES:
        if key.startswith(p):
            return comp, key[len(p):], False
    return TRANSFORMER, key, False


def parse(state: Mapping[str, Any], name: str, configs: Mapping[str, Mapping[str, Any]]) -> LoraWeights:
    """The layers of a LoRA state dict (see `load_lora`)."""
    pairs: dict[tuple[str, str, bool], dict[str, tuple[str, Any]]] = {}
    for key in sorted(state):
        if any(m in key for m in _UNSUPPORTED):
            raise LoraError(f"{name}: key {key!r} belongs to an unsupported layout (DoRA, LoRA bias, LyCORIS or an "
                            f"adapter-named PEFT key); only plain lora_A/lora_B (or lora_down/lora_up) pairs are read")
        comp, rest, kohya = _component(key)
        for part, suffixes in (("down", _DOWN), ("up", _UP), ("alpha", (".alpha",))):
            suffix = next((s for s in suffixes if rest.endswith(s)), None)
            if suffix is not None:
                pairs.setdefault((comp, rest[: -len(suffix)], kohya), {})[part] = (key, state[key])
                break
        else:
            raise LoraError(f"{name}: key {key!r} is not a LoRA weight (expected <module>.lora_A.weight / lora_B.weight, "
                            f"or kohya's lora_unet_<module>.lora_down.weight / lora_up.weight / alpha)")
    layers = [(comp, _layer(parts, comp, module, kohya, name, configs)) for (comp, module, kohya), parts in pairs.items()]
    return LoraWeights(name, tuple(layers))


def _layer(parts: dict, comp: str, module: str, kohya: bool, name: str, configs) -> LoraLayer:
    any_key = next(iter(parts.values()))[0]
    for part in ("down", "up"):
        if part not in parts:
            raise LoraError(f"{name}: key {any_key!r} has no matching {part} ({'lora_A' if part == 'down' else 'lora_B'}) weight")
    (dkey, down), (ukey, up) = parts["down"], parts["up"]
    for key, t in ((dkey, down), (ukey, up)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
            raise LoraError(f"{name}: key {key!r} must be a 2-d float tensor, got "
                            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__} "
                            f"(conv LoRA layouts are not supported)")
    if up.shape[1] != down.shape[0]:
        raise LoraError(f"{name}: key {ukey!r} has rank {up.shape[1]} but {dkey!r} has rank {down.shape[0]}")
    rank = int(down.shape[0])
    factor = _factor(parts.get("alpha"), rank, module, comp, configs, name, dkey)
    return LoraLayer(dkey, module, kohya, down.detach(), up.detach(), factor)


def _factor(alpha_entry, rank: int, module: str, comp: str, configs, name: str, dkey: str) -> float:
    if alpha_entry is not None:
        akey, alpha = alpha_entry
        if not isinstance(alpha, torch.Tensor) or alpha.numel() != 1:
            raise LoraError(f"{name}: key {akey!r} must be one number")
        return float(alpha) / rank
    cfg = configs.get(comp, configs.get(""))
    if not cfg:
        return 1.0  # diffusers' default: alpha = rank
    if cfg.get("use_dora"):
        raise LoraError(f"{name}: key {dkey!r}: the adapter config says use_dora, which is not supported")
    r = cfg.get("rank_pattern", {}).get(_pattern_key(cfg.get("rank_pattern", {}), module), cfg.get("r", rank))
    if int(r) != rank:
        raise LoraError(f"{name}: key {dkey!r} has rank {rank} but the adapter config says {r}")
    alpha = cfg.get("alpha_pattern", {}).get(_pattern_key(cfg.get("alpha_pattern", {}), module), cfg.get("lora_alpha", rank))
    return float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of the module path."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", module):
            return p
    return module
