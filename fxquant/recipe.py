"""Recipes: what to quantize, how, and what to leave alone.

A recipe is a frozen, validated dataclass. It decides one `Scheme` per linear (the selection
pass applies it; lowering passes only carry it out):

    skip rule -> skipped (float, untouched)     protect rule / fragility top-k -> protect_scheme
    scheme rule (first match) -> its scheme     otherwise -> default
    and a scheme whose block does not divide in_features -> the misaligned policy

It round-trips through JSON (`Recipe.to_json` / `Recipe.from_json`), presets are looked up by name,
and a JSON file of format 1 (``weights`` / ``activations`` keys) still reads::

    >>> r = Recipe.preset("q4_k_m")
    >>> Recipe.from_json(r.to_json()) == r
    True
    >>> Recipe.from_dict({"rules": [{"match": "layers.*.feed_forward.w2", "scheme": "q8_0"}], "default": "q4_k"}).default
    <Scheme.Q4_K: 'q4_k'>
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import RecipeError, is_fraction, is_int
from .rules import LayerRule, SchemeRule, _enum, _rules, _scheme_rules
from .schemes import Scheme, info


class FragilityScore(str, enum.Enum):
    KURTOSIS_X_MAXABS = "kurtosis_x_maxabs"  # the paper's: mean kurtosis * max |x|
    KURTOSIS = "kurtosis"
    MAXABS = "maxabs"


class ProtectBy(str, enum.Enum):
    """Which ranking top-k protection (and the float budget) uses."""

    FRAGILITY = "fragility"  # the paper's activation-statistics score (score_fragility)
    SENSITIVITY = "sensitivity"  # measured output error with one linear quantized (score_sensitivity)


class MisalignedPolicy(str, enum.Enum):
    """What becomes of a linear whose in_features is not a multiple of its scheme's block size
    (256 for Q4_K, 32 for Q8_0)."""

    KEEP_FLOAT = "keep_float"
    Q8_0 = "q8_0"  # Q8_0 if in_features is a multiple of 32, else float


# The schemes round_gptq rounds (every quantized weight).
GPTQ_SCHEMES = frozenset({Scheme.W8A8, Scheme.Q4_K, Scheme.Q8_0})


@dataclass(frozen=True)
class Recipe:
    """How to quantize a diffusion transformer.

    Args:
        name: a label, recorded in saved artifacts.
        default: the scheme of every linear no rule and no protection decides (`Scheme`).
        rules: `SchemeRule` s, first match wins: per-layer schemes (``q8_0`` for the FFN
            down-projections of a ``q4_k`` model, say).
        smoothquant: fold SmoothQuant vectors into preceding weights (needs calibration).
        alpha: SmoothQuant migration strength, in [0, 1].
        alpha_search: candidate alphas for a per-layer search on calibration data (empty: fixed alpha).
        protect_top_k: keep the k most fragile linears in float (needs calibration). For a model
            with fewer linears than the reference (279 in Ideogram 4), k is scaled by
            ``protect_reference_linears``; see `fxquant.passes.select_schemes`.
        protect_reference_linears: the linear count ``protect_top_k`` was chosen for (0: no scaling).
        fragility_score: how fragility is scored from activation statistics.
        protect: rules for linears kept at ``protect_scheme`` because they are fragile (``protected``).
        protect_scheme: what protected linears become: ``float`` (the paper) or a cheaper scheme
            such as ``q8_0`` (llama.cpp's Q4_K_M keeps its sensitive tensors at higher precision).
        skip: rules for linears left untouched by every pass (shown as ``skipped``).
        misaligned: what a linear becomes whose in_features is not a multiple of its scheme's block.
        protect_by: the ranking top-k and the budget use: ``fragility`` or ``sensitivity``.
        protect_budget: protect linears greedily by measured error removed per float byte, up to
            this fraction of all linear weight bytes (rule- and top-k-protected ones count); needs
            ``protect_by="sensitivity"``. 0: no budget.
        protect_budget_bytes: the same budget in bytes (0: none; with both, the smaller binds).
        sensitivity_samples: calibration inputs ``score_sensitivity`` runs on (spread over the trajectory).
        gptq: GPTQ rounding of every quantized weight (Hessian from the calibration inputs): the
            W8A8 linears' int8 codes on the RTN per-channel scale, and the Q4_K / Q8_0 linears'
            codes on the block scales (and mins) llama.cpp's reference encoder computes.
        gptq_damp: GPTQ's Hessian damping, a fraction of its mean diagonal.
        gptq_hessian_bytes: the most memory GPTQ's Hessians take at once (float32 ``in_features^2``
            per distinct input, and one extra copy while it is inverted); 0 (default): a twentieth of
            the model's float bytes, at least 64 MiB, which keeps compile within the memory targets
            of docs/memory.md. A weight whose own Hessian does not fit twice is rounded in column
            groups that do (``rounding.groups``; Ideogram 4's ``llm_cond_proj``, 53248 inputs,
            would need 11.3 GB). More memory, fewer forward passes and groups.
    """

    name: str = "custom"
    default: Scheme = Scheme.W8A8
    rules: tuple[SchemeRule, ...] = ()
    smoothquant: bool = False
    alpha: float = 0.5
    alpha_search: tuple[float, ...] = ()
    protect_top_k: int = 0
    protect_reference_linears: int = 0
    fragility_score: FragilityScore = FragilityScore.KURTOSIS_X_MAXABS
    protect: tuple[LayerRule, ...] = ()
    protect_scheme: Scheme = Scheme.FLOAT
    skip: tuple[LayerRule, ...] = ()
    misaligned: MisalignedPolicy = MisalignedPolicy.KEEP_FLOAT
    protect_by: ProtectBy = ProtectBy.FRAGILITY
    protect_budget: float = 0.0
    protect_budget_bytes: int = 0
    sensitivity_samples: int = 2
    gptq: bool = False
    gptq_damp: float = 0.01
    gptq_hessian_bytes: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "default", _enum(Scheme, self.default, "default"))
        set_(self, "protect_scheme", _enum(Scheme, self.protect_scheme, "protect_scheme"))
        set_(self, "rules", _scheme_rules(self.rules))
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
        if not is_fraction(self.alpha):
            raise RecipeError(f"recipe.alpha: expected a number in [0, 1], got {self.alpha!r}")
        set_(self, "alpha", float(self.alpha))
        if not isinstance(self.alpha_search, (list, tuple)) or not all(map(is_fraction, self.alpha_search)):
            raise RecipeError(f"recipe.alpha_search: expected a list of numbers in [0, 1], got {self.alpha_search!r}")
        set_(self, "alpha_search", tuple(float(a) for a in self.alpha_search))
        for key in ("protect_top_k", "protect_reference_linears"):
            v = getattr(self, key)
            if not is_int(v):
                raise RecipeError(f"recipe.{key}: expected an integer >= 0, got {v!r}")
        if self.smoothquant and not any(info(s).quantized_activations for s in self.schemes):
            raise RecipeError(f"recipe.smoothquant: SmoothQuant needs a scheme that quantizes activations (w8a8); "
                              f"this recipe only uses {sorted(s.value for s in self.schemes)} (weight-only)")
        self._check_sensitivity_and_gptq()

    def _check_sensitivity_and_gptq(self) -> None:
        for key in ("protect_budget", "gptq_damp"):
            v = getattr(self, key)
            if not is_fraction(v):
                raise RecipeError(f"recipe.{key}: expected a number in [0, 1], got {v!r}")
            object.__setattr__(self, key, float(v))
        if self.gptq and not self.gptq_damp > 0:
            raise RecipeError(f"recipe.gptq_damp: expected a number in (0, 1] with gptq, got {self.gptq_damp!r}")
        for key, low in (("protect_budget_bytes", 0), ("sensitivity_samples", 1), ("gptq_hessian_bytes", 0)):
            v = getattr(self, key)
            if not is_int(v, low):
                raise RecipeError(f"recipe.{key}: expected an integer >= {low}, got {v!r}")
        if self.has_budget and self.protect_by is not ProtectBy.SENSITIVITY:
            raise RecipeError("recipe.protect_budget: a float budget is spent by measured sensitivity; "
                              "set protect_by to 'sensitivity'")
        # score_sensitivity simulates W8A8 (int8 weights on the RTN scale).
        if self.protect_by is ProtectBy.SENSITIVITY and self.default is not Scheme.W8A8:
            raise RecipeError(f"recipe.protect_by: sensitivity is measured for W8A8, the default here is {self.default.value}")
        if self.gptq and not self.schemes & GPTQ_SCHEMES:
            raise RecipeError(f"recipe.gptq: GPTQ rounds {sorted(s.value for s in GPTQ_SCHEMES)} weights; this recipe "
                              f"only uses {sorted(s.value for s in self.schemes)}")

    @property
    def has_budget(self) -> bool:
        return self.protect_budget > 0 or self.protect_budget_bytes > 0

    @property
    def schemes(self) -> frozenset[Scheme]:
        """Every scheme this recipe can give a linear (before the misaligned policy)."""
        out = {self.default, *(r.scheme for r in self.rules)}
        if self.protect_top_k or self.protect or self.has_budget:
            out.add(self.protect_scheme)
        return frozenset(out)

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
            elif f.name in ("protect", "skip", "rules"):
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
        data = _upgrade_format1(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"recipe: unknown key(s) {unknown}; known keys are {sorted(known)}")
        kwargs = dict(data)
        for key in ("alpha_search", "protect", "skip", "rules"):
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


def _upgrade_format1(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """fxquant 0.1 recipes named one scheme for the whole model with ``weights`` + ``activations``."""
    if "weights" not in data and "activations" not in data:
        return data
    if "default" in data:
        raise RecipeError("recipe: give either 'default' or the old 'weights'/'activations' keys, not both")
    data = dict(data)
    weights, activations = data.pop("weights", "int8"), data.pop("activations", None)
    legacy = {("int8", "int8_per_token"): "w8a8", ("int8", None): "w8a8", ("q4_k", "none"): "q4_k",
              ("q4_k", None): "q4_k", ("q8_0", "none"): "q8_0", ("q8_0", None): "q8_0"}
    key = (weights, activations)
    if key not in legacy:
        raise RecipeError(f"recipe.weights/activations: {weights!r} with {activations!r} is not a scheme; "
                          f"schemes are {[s.value for s in Scheme]} (use 'default')")
    data["default"] = legacy[key]
    return data


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


# At the end: the presets are Recipes built from the classes above (re-exported as fxquant.recipe.PRESETS).
from .presets import PRESETS  # noqa: E402
