"""performer-pytorch 1.1.4's modules (performer_pytorch/performer_pytorch.py) on performer_triton's
FastAttention: same names, constructor signatures, positional order, defaults, behaviour and
state_dict keys, so a 1.1.4 checkpoint loads with strict=True and gives the same outputs.

New options are keyword-only, after 1.1.4's arguments, and default to 1.1.4's behaviour:
``key_stabilizer`` ("global" | "prefix"), ``exact_mask`` (padded keys excluded from the
normaliser and stabilizer), ``backend`` ("auto" | "triton" | "torch") and ``redraw_seed``.
Fixes that do not change numerics are always on (see the README, "Differences from
performer-pytorch").
"""
from __future__ import annotations

import inspect
import math
import re
from contextlib import contextmanager
from functools import partial, total_ordering
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F
from axial_positional_embedding import AxialPositionalEmbedding
from einops import rearrange, repeat
from local_attention import LocalAttention
from torch import Tensor, nn
from torch.cuda.amp import autocast  # noqa: F401  (a 1.1.4 module-level name)

from .decoding import (DecodingCache, LocalWindowState, favor_state, local_cache_unsupported_reason,
                       rows_dtype_error, seen_keys, transactional)
from .distributed import (ContextParallel, context_parallel_arg, context_parallel_attention, gather_device, group_arg,
                          local_checks, with_neighbours)
from .fast_attention import FastAttention
from . import functional
from . import projection
from .projection import Device, orthogonal_matrix_chunk
from .feature_maps import CAUSAL_EPS, GENERALIZED_EPS, SOFTMAX_EPS, generalized_features, keep_rows, softmax_features
from .reversible import ReversibleSequence, SequentialSequence
from .validation import (DtypeError, InputError, TokenRangeError, check_feature_input, check_int, host_reads,
                         ignored_kwargs, ignored_unless, runs_base_forward, warn_ignored)

# `from performer_triton.performer_pytorch import *` binds what performer-pytorch 1.1.4's module binds, no more
__all__ = [
    "APEX_AVAILABLE", "AbsolutePositionalEmbedding", "Always", "Attention",
    "AxialPositionalEmbedding", "Chunk", "CrossAttention", "F", "FastAttention", "FeedForward",
    "FixedPositionalEmbedding", "LocalAttention", "LooseVersion", "Performer", "PerformerLM",
    "PreLayerNorm", "PreScaleNorm", "PreShiftTokens", "ProjectionUpdater", "ReZero",
    "ReversibleSequence", "SelfAttention", "SequentialSequence", "TORCH_GE_1_8_0",
    "apply_rotary_pos_emb", "autocast", "cast_tuple", "causal_linear_attention",
    "causal_linear_attention_noncuda", "contextmanager", "default", "empty", "exists",
    "find_modules", "gaussian_orthogonal_random_matrix", "generalized_kernel", "get_module_device",
    "linear_attention", "math", "nn", "null_context", "orthogonal_matrix_chunk", "partial",
    "rearrange", "repeat", "rotate_every_two", "shift", "softmax_kernel", "torch"
]

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

T = TypeVar("T")

@total_ordering
class LooseVersion:
    """1.1.4's module-level ``from distutils.version import LooseVersion`` (it compared torch
    versions with it), without distutils (gone in Python 3.12, deprecated before): version strings
    split into numbers and letter runs, compared as lists, as distutils' LooseVersion does."""

    _component = re.compile(r"(\d+|[a-z]+|\.)")

    def __init__(self, vstring: str | None = None):
        if vstring:
            self.parse(vstring)

    def parse(self, vstring: str) -> None:
        self.vstring = vstring
        parts = [part for part in self._component.split(vstring) if part and part != "."]
        self.version = [int(part) if part.isdigit() else part for part in parts]

    def __str__(self) -> str:
        return self.vstring

    def __repr__(self) -> str:
        return f"LooseVersion ('{self}')"

    def _other(self, other: object) -> list | None:
        if isinstance(other, str):
            return LooseVersion(other).version
        return other.version if isinstance(other, LooseVersion) else None

    def __eq__(self, other: object) -> bool:
        version = self._other(other)
        return NotImplemented if version is None else self.version == version

    def __lt__(self, other: object) -> bool:
        version = self._other(other)
        return NotImplemented if version is None else self.version < version


# 1.1.4's module-level flags: no apex needed (half precision runs natively), torch >= 1.8
APEX_AVAILABLE = False
TORCH_GE_1_8_0 = True


@contextmanager
def null_context():
    yield

# helpers


def exists(val) -> bool:
    return val is not None


def empty(tensor: Tensor) -> bool:
    return tensor.numel() == 0


def default(val, d):
    return val if exists(val) else d


def cast_tuple(val) -> tuple:
    return (val,) if not isinstance(val, tuple) else val


def get_module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# errors two entry points raise alike
_CACHE_WITH_CP = "cache: cached decoding runs on one process, not with context parallelism"
_EXACT_MASK_WITH_CP = ("exact_mask with a mask is not supported with context parallelism (1.1.4's masking, exact_mask="
                       "False, is: padded keys' values are zeroed on their rank)")


def find_modules(nn_module: nn.Module, type: type) -> list:
    return [module for module in nn_module.modules() if isinstance(module, type)]


