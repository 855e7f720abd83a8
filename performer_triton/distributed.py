"""Context parallelism: FAVOR+ attention over a sequence split across the ranks of a
torch.distributed process group, each rank holding one contiguous block, blocks in rank order.

A rank needs only the attention state (performer_triton.attention_state) of the keys before its
block, never those keys: the traffic per layer is one all-gather of (m, e + 1) states per head,
whatever the sequence length.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .attention_state import AttentionState, chain_states
from .functional import favor_attention

__all__ = ["context_parallel_attention"]


class _StatesBefore(torch.autograd.Function):
    """The exclusive scan of the ranks' states: this rank's state of its own keys in, the chain of
    the earlier ranks' states (chain_states, from the empty state) out.  Forward: one all-gather
    per state tensor.  Backward: rank r's incoming gradient reaches rank j < r's hz with the
    chain's factor exp(ref_j - R_r) (<= 1) and its v_sum unchanged; one all-reduce of those
    per-rank rows (gloo and NCCL both have it), each rank keeping its own row.  Every rank takes
    part in both, rank 0 too (its output, the empty state, still carries the gradient call)."""

    @staticmethod
    def forward(ctx, hz: Tensor, v_sum: Tensor, ref: Tensor, stab: Tensor, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        gathered = []
        for t in (hz, v_sum, ref, stab):
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous(), group=group)
            gathered.append(parts)
        b, h, m, e1 = hz.shape
        before = AttentionState.empty(b, h, m, e1 - 1, dtype=hz.dtype, device=hz.device)
        for j in range(rank):
            before = chain_states(before, AttentionState(*(parts[j] for parts in gathered)))
        ctx.group, ctx.rank, ctx.world = group, rank, world
        ctx.save_for_backward(torch.stack(gathered[2]), before.ref)
        ctx.mark_non_differentiable(before.ref, before.stab)
        return tuple(before)

    @staticmethod
    def backward(ctx, d_hz: Tensor | None, d_v_sum: Tensor | None, _ref, _stab):
        refs, ref = ctx.saved_tensors  # (world, b, h), (b, h)
        base = ref.masked_fill(torch.isinf(ref), 0.0)  # chain_states' finite base
        rows_hz = d_hz.new_zeros((ctx.world, *d_hz.shape)) if d_hz is not None else None
        rows_vs = d_v_sum.new_zeros((ctx.world, *d_v_sum.shape)) if d_v_sum is not None else None
        for j in range(ctx.rank):
            if rows_hz is not None:
                rows_hz[j] = d_hz * (refs[j] - base).exp()[..., None, None]
            if rows_vs is not None:
                rows_vs[j] = d_v_sum
        grads = []
        for rows in (rows_hz, rows_vs):
            if rows is None:  # (every rank alike: the same graph on every rank)
                grads.append(None)
                continue
            dist.all_reduce(rows, group=ctx.group)
            grads.append(rows[ctx.rank])
        return (*grads, None, None, None)


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection_matrix: Tensor | None,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    key_stabilizer: str = "global",
    feature_map: str = "softmax",
) -> Tensor:
    """favor_attention over the whole sequence, this rank's block of it: q, k (b, h, n_local, d),
    v (b, h, n_local, e) -> (b, h, n_local, e); group (default: the world) holds the blocks in
    rank order.

    Causal (key_stabilizer="prefix" with softmax features, or relu): this block's keys as a state,
    an all-gather of the states, the chain of the earlier ranks' states (an exclusive scan) as the
    initial state of this block's attention; autograd runs the reverse scan (the all-gather's
    backward sums the state gradients over ranks).  Not yet: non-causal attention and the causal
    global stabilizer, which need the key stabilizer all-reduced first (issue 14).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("context_parallel_attention needs an initialized torch.distributed process group")
    if not causal:
        raise ValueError("context_parallel_attention: causal=True only for now (non-causal needs the global key "
                         "stabilizer all-reduced before the key sums)")
    kw = dict(causal=True, key_stabilizer=key_stabilizer, feature_map=feature_map)
    # this block's keys alone: their state (the outputs of this pass are not used)
    _, local = favor_attention(q, k, v, projection_matrix, output_final_state=True, **kw)
    before = AttentionState(*_StatesBefore.apply(*local, group))
    return favor_attention(q, k, v, projection_matrix, initial_state=before, **kw)
