"""The state of causal FAVOR+ attention after some keys: what a later call needs of them.

The running sums of the cached decoder (performer_triton.decoding.FavorState) in the referenced
form of kernels/NOTES.md, per (batch, head); m features, e value dim:

    hz    (b, h, m, e + 1)  [H | z] = sum_j exp(row_scale_j - R) u_j [v_j, 1]^T
    v_sum (b, h, e + 1)     [sum of the values | number of keys]
    ref   (b, h)            R: running max of row_scale = row_max - |dn k|^2 / 2 (softmax);
                            0 for the maps without a stabilizer once a key is in; -inf before
    stab  (b, h)            M: running max of row_max, the next query's key stabilizer
                            (softmax; -inf for the other maps)

with u_j the key units exp(dash_j - row_max_j) (softmax), relu(dash_j) (relu) or the given key
features. Every factor exp(row_scale_j - R) is at most 1 and a query reads the state with
exp(R - M) <= 1, so the state stays finite in fp16 however large |k| is. Chaining:
`favor_attention(x2, initial_state=s1)`, s1 the final state of `favor_attention(x1)`, gives the
outputs (and gradients) of one call over x1 and x2 with the prefix stabilizer.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .feature_maps import GIVEN_MAP, FeatureMap, check_stateful, resolve
from .torch_backend import KeysState, empty_state, merge_referenced
from .validation import check_int, check_projection, check_qkv, check_state_tuple, host_reads


class AttentionState(NamedTuple):
    """Causal FAVOR+ attention state (module docstring): hz, v_sum, ref, stab."""

    hz: Tensor
    v_sum: Tensor
    ref: Tensor
    stab: Tensor

    def to(self, *args, **kwargs) -> AttentionState:
        """Every tensor through Tensor.to (a dtype, a device or both)."""
        return AttentionState(*(t.to(*args, **kwargs) for t in self))

    @classmethod
    def empty(cls, b: int, h: int, m: int, e: int, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> AttentionState:
        """The state before any key: zero sums, R = M = -inf."""
        sizes = {name: check_int(name, value, 0, ValueError) for name, value in dict(b=b, h=h, m=m, e=e).items()}
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        return cls(*empty_state(*sizes.values(), dtype, device))


# a state saved with torch.save loads under torch.load's default weights_only=True: it is four tensors
torch.serialization.add_safe_globals([AttentionState])


def check_state(state: object, b: int, h: int, m: int, e: int, device: torch.device,
                softmax: bool | None = None, what: str = "initial_state",
                sizes: str = "b, h, m, e of this call") -> AttentionState:
    """state as an AttentionState of these sizes on this device (ValueError / TypeError naming
    what differs); with softmax given, also made by a map of that kind (below)."""
    check_state_tuple(state, what)
    state = AttentionState(*state)
    expected = dict(hz=(b, h, m, e + 1), v_sum=(b, h, e + 1), ref=(b, h), stab=(b, h))
    for name, shape in expected.items():
        t = getattr(state, name)
        if tuple(t.shape) != shape:
            raise ValueError(f"{what}.{name} must have shape {shape} ({sizes}), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{what}.{name} must be floating point, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{what}.{name} must be on {device}, got {t.device}")
    if softmax is not None and host_reads(*state):
        _check_map_kind(state, softmax)
    return state


def _check_map_kind(state: AttentionState, softmax: bool) -> None:
    """A state that holds keys records its map's kind: softmax features keep a finite stabilizer M,
    the others none (-inf); continuing it with the other kind would mix two attentions.  (The maps
    without a stabilizer, relu and the given-feature ones, cannot be told apart.)"""
    nan = torch.isnan(state.ref).any() | torch.isnan(state.stab).any()  # (no map makes these)
    wrong = (torch.isfinite(state.ref) & (torch.isfinite(state.stab) != softmax)).any()
    above = (state.ref > state.stab).any() & softmax  # (ref is at most stab with softmax features)
    if not bool(nan | wrong | above):  # (one host read when the state is fine)
        return
    if bool(nan):
        raise ValueError("initial_state.ref / stab hold NaN: not a state any call made (ref and stab are -inf "
                         "before any key and finite after; stab stays -inf without softmax features)")
    if bool(wrong):
        made, call = ("relu or given", "softmax") if softmax else ("softmax", "relu or given")
        raise ValueError(f"initial_state was made with {made} features (its stab is "
                         f"{'-inf' if softmax else 'finite'} where it holds keys); this call computes {call} features")
    raise ValueError("initial_state.ref exceeds its stab: not a state any call made (ref, the max of row_max - "
                     "|dn k|^2 / 2 over its keys, is at most stab, the max of row_max)")


def chain_states(first: AttentionState, then: AttentionState) -> AttentionState:
    """The state after the keys of first and then those of then (a state of its keys alone, from
    the empty state): sums relative to the larger reference (both factors <= 1), counts added,
    the larger stabilizer.  Differentiable in hz and v_sum; references and stabilizers are
    constants, as every stabilizer.  Both states of the same sizes and device (first's)."""
    check_state_tuple(first, "first")
    b, h, m, e1 = first[0].shape
    first = check_state(first, b, h, m, e1 - 1, first[0].device, what="first", sizes="b, h, m, e of first.hz")
    then = check_state(then, b, h, m, e1 - 1, first.hz.device, what="then", sizes="first's b, h, m, e")
    if host_reads(*first, *then):  # where both hold keys, both were made by maps of one kind (_check_map_kind)
        both = torch.isfinite(first.ref) & torch.isfinite(then.ref)
        if bool((both & (torch.isfinite(first.stab) != torch.isfinite(then.stab))).any()):
            raise ValueError("chain_states: first and then were made by different feature maps (softmax states keep "
                             "a finite stab, relu and given-feature states -inf)")
    return joined_states(first, then)


def joined_states(first: AttentionState, then: AttentionState) -> AttentionState:
    """chain_states of states already checked (the library's own: no checks, no host reads)."""
    hz, ref = merge_referenced(first.hz, first.ref, then.hz, then.ref)
    return AttentionState(hz, first.v_sum + then.v_sum, ref, torch.maximum(first.stab, then.stab))


def keys_state(k: Tensor, v: Tensor, projection_matrix: Tensor | None, *,
               feature_map: str | FeatureMap = "softmax") -> AttentionState:
    """The state after keys k (b, h, s, d) and values v (b, h, s, e) from the empty state,
    without queries: the final state of favor_attention(q, k, v, projection_matrix, causal=True,
    key_stabilizer="prefix", feature_map=feature_map, output_final_state=True) for any q, at a
    fraction of its cost (one chunked pass over the keys, on the PyTorch path).  Differentiable in
    k and v.  feature_map: "softmax", "relu" or a callable kernel_fn ("none" rescales its keys per
    call and has no state)."""
    check_qkv(k, k, v, causal=True, q_name="k")
    fmap = resolve(feature_map)
    check_stateful(fmap, "keys_state")
    if fmap.fused:
        projection = check_projection(projection_matrix, k, fixed_by="keys_state's fused features", name="k")
        return AttentionState(*KeysState.apply(k, v, projection.to(k.dtype), fmap.code))
    if fmap.needs_projection:
        projection_matrix = check_projection(projection_matrix, k, name="k")
    features = fmap.key_features(k, projection_matrix, True, None)
    return AttentionState(*KeysState.apply(features, v, None, GIVEN_MAP.code))
