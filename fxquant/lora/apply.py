"""Runtime LoRA on a compiled module: low-rank float branches beside the lowered linears.

    before:  y = fxquant.linear_w8a8(x, w_int8, w_scale, bias, smooth)    (or linear_gguf, aten.linear)
             out = f(y)
    after:   y   = fxquant.linear_w8a8(x, w_int8, w_scale, bias, smooth)
             y_1 = fxquant.lora(y, x, get_attr[fxquant_lora.<name>.<module>.down],
                                get_attr[fxquant_lora.<name>.<module>.up], get_attr[fxquant_lora.<name>.scale], factor)
             out = f(y_1)

The int8 / GGUF weights are not touched. Adapters stack: a second one takes the first one's
output as its ``y``. Each adapter's strength is one float32 0-d buffer
(``fxquant_lora.<name>.scale``) that `set_lora_scale` replaces; the graph never changes for it.
`remove_lora` erases exactly the nodes and tensors `apply_lora` added.

SmoothQuant: the branch must see the unsmoothed input x. Per the linear's ``smoothing`` record:
``fused`` - the op (or the ``mul(x, smooth)`` in front of a float linear) smooths inside, so
the branch reads the op's input before smoothing; ``norm`` / ``adaln`` / ``linear`` - the graph
input already is x / s, so A's columns are rescaled (A' = A * s, with s from ``smoothing.vector``)
and ``A' (x / s) = A x``; ``none`` - as is.

The key prefix of each branch (the pipeline component it is): a single module is
``transformer``; a dict of CFG branches maps ``cond`` -> ``transformer`` and ``uncond`` ->
``unconditional_transformer`` unless ``prefixes=`` says otherwise; a pipeline uses its
attribute names. Every key of the file must land on a linear of some branch.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Union

import torch
import torch.fx as fx

from .. import graph, meta
from ..errors import LoraError
from ..schemes import SmoothingTarget
from .files import LoraLayer, LoraSource, load_lora
from .targets import DEFAULT_PREFIXES, Target, branches, graph_modules  # noqa: F401 - DEFAULT_PREFIXES re-exported

LORA = torch.ops.fxquant.lora.default
MUL = torch.ops.aten.mul.Tensor
ROOT = "fxquant_lora"  # submodule holding every adapter's tensors
CUSTOM_KEY = "fxquant_lora"  # node.meta["custom"] entry of a branch node: {"adapter", "module"}


def adapters(gm: fx.GraphModule) -> dict[str, float]:
    """Adapter name -> scale of the adapters applied to ``gm``, in order of application."""
    names = dict.fromkeys(_adapter(n) for n in gm.graph.nodes if n.op == "call_function" and n.target is LORA)
    return {a: float(graph.get_attr(gm, f"{ROOT}.{a}.scale")) for a in names}


def _adapter(node: fx.Node) -> str:
    scale = node.args[4]
    return str(scale.target)[len(ROOT) + 1: -len(".scale")]


def check_name(name: str, who: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise LoraError(f"{who}: adapter name {name!r} must be a Python identifier (letters, digits, '_')")


def check_scale(scale: Any, who: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not torch.isfinite(torch.tensor(float(scale))):
        raise LoraError(f"{who}: scale must be a finite number, got {scale!r}")
    return float(scale)


def apply_lora(module: Target, lora: LoraSource, scale: float = 1.0, name: str = "default", *,
               prefixes: Union[str, Mapping[str, str], None] = None, config: Any = None) -> Target:
    """Add a LoRA's low-rank branches to a compiled module, in place (see the module docstring).

    Args:
        module: a GraphModule from `fxquant.compile` / `fxquant.load`, a dict of CFG branches, or
            a pipeline whose ``transformer`` / ``unconditional_transformer`` are compiled.
        lora: a LoRA file, folder, state dict or `LoraWeights` (`fxquant.load_lora`).
        scale: the adapter's strength (changeable later with `set_lora_scale`).
        name: the adapter's name, a Python identifier, unique per module.
        prefixes: the key prefix (component) of a single module, or branch label -> prefix.
        config: a PEFT adapter config (dict or ``adapter_config.json``), as for `load_lora`.

    Returns:
        ``module`` itself, with the branches added to every branch the LoRA has keys for.

    Raises:
        LoraError: a LoRA with no layers; an adapter of that name is already applied; a key
            that matches no linear or no branch; a shape that does not fit the linear; a smoothed
            linear without its smoothing vector (an artifact from before it was recorded); and
            what `load_lora` raises. Nothing is changed when it raises.

    Example:
        >>> fxquant.apply_lora(gm, "style.safetensors", scale=0.8, name="style")  # doctest: +SKIP
    """
    who = "apply_lora"
    check_name(name, who)
    scale = check_scale(scale, who)
    weights = load_lora(lora, config)
    plans = []
    for label, gm, comp in branches(module, prefixes, who):
        if name in adapters(gm):
            raise LoraError(f"{who}: {label} already has an adapter named {name!r}; remove_lora it or pick another name")
        recs = meta.records(gm)
        layers = weights.for_component(comp, (r.name for _, r in recs), f"{label} (key prefix {comp!r})")
        if layers:
            _check_vectors(recs, label)
        plans.append((gm, _row_scales(recs), [(n, r, layers[r.name]) for n, r in recs if r.name in layers]))
    claimed = {comp for _, _, comp in branches(module, prefixes, who)}
    for comp, layer in weights.layers:
        if comp not in claimed:
            raise LoraError(f"{who}: {weights.source}: key {layer.key!r} is for component {comp!r}, which none of the "
                            f"branches is (their key prefixes: {sorted(claimed)})")
    if not any(plan for _, _, plan in plans):
        raise LoraError(f"{who}: {weights.source} has no LoRA layers; nothing to apply")
    staged = [(gm, [_branch_tensors(n, r, layer, rows.get(r.name, ()), _compute_dtype(gm)) for n, r, layer in plan])
              for gm, rows, plan in plans]
    for gm, items in staged:
        if items:
            _insert(gm, items, name, scale)
    return module


FOLDED = (SmoothingTarget.NORM, SmoothingTarget.ADALN, SmoothingTarget.LINEAR)


def _check_vectors(recs, label: str) -> None:
    for _, r in recs:
        if r.smoothing is not None and r.smoothing.target in FOLDED and r.smoothing.vector is None:
            raise LoraError(f"apply_lora: {label}: linear {r.name!r} reads x / s (smoothing folded into "
                            f"{r.smoothing.target_name!r}) but its record holds no smoothing vector, so no branch "
                            f"can be placed exactly; recompile the module with this fxquant version")


def _row_scales(recs) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """Linear module -> [(s, first row)]: output rows that a downstream group's fold divided by s."""
    out: dict[str, list[tuple[torch.Tensor, int]]] = {}
    seen = set()
    for _, r in recs:
        sm = r.smoothing
        for module, start in (sm.scaled_rows if sm is not None else ()):
            if (sm.group, module, start) not in seen:
                seen.add((sm.group, module, start))
                out.setdefault(module, []).append((sm.vector, start))
    return out


