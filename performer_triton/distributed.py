"""Context parallelism: FAVOR+ attention over a sequence split across the ranks of a
torch.distributed process group, each rank holding one contiguous block, blocks in rank order.

A rank needs only the attention state (performer_triton.attention_state) of the keys before its
block, never those keys: the traffic per layer is one all-gather of (m, e + 1) states per head,
whatever the sequence length.  The models (Performer, PerformerLM, PerformerEncDec) take the group
as a forward keyword, context_parallel_group, and route a ContextParallel (the group and every
rank's block length) to their layers; windowed heads and token shifts get the neighbouring ranks'
rows they read (with_neighbours).
"""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .attention_state import AttentionState, joined_states, keys_state
from .feature_maps import GIVEN_MAP, check_stateful, resolve
from .functional import FeatureMapArg, _autocast, _connected, favor_attention, linear_attention, pytorch_features
from .torch_backend import ReadContext, autocast_off, finite_base, key_context
from .validation import (BACKENDS, check_bool, check_choice, check_key_stabilizer, check_projection, check_qkv,
                         ignored_unless)

__all__ = ["ContextParallel", "context_parallel_attention", "with_neighbours"]


def _check_initialized(where: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{where} needs an initialized torch.distributed process group")


@dataclass(frozen=True)
class ContextParallel:
    """A sequence split over the ranks of `group` (None: the world) in rank order: this rank's
    index, every rank's block length, and whether any rank has a mask / a context mask (a rank
    without one then uses an all-True one, so that every rank takes part in the same exchanges)."""

    group: dist.ProcessGroup | None
    rank: int
    lengths: tuple[int, ...]
    masked: bool = False
    context_masked: bool = False

    @classmethod
    def gather(cls, n_local: int, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu", *,
               masked: bool = False, context_masked: bool = False, batch: int = -1,
               dtype: torch.dtype | None = None, input_dtype: torch.dtype | None = None,
               where: str = "context parallelism", refused: Exception | None = None,
               model: nn.Module | None = None) -> ContextParallel:
        """Every rank's block length and mask flags (one all-gather of a few ints; device: where
        the group's backend takes tensors, CUDA for NCCL), and a ValueError on every rank, naming
        `where` (the call), where their batch sizes, model dtypes or input dtypes differ, before
        any exchange sized by them (batch -1, a dtype None: not compared), or where the structure of
        `model` differs (its modules' names and types, its parameters' shapes: a token shift or
        windowed heads on one rank only waited in an exchange the others never made).  refused: the error of
        this rank's own checks of the call (local_checks), raised here, after the all-gather, and
        every other rank raises too, instead of waiting for this one in the all-gather."""
        _check_initialized("context parallelism")
        rows = _gathered_ints([int(refused is not None), n_local, int(masked), int(context_masked), batch,
                               _DTYPE_CODES.get(dtype, -1), _DTYPE_CODES.get(input_dtype, -1),
                               -1 if model is None or refused is not None else _structure_code(model)], group, device)
        _raise_refusals(where, [r.pop(0) for r in rows], refused)
        _refuse_differences(f"{where}: the ranks' calls", {"batch": [r[3] for r in rows],
                                                           "dtype": [_dtype_name(r[4]) for r in rows],
                                                           "input dtype": [_dtype_name(r[5]) for r in rows],
                                                           "model structure (a checksum)": [r[6] for r in rows]},
                            "every rank must run the same batch, in the same dtype, on a model of the same dtype "
                            "and structure, each with its own block of the sequence")
        return cls(group, dist.get_rank(group), tuple(r[0] for r in rows), any(r[1] for r in rows),
                   any(r[2] for r in rows))

    @property
    def world(self) -> int:
        return len(self.lengths)

    @property
    def offset(self) -> int:
        """The position of this block's first row in the whole sequence."""
        return sum(self.lengths[: self.rank])

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def peer(self, rank: int) -> int:
        """The global rank of the group's `rank` (what point-to-point calls take)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def rows_from(self, before: int, after: int) -> tuple[int, int]:
        """The rows with_neighbours brings to this rank: from the previous rank's end and the
        next rank's start (0 at the ends of the sequence, at most that rank's length)."""
        r = self.rank
        return (min(before, self.lengths[r - 1]) if r > 0 else 0,
                min(after, self.lengths[r + 1]) if r + 1 < self.world else 0)

    def broadcast_(self, tensors: list[Tensor]) -> None:
        """Copy the group's rank 0 values of `tensors` into every rank's (one flat broadcast)."""
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.broadcast(flat, src=self.peer(0), group=self.group)
        with torch.no_grad():
            for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
                if not torch.equal(t, part.view_as(t)):  # (a copy would bump the version autograd checks)
                    t.copy_(part.view_as(t))


def _exchange(cp: ContextParallel, sends: list[tuple[Tensor, int]], shapes: list[tuple[tuple[int, ...], int]],
              like: Tensor) -> list[Tensor]:
    """Point-to-point: each (tensor, group rank) sent, one tensor of each (shape, group rank)
    received (like's dtype and device), in one batch.  Empty tensors are not sent (both sides
    know the sizes)."""
    ops, received = [], []
    for t, rank in sends:
        if t.numel():
            ops.append(dist.P2POp(dist.isend, t.contiguous(), cp.peer(rank), cp.group))
    for shape, rank in shapes:
        buf = like.new_empty(shape)
        received.append(buf)
        if buf.numel():
            ops.append(dist.P2POp(dist.irecv, buf, cp.peer(rank), cp.group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return received


def _rows(x: Tensor, dim: int, rows: int) -> tuple[int, ...]:
    """x's shape with `rows` along dim."""
    return (*x.shape[:dim], rows, *x.shape[dim + 1:])


