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
from .feature_maps import project, resolve, softmax_features
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


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(sum) whose backward is one too: every rank's piece reaches every rank's sum."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _noncausal(q: Tensor, k: Tensor, v: Tensor, projection_matrix: Tensor, feature_map: str, group) -> Tensor:
    """out = q' S[:e] / q' S[e], S = sum over every rank's keys of k' [v, 1] (an all-reduce of
    (m, e + 1) per head); softmax keys take the max over every rank's keys as 1.1.4 takes it over
    the whole sequence (an all-reduce max first).  On the PyTorch feature maps."""
    fmap = resolve(feature_map)
    if fmap.stabilized:
        key_max = project(k, projection_matrix).detach().amax(dim=(-1, -2), keepdim=True)
        dist.all_reduce(key_max, op=dist.ReduceOp.MAX, group=group)
        q_f = softmax_features(q, projection_matrix, is_query=True)
        k_f = softmax_features(k, projection_matrix, is_query=False, key_max=key_max)
    else:
        q_f, k_f = fmap.features(q, k, projection_matrix, causal=False)
    ones = torch.ones_like(v[..., :1])
    sums = _AllReduceSum.apply(k_f.mT @ torch.cat([v, ones], dim=-1), group)  # (b, h, m, e + 1)
    out = q_f @ sums
    return (out[..., :-1] / out[..., -1:]).to(v.dtype)


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
    backward sums the state gradients over ranks).  Non-causal: the key stabilizer all-reduced
    (max), then the key sums (sum), on the PyTorch feature maps.  Not yet: the causal global
    stabilizer (favor_attention refuses a state with it: a ValueError).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("context_parallel_attention needs an initialized torch.distributed process group")
    if not causal:
        if key_stabilizer != "global":
            raise ValueError(f"key_stabilizer={key_stabilizer!r} applies to causal attention only")
        return _noncausal(q, k, v, projection_matrix, feature_map, group)
    kw = dict(causal=True, key_stabilizer=key_stabilizer, feature_map=feature_map)
    # this block's keys alone: their state (the outputs of this pass are not used)
    _, local = favor_attention(q, k, v, projection_matrix, output_final_state=True, **kw)
    before = AttentionState(*_StatesBefore.apply(*local, group))
    return favor_attention(q, k, v, projection_matrix, initial_state=before, **kw)
