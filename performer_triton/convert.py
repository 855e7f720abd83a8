"""Move an existing performer-pytorch 1.1.4 model onto performer_triton's attention in place."""
from __future__ import annotations

import torch
from torch import nn

from .fast_attention import FastAttention
from .performer_pytorch import ProjectionUpdater
from .validation import BACKENDS, check_choice

__all__ = ["replace_fast_attention"]


def _convert_fast_attention(old: nn.Module, backend: str) -> FastAttention:
    new = FastAttention(
        old.dim_heads,
        old.nb_features,
        old.ortho_scaling,
        old.causal,
        old.generalized_attention,
        old.kernel_fn,
        old.no_projection,
        backend=backend,
        generator=torch.Generator(),  # a throwaway draw: leaves the global RNG where it was
    )
    new.projection_matrix = old.projection_matrix  # the same buffer: dtype, device and values kept
    return new.train(old.training)


def _convert_projection_updater(old: nn.Module) -> ProjectionUpdater:
    new = ProjectionUpdater(old.instance, old.feature_redraw_interval)
    new.calls_since_last_redraw = old.calls_since_last_redraw
    return new.train(old.training)


def replace_fast_attention(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Swap every performer_pytorch FastAttention in ``model`` for performer_triton's, in place,
    and return the model (a bare FastAttention is returned converted).

    Projection matrices are kept (the same tensors), so outputs are unchanged up to rounding
    (1.1.4's numerics: global key stabilizer, v-zeroing masks). Every performer_pytorch
    ProjectionUpdater becomes performer_triton's (same interval and call counter), so redraws go on
    at the same schedule, from the global RNG as before; state_dict keys do not change.
    ``backend``: "auto" | "triton" | "torch" for the new modules.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice("backend", backend, BACKENDS)  # up front: also when there is nothing to convert
    try:
        import performer_pytorch.performer_pytorch as original
    except ImportError:  # not installed: the model cannot hold its modules
        return model
    converters = {original.FastAttention: lambda m: _convert_fast_attention(m, backend)}
    converters[original.ProjectionUpdater] = _convert_projection_updater
    if type(model) in converters:  # nothing to replace it in: return the converted module
        return converters[type(model)](model)
    replaced: dict[nn.Module, nn.Module] = {}  # a module reachable by several paths is converted once
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            convert = converters.get(type(child))
            if convert is None:
                continue
            if child not in replaced:
                replaced[child] = convert(child)
            setattr(parent, name, replaced[child])
    return model