class _WithNeighbours(torch.autograd.Function):
    """x (this rank's block along dim) -> [previous rank's last `before` rows, x, next rank's
    first `after` rows]; the backward sends those rows' gradients back to their ranks."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, before: int, after: int, cp: ContextParallel) -> Tensor:
        r, n = cp.rank, x.shape[dim]
        got_before, got_after = cp.rows_from(before, after)
        # what the neighbours take of this block: the next rank its last rows, the previous its first
        to_next = min(before, n) if r + 1 < cp.world else 0
        to_prev = min(after, n) if r > 0 else 0
        sends = [(x.narrow(dim, n - to_next, to_next), r + 1), (x.narrow(dim, 0, to_prev), r - 1)]
        receives = [(_rows(x, dim, got_before), r - 1), (_rows(x, dim, got_after), r + 1)]
        prev_rows, next_rows = _exchange(cp, sends, receives, x)
        ctx.dim, ctx.cp, ctx.rows = dim, cp, (got_before, n, got_after, to_next, to_prev)
        return torch.cat([prev_rows, x, next_rows], dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        dim, cp = ctx.dim, ctx.cp
        got_before, n, got_after, to_next, to_prev = ctx.rows
        r = cp.rank
        sends = [(grad.narrow(dim, 0, got_before), r - 1), (grad.narrow(dim, got_before + n, got_after), r + 1)]
        receives = [(_rows(grad, dim, to_next), r + 1), (_rows(grad, dim, to_prev), r - 1)]
        from_next, from_prev = _exchange(cp, sends, receives, grad)
        dx = grad.narrow(dim, got_before, n).clone()
        dx.narrow(dim, n - to_next, to_next).add_(from_next)
        dx.narrow(dim, 0, to_prev).add_(from_prev)
        return dx, None, None, None, None


def with_neighbours(x: Tensor, cp: ContextParallel, *, before: int, after: int = 0, dim: int = 2) -> Tensor:
    """x with the previous rank's last `before` rows in front and the next rank's first `after`
    rows behind, along dim (fewer at the ends of the sequence: ContextParallel.rows_from);
    differentiable.  Bool tensors (masks) travel as uint8.  Rows come from the adjacent ranks
    only: a block whose neighbour holds fewer of the rows it needs (an empty or short block between
    two others) is refused (ValueError); empty blocks at either end take part."""
    dim %= x.dim()
    if x.shape[dim] != cp.lengths[cp.rank]:
        raise ValueError(f"with_neighbours: x has {x.shape[dim]} rows along dim {dim}, but this rank's block holds "
                         f"{cp.lengths[cp.rank]} (block lengths {list(cp.lengths)})")
    starts = [0, *itertools.accumulate(cp.lengths)]
    for r, n in enumerate(cp.lengths):  # what each non-empty block needs, from its neighbours alone
        rows_before, rows_after = min(before, starts[r]), min(after, starts[-1] - starts[r + 1])
        if n and ((r > 0 and cp.lengths[r - 1] < rows_before) or (r + 1 < cp.world and cp.lengths[r + 1] < rows_after)):
            raise ValueError(
                f"with_neighbours: the rows of {max(before, after)} positions around each block come from the "
                f"adjacent ranks, but block {r}'s neighbour holds fewer than it needs: block lengths {list(cp.lengths)}"
            )
    if x.dtype == torch.bool:
        return _WithNeighbours.apply(x.to(torch.uint8), dim, before, after, cp).bool()
    return _WithNeighbours.apply(x, dim, before, after, cp)


def _all_gather(t: Tensor, group) -> list[Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


class _StatesBefore(torch.autograd.Function):
    """The exclusive scan of the ranks' states: this rank's state of its own keys in, the chain of
    the earlier ranks' states (joined_states, from the empty state) out.  Forward: an all-gather of
    the states.  Backward, the reverse scan: rank r's incoming gradient reaches rank j < r's hz
    with the chain's factor exp(ref_j - R_r) (<= 1) and its v_sum unchanged; an all-gather of
    every rank's gradient and R_r, each rank adding what reaches it.  Either way a rank sends one
    state, whatever the number of ranks.  Every rank takes part in both, rank 0 too (its output,
    the empty state, still carries the gradient call).  whole_max: the stabilizer out is the max
    over every rank's keys, later ones too (1.1.4's global stabilizer)."""

    @staticmethod
    def forward(ctx, hz: Tensor, v_sum: Tensor, ref: Tensor, stab: Tensor, group, whole_max: bool):
        rank = dist.get_rank(group)
        gathered = [_all_gather(t, group) for t in (hz, v_sum, ref, stab)]
        b, h, m, e1 = hz.shape
        before = AttentionState.empty(b, h, m, e1 - 1, dtype=hz.dtype, device=hz.device)
        for j in range(rank):
            before = joined_states(before, AttentionState(*(parts[j] for parts in gathered)))
        if whole_max:
            before = before._replace(stab=torch.stack(gathered[3]).amax(0))
        ctx.group, ctx.rank = group, rank
        ctx.save_for_backward(ref, before.ref, hz, v_sum)
        ctx.mark_non_differentiable(before.ref, before.stab)
        return tuple(before)

    @staticmethod
    def backward(ctx, d_hz: Tensor | None, d_v_sum: Tensor | None, _ref, _stab):
        own_ref, chain_ref, hz, v_sum = ctx.saved_tensors  # own_ref: this rank's keys' R; chain_ref: its chain's
        base = finite_base(chain_ref)  # (as joined_states)
        grads = []
        # every rank gathers, whether or not its output reached its loss (an empty block's does not)
        for d, like, factor in ((d_hz, hz, True), (d_v_sum, v_sum, False)):
            d = torch.zeros_like(like) if d is None else d
            parts = _all_gather(d, ctx.group)
            bases = _all_gather(base, ctx.group) if factor else None
            total = torch.zeros_like(d)
            for r in range(ctx.rank + 1, len(parts)):
                scale = (own_ref - bases[r]).exp()[..., None, None] if factor else 1.0
                total = total + parts[r] * scale
            grads.append(total)
        return (*grads, None, None, None, None)


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


def _noncausal(q: Tensor, k: Tensor, v: Tensor, projection_matrix: Tensor | None, fmap, group) -> Tensor:
    """out = q~ C[:e] / q~ C[e], C = sum over every rank's keys of k~ [v, 1]: each rank's keys as a
    state (keys_state), rescaled to the key max over every rank (softmax: 1.1.4 takes it over the
    whole sequence; an all-reduce max of the states' stabilizers), plus the eps part, then an
    all-reduce (sum) of these (m, e + 1) contexts, then the queries read it.  Chunked on the
    PyTorch path, forward and backward, so no (n, m) feature tensor is kept."""
    dtype = v.dtype
    if not fmap.fused:  # a kernel_fn's features, computed in PyTorch, are the rows
        q, k = pytorch_features(q, k, fmap, projection_matrix, causal=False)
        v, projection_matrix, fmap = v.to(q.dtype), None, GIVEN_MAP
    local = keys_state(k, v, projection_matrix, feature_map=fmap)
    key_max = torch.zeros_like(local.stab)
    if fmap.stabilized:
        key_max = local.stab.clone()
        dist.all_reduce(key_max, op=dist.ReduceOp.MAX, group=group)
        key_max = finite_base(key_max)  # (no key on any rank: 0)
    # this rank's keys' part of the context (every factor exp(R - key max) <= 1), summed over ranks
    context = _AllReduceSum.apply(key_context(local.hz, local.ref, key_max, local.v_sum, fmap.eps), group)
    projection = None if projection_matrix is None else projection_matrix.to(q.dtype)
    return ReadContext.apply(q, context, projection, fmap.code).to(dtype)


def _states_before(local: AttentionState, group, whole_max: bool = False) -> AttentionState:
    return AttentionState(*_StatesBefore.apply(*local, group, whole_max))


def _joined(out: Tensor, before: AttentionState) -> Tensor:
    """out, its autograd graph joined to the incoming state's even when out is empty (a rank with
    an empty block): the backward's all-gather then runs on every rank."""
    return out if out.numel() else _connected(out, before.hz, before.v_sum)


