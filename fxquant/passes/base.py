"""The pass protocol: ``pass_(gm) -> PassResult(gm, modified)``, with ``requires``/``ensures`` hooks.

This is torch.fx's own `PassBase`; fxquant passes add a ``name`` used in error messages and
never call each other: they read and write the graph and ``node.meta["fxquant"]``.
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import meta
from ..errors import PassError

__all__ = ["FxquantPass", "PassResult", "require_records"]


class FxquantPass(PassBase):
    name: str = "pass"


def require_records(gm: fx.GraphModule, pass_name: str, field: str | None = None, before: str = "") -> None:
    """Raise unless every linear has a record (and, if given, ``field`` set by an earlier pass)."""
    recs = meta.records(gm)
    if not recs:
        raise PassError(f"{pass_name}: the graph has no fxquant records; run find_linears first")
    if field is not None:
        missing = [r.name for _, r in recs if getattr(r, field) is None]
        if missing:
            raise PassError(
                f"{pass_name}: {len(missing)} linear(s) lack '{field}' (first: {missing[0]}); run {before or 'the pass that writes it'} first"
            )