def _compute_dtype(gm: fx.GraphModule) -> Optional[torch.dtype]:
    """The module's compute dtype where it has one (a module from compile / load moved with
    ``.to(dtype)``); else None, and each branch takes its linear's traced output dtype."""
    try:
        dtype = getattr(gm, "dtype")
    except AttributeError:
        return None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _branch_tensors(node: fx.Node, rec: meta.LinearRecord, layer: LoraLayer, rows, dtype: Optional[torch.dtype]) -> tuple:
    """(node, record, branch input node, down, up, factor), rescaled where SmoothQuant folded:
    down's columns by the linear's own s (its input is x / s), up's rows by 1/s of a downstream
    group that folded into this linear's rows (its output is y / s there)."""
    if tuple(layer.down.shape) != (layer.rank, rec.in_features) or tuple(layer.up.shape) != (rec.out_features, layer.rank):
        raise LoraError(f"apply_lora: key {layer.key!r}: down {tuple(layer.down.shape)} / up {tuple(layer.up.shape)} do "
                        f"not fit linear {rec.name!r} ({rec.in_features} -> {rec.out_features})")
    x, down = node.args[0], layer.down.float()
    sm = rec.smoothing
    if sm is not None and sm.target is SmoothingTarget.FUSED:
        if isinstance(x, fx.Node) and x.target is MUL and isinstance(x.args[1], fx.Node) and x.args[1].op == "get_attr":
            x = x.args[0]  # a float linear still fed by mul(x, 1/s): read x before it
    elif sm is not None and sm.target in FOLDED:
        if sm.vector is None or tuple(sm.vector.shape) != (rec.in_features,):
            raise LoraError(f"apply_lora: linear {rec.name!r} reads x / s (smoothing folded into {sm.target_name!r}) "
                            f"but its record holds no smoothing vector; recompile it with this fxquant version")
        down = down * sm.vector.float()[None, :]
    up = layer.up.float()
    for s, start in rows:
        up = torch.cat([up[:start], up[start: start + len(s)] / s.float()[:, None], up[start + len(s):]])
    val = node.meta.get("val")
    if dtype is None:
        dtype = val.dtype if isinstance(val, torch.Tensor) else layer.up.dtype
    return node, rec, x, down.to(dtype), up.to(dtype), layer.factor