T = TypeVar("T")

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3, torch.uint8: 4, torch.int8: 5,
                torch.int16: 6, torch.int32: 7, torch.int64: 8, torch.bool: 9}  # (token ids are exchanged too)


def _structure_code(model: nn.Module) -> int:
    """A checksum of a model's structure: its modules' names and types, its parameters' names and
    shapes (the same on every rank that built the same model; zlib's crc32, not Python's hash,
    which differs between processes)."""
    parts = [f"{name}:{type(module).__name__}" for name, module in model.named_modules()]
    parts += [f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters()]
    return zlib.crc32("|".join(parts).encode())


def group_arg(where: str, group: object) -> dist.ProcessGroup | None:
    """context_parallel_group when it is a ProcessGroup (or None); anything else 1.1.4 took among
    a model's keywords (and ignored) is ignored with a one-time warning: None."""
    return ignored_unless(where, "context_parallel_group", group, getattr(dist, "ProcessGroup", ()),
                          "a torch.distributed ProcessGroup")


def context_parallel_arg(where: str, cp: object) -> ContextParallel | None:
    """A layer's context_parallel (what the models pass it), or None with a one-time warning for
    anything else (1.1.4 took and ignored it, as any keyword)."""
    return ignored_unless(where, "context_parallel", cp, ContextParallel, "the ContextParallel the models pass their "
                          "layers")


