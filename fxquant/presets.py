"""The built-in recipes, by name: `fxquant.recipe.resolve` and `Recipe.preset` look them up here.

    int8-w8a8, int8-w8a8-paper, int8-w8a8-q8, w8a8-naive   W8A8 and its protection variants
    q4_k, q4_k-gptq, q4_k_m, q8_0, q8_0-gptq               GGUF weight-only (q4_k_m and -gptq: GPTQ codes)

Re-exported as ``fxquant.recipe.PRESETS``; docs/recipes.md describes each.
"""

from __future__ import annotations

from .recipe import LayerRule, MisalignedPolicy, ProtectBy, Recipe
from .schemes import Scheme

# The paper's recipe: SmoothQuant (alpha 0.5) plus mixed-precision protection of the 17 most
# fragile of Ideogram 4's 279 linears, and the time-embedding output always.
_PAPER = Recipe(
    name="int8-w8a8-paper",
    smoothquant=True,
    alpha=0.5,
    protect_top_k=17,
    protect_reference_linears=279,
    protect=(LayerRule("t_embedding.mlp_out", required=False),),
)

PRESETS: dict[str, Recipe] = {
    # What bench/sensitivity_ablation.py measured best (docs/sensitivity.md): SmoothQuant (alpha 0.5),
    # the linears whose quantization measurably hurts the output most per float byte kept in float
    # within 5 % of the linear weight bytes, and GPTQ rounding of the int8 weights.
    "int8-w8a8": Recipe(name="int8-w8a8", smoothquant=True, alpha=0.5, protect_by=ProtectBy.SENSITIVITY,
                        protect_budget=0.05, gptq=True),
    "int8-w8a8-paper": _PAPER,
    # The paper's recipe with the protected linears stored Q8_0 (weight-only) instead of float.
    "int8-w8a8-q8": _PAPER.replace(name="int8-w8a8-q8", protect_scheme=Scheme.Q8_0),
    "w8a8-naive": Recipe(name="w8a8-naive"),
    # q4_k and q8_0 are llama.cpp's reference encoders, byte for byte (no calibration needed);
    # the -gptq presets keep their block scales and choose the codes by GPTQ on the calibration
    # inputs (bench/gptq_gguf.py: 0.10-0.64x the reference codes' error in all 9 planted runs;
    # docs/gguf.md).
    "q4_k": Recipe(name="q4_k", default=Scheme.Q4_K),
    "q4_k-gptq": Recipe(name="q4_k-gptq", default=Scheme.Q4_K, gptq=True),
    # llama.cpp's Q4_K_M idea: Q4_K, with the most fragile linears (same ranking and k as the
    # paper's) in Q8_0; linears too narrow for Q4_K's 256-blocks go Q8_0 rather than float; GPTQ
    # codes (it calibrates anyway).
    "q4_k_m": Recipe(name="q4_k_m", default=Scheme.Q4_K, protect_top_k=17, protect_reference_linears=279,
                     protect_scheme=Scheme.Q8_0, misaligned=MisalignedPolicy.Q8_0, gptq=True),
    "q8_0": Recipe(name="q8_0", default=Scheme.Q8_0),
    "q8_0-gptq": Recipe(name="q8_0-gptq", default=Scheme.Q8_0, gptq=True),
}
