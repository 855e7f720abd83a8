"""Recurrent state for cached (incremental) causal decoding.

A causal FAVOR+ layer only needs, for the next query, sums over the keys seen so far; each new
token updates them in O(1) time and memory w.r.t. the prefix length (kernels/NOTES.md, ratio-free
form; shapes per (batch, head), m features, e value dim):

    softmax features, relative to the reference R = running max of row_scale = row_max - diag:
        H (m, e) = sum_j exp(dash_j - diag_j - R) v_j^T      z (m,) = sum_j exp(dash_j - diag_j - R)
        vsum (e,) = sum_j v_j                                count = number of keys
        M = running max of row_max (the key stabilizer of the newest query)
    out = N / D,  N = exp(R - M) q~ @ H + 1e-4 sum(q~) vsum,
                  D = exp(R - M) q~ . z + 1e-4 sum(q~) count + 1e-6 sum(q~) / ratio
    other features (generalized, no_projection): S = sum_j k'_j v_j^T, z = sum_j k'_j,
        out = q' @ S / (q' . z + 1e-6 sum(q'))

The newest query's stabilizer M is the max over all keys so far, which is both the "prefix"
stabilizer and, for the last position, the "global" one. Local (windowed) heads keep only the
keys and values their window can still see.
"""
from __future__ import annotations

from typing import Any

import torch
from local_attention.rotary import rotate_half
from torch import Tensor, nn

from .fast_attention import FastAttention
from .reference import CAUSAL_EPS, SOFTMAX_EPS, generalized_features

__all__ = ["DecodingCache", "FeatureState", "LocalWindowState", "SoftmaxState", "favor_state"]


class DecodingCache:
    """Per-module decoding state of one model, plus the number of positions processed so far.

    Pass the same cache to every forward call of a generation; each call feeds only the new
    tokens. Modules store their state under themselves as key.
    """

    def __init__(self) -> None:
        self.length = 0
        self._states: dict[nn.Module, Any] = {}

    def get(self, module: nn.Module) -> Any:
        return self._states.get(module)

    def set(self, module: nn.Module, state: Any) -> None:
        self._states[module] = state

    def tensors(self) -> list[Tensor]:
        """Every tensor the cache holds (to measure its memory)."""
        found: list[Tensor] = []
        for state in self._states.values():
            for value in (state if isinstance(state, tuple) else (state,)):
                if isinstance(value, Tensor):
                    found.append(value)
                elif value is not None:
                    found.extend(t for t in vars(value).values() if isinstance(t, Tensor))
        return found


def _keep(keep: Tensor | None, x: Tensor) -> Tensor:
    """(b, t) bool key mask, all True when None.  x (b, h, t, d)."""
    return torch.ones(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device) if keep is None else keep


def _project(x: Tensor, projection: Tensor) -> Tensor:
    """(dn x) @ P^T, dn = d**-0.25, as 1.1.4.  x (b, h, t, d) -> (b, h, t, m)."""
    return torch.einsum("...id,jd->...ij", x.shape[-1] ** -0.25 * x, projection.type_as(x))


def _half_sq_norm(x: Tensor) -> Tensor:
    """|dn x|^2 / 2.  x (b, h, t, d) -> (b, h, t)."""
    return (x**2).sum(dim=-1) / 2.0 * (x.shape[-1] ** -0.25) ** 2