def gather_device(group: dist.ProcessGroup | None, like: object) -> torch.device:
    """Where the group's collectives take tensors: like's device when it is a tensor, else CUDA's
    current device for NCCL, the CPU otherwise."""
    if isinstance(like, Tensor):
        return like.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_checks(check: Callable[[], T], group: dist.ProcessGroup | None) -> tuple[T | None, Exception | None]:
    """(check(), None), or with a context-parallel group (None: no group) (None, the ValueError /
    TypeError check raised), for the call's first all-gather to raise on every rank: a rank that
    raised on its own left the others waiting in that all-gather until the group's timeout."""
    if group is None or not (dist.is_available() and dist.is_initialized()):  # (nothing to wait for)
        return check(), None
    try:
        return check(), None
    except (ValueError, TypeError) as error:
        return None, error


def _raise_refusals(where: str, flags: list[int], refused: Exception | None) -> None:
    """After an all-gather of every rank's refusal flag: this rank's own error, or a ValueError
    naming the ranks that refused the call."""
    if refused is not None:
        raise refused
    ranks = [rank for rank, flag in enumerate(flags) if flag]
    if ranks:
        raise ValueError(f"{where}: rank(s) {ranks} of the group refused their call (their error names the "
                         "argument); every rank stops here")


def _map_fingerprint(fmap, device) -> int:
    """A checksum of a kernel_fn's values at fixed points (0 for maps without one, which their code
    names): ranks with different callables would attend differently, without any error.  Probed on
    the CPU first: on the call's device it would wait for the GPU's queue on every attention call."""
    fn = getattr(fmap, "kernel_fn", None)
    if fn is None:
        return 0
    values = None
    for where in dict.fromkeys((torch.device("cpu"), torch.device(device))):
        try:
            with torch.no_grad():
                values = torch.as_tensor(fn(torch.linspace(-3.0, 3.0, 13, device=where))).double().cpu()
            break
        except Exception:  # (a callable that takes no 1-D CPU tensor: tried on the device)
            continue
    if values is None:  # (nor one on the device: not compared)
        return -1
    values = torch.nan_to_num(values, nan=7e9, posinf=8e9, neginf=-8e9).flatten()
    weights = torch.arange(1, values.numel() + 1, dtype=torch.float64)
    return int(torch.round(values * 1e4).mul(weights).sum().item())


