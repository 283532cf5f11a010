"""Who owns the tensors of a compiled module: never the source model.

After ``trace`` the GraphModule reads the source model's own tensors (no copy). ``compile`` ends
in one of two ways:

    own_tensors(gm, model)       (default)  every tensor still shared with ``model`` (what stays
                                            float: biases, norm gains, protected linears, buffers)
                                            is cloned, one at a time; the clones count toward the
                                            compiled module's bytes. In-place changes to the
                                            source (an optimizer step, ``fuse_lora``) no longer
                                            reach the compiled module.
    take_ownership(model, gm)    (consume)  right after tracing, every parameter and buffer of
                                            ``model`` is replaced by a meta tensor of the same
                                            shape and dtype: the GraphModule holds the only
                                            reference, so each float weight is freed as soon as
                                            its lowering replaces it. ``model`` is left as an
                                            empty shell (calling it raises).
"""

from __future__ import annotations

import torch


def _tensors(module: torch.nn.Module):
    """(owner module, leaf name, tensor, is_parameter) of every parameter and buffer, once per slot."""
    for mod in module.modules():
        for leaf, p in list(mod._parameters.items()):
            if p is not None:
                yield mod, leaf, p, True
        for leaf, b in list(mod._buffers.items()):
            if b is not None:
                yield mod, leaf, b, False


def _storage(t: torch.Tensor) -> int | None:
    if t.device.type == "meta":
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None


def own_tensors(gm: torch.nn.Module, model: torch.nn.Module) -> int:
    """Clone every tensor of ``gm`` that shares storage with ``model``; returns the bytes cloned.

    Tied tensors stay tied (one clone per shared tensor)."""
    shared = {_storage(t) for _, _, t, _ in _tensors(model)} - {None}
    clones: dict[tuple, torch.Tensor] = {}
    nbytes = 0
    for mod, leaf, t, is_param in _tensors(gm):
        if _storage(t) not in shared:
            continue
        key = (_storage(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in clones:
            clones[key] = t.detach().clone()
            nbytes += t.numel() * t.element_size()
        c = clones[key]
        if is_param:
            mod._parameters[leaf] = torch.nn.Parameter(c, requires_grad=False)
        else:
            mod._buffers[leaf] = c
    return nbytes


def take_ownership(model: torch.nn.Module) -> None:
    """Replace every parameter and buffer of ``model`` by a meta tensor of the same shape and dtype
    (see the module docstring); whoever else holds the tensors (the traced module) keeps them."""
    for mod, leaf, t, is_param in _tensors(model):
        empty = torch.empty_like(t, device="meta")
        if is_param:
            mod._parameters[leaf] = torch.nn.Parameter(empty, requires_grad=t.requires_grad)
        else:
            mod._buffers[leaf] = empty