class SoftmaxState:
    """Running FAVOR+ state of causal softmax-feature heads (see the module docstring)."""

    def __init__(self, projection: Tensor, b: int, h: int, e: int, dtype: torch.dtype, device: torch.device):
        m = projection.shape[0]
        self.projection = projection
        self.ratio = m**-0.5
        self.ref = torch.full((b, h), float("-inf"), dtype=dtype, device=device)  # R
        self.stab = torch.full((b, h), float("-inf"), dtype=dtype, device=device)  # M
        self.context = torch.zeros(b, h, m, e, dtype=dtype, device=device)  # H(R)
        self.key_sum = torch.zeros(b, h, m, dtype=dtype, device=device)  # z(R)
        self.value_sum = torch.zeros(b, h, e, dtype=dtype, device=device)
        self.count = torch.zeros(b, 1, dtype=dtype, device=device)

    def extend(self, k: Tensor, v: Tensor, keep: Tensor | None = None) -> None:
        """Add keys k (b, h, t, d) and values v (b, h, t, e); keep (b, t) bool drops keys entirely."""
        keep = _keep(keep, k)[:, None, :]  # (b, 1, t)
        dash = _project(k, self.projection)  # (b, h, t, m)
        row_max = dash.amax(dim=-1)  # (b, h, t)
        row_scale = row_max - _half_sq_norm(k)
        neg_inf = torch.tensor(float("-inf"), dtype=dash.dtype, device=dash.device)
        ref = torch.maximum(self.ref, torch.where(keep, row_scale, neg_inf).amax(dim=-1))  # (b, h)
        self.stab = torch.maximum(self.stab, torch.where(keep, row_max, neg_inf).amax(dim=-1))
        # old state rescaled to the new reference; 0 while no key has been kept yet
        decay = torch.where(torch.isinf(self.ref), torch.zeros_like(ref), torch.exp(self.ref - ref))
        ref_safe = torch.where(torch.isinf(ref), torch.zeros_like(ref), ref)
        # exp(dash - diag - R) = exp(dash - row_max) exp(row_scale - R): both factors <= 1
        weight = torch.where(keep, torch.exp(row_scale - ref_safe[..., None]), torch.zeros_like(row_scale))
        features = torch.exp(dash - row_max[..., None]) * weight[..., None]  # (b, h, t, m)
        self.context = decay[..., None, None] * self.context + features.transpose(-1, -2) @ v
        self.key_sum = decay[..., None] * self.key_sum + features.sum(dim=-2)
        self.value_sum = self.value_sum + (v * keep[..., None]).sum(dim=-2)
        self.count = self.count + keep[:, 0].sum(dim=-1, keepdim=True)
        self.ref = ref

    def read(self, q: Tensor) -> Tensor:
        """Outputs of queries q (b, h, t, d) against every key added so far -> (b, h, t, e)."""
        dash = _project(q, self.projection)  # (b, h, t, m)
        q_feat = torch.exp(dash - _half_sq_norm(q)[..., None] - dash.amax(dim=-1, keepdim=True)) + SOFTMAX_EPS
        q_sum = q_feat.sum(dim=-1, keepdim=True)  # (b, h, t, 1)
        scale = torch.exp(self.ref - self.stab)[..., None, None]  # (b, h, 1, 1), <= 1
        num = scale * (q_feat @ self.context) + SOFTMAX_EPS * q_sum * self.value_sum[..., None, :]
        den = (
            scale * (q_feat @ self.key_sum[..., None])
            + SOFTMAX_EPS * q_sum * self.count[..., None, None]
            + CAUSAL_EPS * q_sum / self.ratio
        )
        return num / den

    def step(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None = None) -> Tensor:
        """Causal outputs of t new positions, one at a time.  (b,h,t,d) x2, (b,h,t,e) -> (b,h,t,e)."""
        return _step(self, q, k, v, keep)


class FeatureState:
    """Running sums of causal heads whose features need no stabilizer (generalized attention,
    no_projection): S = sum k' v^T, z = sum k'."""

    def __init__(self, fast_attention: FastAttention, b: int, h: int, m: int, e: int, dtype, device):
        self.fast_attention = fast_attention
        self.context = torch.zeros(b, h, m, e, dtype=dtype, device=device)
        self.key_sum = torch.zeros(b, h, m, dtype=dtype, device=device)

    def _features(self, x: Tensor, is_query: bool) -> Tensor:
        fa = self.fast_attention
        if fa.no_projection:  # 1.1.4, causal: softmax over features for q, exp for k
            return x.softmax(dim=-1) if is_query else torch.exp(x)
        return generalized_features(x, fa.projection_matrix, fa.kernel_fn)

    def extend(self, k: Tensor, v: Tensor, keep: Tensor | None = None) -> None:
        features = self._features(k, is_query=False) * _keep(keep, k)[:, None, :, None]  # (b, h, t, m)
        self.context = self.context + features.transpose(-1, -2) @ v
        self.key_sum = self.key_sum + features.sum(dim=-2)

    def read(self, q: Tensor) -> Tensor:
        q_feat = self._features(q, is_query=True)  # (b, h, t, m)
        den = q_feat @ self.key_sum[..., None] + CAUSAL_EPS * q_feat.sum(dim=-1, keepdim=True)
        return (q_feat @ self.context) / den

    def step(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None = None) -> Tensor:
        return _step(self, q, k, v, keep)