def _dtype_name(code: int) -> str:
    """The dtype of a gathered _DTYPE_CODES value, for messages ("other": not a float dtype)."""
    return next((str(d).removeprefix("torch.") for d, c in _DTYPE_CODES.items() if c == code), "other")


def _gathered_ints(mine: list[int], group: dist.ProcessGroup | None, device) -> list[list[int]]:
    """Every rank's list of ints (one all-gather), by rank."""
    t = torch.tensor(mine, dtype=torch.int64, device=device)
    parts = [torch.zeros_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts).tolist()


def _refuse_differences(what: str, fields: dict[str, list], expected: str) -> None:
    """A ValueError naming every field whose values (by rank) differ: the collectives exchange
    buffers sized by them, and a mismatch aborts a gloo rank (a hang with NCCL) instead of naming
    it.  Every rank sees the same values, so every rank raises."""
    differ = [f"{name} {values}" for name, values in fields.items() if len(set(values)) > 1]
    if differ:
        raise ValueError(f"{what} differ in " + ", ".join(differ) + f" (by rank): {expected}")


_CALL_FIELDS = ("batch", "heads", "head dim", "value dim", "projection rows", "dtype", "causal", "feature map",
                "kernel_fn values", "prefix key stabilizer")


def _call_fields(q: Tensor, v: Tensor, projection: Tensor | None, causal: bool, fmap, prefix: bool) -> list[int]:
    m = -1 if projection is None else projection.shape[0]
    return [q.shape[0], q.shape[1], q.shape[-1], v.shape[-1], m, _DTYPE_CODES.get(q.dtype, -1), int(causal), fmap.code,
            _map_fingerprint(fmap, q.device), int(prefix)]


