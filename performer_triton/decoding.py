"""Recurrent state for cached (incremental) causal decoding.

A causal FAVOR+ layer only needs, for the next query, sums over the keys seen so far; each new
token updates them in O(1) time and memory w.r.t. the prefix length. The state is kept in the
chunked PyTorch path's form (kernels/NOTES.md, ratio-free form) and updated by its one state
update (torch_backend.add_keys); per (batch, head), m features, e value dim:

    hz (m, e+1) = sum_j exp(row_scale_j - R) u_j [v_j, 1]^T   (H | z), relative to the reference
                  R = running max of row_scale = row_max - |dn k|^2 / 2 (softmax; 0 otherwise)
    v_sum (e+1,) = sum_j [v_j, 1]                           (value sum | key count)
    M = running max of row_max: the key stabilizer of the newest query (softmax)
    out = N / D with [N, D] = exp(R - M) q~ @ hz + eps sum(q~) v_sum, D += 1e-6 sum(q~) / ratio

u_j are the key units exp(dash_j - row_max_j) (softmax), relu(dash_j) (relu), or the key
features of maps the kernels do not compute (no_projection, a callable kernel_fn). The newest
query's stabilizer M is the max over all keys so far, which is both the "prefix" stabilizer and,
for the last position, the "global" one. Local (windowed) heads keep only the keys and values
their window can still see. The state is fp32 for 16-bit inputs (fp64 for fp64), as the
functional API's states.

One new position at a time with the kernels' own feature maps (softmax, relu) runs the fused
Triton step (kernels/decode.py: features, state update and output in one launch per layer) on
CUDA, or wherever the attention's backend is "triton"; the PyTorch update otherwise.
"""
from __future__ import annotations

import copy
import functools
from typing import Any

import torch
import torch.nn.functional as F
from local_attention import LocalAttention
from local_attention.rotary import rotate_half
from torch import Tensor, nn

from .attention_state import AttentionState, check_state
from .fast_attention import FastAttention
from .feature_maps import GIVEN_MAP, FeatureMap, keep_rows
from .functional import _autocast, _use_triton
from .torch_backend import (ChunkFeatures, add_keys, autocast_off, compute_dtype, finite_base, reciprocal_or_zero,
                            with_ones)
from .validation import runs_base_forward

__all__ = ["DecodingCache", "FavorState", "LocalWindowState", "favor_state", "transactional"]


