"""FastAttention: performer-pytorch 1.1.4's module, on the fused kernels."""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from .feature_maps import FeatureMap, from_options
from .functional import favor_attention
from .projection import Device
from .validation import BACKENDS, ShapeError, check_choice, check_generator, check_int, check_key_stabilizer


class FastAttention(nn.Module):
    """FAVOR+ attention with 1.1.4's constructor (same positional order and defaults), buffer
    ``projection_matrix`` (nb_features, dim_heads) and state_dict.

    Keyword-only additions: ``key_stabilizer`` ("global" = 1.1.4, "prefix" = leak-free causal),
    ``backend`` ("auto" | "triton" | "torch"), ``generator`` (draws the initial projection from a
    private torch.Generator instead of the global RNG).
    """

    def __init__(
        self,
        dim_heads: int,
        nb_features: int | None = None,
        ortho_scaling: int = 0,
        causal: bool = False,
        generalized_attention: bool = False,
        kernel_fn: Callable[[Tensor], Tensor] = nn.ReLU(),
        no_projection: bool = False,
        *,
        key_stabilizer: str = "global",
        backend: str = "auto",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        dim_heads = check_int("dim_heads", dim_heads, 1, ValueError)
        check_key_stabilizer(key_stabilizer, causal)
        check_choice("backend", backend, BACKENDS)
        check_generator(generator)
        if generalized_attention and not callable(kernel_fn):
            raise TypeError(f"kernel_fn must be callable, got {type(kernel_fn).__name__}")
        nb_features = nb_features if nb_features is not None else int(dim_heads * math.log(dim_heads))
        try:
            nb_features = check_int("nb_features", nb_features, 1, ValueError)
        except (TypeError, ValueError) as error:  # (TypeError for a float, as 1.1.4's randn raised)
            raise type(error)(
                f"nb_features must be a positive int (default int(dim_heads * ln(dim_heads)), 0 for dim_heads=1), "
                f"got {nb_features!r}"
            ) from None
        self.dim_heads = dim_heads
        self.nb_features = nb_features
        self.ortho_scaling = ortho_scaling
        # 1.1.4 binds its module's function (a program may have replaced it before building)
        self.create_projection = partial(
            _module_level("gaussian_orthogonal_random_matrix"), nb_rows=nb_features, nb_columns=dim_heads,
            scaling=ortho_scaling
        )
        self.register_buffer("projection_matrix", self.create_projection(**_given(generator=generator)))
        self.generalized_attention = generalized_attention
        self.kernel_fn = kernel_fn
        self.no_projection = no_projection
        self.causal = causal
        self.key_stabilizer = key_stabilizer
        self.backend = backend
        # 1.1.4's attribute: its causal attention on features; one put in its place is called
        self.causal_linear_fn = _module_level("causal_linear_attention_noncuda") if causal else None

    @property
    def feature_map(self) -> FeatureMap:
        """1.1.4's generalized_attention / kernel_fn / no_projection as one registry entry
        (performer_triton.feature_maps); attributes may be changed after construction, as in 1.1.4."""
        return from_options(self.generalized_attention, self.kernel_fn, self.no_projection)

    @torch.no_grad()
    def redraw_projection_matrix(self, device: Device = None, *, generator: torch.Generator | None = None) -> None:
        """Draw a fresh projection in place (from ``generator`` when given, else the global RNG)."""
        check_generator(generator)
        device = self.projection_matrix.device if device is None else device
        # 1.1.4's call without a generator: programs replace create_projection with 1.1.4's partial
        draw = {} if generator is None else {"generator": generator}
        self.projection_matrix.copy_(self.create_projection(device=device, **draw))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None) -> Tensor:
        """q (b, h, n, dim_heads), k (b, h, s, dim_heads), v (b, h, s, e) -> (b, h, n, e).

        key_padding_mask (b, s) bool, True = keep: padded keys are excluded from the numerator,
        the normaliser and the stabilizer (1.1.4 only zeroed v).  As 1.1.4's einsums, (b, h) of
        q, k and v broadcast (e.g. v (b, 1, s, e) for every head), causal attention promotes
        mixed dtypes, and a projection of one column (dim_heads=1) is the same for every column
        of wider heads."""
        projection = None if self.no_projection else self.projection_matrix
        if all(isinstance(t, Tensor) and t.dim() == 4 for t in (q, k, v)):
            q, k, v = _broadcast_heads(q, k, v)
            if self.causal and len({q.dtype, k.dtype, v.dtype}) > 1 and all(t.is_floating_point() for t in (q, k, v)):
                # 1.1.4's causal path promotes (rotary code hands it fp32 q, k and a 16-bit v);
                # its non-causal einsums raise, as favor_attention does (validation.DtypeError)
                dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
                q, k, v = (t.to(dtype) for t in (q, k, v))
            if projection is not None and projection.shape[1] == 1 and q.shape[-1] != 1:
                projection = projection.expand(-1, q.shape[-1]).contiguous()
            for name, t in (("q", q), ("k", k)):
                if projection is not None and t.shape[-1] != projection.shape[1]:
                    raise ShapeError(
                        f"{name} must have last dimension dim_heads={self.dim_heads}, got shape {tuple(t.shape)}"
                    )
        if self._replaced_functions():
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask: performer_pytorch's module-level feature or attention functions "
                                 "are replaced here, and 1.1.4's, which this call then runs, take no mask")
            return self._forward_as_1_1_4(q, k, v)
        replaced = getattr(self, "causal_linear_fn", None)
        if self.causal and replaced is not None and replaced is not _as_defined("causal_linear_attention_noncuda"):
            q_features, k_features = self.feature_map.features(q, k, projection, causal=True,
                                                               key_padding_mask=key_padding_mask)
            return replaced(q_features, k_features, v)
        return favor_attention(
            q,
            k,
            v,
            projection,
            causal=bool(self.causal),  # 1.1.4 takes any truthy value
            key_stabilizer=self.key_stabilizer,
            feature_map=self.feature_map,
            key_padding_mask=key_padding_mask,
            backend=self.backend,
        )

    def _replaced_functions(self) -> bool:
        """Whether a program replaced a module-level function of performer_pytorch that 1.1.4's
        forward calls in this configuration (its feature kernel; linear_attention, non-causal)."""
        names = [] if self.no_projection else ["generalized_kernel" if self.generalized_attention else "softmax_kernel"]
        names += [] if self.causal else ["linear_attention"]
        return any(_module_level(name) is not _as_defined(name) for name in names)

    def _forward_as_1_1_4(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """1.1.4's forward, step by step, through performer_pytorch's module-level functions as they
        are now (a program replaced some of them)."""
        if self.no_projection:
            q = q.softmax(dim=-1)
            k = torch.exp(k) if self.causal else k.softmax(dim=-2)
        elif self.generalized_attention:
            create_kernel = partial(_module_level("generalized_kernel"), kernel_fn=self.kernel_fn,
                                    projection_matrix=self.projection_matrix, device=q.device)
            q, k = map(create_kernel, (q, k))
        else:
            create_kernel = partial(_module_level("softmax_kernel"), projection_matrix=self.projection_matrix,
                                    device=q.device)
            q, k = create_kernel(q, is_query=True), create_kernel(k, is_query=False)
        attn_fn = _module_level("linear_attention") if not self.causal else self.causal_linear_fn
        return attn_fn(q, k, v)

    def extra_repr(self) -> str:
        return (
            f"dim_heads={self.dim_heads}, nb_features={self.nb_features}, causal={self.causal}, "
            f"feature_map={self.feature_map.name!r}, key_stabilizer={self.key_stabilizer!r}, backend={self.backend!r}"
        )


def _broadcast_heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v expanded (views) to their broadcast (batch, heads), as 1.1.4's einsums take them;
    shapes that do not broadcast are left for favor_attention's error."""
    try:
        lead = torch.broadcast_shapes(q.shape[:2], k.shape[:2], v.shape[:2])
    except RuntimeError:
        return q, k, v
    return tuple(t.expand(*lead, *t.shape[2:]) for t in (q, k, v))


def _module_level(name: str) -> Callable:
    """performer_pytorch's module-level function `name` as it is now (a program may replace it)."""
    from . import performer_pytorch  # (which imports this module)

    return getattr(performer_pytorch, name)


def _as_defined(name: str) -> Callable:
    """performer_pytorch's module-level function `name` as this library defines it."""
    from . import performer_pytorch

    return performer_pytorch.AS_DEFINED[name]


def _given(**kwargs) -> dict:
    """The keyword arguments that are not None (a replaced create_projection takes 1.1.4's only)."""
    return {key: value for key, value in kwargs.items() if value is not None}
