"""One module or a dict of CFG branches: every public entry point takes either.

    as_branches(gm)                      -> ({"": gm}, False)
    as_branches({"cond": a, "uncond": b}) -> ({"cond": a, "uncond": b}, True)
"""

from __future__ import annotations

from typing import Any, Mapping, TypeVar

from .errors import FxquantError

T = TypeVar("T")


def as_branches(obj: "T | Mapping[str, T]", who: str) -> tuple[dict[str, T], bool]:
    """``({branch name: module}, is_dict)``; a single module is the branch ``""``.

    Raises:
        FxquantError: an empty dict, or a branch name that is not a non-empty string (naming ``who``).
    """
    if not isinstance(obj, Mapping):
        return {"": obj}, False
    if not obj:
        raise FxquantError(f"{who}: the dict of branches is empty")
    bad = [k for k in obj if not isinstance(k, str) or not k]
    if bad:
        raise FxquantError(f"{who}: branch names must be non-empty strings, got {bad!r}")
    return dict(obj), True


def unless_dict(results: dict[str, Any], is_dict: bool) -> Any:
    """The per-branch results in the caller's shape: the dict, or the single module's result."""
    return results if is_dict else results[""]
