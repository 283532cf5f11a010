"""Recipes: what to quantize, how, and what to leave alone.

A recipe is a frozen, validated dataclass. It round-trips through JSON
(`Recipe.to_json` / `Recipe.from_json`), and presets are looked up by name::

    >>> r = Recipe.preset("w8a8-naive")
    >>> Recipe.from_json(r.to_json()) == r
    True
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .errors import RecipeError


class WeightScheme(str, enum.Enum):
    INT8 = "int8"  # per-output-channel symmetric int8
    Q4_K = "q4_k"  # GGUF k-quant, 4.5 bits/weight
    Q8_0 = "q8_0"  # GGUF, 8.5 bits/weight


class ActivationScheme(str, enum.Enum):
    INT8_PER_TOKEN = "int8_per_token"  # dynamic symmetric int8, one scale per token
    NONE = "none"  # weight-only: activations stay in the model's float dtype


class FragilityScore(str, enum.Enum):
    KURTOSIS_X_MAXABS = "kurtosis_x_maxabs"  # the paper's: mean kurtosis * max |x|
    KURTOSIS = "kurtosis"
    MAXABS = "maxabs"


class ProtectBy(str, enum.Enum):
    """Which ranking top-k protection (and the float budget) uses."""

    FRAGILITY = "fragility"  # the paper's activation-statistics score (score_fragility)
    SENSITIVITY = "sensitivity"  # measured output error with one linear quantized (score_sensitivity)


class MisalignedPolicy(str, enum.Enum):
    """What a GGUF recipe does with a linear whose in_features is not a multiple of the block size."""

    KEEP_FLOAT = "keep_float"
    Q8_0 = "q8_0"


@dataclass(frozen=True)
class LayerRule:
    """A glob (fnmatch) over qualified module names, e.g. ``layers.*.feed_forward.w2``.

    A rule with ``required=True`` that matches no linear in the model is an error,
    so that a typo never silently protects nothing.
    """

    pattern: str
    required: bool = True

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def to_json(self) -> Any:
        return self.pattern if self.required else {"pattern": self.pattern, "required": False}

    @staticmethod
    def parse(value: Any, key: str) -> "LayerRule":
        if isinstance(value, LayerRule):
            return value
        if isinstance(value, str) and value:
            return LayerRule(value)
        if (isinstance(value, Mapping) and set(value) <= {"pattern", "required"} and isinstance(value.get("pattern"), str)
                and value["pattern"] and isinstance(value.get("required", True), bool)):
            return LayerRule(value["pattern"], value.get("required", True))
        raise RecipeError(f"recipe.{key}: expected a glob string or {{'pattern': str, 'required': bool}}, got {value!r}")


def _rules(values: Iterable[Any], key: str) -> tuple[LayerRule, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise RecipeError(f"recipe.{key}: expected a list of patterns, got {values!r}")
    return tuple(LayerRule.parse(v, key) for v in values)


def _enum(cls: type[enum.Enum], value: Any, key: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)
        raise RecipeError(f"recipe.{key}: {value!r} is not one of {allowed}") from None


@dataclass(frozen=True)
class Recipe:
    """How to quantize a diffusion transformer.

    Args:
        name: a label, recorded in saved artifacts.
        weights: the weight scheme (``int8``, ``q4_k``, ``q8_0``).
        activations: ``int8_per_token`` (W8A8) or ``none`` (weight-only, required for GGUF).
        smoothquant: fold SmoothQuant vectors into preceding weights (needs calibration).
        alpha: SmoothQuant migration strength, in [0, 1].
        alpha_search: candidate alphas for a per-layer search on calibration data (empty: fixed alpha).
        protect_top_k: keep the k most fragile linears in float (needs calibration). For a model
            with fewer linears than the reference (279 in Ideogram 4), k is scaled by
            ``protect_reference_linears``; see `fxquant.passes.select_protected`.
        protect_reference_linears: the linear count ``protect_top_k`` was chosen for (0: no scaling).
        fragility_score: how fragility is scored from activation statistics.
        protect: rules for linears kept in float because they are fragile (shown as ``protected``).
        skip: rules for linears left untouched by every pass (shown as ``skipped``).
        misaligned: GGUF policy for a linear whose in_features is not a multiple of the block size.
        protect_by: the ranking top-k and the budget use: ``fragility`` or ``sensitivity``.
        protect_budget: keep linears in float, greedily by measured error removed per float byte,
            up to this fraction of all linear weight bytes (rule-protected ones count); needs
            ``protect_by="sensitivity"``. 0: no budget.
        protect_budget_bytes: the same budget in bytes (0: none; with both, the smaller binds).
        sensitivity_samples: calibration inputs ``score_sensitivity`` runs on (spread over the trajectory).
        gptq: GPTQ rounding of the int8 weights (Hessian from the calibration inputs).
        gptq_damp: GPTQ's Hessian damping, a fraction of its mean diagonal.
    """

    name: str = "custom"
    weights: WeightScheme = WeightScheme.INT8
    activations: ActivationScheme = ActivationScheme.INT8_PER_TOKEN
    smoothquant: bool = False
    alpha: float = 0.5
    alpha_search: tuple[float, ...] = ()
    protect_top_k: int = 0
    protect_reference_linears: int = 0
    fragility_score: FragilityScore = FragilityScore.KURTOSIS_X_MAXABS
    protect: tuple[LayerRule, ...] = ()
    skip: tuple[LayerRule, ...] = ()
    misaligned: MisalignedPolicy = MisalignedPolicy.KEEP_FLOAT
    protect_by: ProtectBy = ProtectBy.FRAGILITY
    protect_budget: float = 0.0
    protect_budget_bytes: int = 0
    sensitivity_samples: int = 2
    gptq: bool = False
    gptq_damp: float = 0.01

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "weights", _enum(WeightScheme, self.weights, "weights"))
        set_(self, "activations", _enum(ActivationScheme, self.activations, "activations"))
        set_(self, "fragility_score", _enum(FragilityScore, self.fragility_score, "fragility_score"))
        set_(self, "misaligned", _enum(MisalignedPolicy, self.misaligned, "misaligned"))
        set_(self, "protect_by", _enum(ProtectBy, self.protect_by, "protect_by"))
        set_(self, "protect", _rules(self.protect, "protect"))
        set_(self, "skip", _rules(self.skip, "skip"))
        if not isinstance(self.name, str) or not self.name:
            raise RecipeError(f"recipe.name: expected a non-empty string, got {self.name!r}")
        for key in ("smoothquant", "gptq"):
            if not isinstance(getattr(self, key), bool):
                raise RecipeError(f"recipe.{key}: expected true or false, got {getattr(self, key)!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise RecipeError(f"recipe.alpha: expected a number in [0, 1], got {self.alpha!r}")
        set_(self, "alpha", float(self.alpha))
        if not isinstance(self.alpha_search, (list, tuple)) or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and 0.0 <= a <= 1.0 for a in self.alpha_search
        ):
            raise RecipeError(f"recipe.alpha_search: expected a list of numbers in [0, 1], got {self.alpha_search!r}")
        set_(self, "alpha_search", tuple(float(a) for a in self.alpha_search))
        self._check_sensitivity_and_gptq()
        for key in ("protect_top_k", "protect_reference_linears"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise RecipeError(f"recipe.{key}: expected an integer >= 0, got {v!r}")
        gguf = self.weights in (WeightScheme.Q4_K, WeightScheme.Q8_0)
        if gguf and self.activations is not ActivationScheme.NONE:
            raise RecipeError(f"recipe.activations: GGUF weights ({self.weights.value}) are weight-only; set activations to 'none'")
        if not gguf and self.activations is ActivationScheme.NONE:
            raise RecipeError("recipe.activations: 'none' (weight-only) is supported for q4_k and q8_0 weights, not int8")
        if gguf and self.smoothquant:
            raise RecipeError("recipe.smoothquant: SmoothQuant needs quantized activations; GGUF recipes are weight-only")

    def _check_sensitivity_and_gptq(self) -> None:
        for key in ("protect_budget", "gptq_damp"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise RecipeError(f"recipe.{key}: expected a number in [0, 1], got {v!r}")
            object.__setattr__(self, key, float(v))
        if self.gptq and not self.gptq_damp > 0:
            raise RecipeError(f"recipe.gptq_damp: expected a number in (0, 1] with gptq, got {self.gptq_damp!r}")
        for key, low in (("protect_budget_bytes", 0), ("sensitivity_samples", 1)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise RecipeError(f"recipe.{key}: expected an integer >= {low}, got {v!r}")
        if self.has_budget and self.protect_by is not ProtectBy.SENSITIVITY:
            raise RecipeError("recipe.protect_budget: a float budget is spent by measured sensitivity; "
                              "set protect_by to 'sensitivity'")
        if self.protect_by is ProtectBy.SENSITIVITY and self.weights is not WeightScheme.INT8:
            raise RecipeError(f"recipe.protect_by: sensitivity is measured for int8 (W8A8) weights, not {self.weights.value}")
        if self.gptq and self.weights is not WeightScheme.INT8:
            raise RecipeError(f"recipe.gptq: GPTQ rounding is implemented for int8 weights, not {self.weights.value}")

    @property
    def has_budget(self) -> bool:
        return self.protect_budget > 0 or self.protect_budget_bytes > 0

    @property
    def needs_calibration(self) -> bool:
        return self.smoothquant or self.protect_top_k > 0 or self.has_budget or self.gptq

    # ---- JSON ----
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, enum.Enum):
                v = v.value
            elif f.name in ("protect", "skip"):
                v = [r.to_json() for r in v]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        if not isinstance(data, Mapping):
            raise RecipeError(f"recipe: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"recipe: unknown key(s) {unknown}; known keys are {sorted(known)}")
        kwargs = dict(data)
        for key in ("alpha_search", "protect", "skip"):
            if key in kwargs and not isinstance(kwargs[key], (list, tuple)):
                raise RecipeError(f"recipe.{key}: expected a list, got {kwargs[key]!r}")
            if key in kwargs and key == "alpha_search":
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"recipe: invalid JSON ({e})") from None
        return cls.from_dict(data)

    @classmethod
    def preset(cls, name: str) -> "Recipe":
        if not isinstance(name, str) or name not in PRESETS:
            raise RecipeError(f"unknown recipe preset {name!r}; presets are {sorted(PRESETS)}")
        return PRESETS[name]

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)


# int8-w8a8-paper, the paper's recipe: SmoothQuant (alpha 0.5) plus mixed-precision protection of
# the 17 most fragile of Ideogram 4's 279 linears, and the time-embedding output always.
# int8-w8a8, what bench/sensitivity_ablation.py measured best (docs/sensitivity.md): SmoothQuant
# (alpha 0.5), the linears whose quantization measurably hurts the output most per float byte kept
# in float within 5 % of the linear weight bytes, and GPTQ rounding of the int8 weights.
PRESETS: dict[str, Recipe] = {
    "int8-w8a8": Recipe(
        name="int8-w8a8",
        smoothquant=True,
        alpha=0.5,
        protect_by=ProtectBy.SENSITIVITY,
        protect_budget=0.05,
        gptq=True,
    ),
    "int8-w8a8-paper": Recipe(
        name="int8-w8a8-paper",
        smoothquant=True,
        alpha=0.5,
        protect_top_k=17,
        protect_reference_linears=279,
        protect=(LayerRule("t_embedding.mlp_out", required=False),),
    ),
    "w8a8-naive": Recipe(name="w8a8-naive"),
    "q4_k": Recipe(name="q4_k", weights=WeightScheme.Q4_K, activations=ActivationScheme.NONE),
    "q8_0": Recipe(name="q8_0", weights=WeightScheme.Q8_0, activations=ActivationScheme.NONE),
}


def resolve(recipe: "Recipe | str | os.PathLike[str]") -> Recipe:
    """A `Recipe`, a preset name, or a path to a recipe JSON file -> a `Recipe`."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str) and recipe in PRESETS:
        return PRESETS[recipe]
    if isinstance(recipe, (str, os.PathLike)) and os.path.isfile(recipe):
        try:
            with open(recipe, encoding="utf-8") as f:
                return Recipe.from_json(f.read())
        except RecipeError as e:
            raise RecipeError(f"{os.fspath(recipe)}: {e}") from None
        except (UnicodeDecodeError, OSError) as e:
            raise RecipeError(f"{os.fspath(recipe)}: cannot read the recipe file ({e})") from None
    if isinstance(recipe, str):
        raise RecipeError(f"recipe {recipe!r} is neither a preset ({sorted(PRESETS)}) nor an existing JSON file")
    raise RecipeError(f"recipe: expected a Recipe, a preset name or a JSON path, got {type(recipe).__name__}")
