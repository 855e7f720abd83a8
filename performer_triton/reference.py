"""Plain-PyTorch reference numerics of FAVOR+ attention (any float dtype, float64 included).

This is the oracle every other path is tested against; no production module imports it (a
test scans the imports). Feature maps come from the registry (performer_triton.feature_maps),
whose 1.1.4-form functions it checks against performer-pytorch 1.1.4 itself (tests/test_reference.py);
the attention itself is computed here independently, causal attention in quadratic form. It follows performer-pytorch 1.1.4
operation by operation (same constants, same stabilizers, same order of floating-point work),
plus the leak-free ``key_stabilizer="prefix"`` causal mode. It favours obviousness over speed:
causal attention is computed in quadratic form.

Shapes: q (b, h, n, d), k (b, h, s, d), v (b, h, s, e), projection_matrix (m, d).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .feature_maps import CAUSAL_EPS, SOFTMAX_EPS, half_sq_norm, project, resolve, softmax_features


def linear_attention(q_features: Tensor, k_features: Tensor, v: Tensor, *, causal: bool = False) -> Tensor:
    """Linear attention on precomputed features.  (b,h,n,m), (b,h,s,m), (b,h,s,e) -> (b,h,n,e).

    Non-causal: (q' @ (k'^T v)) / (q' . sum_s k'), no eps (as 1.1.4).
    Causal:     out_i = sum_{j<=i} (q'_i.k'_j) v_j / (q'_i . (sum_{j<=i} k'_j + 1e-6)), the n
                queries the last n of the s positions (bottom-right aligned).
    """
    if not causal:
        k_sum = k_features.sum(dim=-2)
        den = torch.einsum("...nd,...d->...n", q_features, k_sum.type_as(q_features))
        # no keys at all (every one masked out): output 0; the division sees 1 there, so that no
        # inf of the unselected branch turns the gradient into 0 * inf = NaN
        d_inv = torch.where(den == 0, 0.0, 1.0 / torch.where(den == 0, 1.0, den))
        context = torch.einsum("...nd,...ne->...de", k_features, v)
        return torch.einsum("...de,...nd,...n->...ne", context, q_features, d_inv)
    n, s = q_features.shape[-2], k_features.shape[-2]
    weights = (q_features @ k_features.transpose(-1, -2)).tril(s - n)  # (b, h, n, s)
    den = weights.sum(dim=-1) + CAUSAL_EPS * q_features.sum(dim=-1)
    return (weights @ v) / den[..., None] if n else weights @ v


def _no_projection_causal(q_features: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """1.1.4's causal no_projection attention (keys exp(k)) with each query's weights and eps
    times exp(-c_i), c_i the largest kept key entry it sees (at least 0, detached): the same
    attention, written without the registry's shift (feature_maps._exp_shift and causal_eps are
    what this checks), finite for keys past the dtype's exp range.  Quadratic: (b, h, n, s, d)."""
    n, s = q_features.shape[-2], k.shape[-2]
    keep = torch.ones(k.shape[0], s, dtype=torch.bool, device=k.device) if key_padding_mask is None \
        else key_padding_mask
    visible = torch.ones(n, s, dtype=torch.bool, device=k.device).tril(s - n) & keep[:, None, None, :]  # (b, 1, n, s)
    k = k.masked_fill(~keep[:, None, :, None], 0.0)
    seen = k.detach()[..., None, :, :].masked_fill(~visible[..., None], float("-inf"))  # (b, h, n, s, d)
    c = torch.nan_to_num(seen.amax(dim=(-2, -1)), neginf=0.0).clamp_min(0.0)  # (b, h, n)
    factors = torch.exp(k[..., None, :, :] - c[..., None, None]).masked_fill(~visible[..., None], 0.0)
    weights = torch.einsum("bhnd,bhnsd->bhns", q_features, factors)
    den = weights.sum(dim=-1) + CAUSAL_EPS * torch.exp(-c) * q_features.sum(dim=-1)
    return (weights @ v) / den[..., None]


