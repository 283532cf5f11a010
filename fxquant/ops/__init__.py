"""Custom ops (``fxquant::*``) that lowered graphs call, one file per op family.

Importing this package registers them; a lowered module reloaded with ``torch.export.load``
needs ``import fxquant`` first.
"""

from . import dequant, fold, gguf, lora, w8a8  # noqa: F401
from .dequant import dequantize_gguf, dequantize_int8
from .fold import scale_param
from .gguf import linear_gguf
from .lora import lora as lora_branch
from .w8a8 import linear_w8a8, quantize_act_per_token, quantize_weight_per_channel

__all__ = ["dequantize_gguf", "dequantize_int8", "scale_param", "linear_gguf", "lora_branch", "linear_w8a8", "quantize_act_per_token", "quantize_weight_per_channel"]