def _step(state: SoftmaxState | FeatureState, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
    outs = []
    for i in range(q.shape[2]):
        state.extend(k[:, :, i : i + 1], v[:, :, i : i + 1], None if keep is None else keep[:, i : i + 1])
        outs.append(state.read(q[:, :, i : i + 1]))
    return torch.cat(outs, dim=2)


def favor_state(fast_attention: FastAttention, k: Tensor, v: Tensor) -> SoftmaxState | FeatureState:
    """An empty state for the causal heads of ``fast_attention`` (k (b,h,t,d), v (b,h,t,e) give
    sizes, dtype and device)."""
    if not fast_attention.causal:
        raise ValueError("incremental decoding needs a causal FastAttention (causal=False here)")
    b, h, _, e = v.shape
    if fast_attention.feature_map == "softmax":
        return SoftmaxState(fast_attention.projection_matrix.to(k.dtype), b, h, e, k.dtype, k.device)
    m = k.shape[-1] if fast_attention.no_projection else fast_attention.nb_features
    return FeatureState(fast_attention, b, h, m, e, k.dtype, k.device)


class LocalWindowState:
    """Keys and values a causal local_attention.LocalAttention can still see.

    LocalAttention buckets positions into windows of W and lets a query in window w see windows
    w-1 and w (up to itself); rotary positions are counted from the start of window w-1, queries
    sitting at W + (p mod W). Only keys from the start of the previous window are kept.
    """

    def __init__(self, local_attn: nn.Module):
        self.local_attn = local_attn
        self.window = local_attn.window_size
        self.length = 0  # positions seen
        self.keys: Tensor | None = None  # (b, h, L, d), before rotary
        self.values: Tensor | None = None  # (b, h, L, e)
        self.keep: Tensor | None = None  # (b, L) bool
        self.start = 0  # absolute position of keys[:, :, 0]

    def _frame(self, position: int) -> int:
        """Absolute position of rotary position 0 for a query at ``position``."""
        return (position // self.window - 1) * self.window

    def extend(self, k: Tensor, v: Tensor, keep: Tensor | None = None) -> None:
        keep = _keep(keep, k)
        if self.keys is None:
            self.keys, self.values, self.keep = k, v, keep
        else:
            self.keys = torch.cat((self.keys, k), dim=2)
            self.values = torch.cat((self.values, v), dim=2)
            self.keep = torch.cat((self.keep, keep), dim=1)
        self.length += k.shape[2]
        self._drop_before(max(0, self._frame(self.length - 1)))  # nothing older is visible any more

    def _drop_before(self, position: int) -> None:
        drop = position - self.start
        if drop > 0:
            self.keys, self.values, self.keep = self.keys[:, :, drop:], self.values[:, :, drop:], self.keep[:, drop:]
            self.start = position

    def _rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        inv_freq = self.local_attn.rel_pos.inv_freq
        freqs = torch.einsum("i,j->ij", positions.type_as(inv_freq), inv_freq)
        freqs = torch.cat((freqs, freqs), dim=-1)  # (t, d)
        return x * freqs.cos() + rotate_half(x) * freqs.sin()

    def read(self, q: Tensor) -> Tensor:
        """Output of the query q (b, h, 1, d) at the newest position -> (b, h, 1, e)."""
        frame = self._frame(self.length - 1)
        scale = self.local_attn.scale if self.local_attn.scale is not None else q.shape[-1] ** -0.5
        q, k = q * scale, self.keys
        if self.local_attn.rel_pos is not None:
            key_positions = torch.arange(self.start, self.length, device=q.device) - frame
            q = self._rotate(q, key_positions[-1:])
            k = self._rotate(k, key_positions)
        sim = q @ k.transpose(-1, -2)  # (b, h, 1, L)
        sim = sim.masked_fill(~self.keep[:, None, None, :], -torch.finfo(sim.dtype).max)
        return sim.softmax(dim=-1) @ self.values

    def step(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None = None) -> Tensor:
        """Outputs of t new positions, one at a time.  (b,h,t,d) x2, (b,h,t,e) -> (b,h,t,e)."""
        outs = []
        for i in range(q.shape[2]):
            self.extend(k[:, :, i : i + 1], v[:, :, i : i + 1], None if keep is None else keep[:, i : i + 1])
            outs.append(self.read(q[:, :, i : i + 1]))
        return torch.cat(outs, dim=2)


def local_cache_unsupported_reason(local_attn: nn.Module) -> str | None:
    """Why LocalWindowState cannot reproduce ``local_attn`` (None when it can)."""
    la = local_attn
    if not la.causal:
        return "local attention is not causal"
    if (la.look_backward, la.look_forward, la.shared_qk, la.exact_windowsize) != (1, 0, False, False):
        return "local attention is not configured as performer-pytorch 1.1.4 builds it"
    if la.rel_pos is not None and la.use_xpos:
        return "local attention uses xpos"
    return None