def _prefix_causal_softmax(q: Tensor, k: Tensor, v: Tensor, projection_matrix: Tensor,
                           key_padding_mask: Tensor | None = None) -> Tensor:
    """Leak-free causal FAVOR+: out_i is 1.1.4's causal output at the last position of the
    sequence truncated after i, so the key stabilizer of query i is max_{j<=i, f} dash_k[j, f].
    The queries are the last n of the s positions.  key_padding_mask (b, s): padded keys are
    left out entirely (the sequence without them); queries at padded positions give 0."""
    n, s = q.shape[-2], k.shape[-2]
    keep = torch.ones(k.shape[0], s, dtype=torch.bool, device=k.device) if key_padding_mask is None else key_padding_mask
    ratio = projection_matrix.shape[0] ** -0.5
    q_features = softmax_features(q, projection_matrix, is_query=True)
    dash = project(k, projection_matrix)  # (b, h, s, m)
    row_max = dash.amax(dim=-1).detach()  # (b, h, s)
    # (b, h, n): key stabilizer of query i, over the kept keys up to its position s - n + i
    stab = torch.cummax(row_max.masked_fill(~keep[:, None, :], float("-inf")), dim=-1).values[..., s - n:]
    # k'_j(stab_i) = ratio * (exp(dash_j - diag_j - stab_i) + eps), factored so no exp overflows:
    # exp(dash_j - row_max_j) * exp(row_max_j - diag_j - stab_i), the second factor <= 1 for visible j.
    unit = torch.exp(dash - row_max[..., None])  # (b, h, s, m), max 1 per row
    row_scale = row_max - half_sq_norm(k)  # (b, h, s)
    visible = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(s - n) & keep[:, None, None, :]  # (b, 1, n, s)
    factor = torch.exp((row_scale[..., None, :] - stab[..., :, None]).masked_fill(~visible, float("-inf")))
    weights = ratio * ((q_features @ unit.transpose(-1, -2)) * factor + SOFTMAX_EPS * q_features.sum(-1, keepdim=True))
    weights = weights.masked_fill(~visible, 0.0)
    den = weights.sum(dim=-1) + CAUSAL_EPS * q_features.sum(dim=-1)
    out = (weights @ v.masked_fill(~keep[:, None, :, None], 0.0)) / den[..., None]
    return out.masked_fill(~keep[:, None, s - n:, None], 0.0)


def feature_maps(
    q: Tensor, k: Tensor, projection_matrix: Tensor | None, *, causal: bool,
    feature_map: str | Callable[[Tensor], Tensor] = "softmax", key_padding_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """1.1.4's (q', k') for feature_map "softmax", "relu", "none" (no_projection) or a
    callable kernel_fn (generalized attention). key_padding_mask (b, s) bool, True = keep:
    padded keys get zero features and are excluded from the key stabilizer / softmax."""
    return resolve(feature_map).features(q, k, projection_matrix, causal=causal, key_padding_mask=key_padding_mask)


def favor_attention(
    q: Tensor, k: Tensor, v: Tensor, projection_matrix: Tensor | None, *, causal: bool = False,
    key_stabilizer: str = "global", feature_map: str | Callable[[Tensor], Tensor] = "softmax",
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Reference FAVOR+ attention.  q (b,h,n,d), k (b,h,s,d), v (b,h,s,e) -> (b,h,n,e).

    key_stabilizer "global" reproduces 1.1.4; "prefix" (causal softmax only) is leak-free.
    key_padding_mask (b, s) bool (True = keep) removes padded keys entirely (with "prefix":
    the sequence without them); causal queries at padded positions give 0.
    """
    if key_stabilizer == "prefix" and causal and feature_map == "softmax":
        return _prefix_causal_softmax(q, k, v, projection_matrix, key_padding_mask)
    q_features, k_features = feature_maps(
        q, k, projection_matrix, causal=causal, feature_map=feature_map, key_padding_mask=key_padding_mask
    )
    if causal and feature_map == "none":
        out = _no_projection_causal(q_features, k, v, key_padding_mask)
    else:
        out = linear_attention(q_features, k_features, v, causal=causal)
    if causal and key_padding_mask is not None:
        out = out.masked_fill(~key_padding_mask[:, None, k.shape[2] - q.shape[2]:, None], 0.0)
    return out
