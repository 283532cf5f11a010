"""The typed modes every pass shares: how a linear is stored (`Scheme`), why (`SelectionKind`, `DecidedBy`)
and where its smoothing vector went (`SmoothingTarget`).

The selection pass decides one `Scheme` per linear; each lowering pass owns some schemes and lowers
only those (the registry is `fxquant.pipeline.LOWERINGS`). Adding a scheme is one value here (plus
a `SchemeInfo` row if its defaults do not fit), one lowering pass and one registry line; see
docs/architecture.md.

All enums are ``str``-valued, so a record read back from JSON compares equal to the plain string
(``Scheme.W8A8 == "w8a8"``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Scheme(str, enum.Enum):
    """How a linear's weight is stored and run."""

    W8A8 = "w8a8"  # int8 per-output-channel weights, dynamic per-token int8 activations (fxquant::linear_w8a8)
    Q4_K = "q4_k"  # GGUF k-quant, 4.5 bits/weight, weight-only (fxquant::linear_gguf)
    Q8_0 = "q8_0"  # GGUF, 8.5 bits/weight, weight-only (fxquant::linear_gguf)
    FLOAT = "float"  # left in the model's float dtype (aten.linear)


@dataclass(frozen=True)
class SchemeInfo:
    """What the passes before the lowering need to know of a scheme.

    block: ``in_features`` must be a multiple of it (GGUF block sizes); 1 for none.
    quantized_activations: the scheme quantizes the linear's input, so SmoothQuant applies to it.
    """

    block: int = 1
    quantized_activations: bool = False


INFO: dict[Scheme, SchemeInfo] = {
    Scheme.W8A8: SchemeInfo(quantized_activations=True),
    Scheme.Q4_K: SchemeInfo(block=256),
    Scheme.Q8_0: SchemeInfo(block=32),
}


def info(scheme: Scheme) -> SchemeInfo:
    return INFO.get(Scheme(scheme), SchemeInfo())


class SelectionKind(str, enum.Enum):
    """Why a linear has its scheme."""

    QUANTIZE = "quantize"  # the recipe's scheme for it (its default or a scheme rule)
    PROTECTED = "protected"  # kept at higher precision: a protect rule or the fragility top-k (recipe.protect_scheme)
    SKIPPED = "skipped"  # untouched by every pass (float, never smoothed)


class DecidedBy(str, enum.Enum):
    """Which part of the recipe decided a linear's selection."""

    DEFAULT = "default"  # recipe.default
    RULE = "rule"  # a skip / protect / scheme rule
    TOP_K = "top_k"  # the fragility (or sensitivity) ranking
    BUDGET = "budget"  # the float budget spent by measured sensitivity (score_sensitivity)
    MISALIGNED = "misaligned"  # the wanted scheme's block does not divide in_features (recipe.misaligned)


class SmoothingTarget(str, enum.Enum):
    """Where ``fold_smoothing`` put a linear's 1/s."""

    NORM = "norm"  # a norm's gain
    ADALN = "adaln"  # the rows of an adaLN modulation linear
    LINEAR = "linear"  # the rows of the producing linear (to_v -> to_out, w3 -> w2)
    FUSED = "fused"  # a private vector the W8A8 op applies while quantizing its input
    NONE = "none"  # not smoothed