class DecodingCache:
    """Per-module decoding state of one model, plus the number of positions processed so far.

    Pass the same cache to every forward call of a generation; each call feeds only the new
    tokens. Modules store their state under themselves as key. copy.deepcopy(cache) (or
    copy.copy) branches a generation (beam search): the copy's states are its own, for the same
    model's layers, unless the model is copied first in the same deepcopy call
    (copy.deepcopy((model, cache))), whose copies it then follows; pickle works the same way.
    """

    def __init__(self) -> None:
        self.length = 0
        self.batch: int | None = None  # the batch size of the first call; every later call must match
        self._states: dict[nn.Module, Any] = {}
        self._open = False  # a call that feeds the cache is running (transactional)

    def check_batch(self, batch: int) -> None:
        """Record the first call's batch size; a later call with another one is a ValueError (the
        states hold one row per sequence, so it would fail deep inside torch)."""
        if self.batch is None:
            self.batch = batch
        elif batch != self.batch:
            raise ValueError(f"cache: this DecodingCache holds batch {self.batch}, the call has batch {batch}; "
                             "use a new DecodingCache for another batch")

    @torch.compiler.disable
    def _snapshot(self) -> tuple | None:
        """What a failed call restores (None inside a call already open: the outermost one
        restores): length, batch, the states by layer and each state object's attributes.
        References suffice: every update replaces a state's tensors (the fused step included) and
        never writes them."""
        if getattr(self, "_open", False):
            return None
        objects = [s for value in self._states.values() for s in (value if isinstance(value, tuple) else (value,))
                   if s is not None and not isinstance(s, Tensor)]
        snapshot = (self.length, self.batch, dict(self._states), [(s, dict(vars(s))) for s in objects])
        self._open = True  # (once the snapshot is taken: a failure above leaves the cache closed)
        return snapshot

    @torch.compiler.disable
    def _close(self, snapshot: tuple | None, failed: bool) -> None:
        if snapshot is None:
            return
        self._open = False
        if failed:
            self.length, self.batch, self._states, objects = snapshot
            for obj, attributes in objects:
                vars(obj).clear()
                vars(obj).update(attributes)

    def get(self, module: nn.Module) -> Any:
        """module's state; None before its first call.  A layer without a state once the cache has
        seen positions is a ValueError: the cache was filled by another model's layers."""
        state = self._states.get(module)
        if state is None and self.length > 0:
            raise ValueError(
                f"this DecodingCache has seen {self.length} positions but holds no state for this layer: it was filled "
                "by another model (a copy made without the cache, or one copied before its model: "
                "copy.deepcopy((model, cache)) copies both together)"
            )
        return state

    def set(self, module: nn.Module, state: Any) -> None:
        """Keep module's recurrent state (a layer's, after its prefill)."""
        self._states[module] = state

    def __deepcopy__(self, memo: dict) -> DecodingCache:
        new = _copy_sharing(self, memo, ("_states",))
        # keyed by the same layers, or by their copies where this deepcopy copied the model too
        new._states = {memo.get(id(m), m): _branch_copy(state, memo) for m, state in self._states.items()}
        return new

    def __copy__(self) -> DecodingCache:
        # a shallow copy would share the layers' states, which every step of either cache moves
        # on (wrong outputs in both, no error): copy.copy branches as copy.deepcopy(cache) does
        return copy.deepcopy(self)

    def tensors(self) -> list[Tensor]:
        """Every tensor the cache holds (to measure its memory): not a layer's projection buffer,
        which a state refers to (FavorState.source, and its projection where no cast copied it)."""
        found: list[Tensor] = []
        for state in self._states.values():
            for value in (state if isinstance(state, tuple) else (state,)):
                if isinstance(value, Tensor):
                    found.append(value)
                elif value is not None:
                    layer = getattr(value, "source", None)
                    found.extend(t for t in vars(value).values() if isinstance(t, Tensor) and not (
                        layer is not None and t.data_ptr() == layer.data_ptr()))
        return found


def _copy_sharing(obj: Any, memo: dict, shared: tuple[str, ...]) -> Any:
    """A deep copy of obj whose attributes named in shared refer to what they referred to (the
    model's layers, buffers and feature map), or to their copies where this deepcopy made them."""
    new = object.__new__(type(obj))
    memo[id(obj)] = new
    # shared first: a copied attribute that holds the same tensor (a projection that is the layer's
    # buffer) would otherwise put its private copy in memo, and source would watch that copy
    for name, value in sorted(vars(obj).items(), key=lambda item: item[0] not in shared):
        if name in shared:
            setattr(new, name, memo.get(id(value), value))
        else:
            setattr(new, name, _branch_copy(value, memo))
    return new


def _branch_copy(value: Any, memo: dict) -> Any:
    """copy.deepcopy(value, memo), but a tensor made with autograd on (a state filled under
    autograd; torch deep-copies graph leaves only) is copied detached: a branch holds its values."""
    if isinstance(value, Tensor) and value.grad_fn is not None:
        return memo.setdefault(id(value), value.detach().clone())
    if isinstance(value, tuple):
        return tuple(_branch_copy(v, memo) for v in value)
    return copy.deepcopy(value, memo)


def transactional(forward):
    """forward(self, ..., cache=DecodingCache) such that a call that raises leaves the cache as it
    was before it (a layer that fails after earlier layers, or its own FAVOR heads, moved on),
    so the call can be retried; nested calls (a model's layers) join the outermost one."""

    @functools.wraps(forward)
    def run(self, *args, **kwargs):
        cache = kwargs.get("cache")
        if not isinstance(cache, DecodingCache):
            return forward(self, *args, **kwargs)
        snapshot = cache._snapshot()
        try:
            out = forward(self, *args, **kwargs)
        except BaseException:
            cache._close(snapshot, failed=True)
            raise
        cache._close(snapshot, failed=False)
        return out

    return run


