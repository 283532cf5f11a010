"""Layer selection rules: typed globs over qualified module names, parsed from JSON and validated.

    "layers.*.attn.*"                                        -> LayerRule("layers.*.attn.*")
    {"pattern": "t_embedding.*", "required": false}          -> LayerRule("t_embedding.*", required=False)
    {"match": "layers.*.feed_forward.w2", "scheme": "q8_0"}  -> SchemeRule("layers.*.feed_forward.w2", Scheme.Q8_0)

A required rule that matches no linear is an error (`fxquant.passes.select_schemes` checks it).
Re-exported by `fxquant.recipe`, whose `Recipe` holds them.
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .errors import RecipeError
from .schemes import Scheme


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


@dataclass(frozen=True)
class SchemeRule:
    """Linears whose qualified name matches the glob ``match`` get ``scheme``; the first matching
    rule wins. A rule with ``required=True`` that matches no linear is an error.

    JSON: ``{"match": "layers.*.feed_forward.w2", "scheme": "q8_0"}`` (``"required": false`` optional).
    """

    match: str
    scheme: Scheme
    required: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.match, str) or not self.match:
            raise RecipeError(f"recipe.rules: 'match' must be a non-empty glob string, got {self.match!r}")
        object.__setattr__(self, "scheme", _enum(Scheme, self.scheme, "rules[].scheme"))
        if not isinstance(self.required, bool):
            raise RecipeError(f"recipe.rules: 'required' must be true or false, got {self.required!r}")

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.match)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"match": self.match, "scheme": self.scheme.value}
        if not self.required:
            out["required"] = False
        return out

    @staticmethod
    def parse(value: Any, where: str) -> "SchemeRule":
        if isinstance(value, SchemeRule):
            return value
        if not isinstance(value, Mapping) or not {"match", "scheme"} <= set(value) <= {"match", "scheme", "required"}:
            raise RecipeError(f"recipe.{where}: expected {{'match': glob, 'scheme': scheme, 'required'?: bool}}, "
                              f"got {value!r}")
        return SchemeRule(value["match"], value["scheme"], value.get("required", True))


def _rules(values: Iterable[Any], key: str) -> tuple[LayerRule, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise RecipeError(f"recipe.{key}: expected a list of patterns, got {values!r}")
    return tuple(LayerRule.parse(v, key) for v in values)


def _scheme_rules(values: Any) -> tuple[SchemeRule, ...]:
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, (list, tuple)):
        raise RecipeError(f"recipe.rules: expected a list of {{'match', 'scheme'}} objects, got {values!r}")
    return tuple(SchemeRule.parse(v, f"rules[{i}]") for i, v in enumerate(values))


def _enum(cls: type[enum.Enum], value: Any, key: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)
        raise RecipeError(f"recipe.{key}: {value!r} is not one of {allowed}") from None