def _check_same_call(group: dist.ProcessGroup | None, mine: list[int] | None, device, refused: Exception | None) -> None:
    """Every rank's call alike but for its block length (one all-gather of a few ints: mine,
    _call_fields'), or refused by its own checks (refused: this rank's error, mine None)."""
    mine = [-1] * len(_CALL_FIELDS) if mine is None else mine
    rows = _gathered_ints([int(refused is not None), *mine], group, device)
    _raise_refusals("context_parallel_attention", [r.pop(0) for r in rows], refused)
    fields = {n: [r[i] for r in rows] for i, n in enumerate(_CALL_FIELDS)}
    fields["dtype"] = [_dtype_name(c) for c in fields["dtype"]]
    _refuse_differences("context_parallel_attention: the ranks' calls", fields,
                        "every rank must pass the same batch, heads, dims, projection, dtype and mode, each with its "
                        "own block of the sequence")


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection_matrix: Tensor | None,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    key_stabilizer: str = "global",
    feature_map: FeatureMapArg = "softmax",
    backend: str = "auto",
) -> Tensor:
    """favor_attention over the whole sequence, this rank's block of it: q, k (b, h, n_local, d),
    v (b, h, n_local, e) -> (b, h, n_local, e); group (default: the world) holds the blocks in
    rank order.  Cross-attention: q and k, v may be blocks of different sequences (non-causal).

    Causal: this block's keys as a state (attention_state.keys_state), an all-gather of the
    states, the chain of the earlier ranks' states (an exclusive scan) as the initial state of
    this block's attention; autograd runs the reverse scan.  With softmax features and
    key_stabilizer="global" (1.1.4's) that state's stabilizer is the max over every rank's keys
    (from the same all-gather).  A kernel_fn's features are computed in PyTorch.
    Non-causal: each rank's keys as a state, their key max all-reduced (max), the key sums
    (m, e + 1) all-reduced (sum), read by the queries; on the chunked PyTorch path.
    feature_map "none" (1.1.4's no_projection) is refused: its keys are normalised over each
    call's sequence.
    """
    _check_initialized("context_parallel_attention")

    def check():
        q_, k_, v_ = _autocast(q, k, v)  # as favor_attention: rotary positions make q, k fp32 under autocast
        check_bool("causal", causal)
        # (keys may be empty here and not elsewhere: cross-attention on a rank without context)
        check_qkv(q_ if k_.shape[2] else q_[..., :0, :], k_, v_, causal=causal)
        check_key_stabilizer(key_stabilizer, causal)
        check_choice("backend", backend, BACKENDS)
        fmap_ = resolve(feature_map)
        check_stateful(fmap_, "context_parallel_attention")
        if fmap_.needs_projection:  # (a wrong one failed on its rank only, in the exchange that followed)
            check_projection(projection_matrix, q_)
        return q_, k_, v_, fmap_

    # this rank's errors are raised on every rank, at the call's all-gather (not before it: the
    # other ranks would wait there)
    checked, refused = local_checks(check, group if group is not None else dist.group.WORLD)
    q, k, v, fmap = checked if refused is None else (q, k, v, None)
    _check_same_call(group, None if refused else _call_fields(q, v, projection_matrix, causal, fmap,
                                                              key_stabilizer == "prefix"),
                     gather_device(group, q), refused)
    if not causal:
        return _noncausal(q, k, v, projection_matrix, fmap, group)  # (the PyTorch path, whatever the backend)
    if fmap.fused:
        # 1.1.4's global stabilizer is the max over every key; a call whose initial state already
        # has that max as its stabilizer keeps it for every query (the prefix stabilizer is the
        # running max from the state's on): the global numbers on the prefix path, fused
        whole = fmap.stabilized and key_stabilizer == "global"
        before = _states_before(keys_state(k, v, projection_matrix, feature_map=fmap), group, whole_max=whole)
        return _joined(favor_attention(q, k, v, projection_matrix, causal=True,
                                       key_stabilizer="prefix" if fmap.stabilized else key_stabilizer,
                                       feature_map=fmap, backend=backend, initial_state=before), before)
    q_f, k_f = pytorch_features(q, k, fmap, projection_matrix, causal=True)  # a kernel_fn's
    return _causal_given(q_f, k_f, v, fmap.causal_eps(k), backend, group)


@autocast_off
def _causal_given(q_f: Tensor, k_f: Tensor, v: Tensor, eps: float, backend: str, group) -> Tensor:
    """Causal context parallelism on features made in PyTorch (fp32 for 16-bit rows), autocast
    off: an enclosing autocast would make linear_attention attend them in 16 bits.  -> v's dtype."""
    v_f = v.to(q_f.dtype)
    before = _states_before(keys_state(k_f, v_f, None, feature_map=GIVEN_MAP), group)
    return _joined(linear_attention(q_f, k_f, v_f, causal=True, eps=eps, backend=backend, initial_state=before),
                   before).to(v.dtype)