def _check_mask(name: str, mask: object, b: int, n: int, device: torch.device) -> Tensor | None:
    """mask (b, n) bool, True = keep, on the device of what it masks; returned expanded to (b, n)
    when it broadcasts to it (a (1, n) mask shared by the batch: 1.1.4's masked_fill broadcast it)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise DtypeError(f"{name} must be a bool tensor (True = keep), got {mask.dtype}")
    # (!= rather than `in`: under torch.compile `13 in (1, s)` with a symbolic s is False)
    if mask.dim() != 2 or any(m != 1 and m != full for m, full in zip(mask.shape, (b, n))):
        raise ValueError(f"{name} must have shape (batch, length) = ({b}, {n}) or one that broadcasts to it "
                         f"(1 for either), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, the input it masks on {device}")
    return mask.expand(b, n)


def _finite_padded_rows(x: Tensor, keep: Tensor) -> Tensor:
    """x (b, n, dim) with every padded row (keep (b, n) False) that is not finite replaced by
    zeros, by selection (finite rows keep 1.1.4's numbers).  Attention's inputs, so that no NaN
    or inf at a padded position reaches kept outputs or gradients: 1.1.4's masking counts padded
    keys in the normaliser and the key stabilizer, local heads weight padded values by 0, and a
    padded query's zero gradient multiplies its features (0 x NaN = NaN every time).  Also the
    heads q, k, v (b, h, n, d) with keep[:, None]: a finite padded row can overflow in to_q / to_k
    / to_v (fp16 rows ~6e4)."""
    return x.masked_fill(~keep[..., None] & ~torch.isfinite(x).all(-1, keepdim=True), 0.0)


class Always(nn.Module):
    """Returns ``val`` whatever it is called with."""

    def __init__(self, val):
        super().__init__()
        self.val = val

    def forward(self, *args, **kwargs):
        return self.val


# token shifting


def shift(t: Tensor, amount: int, mask: Tensor | None = None) -> Tensor:
    """Shift t (b, n, f) by ``amount`` positions along n (zeros come in); masked positions
    (mask (b, n) False) are zeroed first."""
    if amount == 0:
        return t
    if exists(mask):
        t = t.masked_fill(~mask[..., None], 0.0)
    if abs(amount) >= t.shape[1]:  # all shifted out: F.pad cannot crop below length 0 (n = 0 crashed 1.1.4)
        return torch.zeros_like(t)
    return F.pad(t, (0, 0, amount, -amount), value=0.0)


class PreShiftTokens(nn.Module):
    """Splits the features into len(shifts) segments (plus a remainder left as is), shifts
    segment i by shifts[i] positions, then calls fn. With a DecodingCache it keeps the last
    max(shifts) (masked) input rows instead of the sequence."""

    def __init__(self, shifts: Sequence[int], fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.shifts = tuple(shifts)

    def forward(self, x: Tensor, **kwargs):
        mask = kwargs.get("mask")
        cache = _cache_arg(f"{type(self).__name__}.forward", kwargs.get("cache"))
        cp = context_parallel_arg(f"{type(self).__name__}.forward", kwargs.get("context_parallel"))
        for name, value in (("cache", cache), ("context_parallel", cp)):
            if name in kwargs:
                kwargs[name] = value
        segments = len(self.shifts)
        parts = x.split(x.shape[-1] // segments, dim=-1)
        to_shift, rest = parts[:segments], parts[segments:]
        if exists(cp):
            if mask is None and cp.masked:  # another rank has a mask: exchange all-True rows
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            shifted = self._shift_parallel(to_shift, mask, cp)
        elif cache is None:
            shifted = [shift(t, amount, mask=mask) for t, amount in zip(to_shift, self.shifts)]
        else:
            shifted = self._shift_cached(to_shift, mask, cache)
        return self.fn(torch.cat((*shifted, *rest), dim=-1), **kwargs)

    def _shift_parallel(self, segments: Sequence[Tensor], mask: Tensor | None, cp: ContextParallel) -> list[Tensor]:
        """Shifts across the blocks of a sequence split over ranks: the rows that come in from
        before (after) this block are the previous (next) rank's."""
        before, after = max(0, *self.shifts), max(0, *(-a for a in self.shifts))
        n = segments[0].shape[1]
        wide = with_neighbours(torch.cat(segments, dim=-1), cp, before=before, after=after, dim=1)
        wide_mask = with_neighbours(mask, cp, before=before, after=after, dim=1) if exists(mask) else None
        first, _ = cp.rows_from(before, after)
        width = segments[0].shape[-1]
        return [
            shift(wide[..., i * width : (i + 1) * width], amount, mask=wide_mask)[:, first : first + n]
            for i, amount in enumerate(self.shifts)
        ]

    def _shift_cached(self, segments: Sequence[Tensor], mask: Tensor | None, cache: DecodingCache) -> list[Tensor]:
        if min(self.shifts) < 0:
            raise ValueError(f"shifts {self.shifts} look ahead; incremental decoding needs shifts >= 0")
        rows, n = max(self.shifts), segments[0].shape[1]
        x = torch.cat(segments, dim=-1)  # (b, n, f * segments)
        if exists(mask):
            x = x.masked_fill(~mask[..., None], 0.0)
        history = cache.get(self)
        if history is None:  # the zeros F.pad brings in before the first position
            history = x.new_zeros(x.shape[0], rows, x.shape[-1])
        elif history.dtype != x.dtype:
            raise rows_dtype_error("the token shift's history", history.dtype, x.dtype)
        full = torch.cat((history, x), dim=1)  # (b, rows + n, f * segments)
        cache.set(self, full[:, full.shape[1] - rows :])
        width = segments[0].shape[-1]
        return [
            seg if amount == 0 else full[:, rows - amount : rows - amount + n, i * width : (i + 1) * width]
            for i, (seg, amount) in enumerate(zip(segments, self.shifts))
        ]


# kernel functions (1.1.4's module-level API)


def gaussian_orthogonal_random_matrix(nb_rows: int, nb_columns: int, scaling: int = 0, device: Device = None, *,
                                      generator: torch.Generator | None = None) -> Tensor:
    """projection.gaussian_orthogonal_random_matrix, its orthogonal blocks from this module's
    orthogonal_matrix_chunk as 1.1.4 looks it up at each call (a program may patch it: the patched
    function is called as 1.1.4 calls it, chunk(cols, device=device), drawing from the global RNG;
    with a generator, from the global RNG forked and seeded from it)."""
    chunk = orthogonal_matrix_chunk
    if chunk is AS_DEFINED["orthogonal_matrix_chunk"]:
        return projection.gaussian_orthogonal_random_matrix(nb_rows, nb_columns, scaling, device, generator=generator)
    def draw() -> Tensor:
        return projection.stacked_blocks(nb_rows, nb_columns, scaling, device, lambda cols, dev: chunk(cols, device=dev))

    return draw() if generator is None else _from_forked_rng(draw, device, generator)


def _rng_states(device: Device) -> list[Tensor]:
    """The states of the global generators a draw on device uses: the CPU's, and device's on CUDA."""
    states = [torch.get_rng_state()]
    if device is not None and torch.device(device).type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _same_states(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _set_rng_states(device: Device, states: list[Tensor]) -> None:
    torch.set_rng_state(states[0])
    if len(states) > 1:
        torch.cuda.set_rng_state(states[1], device)


def _from_forked_rng(draw: Callable[[], T], device: Device, generator: torch.Generator) -> T:
    """draw() on the global RNG forked and seeded from generator: a seeded draw (redraw_seed) of
    code that draws from the global RNG (a replaced orthogonal_matrix_chunk, an overridden
    redraw_projection_matrix) stays private (the global stream untouched) and rank-identical."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    on_cuda = device is not None and torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device)] if on_cuda else []):
        torch.manual_seed(seed)
        return draw()


def softmax_kernel(
    data: Tensor,
    *,
    projection_matrix: Tensor,
    is_query: bool,
    normalize_data: bool = True,
    eps: float = SOFTMAX_EPS,
    device=None,
) -> Tensor:
    """1.1.4's positive random features (feature_maps.softmax_features).  data (b, h, n, d),
    projection_matrix (m, d) -> (b, h, n, m). ``device`` is unused (as in 1.1.4)."""
    check_feature_input(data, projection_matrix, "softmax_kernel")
    return softmax_features(data, projection_matrix, is_query=is_query, normalize=normalize_data, eps=eps)


def generalized_kernel(
    data: Tensor,
    *,
    projection_matrix: Tensor | None,
    kernel_fn: Callable[[Tensor], Tensor] = nn.ReLU(),
    kernel_epsilon: float = GENERALIZED_EPS,
    normalize_data: bool = True,
    device=None,
) -> Tensor:
    """1.1.4's generalized features kernel_fn((dn x) @ P^T) + kernel_epsilon
    (feature_maps.generalized_features), (b,h,n,d) -> (b,h,n,m)."""
    check_feature_input(data, projection_matrix, "generalized_kernel", optional=True)
    return generalized_features(data, projection_matrix, kernel_fn, normalize=normalize_data, eps=kernel_epsilon)


def _any_rank(attend: Callable[[Tensor, Tensor, Tensor], Tensor], q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """attend on (B, 1, n, .) rows for features of any rank >= 2 (1.1.4's einsums over '...nd':
    3-D single-head, 5-D grouped heads), leading dims broadcast as einsum broadcasts them."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() < 2:
            raise ValueError(f"{name} must be a tensor of at least 2 dimensions (..., n, d), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if q.shape[-1] == 0 or k.shape[-1] == 0:  # named in the caller's shapes, not the (B, 1, n, .) rows
        raise ValueError(f"q and k must have at least one feature (last dim), got shapes {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if q.dim() == k.dim() == v.dim() == 4 and q.shape[:2] == k.shape[:2] == v.shape[:2]:
        return attend(q, k, v)
    try:
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(f"q, k, v leading dims must broadcast, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}") from None
    rows = [t.expand(*lead, *t.shape[-2:]).reshape(-1, 1, *t.shape[-2:]) for t in (q, k, v)]
    out = attend(*rows)
    return out.reshape(*lead, *out.shape[-2:])


def linear_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Non-causal linear attention on features (1.1.4's name), fused: (q' @ (k'^T v)) / (q' . sum k').
    (..., n, m), (..., s, m), (..., s, e) -> (..., n, e)."""
    return _any_rank(functional.linear_attention, q, k, v)


def causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = CAUSAL_EPS) -> Tensor:
    """Causal linear attention on features (1.1.4's name), fused.  (..., n, m) x2, (..., n, e) -> (..., n, e)."""
    return _any_rank(partial(functional.linear_attention, causal=True, eps=eps), q, k, v)


def causal_linear_attention_noncuda(
    q: Tensor, k: Tensor, v: Tensor, chunk_size: int = 128, eps: float = CAUSAL_EPS
) -> Tensor:
    """1.1.4's chunked CPU variant; chunk_size only set its memory use, the fused op needs none."""
    check_int("chunk_size", chunk_size, 1)
    return causal_linear_attention(q, k, v, eps=eps)


# 1.1.4 looks these module-level functions up when it calls them: a program that replaces one
# (`performer_pytorch.softmax_kernel = f` before or after building its model) has it called
# (FastAttention: create_projection, its forward's features and attention)
AS_DEFINED = {f.__name__: f for f in (orthogonal_matrix_chunk, gaussian_orthogonal_random_matrix, softmax_kernel,
                                      generalized_kernel, linear_attention, causal_linear_attention_noncuda)}


# redraws


class ProjectionUpdater(nn.Module):
    """Counts training-mode calls and redraws every FastAttention projection of ``instance``
    after ``feature_redraw_interval`` calls (period interval + 1, never on the first call).

    Registers ``instance`` as a submodule (so its keys appear twice in the state_dict, as in
    1.1.4). By default redraws draw from the global RNG exactly as 1.1.4 (same matrices, same
    random stream afterwards); DistributedDataParallel's default broadcast_buffers=True copies
    rank 0's projections to every rank at each forward, so replicas stay equal. With ``seed``
    (opt-in) they draw from a private generator seeded with (seed, redraw count): identical on
    every rank without a broadcast, the global RNG untouched. Seed and count are Python ints
    (kept by deepcopy and pickling; a model built on the meta device keeps them too), not
    state_dict entries, so the keys stay 1.1.4's: a run resumed from a state_dict draws its
    redraws from count 0 again unless redraw_count is restored.
    """

    def __init__(self, instance: nn.Module, feature_redraw_interval: int | None, *, seed: int | None = None):
        super().__init__()
        self.instance = instance
        self.feature_redraw_interval = feature_redraw_interval
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))
        self.seeded = seed is not None
        self.redraw_seed = None if seed is None else check_int("seed", seed, 0) % 2**63
        self.redraw_count = 0  # seeded redraws so far

    def fix_projections_(self) -> None:
        self.feature_redraw_interval = None

    def redraw_projections(self) -> None:
        """In training mode: redraw if the interval has elapsed, else count the call. A forward
        recomputed during backward (torch.utils.checkpoint) is not a new call: it must see the
        projections the original forward used. Runs eagerly under torch.compile (it reads the
        counter and may rewrite the projections in place): one graph break per training call,
        none with feature_redraw_interval=None (no redraw can happen: the count, 1.1.4's
        state_dict value, is an in-graph add)."""
        if self.feature_redraw_interval is None and torch.compiler.is_compiling():
            if self.training:
                self.calls_since_last_redraw += 1
            return
        self._redraw_projections()

    @torch.compiler.disable
    def _redraw_projections(self) -> None:
        if not self.training:
            return
        if torch._C._current_graph_task_id() != -1:
            self._recomputed_call()
            return
        interval = self.feature_redraw_interval
        if self.calls_since_last_redraw.is_meta:  # a model on meta (shapes only): no count to read, no draw
            self.calls_since_last_redraw += 1
            return
        if exists(interval) and self.calls_since_last_redraw >= interval:
            # 1.1.4's call, redraw_projection_matrix(device) positionally (subclasses override it with
            # that signature), with 1.1.4's device, get_module_device's (a program may replace that
            # function: called as 1.1.4 calls it); without parameters (1.1.4: StopIteration) or on
            # meta (offloaded weights: a draw could not be copied), the projection's own
            try:
                device = get_module_device(self.instance)
            except StopIteration:
                device = None
            if device is not None and torch.device(device).type == "meta":
                device = None
            generator, before = None, None
            if not self.seeded:
                before = _rng_states(device)
            else:  # (the opt-in: a private generator)
                seed = (self.redraw_seed * 1_000_003 + self.redraw_count) % 2**63
                generator = torch.Generator().manual_seed(seed)
                self.redraw_count += 1
            for fast_attention in find_modules(self.instance, FastAttention):
                redraw = fast_attention.redraw_projection_matrix
                if generator is None:
                    redraw(device)
                elif "generator" in inspect.signature(redraw).parameters:
                    redraw(generator=generator)
                else:  # an override with 1.1.4's signature, redraw_projection_matrix(device)
                    _from_forked_rng(lambda: redraw(device), device, generator)
            self.calls_since_last_redraw.zero_()
            # the global RNG before and after this redraw's draws, for a recomputation of this forward
            self._last_redraw = None if before is None else (device, before, _rng_states(device))
            return
        last = getattr(self, "_last_redraw", None)
        if last is not None and _same_states(_rng_states(last[0]), last[1]):
            # a call that does not redraw from the RNG state the last redraw started from (the same
            # seed set again): a recomputation reaching that state could be either call's
            self._last_redraw = None
        self.calls_since_last_redraw += 1

    def _recomputed_call(self) -> None:
        """A forward recomputed during backward (torch.utils.checkpoint) neither redraws nor
        counts: it must see the projections the original forward used.  Where that forward
        redrew from the global RNG, what it drew next (dropout masks) came after the redraw's
        draws, while checkpoint replays the forward from the RNG state of its start: reaching this
        point with the RNG as it was before that redraw, the
        recomputation moves on to the state after it, so that it draws the forward's masks (calls
        made since, gradient accumulation's micro-batches, reach this point in other states)."""
        last = getattr(self, "_last_redraw", None)
        if last is None:
            return
        device, before, after = last
        if _same_states(_rng_states(device), before):
            _set_rng_states(device, after)

    def forward(self, x: T) -> T:
        """Runs the redraw check (as redraw_projections) and returns x unchanged."""
        self.redraw_projections()
        return x


# wrappers


class ReZero(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(1e-3))
        self.fn = fn

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.fn(x, **kwargs) * self.g


class PreScaleNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module, eps: float = 1e-5):
        super().__init__()
        self.fn = fn
        self.g = nn.Parameter(torch.ones(1))
        self.eps = eps

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        norm = torch.norm(x, dim=-1, keepdim=True).clamp(min=self.eps)
        return self.fn(x / norm * self.g, **kwargs)


class PreLayerNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.fn(self.norm(x), **kwargs)


class Chunk(nn.Module):
    """Applies fn to ``chunks`` pieces of x along ``along_dim`` (bounds feed-forward memory)."""

    def __init__(self, chunks: int, fn: nn.Module, along_dim: int = -1):
        super().__init__()
        self.dim = along_dim
        self.chunks = _check_size("chunks", chunks)  # (1.1.4 took ff_chunks=1.0: its chunks == 1 test passes)
        self.fn = fn

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        if self.chunks == 1:
            return self.fn(x, **kwargs)
        return torch.cat([self.fn(c, **kwargs) for c in x.chunk(self.chunks, dim=self.dim)], dim=self.dim)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, activation=None, glu: bool = False):
        super().__init__()
        activation = default(activation, nn.GELU)
        self.glu = glu
        self.w1 = nn.Linear(dim, dim * mult * (2 if glu else 1))
        self.act = activation()
        self.dropout = nn.Dropout(dropout)
        self.w2 = nn.Linear(dim * mult, dim)

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        """x (..., dim) -> (..., dim). Position-wise, so the keywords a Performer routes to every
        layer (mask, cache) do not concern it."""
        if self.glu:
            x, gate = self.w1(x).chunk(2, dim=-1)
            x = self.act(x) * gate
        else:
            x = self.act(self.w1(x))
        return self.w2(self.dropout(x))


# attention


class Attention(nn.Module):
    """Multi-head FAVOR+ attention; the last ``local_heads`` heads are windowed softmax attention
    (local-attention's LocalAttention, 1.1.4's arguments).

    Keyword-only additions: key_stabilizer ("prefix": leak-free causal), exact_mask (padded keys
    are excluded from the normaliser and stabilizer instead of only having v zeroed), backend.
    ``feature_redraw_interval`` is unused, as in 1.1.4 (the Performer's ProjectionUpdater redraws);
    a value other than the default warns once.
    """

    def __init__(
        self,
        dim: int,
        causal: bool = False,
        heads: int = 8,
        dim_head: int | None = 64,
        local_heads: int = 0,
        local_window_size: int = 256,
        nb_features: int | None = None,
        feature_redraw_interval: int | None = 1000,
        generalized_attention: bool = False,
        kernel_fn: Callable[[Tensor], Tensor] = nn.ReLU(),
        dropout: float = 0.0,
        no_projection: bool = False,
        qkv_bias: bool = False,
        attn_out_bias: bool = True,
        *,
        key_stabilizer: str = "global",
        exact_mask: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        dim = check_int("dim", dim, 1)
        heads = check_int("heads", heads, 1)
        if dim % heads != 0:
            raise InputError(f"dim ({dim}) must be divisible by heads ({heads})")
        dim_head = check_int("dim_head", default(dim_head, dim // heads), 1)
        local_heads = check_int("local_heads", local_heads, 0)
        if local_heads > heads:
            raise InputError(f"local_heads ({local_heads}) must be <= heads ({heads})")
        if feature_redraw_interval != 1000:  # the default is what Performer leaves it at: no warning there
            warn_ignored(type(self).__name__, ["feature_redraw_interval"],
                         "performer-pytorch 1.1.4 ignores it too: a Performer's ProjectionUpdater redraws the "
                         "projections; a layer on its own redraws with fast_attention.redraw_projection_matrix()")
        inner_dim = dim_head * heads
        self.fast_attention = FastAttention(
            dim_head,
            nb_features,
            causal=causal,
            generalized_attention=generalized_attention,
            kernel_fn=kernel_fn,
            no_projection=no_projection,
            key_stabilizer=key_stabilizer,
            backend=backend,
        )
        self.heads = heads
        self.global_heads = heads - local_heads
        self.local_attn = (
            LocalAttention(
                window_size=_check_size("local_window_size", local_window_size),
                causal=causal,
                autopad=True,
                dropout=dropout,
                look_forward=int(not causal),
                rel_pos_emb_config=(dim_head, local_heads),
            )
            if local_heads > 0
            else None
        )
        self.to_q = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.to_out = nn.Linear(inner_dim, dim, bias=attn_out_bias)
        self.dropout = nn.Dropout(dropout)
        self.dim = dim
        self.exact_mask = exact_mask

    @transactional
    def forward(
        self,
        x: Tensor,
        pos_emb: Tensor | None = None,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        context_mask: Tensor | None = None,
        *,
        cache: DecodingCache | None = None,
        context_parallel: ContextParallel | None = None,
        **kwargs,
    ) -> Tensor:
        """x (b, n, dim) -> (b, n, dim).

        pos_emb (1, n, dim_head) rotary sinusoids for the global heads; context (b, s, dim) for
        cross-attention; mask (b, n) / context_mask (b, s) bool, True = keep. With ``cache``
        (causal self-attention), x holds only the new positions and the layer's recurrent state
        is read and updated. context_parallel: x (and context) are this rank's blocks of sequences
        split over ranks (performer_triton.distributed). Other keywords are ignored (with a
        one-time warning), as in 1.1.4.
        """
        ignored_kwargs(f"{type(self).__name__}.forward", kwargs)
        cache = _cache_arg(f"{type(self).__name__}.forward", cache)
        context_parallel = context_parallel_arg(f"{type(self).__name__}.forward", context_parallel)
        _check_input("x", x, self.dim)
        _check_dtype("x", x, self.to_q)
        b, n, _ = x.shape
        h, gh = self.heads, self.global_heads
        cross_attend = exists(context)
        if cross_attend:
            _check_context(context, None, b, self.dim, x.device)
            _check_dtype("context", context, self.to_k)
            context = context.expand(b, -1, -1)  # one context for the whole batch, as 1.1.4's einsums broadcast it
        else:
            context, context_mask = x, default(context_mask, mask)
        mask = _check_mask("mask", mask, b, n, x.device)
        context_mask = _check_mask("context_mask", context_mask, b, context.shape[1], x.device)
        if cross_attend and context.shape[1] == 0 and n > 0 and context_parallel is None:  # (a rank's block may be empty)
            raise ValueError(f"context has length 0 but x has {n} positions: nothing to attend to")
        if cross_attend and exists(mask):
            x = _finite_padded_rows(x, mask)
        if exists(context_mask):  # (self-attention: mask, unless a context_mask of its own was given)
            context = _finite_padded_rows(context, context_mask)
            x = x if cross_attend else context
        if cross_attend and self.local_attn is not None:
            raise InputError("local attention is not compatible with cross attention (local_heads > 0)")
        if gh < h and self.local_attn.rel_pos is not None and (self.to_q.out_features // h) % 2:
            # (1.1.4 builds such a layer too and fails inside local-attention's rotary embedding)
            raise ValueError(f"local attention heads (local_heads={h - gh}) need an even dim_head: local-attention's "
                             f"rotary embedding rotates channel pairs; got dim_head={self.to_q.out_features // h}")
        if exists(context_parallel) and exists(cache):
            raise ValueError(_CACHE_WITH_CP)
        if exists(context_parallel) and context_parallel.masked and mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=x.device)  # another rank has one: take part alike

        # nothing to attend from (1.1.4 failed in torch.cat); a rank's empty block still takes part
        # in its group's exchanges
        if b == 0 or (n == 0 and context_parallel is None):
            return self.dropout(self.to_out(x.new_zeros(b, n, self.to_out.in_features)))
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=h) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if exists(mask):
            q = _finite_padded_rows(q, mask[:, None])
        if exists(context_mask):
            k, v = (_finite_padded_rows(t, context_mask[:, None]) for t in (k, v))
        (q, lq), (k, lk), (v, lv) = ((t[:, :gh], t[:, gh:]) for t in (q, k, v))

        state = cache.get(self) if exists(cache) and not cross_attend else None
        prefill = exists(cache) and not cross_attend and state is None
        key_keep = context_mask if self.exact_mask else None
        fa = self.fast_attention
        if (key_keep is not None and fa.causal and fa.key_stabilizer == "prefix" and fa.feature_map.stabilized
                and torch.compiler.is_compiling()):
            # the masked prefix path reads the mask on the host (a graph break): views of this
            # graph's intermediates live across it are replayed by aot_autograd from their base,
            # which corrupts their shapes (torch 2.13, as for the local heads): hold copies
            q, k, v, lq, lk, lv = (t.clone() for t in (q, k, v, lq, lk, lv))
        outs = []
        if gh > 0:
            if exists(context_mask) and not self.exact_mask:  # 1.1.4: padded keys only lose their values
                v = keep_rows(v, context_mask)
            if exists(pos_emb) and not cross_attend:
                q, k = apply_rotary_pos_emb(q, k, pos_emb)
            # (the result first: a bound outs.append waiting on the stack across the call's graph
            # break made dynamo recompile on every call)
            if exists(state):
                out = state[0].step(q, k, v, key_keep)
            else:
                out = self._global_attention(q, k, v, key_keep, context_parallel)
            outs.append(out)
        if gh < h:
            local_mask = mask
            if self.exact_mask and mask is None:  # so autopad's zero keys are not attended to
                local_mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
            if exists(state):
                out = state[1].step(lq, lk, lv, local_mask)  # (the result first, as above)
            else:
                if torch.compiler.is_compiling():
                    # views of this graph's intermediates handed out of the graph get replayed by
                    # aot_autograd from their base, which corrupts shapes (torch 2.13): hand copies
                    lq, lk, lv = lq.clone(), lk.clone(), lv.clone()
                out = self._local_attention(lq, lk, lv, local_mask, context_parallel)
            outs.append(out)
        if prefill:
            self._start_cache(cache, (q, k, v, key_keep), (lk, lv, mask))

        out = rearrange(torch.cat(outs, dim=1), "b h n d -> b n (h d)")
        return self.dropout(self.to_out(out))

    @torch.compiler.disable
    def _local_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                         cp: ContextParallel | None = None) -> Tensor:
        """local-attention's windowed heads, eagerly: inductor (torch 2.13) compiles their backward
        to wrong gradients (0.4 relative, tests/test_compile.py), so they stay out of the graph.
        Its rotary embedding returns fp32 q, k for 16-bit inputs, which its einsum then meets with
        16-bit v: 16-bit local heads run in fp32.  With context parallelism the block gets the
        window before it (and after it, non-causal) from the neighbouring ranks; its windows
        line up with the whole sequence's when every block but the last is a multiple of the
        window size."""
        wide = (q, k, v) if q.dtype.itemsize >= 4 else (q.float(), k.float(), v.float())
        if cp is None:
            return self._unseen_to_zero(self.local_attn(*wide, input_mask=mask), mask).to(q.dtype)
        la = self.local_attn
        w = la.window_size
        last = max((i for i, n in enumerate(cp.lengths) if n), default=0)  # empty blocks may follow it
        if any(n % w for n in cp.lengths[:last]):  # (an empty block keeps the windows aligned too)
            raise ValueError(
                f"local attention heads with context parallelism need every block before the last non-empty one to "
                f"be a multiple of local_window_size={w} (the windows of the whole sequence), got block "
                f"lengths {list(cp.lengths)}"
            )
        before, after = w * la.look_backward, w * la.look_forward
        wide = [with_neighbours(t, cp, before=before, after=after) for t in wide]
        if exists(mask):
            mask = with_neighbours(mask, cp, before=before, after=after, dim=1)
        first, _ = cp.rows_from(before, after)
        if wide[0].shape[2] == 0:  # no rows here or around (local-attention takes no empty sequence):
            # an empty output still in the exchanges' graph, so that this rank takes part in their backward
            return functional._connected(wide[2], *wide).to(q.dtype)
        out = self._unseen_to_zero(la(*wide, input_mask=mask), mask)  # (blocks start at a window)
        return out[:, :, first : first + q.shape[2]].to(q.dtype)

    def _padded_rows_zero(self) -> bool:
        """Whether a causal local query that sees no kept key gets 0 (key_stabilizer="prefix" or
        exact_mask, the opt-ins), not 1.1.4's uniform average over its whole window, whose later
        positions then reach kept outputs through the next layer's normaliser: a future leak."""
        return self.local_attn.causal and (self.exact_mask or self.fast_attention.key_stabilizer == "prefix")

    def _unseen_to_zero(self, out: Tensor, mask: Tensor | None) -> Tensor:
        """out (b, h, n, e) of the local heads, rows without a visible kept key zeroed where
        _padded_rows_zero; mask (b, n) starts at a window boundary."""
        if mask is None or not self._padded_rows_zero():
            return out
        return keep_rows(out, seen_keys(mask, self.local_attn.window_size))

    def _global_attention(self, q: Tensor, k: Tensor, v: Tensor, key_keep: Tensor | None,
                          cp: ContextParallel | None = None) -> Tensor:
        fa = self.fast_attention
        if cp is None:  # 1.1.4's call without a mask: subclasses override forward(self, q, k, v)
            return fa(q, k, v) if key_keep is None else fa(q, k, v, key_padding_mask=key_keep)
        if key_keep is not None:
            raise ValueError(_EXACT_MASK_WITH_CP)
        return context_parallel_attention(
            q, k, v, None if fa.no_projection else fa.projection_matrix, group=cp.group, causal=fa.causal,
            key_stabilizer=fa.key_stabilizer, feature_map=fa.feature_map, backend=fa.backend,
        )

    def _start_cache(self, cache: DecodingCache, global_kv: tuple, local_kv: tuple) -> None:
        q, k, v, key_keep = global_kv
        favor = None
        if not empty(q):
            favor = favor_state(self.fast_attention, k, v)
            favor.extend(k, v, key_keep)
        local = None
        if exists(self.local_attn):
            lk, lv, mask = local_kv
            local = LocalWindowState(self.local_attn, zero_unseen=self._padded_rows_zero())
            local.extend(lk, lv, mask)
        cache.set(self, (favor, local))

    def cache_unsupported_reason(self) -> str | None:
        """Why cached decoding cannot reproduce this layer (None when it can)."""
        fa = self.fast_attention
        if not runs_base_forward(fa, FastAttention):
            return (f"its fast_attention ({type(fa).__name__}) has a forward of its own, which a cached step would "
                    "not call (it updates the attention state instead)")
        if not fa.causal:
            return "attention is not causal (causal=False): every position attends to later positions"
        return local_cache_unsupported_reason(self.local_attn) if exists(self.local_attn) else None


def _check_context(context: object, context_mask: object, b: int, dim: int, device: torch.device) -> None:
    """A cross-attention context (b or 1, s, dim) on device, and its mask (None: not checked here),
    as attention checks them; the models check them first too under context parallelism, where a
    rank that refused them in a layer left the others waiting in an exchange."""
    _check_input("context", context, dim)
    if context.shape[0] != 1 and context.shape[0] != b:  # (not `in`: symbolic sizes, _check_mask)
        raise ValueError(f"context has batch {context.shape[0]}, x has {b} (context's batch must be x's or 1)")
    if context.device != device:
        raise ValueError(f"context is on {context.device}, x on {device}")
    if context_mask is not None:
        _check_mask("context_mask", context_mask, b, context.shape[1], device)


def _check_cross_inputs(model: nn.Module, kwargs: dict, batch: int, dim: int, device) -> None:
    """With context parallelism, what model's cross-attention layers check after the exchanges
    have begun (where one rank's error would leave the others waiting): a context given, of the
    shape and dtype they take.  A model without cross-attention ignores a context, as in 1.1.4."""
    cross = next((m for m in model.modules() if isinstance(m, CrossAttention)), None)
    if cross is None:
        return
    if kwargs.get("context") is None:
        raise InputError("cross attention should receive context")
    _check_context(kwargs["context"], kwargs.get("context_mask"), batch, dim, device)
    _check_dtype("context", kwargs["context"], cross.to_k)


def _check_input(name: str, x: object, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (batch, length, {dim}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DtypeError(f"{name} must have a floating-point dtype (embeddings, not token ids), got {x.dtype}")


def _check_dtype(name: str, x: Tensor, linear: nn.Module) -> None:
    """x in the dtype of the plain nn.Linear it enters (whose own error names neither; 1.1.4
    crashed there too).  Under torch.autocast nn.Linear casts, and a replaced projection
    (quantized, LoRA) may take other dtypes: both are left to torch."""
    weight = linear.weight if type(linear) is nn.Linear else None
    if weight is not None and x.dtype != weight.dtype and not (
            torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)):
        raise DtypeError(f"{name} has dtype {x.dtype} but the module's parameters are {weight.dtype}: cast {name} "
                        f"(.to({weight.dtype})) or the module, or run under torch.autocast")


def _model_dtype(model: nn.Module, x: Tensor) -> torch.dtype:
    """The dtype of a model's floating parameters (what its ranks exchange under context
    parallelism: the projection matrices, the hidden states), else x's."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)


def _cache_arg(where: str, cache: object) -> DecodingCache | None:
    """cache when it is a DecodingCache; anything else 1.1.4 took (and ignored) among a layer's
    keywords is ignored with a one-time warning: None."""
    return ignored_unless(where, "cache", cache, DecodingCache, "a performer_triton DecodingCache")


def _check_cache_batch(cache: object, x: object) -> None:
    """A DecodingCache's states hold one row per sequence: the same batch on every call."""
    if isinstance(cache, DecodingCache) and isinstance(x, Tensor) and x.dim() == 3:
        cache.check_batch(x.shape[0])


class SelfAttention(Attention):
    @transactional  # (the batch check too: a layer used on its own)
    def forward(self, *args, context: Tensor | None = None, **kwargs) -> Tensor:
        if exists(context):
            raise InputError("self attention should not receive context")
        _check_cache_batch(kwargs.get("cache"), args[0] if args else kwargs.get("x"))  # a layer used on its own
        return super().forward(*args, **kwargs)


class CrossAttention(Attention):
    def forward(self, *args, context: Tensor | None = None, **kwargs) -> Tensor:
        if not exists(context):
            raise InputError("cross attention should receive context")
        return super().forward(*args, context=context, **kwargs)


# positional embeddings


def _check_size(name: str, value: object) -> int:
    """A size as an int >= 1; an integral float (16.0) is taken, as 1.1.4 built its embeddings (and
    local windows) from one; a fractional one (1.1.4: one position more than it says, or a crash
    in F.pad) is a TypeError."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return check_int(name, value, 1)


class AbsolutePositionalEmbedding(nn.Module):
    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, x: Tensor, *, offset: int = 0) -> Tensor:
        """Embeddings of positions offset .. offset + x.shape[1] - 1 -> (n, dim)."""
        return self.emb(torch.arange(offset, offset + x.shape[1], device=x.device))


def rotate_every_two(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) over the last dim."""
    x = rearrange(x, "... (d j) -> ... d j", j=2)
    x1, x2 = x.unbind(dim=-1)
    return rearrange(torch.stack((-x2, x1), dim=-1), "... d j -> ... (d j)")


def apply_rotary_pos_emb(q: Tensor, k: Tensor, sinu_pos: Tensor) -> tuple[Tensor, Tensor]:
    """GPT-J style rotary embedding (interleaved pairs).  q, k (b, h, n, d), sinu_pos (1, n, d)
    holding [sin | cos] halves."""
    sinu_pos = rearrange(sinu_pos, "() n (j d) -> n j d", j=2)
    sin, cos = sinu_pos.unbind(dim=-2)
    sin, cos = (repeat(t, "b n -> b (n j)", j=2) for t in (sin, cos))
    return tuple((t * cos) + (rotate_every_two(t) * sin) for t in (q, k))


class FixedPositionalEmbedding(nn.Module):
    """Buffer emb (max_seq_len, dim) = [sin(pos f) | cos(pos f)], f = 1 / 10000^(2i / dim)."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        if check_int("dim", dim, 2) % 2:
            raise ValueError(f"dim must be even for sinusoidal embeddings, got {dim}")
        max_seq_len = _check_size("max_seq_len", max_seq_len)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        position = torch.arange(0, max_seq_len, dtype=torch.float)
        sinusoid_inp = torch.einsum("i,j->ij", position, inv_freq)
        self.register_buffer("emb", torch.cat((sinusoid_inp.sin(), sinusoid_inp.cos()), dim=-1))

    def forward(self, x: Tensor, *, offset: int = 0) -> Tensor:
        """Rows offset .. offset + x.shape[1] - 1 -> (1, n, dim) in x's dtype."""
        return self.emb[None, offset : offset + x.shape[1], :].to(x)


def _positions(module: nn.Module, x: Tensor, offset: int, total: int) -> Tensor | None:
    """A positional module's output for positions offset .. offset + n - 1 of x (b, n, dim), of a
    sequence of `total` positions (more than offset + n when x is one rank's block)."""
    if isinstance(module, Always):
        return module.val
    if isinstance(module, (FixedPositionalEmbedding, AbsolutePositionalEmbedding)):
        return module(x, offset=offset)
    # AxialPositionalEmbedding embeds from position 0 and only reads x's shape and dtype
    b, n, dim = x.shape
    if total > module.max_seq_len:
        raise ValueError(
            f"sequence length {total} exceeds the {module.max_seq_len} positions of axial_position_shape "
            f"{tuple(module.shape)}"
        )
    return module(x.new_zeros(()).expand(b, offset + n, dim))[:, offset:]


# performer


class Performer(nn.Module):
    """depth x [attention, feed-forward] residual layers (plus a cross-attention layer pair per
    depth with cross_attend), pre-normed (LayerNorm, ScaleNorm or ReZero), optionally reversible
    and token-shifted, with a ProjectionUpdater that redraws the random features.

    1.1.4's 25 arguments in 1.1.4's positional order; keyword-only additions: key_stabilizer,
    exact_mask, backend (passed to every attention layer; cross-attention keeps "global") and
    redraw_seed (opt-in: ProjectionUpdater draws from a generator seeded with it instead of
    the global RNG).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        local_attn_heads: int | tuple[int, ...] = 0,
        local_window_size: int = 256,
        causal: bool = False,
        ff_mult: int = 4,
        nb_features: int | None = None,
        feature_redraw_interval: int | None = 1000,
        reversible: bool = False,
        ff_chunks: int = 1,
        generalized_attention: bool = False,
        kernel_fn: Callable[[Tensor], Tensor] = nn.ReLU(),
        use_scalenorm: bool = False,
        use_rezero: bool = False,
        ff_glu: bool = False,
        ff_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        cross_attend: bool = False,
        no_projection: bool = False,
        auto_check_redraw: bool = True,
        qkv_bias: bool = True,
        attn_out_bias: bool = True,
        shift_tokens: bool = False,
        *,
        key_stabilizer: str = "global",
        exact_mask: bool = False,
        backend: str = "auto",
        redraw_seed: int | None = None,
    ):
        super().__init__()
        depth = check_int("depth", depth, 0)  # 0: no layers (1.1.4 builds an embedding-only model)
        heads = check_int("heads", heads, 1)
        local_attn_heads = cast_tuple(local_attn_heads)
        local_attn_heads = local_attn_heads * depth if len(local_attn_heads) == 1 else local_attn_heads
        if len(local_attn_heads) != depth:
            raise InputError(
                f"local_attn_heads must give one count per layer: got {len(local_attn_heads)} for depth {depth}"
            )
        for count in local_attn_heads:
            if check_int("local_attn_heads", count, 0) > heads:
                raise InputError(f"local_attn_heads ({count}) must be <= heads ({heads})")

        if use_scalenorm:
            wrapper_fn = partial(PreScaleNorm, dim)
        elif use_rezero:
            wrapper_fn = ReZero
        else:
            wrapper_fn = partial(PreLayerNorm, dim)

        shared = dict(
            heads=heads,
            dim_head=dim_head,
            nb_features=nb_features,
            generalized_attention=generalized_attention,
            kernel_fn=kernel_fn,
            dropout=attn_dropout,
            no_projection=no_projection,
            qkv_bias=qkv_bias,
            attn_out_bias=attn_out_bias,
            exact_mask=exact_mask,
            backend=backend,
        )

        def feed_forward() -> nn.Module:
            return Chunk(ff_chunks, FeedForward(dim, mult=ff_mult, dropout=ff_dropout, glu=ff_glu), along_dim=1)

        layers = nn.ModuleList([])
        for local_heads in local_attn_heads:
            attn = SelfAttention(
                dim,
                causal=causal,
                local_heads=local_heads,
                local_window_size=local_window_size,
                key_stabilizer=key_stabilizer,
                **shared,
            )
            ff = feed_forward()
            if shift_tokens:
                shifts = (0, 1) if causal else (-1, 0, 1)
                attn, ff = PreShiftTokens(shifts, attn), PreShiftTokens(shifts, ff)
            layers.append(nn.ModuleList([wrapper_fn(attn), wrapper_fn(ff)]))
            if cross_attend:
                layers.append(nn.ModuleList([wrapper_fn(CrossAttention(dim, **shared)), wrapper_fn(feed_forward())]))

        n_layers = len(layers)
        route_attn = ((True, False),) * n_layers
        route_context = ((False, False), (True, False)) * depth
        # exact_mask: the feed-forward token shift also zeroes padded positions (1.1.4 routes no mask there)
        route_mask = ((True, exact_mask),) * n_layers
        # attention layers, and the token shifts of both halves of a self-attention layer: what the
        # cache and context parallelism concern (a feed-forward a program swaps in may take neither)
        route_state = tuple((True, shift_tokens and i % (1 + cross_attend) == 0) for i in range(n_layers))
        args_route = {"mask": route_mask, "pos_emb": route_attn, "cache": route_state, "context_parallel": route_state}
        if cross_attend:
            args_route.update(context=route_context, context_mask=route_context)
        execute_type = ReversibleSequence if reversible else SequentialSequence
        self.net = execute_type(layers, args_route=args_route)

        self.auto_check_redraw = auto_check_redraw
        self.proj_updater = ProjectionUpdater(self.net, feature_redraw_interval, seed=redraw_seed)
        self.causal = causal
        self.shift_tokens = shift_tokens
        self.dim = dim

    def fix_projection_matrices_(self) -> None:
        self.proj_updater.feature_redraw_interval = None

    def check_redraw_projections(self) -> None:
        """Run the redraw check now (what forward does first when auto_check_redraw)."""
        self.proj_updater.redraw_projections()

    def cache_unsupported_reason(self) -> str | None:
        """Why cached decoding cannot reproduce a full recomputation (None when it can)."""
        if not self.causal:
            return "the model is not causal (causal=False): every position attends to later positions"
        attentions = [m for m in self.net.modules() if isinstance(m, SelfAttention)]
        for attn in attentions:
            reason = attn.cache_unsupported_reason()
            if reason:
                return reason
        global_layers = [
            i
            for i, attn in enumerate(attentions)
            if attn.global_heads > 0
            and attn.fast_attention.feature_map.stabilized
            and attn.fast_attention.key_stabilizer == "global"
        ]
        if global_layers and (global_layers[0] < len(attentions) - 1 or self.shift_tokens):
            return (
                "key_stabilizer='global' normalises each layer by the max over all keys, so the outputs of "
                "earlier positions change as tokens arrive and the next layer's cached state would go stale "
                "(performer-pytorch #82); build the model with key_stabilizer='prefix' to decode with a cache"
            )
        return None

    @transactional
    def forward(self, x: Tensor, *, context_parallel_group: ProcessGroup | None = None, **kwargs) -> Tensor:
        """x (b, n, dim) -> (b, n, dim); keywords (mask, pos_emb, context, context_mask, cache) are
        routed to the layers that take them, any other is ignored
        with a one-time warning, as in 1.1.4.

        context_parallel_group: x (and context, mask, pos_emb) are this rank's contiguous blocks
        of sequences split over the group's ranks in rank order (performer_triton.distributed);
        the output is this rank's block of the whole sequence's.  Every rank's projections are
        first set to the group's rank 0 ones (one broadcast), so all ranks attend alike."""
        context_parallel_group = group_arg(f"{type(self).__name__}.forward", context_parallel_group)
        if "context_parallel" in kwargs:  # (the models' own keyword to their layers: not from a caller)
            kwargs["context_parallel"] = context_parallel_arg(f"{type(self).__name__}.forward",
                                                              kwargs["context_parallel"])

        def check() -> Tensor | None:
            _check_input("x", x, self.dim)
            if exists(context_parallel_group):  # what the layers check after the exchanges: here for every rank
                if isinstance(kwargs.get("cache"), DecodingCache):  # (another value is ignored, as without)
                    raise ValueError(_CACHE_WITH_CP)
                _check_cross_inputs(self, kwargs, x.shape[0], self.dim, x.device)
                pos_emb = kwargs.get("pos_emb")
                if isinstance(pos_emb, Tensor) and pos_emb.dim() >= 2 and pos_emb.shape[-2] not in (1, x.shape[1]):
                    raise ValueError(f"pos_emb must hold this rank's {x.shape[1]} positions (dim -2), got shape "
                                     f"{tuple(pos_emb.shape)}")
            if kwargs.get("mask") is not None:  # expanded for the token shifts and context parallelism too
                return _check_mask("mask", kwargs["mask"], x.shape[0], x.shape[1], x.device)
            return None

        mask, refused = local_checks(check, context_parallel_group)  # (context parallelism: raised on every rank)
        if mask is not None:
            kwargs["mask"] = mask
            # the residual stream too, not only attention's inputs: a NaN row's feed-forward backward
            # sends NaN (0 x NaN) into attention's padded query rows, and from there into kept keys
            x = _finite_padded_rows(x, mask)
        if exists(context_parallel_group):  # (a call any rank refused raises on every rank here)
            ok = refused is None
            kwargs["context_parallel"] = ContextParallel.gather(
                x.shape[1] if ok else 0, context_parallel_group, gather_device(context_parallel_group, x),
                masked=kwargs.get("mask") is not None, context_masked=kwargs.get("context_mask") is not None,
                batch=x.shape[0] if ok else -1, dtype=_model_dtype(self, x) if ok else None,
                input_dtype=x.dtype if ok else None, where="Performer.forward", refused=refused, model=self)
        # counted once the call is known to run on every rank: a refused one leaves every rank's
        # redraw counter (and projections) as they were
        if self.auto_check_redraw and self.proj_updater.training:  # eval: nothing to check
            self.proj_updater.redraw_projections()
        cp = kwargs.get("context_parallel")
        if exists(cp):
            if (cp.masked or cp.context_masked) and any(m.exact_mask for m in find_modules(self, Attention)):
                raise ValueError(_EXACT_MASK_WITH_CP)
            cp.broadcast_([m.projection_matrix for m in find_modules(self, FastAttention)])
        cache = _cache_arg(f"{type(self).__name__}.forward", kwargs.pop("cache", None))
        if exists(cache):
            kwargs["cache"] = cache
            reason = self.cache_unsupported_reason()
            if reason:
                raise ValueError(f"cache: cached decoding is not exact here: {reason}")
            _check_cache_batch(cache, x)
        out = self.net(x, **kwargs)
        if exists(cache):
            cache.length += x.shape[1]
        return out


class PerformerLM(nn.Module):
    """Token embedding + positional embedding (rotary, axial or absolute) + Performer + LayerNorm
    + logits (tied to the token embedding with tie_embed). 1.1.4's keyword-only arguments;
    additions: key_stabilizer, exact_mask, backend, redraw_seed (see Performer)."""

    def __init__(
        self,
        *,
        num_tokens: int,
        max_seq_len: int,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int = 64,
        local_attn_heads: int | tuple[int, ...] = 0,
        local_window_size: int = 256,
        causal: bool = False,
        ff_mult: int = 4,
        nb_features: int | None = None,
        feature_redraw_interval: int | None = 1000,
        reversible: bool = False,
        ff_chunks: int = 1,
        ff_glu: bool = False,
        emb_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        generalized_attention: bool = False,
        kernel_fn: Callable[[Tensor], Tensor] = nn.ReLU(),
        use_scalenorm: bool = False,
        use_rezero: bool = False,
        cross_attend: bool = False,
        no_projection: bool = False,
        tie_embed: bool = False,
        rotary_position_emb: bool = True,
        axial_position_emb: bool = False,
        axial_position_shape: tuple[int, int] | None = None,
        auto_check_redraw: bool = True,
        qkv_bias: bool = False,
        attn_out_bias: bool = False,
        shift_tokens: bool = False,
        key_stabilizer: str = "global",
        exact_mask: bool = False,
        backend: str = "auto",
        redraw_seed: int | None = None,
    ):
        super().__init__()
        num_tokens = check_int("num_tokens", num_tokens, 1)
        self.max_seq_len = max_seq_len = _check_size("max_seq_len", max_seq_len)
        self.token_emb = nn.Embedding(num_tokens, dim)

        if rotary_position_emb:
            self.pos_emb = FixedPositionalEmbedding(dim, max_seq_len)
            # checked here, so the message names dim_head, not the embedding's own argument
            if check_int("dim_head", dim_head, 2) % 2:
                raise ValueError(f"dim_head must be even for the rotary position embedding (rotary_position_emb=True, "
                                 f"the default), got {dim_head}")
            self.layer_pos_emb = FixedPositionalEmbedding(dim_head, max_seq_len)
        elif axial_position_emb:
            axial_position_shape = default(axial_position_shape, (math.ceil(max_seq_len / 64), 64))
            self.pos_emb = AxialPositionalEmbedding(dim, axial_position_shape)
            self.layer_pos_emb = Always(None)
        else:
            self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len)
            self.layer_pos_emb = Always(None)

        self.dropout = nn.Dropout(emb_dropout)
        self.performer = Performer(
            dim, depth, heads, dim_head, local_attn_heads, local_window_size, causal, ff_mult, nb_features,
            feature_redraw_interval, reversible, ff_chunks, generalized_attention, kernel_fn, use_scalenorm,
            use_rezero, ff_glu, ff_dropout, attn_dropout, cross_attend, no_projection, auto_check_redraw,
            qkv_bias, attn_out_bias, shift_tokens,
            key_stabilizer=key_stabilizer, exact_mask=exact_mask, backend=backend, redraw_seed=redraw_seed,
        )  # fmt: skip
        self.norm = nn.LayerNorm(dim)
        self.to_out = nn.Linear(dim, num_tokens) if not tie_embed else None

    def check_redraw_projections(self) -> None:
        self.performer.check_redraw_projections()

    def fix_projection_matrices_(self) -> None:
        self.performer.fix_projection_matrices_()

    def cache_unsupported_reason(self) -> str | None:
        """Why cached decoding cannot reproduce a full recomputation (None when it can)."""
        return self.performer.cache_unsupported_reason()

    @transactional  # (the final norm and the logits too: a failure there leaves the cache as it was)
    def forward(
        self, x: Tensor, return_encodings: bool = False, *, cache: DecodingCache | None = None,
        context_parallel_group: ProcessGroup | None = None, **kwargs
    ) -> Tensor:
        """Token ids x (b, n) -> logits (b, n, num_tokens), or the final encodings (b, n, dim).

        kwargs: mask (b, n) bool, context (b, s, dim), context_mask (b, s) bool. With ``cache``
        (a DecodingCache), x holds only the tokens after those the cache has seen.
        context_parallel_group: x (mask, context, context_mask) are this rank's contiguous blocks
        of sequences split over the group's ranks in rank order; positions count from the
        block's offset in the whole sequence (performer_triton.distributed).
        """
        cache = _cache_arg(f"{type(self).__name__}.forward", cache)
        context_parallel_group = group_arg(f"{type(self).__name__}.forward", context_parallel_group)
        if "context_parallel" in kwargs:
            kwargs["context_parallel"] = context_parallel_arg(f"{type(self).__name__}.forward",
                                                              kwargs["context_parallel"])

        def check() -> None:
            if not isinstance(x, Tensor):
                raise TypeError(f"x must be a torch.Tensor of token ids, got {type(x).__name__}")
            if x.dim() != 2:
                raise ValueError(f"x must have shape (batch, length), got {tuple(x.shape)}")
            if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                raise DtypeError(f"x must hold integer token ids, got {x.dtype}")
            vocab = self.token_emb.num_embeddings
            # a value check needs the data: eager only (under torch.compile the embedding checks, as in 1.1.4)
            if host_reads(x) and x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
                raise TokenRangeError(f"x holds token ids outside [0, {vocab}) (num_tokens={vocab}): min "
                                      f"{int(x.min())}, max {int(x.max())}")
            if exists(context_parallel_group):  # what the layers check after the exchanges: here for every rank
                if exists(cache):
                    raise ValueError(_CACHE_WITH_CP)
                _check_mask("mask", kwargs.get("mask"), x.shape[0], x.shape[1], x.device)
                _check_cross_inputs(self, kwargs, x.shape[0], self.performer.dim, x.device)

        _, refused = local_checks(check, context_parallel_group)  # (context parallelism: raised on every rank)
        cp = None
        if exists(context_parallel_group):
            ok = refused is None
            cp = ContextParallel.gather(x.shape[1] if ok else 0, context_parallel_group,
                                        gather_device(context_parallel_group, x),
                                        masked=kwargs.get("mask") is not None,
                                        context_masked=kwargs.get("context_mask") is not None,
                                        batch=x.shape[0] if ok else -1, dtype=_model_dtype(self, x) if ok else None,
                                        where="PerformerLM.forward", refused=refused, model=self)
            offset, n = cp.offset, cp.total
        else:
            offset = cache.length if exists(cache) else 0
            n = offset + x.shape[1]
        if n > self.max_seq_len:
            what = f"sequence length {n}" if offset == 0 or exists(cp) else \
                f"cached length {offset} + new length {x.shape[1]} = {n}"
            raise InputError(f"{what} exceeds max_seq_len {self.max_seq_len}")

        # the embedding takes int32 / int64 ids only (uint8, int16 ids crashed in 1.1.4)
        x = self.token_emb(x if x.dtype in (torch.int32, torch.int64) else x.long())
        x = x + _positions(self.pos_emb, x, offset, n)
        x = self.dropout(x)
        layer_pos_emb = _positions(self.layer_pos_emb, x, offset, n)
        if exists(cp):
            kwargs["context_parallel"] = cp
        if exists(cache):  # routed only when given: a layer a user swapped in may not take it (1.1.4 routes only what it gets)
            kwargs["cache"] = cache
        x = self.performer(x, pos_emb=layer_pos_emb, **kwargs)
        x = self.norm(x)
        if return_encodings:
            return x
        if exists(self.to_out):
            return self.to_out(x)
        return x @ self.token_emb.weight.t()
