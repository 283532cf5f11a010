"""One module or a dict of CFG branches: every public entry point takes either.

    as_branches(gm)                      -> ({"": gm}, False)
    as_branches({"cond": a, "uncond": b}) -> ({"cond": a, "uncond": b}, True)
"""

from __future__ import annotations

from typing import Any, Mapping, TypeVar

from .errors import FxquantError

T = TypeVar("T")


def as_branches(obj: "T | Mapping[str, T]", who: str, *, single: str = "",
                error: type[Exception] = FxquantError) -> tuple[dict[str, T], bool]:
    """``({branch name: module}, is_dict)``; a single module is the branch ``single`` (``""``).

    Args:
        obj: one module, or a mapping of branch name -> module.
        who: the entry point, named in errors.
        single: the key a single module is stored under (the saved format uses ``"module"``).
        error: the exception type raised (an `FxquantError` subclass, or the CLI's own error).

    Raises:
        error: an empty dict, or a branch name that is not a non-empty string (naming ``who``).
    """
    if not isinstance(obj, Mapping):
        return {single: obj}, False
    if not obj:
        raise error(f"{who}: the dict of branches is empty")
    bad = [k for k in obj if not isinstance(k, str) or not k]
    if bad:
        raise error(f"{who}: branch names must be non-empty strings, got {bad!r}")
    return dict(obj), True


def unless_dict(results: dict[str, Any], is_dict: bool) -> Any:
    """The per-branch results in the caller's shape: the dict, or the single module's result."""
    return results if is_dict else next(iter(results.values()))
