"""LoRA on compiled modules without re-quantizing: read LoRA files (`files`), add and remove
low-rank branches at runtime (`apply`), or merge into the float weights before quantizing
(`merge`). See docs/lora.md."""

from .apply import adapters as lora_adapters
from .apply import apply_lora, remove_lora, set_lora_scale
from .files import LoraLayer, LoraWeights, load_lora
from .merge import merge_lora

__all__ = ["apply_lora", "remove_lora", "set_lora_scale", "lora_adapters", "load_lora", "merge_lora",
           "LoraWeights", "LoraLayer"]