def _keep(keep: Tensor | None, x: Tensor) -> Tensor:
    """(b, t) bool key mask, all True when None.  x (b, h, t, d)."""
    return torch.ones(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device) if keep is None else keep


def _as_favor_attention(method):
    """method(self, *args) on its floating tensors cast as favor_attention casts them under
    torch.autocast (to the autocast dtype), then with autocast off: the state's products in the
    compute dtype as the full path's, and outputs in the rows' dtype.  Without autocast (calls
    nested in one that turned it off included: step's extend and read) the method itself."""
    off = autocast_off(method)

    @functools.wraps(method)
    def run(self, *args):
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
            return method(self, *args)
        rows = iter(_autocast(*(a for a in args if isinstance(a, Tensor) and a.is_floating_point())))
        return off(self, *(next(rows) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args))

    return run


class FavorState:
    """Running state of the causal FAVOR+ heads of one layer (see the module docstring).

    feature_map: the layer's FeatureMap; projection (m, d) or None (no_projection); fused: single
    positions run the fused Triton step (kernels/decode.py) on this state; source: the layer's
    projection buffer, which step() checks has not been redrawn since (its version counter, or its
    values for an inference tensor)."""

    def __init__(
        self, feature_map: FeatureMap, projection: Tensor | None, b: int, h: int, m: int, e: int, dtype, device,
        fused: bool = False, *, source: Tensor | None = None,
    ):
        self.feature_map = feature_map
        self.projection = projection
        self.fused = fused
        self.source, self.version = source, _version(source)
        kernel_map = feature_map if feature_map.fused else GIVEN_MAP  # what the chunk math computes
        self.chunk = ChunkFeatures(kernel_map.code, projection, m if projection is None else projection.shape[1], dtype)
        self.rows_dtype: torch.dtype | None = None  # compute_dtype of the rows that filled it (extend)
        # [H | z] relative to R, [value sum | count], R, M
        self.hz, self.v_sum, self.ref, self.stab = AttentionState.empty(b, h, m, e, dtype=dtype, device=device)

    SHARED = ("source", "feature_map", "projection")  # the layer's (deepcopy shares them)

    def __deepcopy__(self, memo: dict) -> FavorState:
        new = _copy_sharing(self, memo, self.SHARED)
        new.version = _version(new.source) if _same(self.version, self.source) else -1  # -1: stale
        return new

    def __getstate__(self) -> dict:
        return {**vars(self), "version": _same(self.version, self.source)}  # whether current when saved

    def __setstate__(self, state: dict) -> None:
        current = state.pop("version")
        vars(self).update(state)
        self.version = _version(self.source) if current else -1

    @property
    def state(self) -> AttentionState:
        """A copy of the running sums as the functional API's state (favor_attention(initial_state=
        ...))."""
        return AttentionState(*(t.clone() for t in (self.hz, self.v_sum, self.ref, self.stab)))

    def load(self, state: AttentionState) -> None:
        """Continue from a state (favor_attention(..., output_final_state=True)'s), in this
        state's dtype."""
        b, h, m, e1 = self.hz.shape
        state = check_state(state, b, h, m, e1 - 1, self.hz.device, softmax=self.chunk.softmax)
        # copies: the caller's state stays as it was whatever it does with its own
        self.hz, self.v_sum, self.ref, self.stab = (t.to(self.hz.dtype).clone(memory_format=torch.contiguous_format)
                                                    for t in state)

    def _rows(self, x: Tensor, is_query: bool) -> Tensor:
        """What the chunk math takes from rows x (b, h, t, d): x itself (fused maps) or its features
        (b, h, t, m), in the state's dtype (16-bit rows make fp32 features, as favor_attention's)."""
        fmap, x = self.feature_map, x.to(self.hz.dtype)
        if fmap.fused:
            return x
        if is_query:
            return fmap.query_features(x, self.projection)
        return fmap.key_features(x, self.projection, True, None)

    @_as_favor_attention
    def extend(self, k: Tensor, v: Tensor, keep: Tensor | None = None) -> None:
        """Add keys k (b, h, t, d) and values v (b, h, t, e); keep (b, t) bool drops keys entirely
        (selected away first: what they hold reaches neither the state nor the keys' shift)."""
        _same_rows("the layer's FAVOR state", self, compute_dtype(k.dtype))
        if k.shape[2] == 0:  # no keys (an empty prompt): nothing to add, and no max over them
            return
        chunk, dtype = self.chunk, self.hz.dtype
        k, v = keep_rows(k, keep).to(dtype), keep_rows(v, keep).to(dtype)
        keep = _keep(keep, k)  # (b, t)
        x = self._rows(k, is_query=False)
        dash = chunk.dash(x)  # (b, h, t, m)
        if chunk.softmax:
            row_max, row_scale = chunk.key_stats(x, dash)  # (b, h, t) each
            self.stab = torch.maximum(self.stab, row_max.masked_fill(~keep[:, None], float("-inf")).amax(dim=-1))
        else:  # features divided by exp(log scale) to stay finite (no_projection): R tracks it
            row_max = dash.new_zeros(dash.shape[:-1])  # (b, h, t)
            log_scale = self.feature_map.key_log_scale(k, True)  # (b, h, 1, 1)
            row_scale = row_max + (log_scale[..., 0] if isinstance(log_scale, Tensor) else log_scale)
        units = keep_rows(chunk.key_units(x, row_max, dash), keep)  # (b, h, t, m)
        vo = keep_rows(with_ones(v), keep)  # (b, h, t, e+1)
        row_scale = row_scale.masked_fill(~keep[:, None], float("-inf"))
        self.hz, self.ref = add_keys(self.hz, self.ref, units, row_scale, vo)
        self.v_sum = self.v_sum + vo.sum(dim=-2)

    @_as_favor_attention
    def read(self, q: Tensor) -> Tensor:
        """Outputs of queries q (b, h, t, d) against every key added so far -> (b, h, t, e)."""
        chunk, e = self.chunk, self.hz.shape[-1] - 1
        x = self._rows(q, is_query=True)
        dash = chunk.dash(x)  # (b, h, t, m)
        q_max = chunk.row_max(dash) if chunk.softmax else None
        q_feat = chunk.query_base(x, dash, q_max) + chunk.eps  # (b, h, t, m)
        q_sum = q_feat.sum(dim=-1, keepdim=True)  # (b, h, t, 1)
        causal_coef = chunk.causal_coef
        if chunk.softmax:  # exp(R - M) <= 1; 0 while no key has been kept
            scale = (self.ref - self.stab).masked_fill(torch.isinf(self.stab), float("-inf")).exp()
        else:  # hz is relative to R: the causal eps relative to it too
            scale = torch.ones_like(self.ref)
            causal_coef = causal_coef * torch.exp(-finite_base(self.ref))[..., None, None]
        nd = scale[..., None, None] * (q_feat @ self.hz) + chunk.eps * q_sum * self.v_sum[..., None, :]
        return (nd[..., :e] * reciprocal_or_zero(nd[..., e:] + causal_coef * q_sum)).to(q.dtype)

    @torch.compiler.disable  # (see LocalWindowState.step)
    @_as_favor_attention
    def step(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None = None) -> Tensor:
        """Causal outputs of t new positions, one at a time.  (b,h,t,d) x2, (b,h,t,e) -> (b,h,t,e)."""
        _same_rows("the layer's FAVOR state", self, compute_dtype(k.dtype))
        if not _same(self.version, self.source):
            raise ValueError(
                "DecodingCache: the layer's projection matrix was redrawn (or reloaded) after this cache was filled, "
                "so its state holds keys of the old features; in training mode every call counts towards "
                "feature_redraw_interval: decode in eval mode (model.eval()) or start a new DecodingCache"
            )
        if self.fused and q.shape[2] == 1:
            from .kernels.decode import decode_step  # imports triton

            out, (self.hz, self.v_sum, self.ref, self.stab) = decode_step(
                q, k, v, self.projection, None if keep is None else keep[:, 0].contiguous(), self.hz, self.v_sum,
                self.ref, self.stab, feature=self.feature_map.code, causal_coef=self.chunk.causal_coef,
            )
        else:
            out = _step(self, q, k, v, keep)
        # a padded query gives 0, as favor_attention's causal key_padding_mask does on the full path
        return keep_rows(out, keep)