def _tip(node: fx.Node) -> fx.Node:
    """The last branch stacked on ``node`` (``node`` itself if none)."""
    while True:
        nxt = [u for u in node.users if u.target is LORA and u.args[0] is node]
        if not nxt:
            return node
        node = nxt[0]


def _insert(gm: fx.GraphModule, items, name: str, scale: float) -> None:
    g = gm.graph
    base = f"{ROOT}.{name}"
    graph.set_buffer(gm, f"{base}.scale", torch.tensor(scale, dtype=torch.float32))
    scale_node: Optional[fx.Node] = None
    for node, rec, x, down, up, factor in items:
        path = f"{base}.{rec.name}"
        suffix = f"_{rec.call}" if rec.call else ""
        graph.set_buffer(gm, f"{path}.down{suffix}", down.contiguous())
        graph.set_buffer(gm, f"{path}.up{suffix}", up.contiguous())
        tip = _tip(node)
        with g.inserting_after(tip):
            new = g.call_function(LORA, (tip, x, None, None, None, float(factor)))
        with g.inserting_before(new):
            if scale_node is None:
                scale_node = g.get_attr(f"{base}.scale")
            d, u = g.get_attr(f"{path}.down{suffix}"), g.get_attr(f"{path}.up{suffix}")
        new.args = (tip, x, d, u, scale_node, float(factor))
        tip.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        if "val" in tip.meta:
            new.meta["val"] = tip.meta["val"]
        if "nn_module_stack" in node.meta:
            new.meta["nn_module_stack"] = dict(node.meta["nn_module_stack"])
        new.meta["custom"] = {CUSTOM_KEY: {"adapter": name, "module": rec.key}}
    g.lint()
    gm.recompile()


def remove_lora(module: Target, name: str) -> Target:
    """Remove adapter ``name`` from every branch that has it; the module is then exactly as before
    `apply_lora` (same graph code, same tensors, bit-identical outputs).

    Raises:
        LoraError: no branch has an adapter of that name (the message lists the applied ones).

    Example:
        >>> fxquant.remove_lora(gm, "style")  # doctest: +SKIP
    """
    targets = graph_modules(module, "remove_lora")
    if not any(name in adapters(gm) for _, gm in targets):
        applied = sorted({a for _, gm in targets for a in adapters(gm)})
        raise LoraError(f"remove_lora: no adapter named {name!r} is applied (applied: {applied})")
    for _, gm in targets:
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is LORA and _adapter(n) == name]
        if not nodes:
            continue
        for n in nodes:
            n.replace_all_uses_with(n.args[0])
            attrs = [a for a in n.args[2:5] if isinstance(a, fx.Node)]
            gm.graph.erase_node(n)
            for a in attrs:
                if not a.users:
                    gm.graph.erase_node(a)
        root = gm.get_submodule(ROOT)
        delattr(root, name)
        if not dict(root.named_children()) and not dict(root.named_buffers()):
            delattr(gm, ROOT)
        gm.graph.lint()
        gm.recompile()
    return module


def set_lora_scale(module: Target, name: str, scale: float) -> Target:
    """Set adapter ``name``'s strength on every branch that has it (a buffer; no recompile).

    Raises:
        LoraError: no branch has that adapter, or the scale is not a finite number.
    """
    scale = check_scale(scale, "set_lora_scale")
    targets = [gm for _, gm in graph_modules(module, "set_lora_scale") if name in adapters(gm)]
    if not targets:
        raise LoraError(f"set_lora_scale: no adapter named {name!r} is applied")
    for gm in targets:
        graph.set_buffer(gm, f"{ROOT}.{name}.scale", torch.tensor(scale, dtype=torch.float32))
    return module
