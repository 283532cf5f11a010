"""fxquant: a torch.fx post-training quantization compiler for diffusion transformers."""

from . import ops as _ops  # noqa: F401  (registers the fxquant:: custom ops)
from .api import Summary, SummaryRow, compile, summary
from .calibrate import record_inputs
from .observe import Observed, observe
from .ladder import Ladder, LadderPoint, protection_ladder
from .errors import (CalibrationError, FormatError, FxquantError, LoraError, MissingDependencyError, PassError, RecipeError,
                     TraceError)
from .artifacts.export import export_program
from .artifacts.pt2 import load_pt2, save_pt2
from .artifacts.io import load, save
from .artifacts.gguf import GGUFReport, save_gguf
from .report import report
from .module import QuantizedModule
from .integrations.pipeline import load_pipeline, quantize_pipeline, save_pipeline
from .lora import (LoraWeights, apply_lora, load_lora, lora_adapters, merge_lora, remove_lora,
                   set_lora_scale)
from .recipe import LayerRule, MisalignedPolicy, Recipe, SchemeRule
from .schemes import DecidedBy, Scheme, SelectionKind, SmoothingTarget

__version__ = "0.1.0"

__all__ = [
    "compile", "summary", "Summary", "SummaryRow", "Recipe", "LayerRule", "SchemeRule", "Scheme", "SelectionKind",
    "DecidedBy", "SmoothingTarget", "MisalignedPolicy", "FxquantError", "RecipeError", "TraceError", "CalibrationError", "PassError",
    "FormatError", "MissingDependencyError", "__version__", "save_gguf", "GGUFReport", "save", "load", "save_pt2", "load_pt2", "export_program",
    "record_inputs", "observe", "Observed", "protection_ladder", "Ladder", "LadderPoint", "report",
    "LoraError", "LoraWeights", "apply_lora", "remove_lora", "set_lora_scale", "lora_adapters", "load_lora",
    "merge_lora", "QuantizedModule", "quantize_pipeline", "save_pipeline", "load_pipeline",
]