def _same_rows(what: str, state: Any, dtype: torch.dtype) -> None:
    """A state keeps the dtype of the rows that filled it (state.rows_dtype, set by the first call):
    rows of another one (a model cast since) are a ValueError naming both, not a failure deep in
    torch or a state of silently mixed precision.  Rows cast by torch.autocast are the rows."""
    if getattr(state, "rows_dtype", None) is None:  # (states pickled before it was recorded: from now on)
        state.rows_dtype = dtype
    elif dtype != state.rows_dtype:
        raise rows_dtype_error(what, state.rows_dtype, dtype)


def rows_dtype_error(what: str, filled: torch.dtype, now: torch.dtype) -> ValueError:
    """The error of a cached state (what) filled from rows of dtype filled and fed rows of now."""
    return ValueError(f"cache: {what} was filled from {filled} rows, this call's are {now} (the model was cast "
                      "since?); use a new DecodingCache")


def _step(state: FavorState | LocalWindowState, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
    outs = [v.new_zeros((*q.shape[:3], v.shape[3]))]  # (no positions: the empty output)
    for i in range(q.shape[2]):
        state.extend(k[:, :, i : i + 1], v[:, :, i : i + 1], None if keep is None else keep[:, i : i + 1])
        outs.append(state.read(q[:, :, i : i + 1]))
    return torch.cat(outs[1:], dim=2) if len(outs) > 1 else outs[0]


def _version(t: Tensor | None) -> int | Tensor | None:
    """What tells that t was written in place since: its version counter; for an inference tensor,
    which has none, a copy of it (compared by value, _same); None without t."""
    if t is None:
        return None
    return t.clone() if t.is_inference() else t._version


def _same(version: int | Tensor | None, t: Tensor | None) -> bool:
    """Whether t is as it was when _version gave version (-1: known stale)."""
    if t is None:
        return version is None
    if t.is_inference():
        return isinstance(version, Tensor) and bool(torch.equal(version, t))  # (a host read)
    return version == t._version


def favor_state(fast_attention: FastAttention, k: Tensor, v: Tensor) -> FavorState:
    """An empty state for the causal heads of ``fast_attention`` (k (b,h,t,d), v (b,h,t,e) give
    sizes, dtype and device)."""
    if not fast_attention.causal:
        raise ValueError("incremental decoding needs a causal FastAttention (causal=False here)")
    k, v = _autocast(k, v)  # the rows the state will see (_as_favor_attention)
    b, h, _, e = v.shape
    fmap = fast_attention.feature_map
    # in the dtype favor_attention uses: the inputs' for the fused maps (the kernels'), else the
    # compute dtype of the features made in PyTorch
    dtype = k.dtype if fmap.fused else compute_dtype(k.dtype)
    projection = None if fast_attention.no_projection else fast_attention.projection_matrix.to(dtype).contiguous()
    m = k.shape[-1] if projection is None else projection.shape[0]
    # the state in fp32 for 16-bit inputs (as favor_attention's states): a bf16 state rounds every
    # update; in float64 for maps that rescale keys (no_projection's exp(k)), as favor_attention's
    # causal path computes them: their sums span more than fp32's exponent range
    state_dtype = torch.float64 if fmap.rescales_keys else compute_dtype(k.dtype)
    return FavorState(fmap, projection, b, h, m, e, state_dtype, k.device,
                      _fused_step(fast_attention.backend, fmap, k, v),
                      source=None if fast_attention.no_projection else fast_attention.projection_matrix)


def _fused_step(backend: str, fmap: FeatureMap, k: Tensor, v: Tensor) -> bool:
    """Whether single positions run the fused Triton step: the kernels' own feature maps, with
    backend "triton", or "auto" on CUDA where the kernels take the inputs (fp32 included: the
    step has no tensor-core dot, so no TF32 question)."""
    return fmap.fused and _use_triton(backend, k, v, True, tf32=False)


class LocalWindowState:
    """Keys and values a causal local_attention.LocalAttention can still see.

    LocalAttention buckets positions into windows of W and lets a query in window w see windows
    w-1 and w (up to itself); rotary positions are counted from the start of window w-1, queries
    sitting at W + (p mod W). Only keys from the start of the previous window are kept.
    """

    def __init__(self, local_attn: nn.Module, *, zero_unseen: bool = False):
        self.local_attn = local_attn
        self.window = local_attn.window_size
        # a query that sees no kept key: 0 (zero_unseen, the layer's opt-ins), else 1.1.4's uniform
        # average over its whole window, later positions included, which a step cannot know
        self.zero_unseen = zero_unseen
        self.masked = False  # a mask was given (else every key is kept)
        self.length = 0  # positions seen
        self.rows_dtype: torch.dtype | None = None  # the keys' dtype (extend)
        self.keys: Tensor | None = None  # (b, h, L, d), before rotary
        self.values: Tensor | None = None  # (b, h, L, e)
        self.keep: Tensor | None = None  # (b, L) bool
        self.start = 0  # absolute position of keys[:, :, 0]

    def __deepcopy__(self, memo: dict) -> LocalWindowState:
        return _copy_sharing(self, memo, ("local_attn",))

    def _frame(self, position: int) -> int:
        """Absolute position of rotary position 0 for a query at ``position``."""
        return (position // self.window - 1) * self.window

    def extend(self, k: Tensor, v: Tensor, keep: Tensor | None = None) -> None:
        """Add keys k (b, h, t, d) and values v (b, h, t, e) of the next t positions; keep (b, t)
        bool marks padded positions (False), which no query attends to; keys no later query can
        see are dropped."""
        _same_rows("the layer's local window", self, k.dtype)
        self.masked = self.masked or keep is not None
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
        seen = self.keep.any(-1)[:, None, None, None]  # (b, 1, 1, 1): a kept key is visible
        if not self.zero_unseen and self.masked and not bool(seen.all()):  # (a host read only with a mask)
            raise ValueError(
                "cache: a padded position whose local window holds no kept key so far, fed after the prefill: "
                "1.1.4's local attention averages its whole window there, later positions included, which a cached "
                "step cannot see (and the next layer counts that row). Feed such positions in the prefill call, or "
                "use key_stabilizer='prefix' or exact_mask=True, which give these rows 0")
        sim = sim.masked_fill(~self.keep[:, None, None, :], -torch.finfo(sim.dtype).max)
        out = sim.softmax(dim=-1) @ self.values
        return torch.where(seen, out, 0.0) if self.zero_unseen else out

    @torch.compiler.disable
    def step(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None = None) -> Tensor:
        """Outputs of t new positions, one at a time.  (b,h,t,d) x2, (b,h,t,e) -> (b,h,t,e).
        Eager in a compiled model: traced, the state's Python positions and the host reads of
        its checks made torch.compile recompile as the window moved."""
        return _step(self, q, k, v, keep)


def seen_keys(mask: Tensor, window: int) -> Tensor:
    """(b, n) bool: whether query i of a causal local attention (windows of `window` from position
    0, looking back one window) sees a kept key: mask (b, n) True somewhere in
    [start of the previous window, i]."""
    b, n = mask.shape
    kept = F.pad(mask, (0, -n % window)).view(b, -(-n // window), window).to(torch.int32)  # (b, windows, window)
    before = F.pad(kept.sum(-1), (1, 0))[:, :-1]  # kept keys of the previous window   (b, windows)
    return (kept.cumsum(-1) + before[..., None] > 0).view(b, -1)[:, :n]


def local_cache_unsupported_reason(local_attn: nn.Module) -> str | None:
    """Why LocalWindowState cannot reproduce ``local_attn`` (None when it can)."""
    la = local_attn
    if not runs_base_forward(la, LocalAttention):
        return f"its local attention ({type(la).__name__}) has a forward of its own, which a cached step would not call"
    if not la.causal:
        return "local attention is not causal"
    if (la.look_backward, la.look_forward, la.shared_qk, la.exact_windowsize) != (1, 0, False, False):
        return "local attention is not configured as performer-pytorch 1.1.4 builds it"
    if la.rel_pos is not None and la.use_xpos:
        return "local attention uses xpos"
    return None
