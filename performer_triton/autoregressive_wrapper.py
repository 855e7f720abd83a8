"""performer-pytorch 1.1.4's AutoregressiveWrapper (next-token loss and sampling), with cached
generation: each new token updates per-layer recurrent state instead of re-running the window."""
from __future__ import annotations

import math
import numbers
from functools import partial  # noqa: F401  (a 1.1.4 module-level name)
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence  # noqa: F401  (a 1.1.4 module-level name)

from .decoding import DecodingCache
from .distributed import ContextParallel, gather_device, group_arg, local_checks, with_neighbours
from .performer_pytorch import PerformerLM, _check_mask, exists
from .validation import calls_observed, check_int, warn_ignored

# `from performer_triton.autoregressive_wrapper import *` binds what performer-pytorch 1.1.4's module binds, no more
__all__ = [
    "AutoregressiveWrapper", "F", "exists", "nn", "pad_sequence", "partial",
    "repetition_penalty_fn", "top_k", "top_p", "torch"
]

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def top_p(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Nucleus filter: keep the most likely tokens whose cumulative probability stays within
    1 - thres (always the first); the rest become -inf.  logits (b, vocab)."""
    _check_thres(thres)
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cum_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum_probs > (1 - thres)
    remove[:, 1:] = remove[:, :-1].clone()
    remove[:, 0] = False
    sorted_logits[remove] = float("-inf")
    return sorted_logits.scatter(1, sorted_indices, sorted_logits)


def _check_thres(thres: object) -> None:
    if isinstance(thres, bool) or not isinstance(thres, (numbers.Real, Tensor)):
        raise TypeError(f"filter_thres must be a number, got {type(thres).__name__} {thres!r}")


def top_k(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Keep the int((1 - thres) * vocab) largest logits; the rest become -inf.  logits (b, vocab)."""
    _check_thres(thres)
    vocab = logits.shape[-1]
    wanted = (1 - thres) * vocab
    # where 1.1.4 crashed (torch.topk: more than vocab or a negative count; int(NaN)); a thres a little
    # below 0 that still asks for at most vocab logits keeps them all, as in 1.1.4
    if wanted != wanted or thres > 1 or int(wanted) > vocab:
        raise ValueError(f"filter_thres (top_k's thres) must be in [0, 1]: top_k keeps int((1 - thres) * vocab) "
                         f"of the {vocab} logits, got thres {thres}")
    k = max(1, int(wanted))  # 1.1.4 kept 0 tokens for small vocabularies (a crash)
    val, ind = torch.topk(logits, k)
    probs = torch.full_like(logits, float("-inf"))
    probs.scatter_(1, ind, val)
    return probs


def repetition_penalty_fn(logits: Tensor, ctx: Tensor, theta: float = 1.2) -> Tensor:
    """1.1.4's penalty: divide the logits (b, vocab) of every token that occurs anywhere in ctx
    (token ids, any shape) by theta, in every row."""
    weights = torch.ones(logits.shape[-1], dtype=torch.float, device=logits.device)
    weights[torch.unique(ctx)] = theta
    return logits / weights


def _penalize_rows(logits: Tensor, history: Tensor, theta: float) -> Tensor:
    """Divide by theta the logits of the tokens in each row's own history.  logits (b, vocab),
    history (b, t) token ids."""
    weights = torch.ones_like(logits, dtype=torch.float)
    weights.scatter_(1, history.long(), theta)
    return logits / weights


def _check_temperature(temperature: object) -> None:
    """A number (or a tensor of them, one per row, divided by as 1.1.4 does); NaN is an error
    here rather than torch.multinomial's.  Negative and infinite temperatures keep 1.1.4's
    numbers where it had any (checked per step in _generate)."""
    if isinstance(temperature, Tensor) and temperature.numel() > 1:
        return
    if not isinstance(temperature, (numbers.Real, Tensor)) or (isinstance(temperature, Tensor)
                                                              and temperature.numel() == 0):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__} {temperature!r}")
    if math.isnan(float(temperature)):
        raise ValueError(f"temperature must be a number (> 0 to sample, 0 = greedy), got {temperature}")


class AutoregressiveWrapper(nn.Module):
    """Wraps a language model net (token ids (b, n) -> logits (b, n, vocab), attribute max_seq_len)."""

    def __init__(self, net: nn.Module, ignore_index: int = 0, pad_value: int = 0):
        super().__init__()
        self.pad_value = pad_value
        if pad_value != 0:
            warn_ignored("AutoregressiveWrapper", ["pad_value"], "performer-pytorch 1.1.4 keeps it as an attribute and "
                         "uses it nowhere")
        self.ignore_index = ignore_index
        self.net = net
        self.max_seq_len = net.max_seq_len

    def cache_unsupported_reason(self) -> str | None:
        """Why generate(use_cache=True) would not reproduce use_cache=False (None when it can)."""
        reason_fn = getattr(self.net, "cache_unsupported_reason", None)
        if reason_fn is None:
            return f"{type(self.net).__name__} has no incremental decoding"
        return reason_fn()

    def _observed(self) -> bool:
        """Whether code of the caller's sees the net's calls (a forward of its own, forward hooks),
        which a cache would make with one new token where 1.1.4 passes the window: generate then
        recomputes by default."""
        return calls_observed(getattr(self.net, "_orig_mod", self.net), PerformerLM)  # (torch.compile's wrapper)

    @torch.no_grad()
    def generate(
        self,
        start_tokens: Tensor,
        seq_len: int,
        eos_token: int | None = None,
        temperature: float = 1.0,
        filter_logits_fn: Callable[..., Tensor] = top_k,
        filter_thres: float = 0.9,
        repetition_penalty: float = 1.0,
        repetition_penalty_ctx: int = 32,
        *,
        use_cache: bool | None = None,
        **kwargs,
    ) -> Tensor:
        """Sample ``seq_len`` tokens after start_tokens (t,) or (b, t) -> (seq_len,) or (b, seq_len)
        (fewer if every row emitted eos_token). kwargs go to the net (mask, context, context_mask).

        use_cache (default: wherever it is exact, unless code of the caller's sees the net's calls: a
        forward of its own, forward hooks; then a one-time warning): feed each new token once and carry per-layer
        recurrent state (O(1) time and memory per token w.r.t. the prefix) instead of re-running
        the whole window each step, with the same tokens for the same seed. It is exact for causal
        models whose softmax attention uses key_stabilizer="prefix", and for generalized or
        no_projection attention. With key_stabilizer="global" (1.1.4's default) and more than one
        layer it is not: every layer is normalised by the max over all keys, so earlier positions'
        outputs change as tokens arrive and cached states of later layers go stale. Such models
        recompute, as 1.1.4 does (use_cache=True too, with a one-time warning saying why). Once the
        sequence outgrows max_seq_len the window slides (positions shift each step), so generation
        continues by recomputation.
        """
        if not isinstance(start_tokens, Tensor):
            raise TypeError(f"start_tokens must be a torch.Tensor of token ids, got {type(start_tokens).__name__}")
        if kwargs.pop("cache", None) is not None:  # (it would reach the net beside generate's own cache)
            warn_ignored("AutoregressiveWrapper.generate", ["cache"], "generate keeps its own DecodingCache, "
                         "use_cache chooses; to continue a cache of your own, call the model with it; "
                         "performer-pytorch 1.1.4 ignores it too")
        if not isinstance(repetition_penalty, numbers.Real) and not (
                isinstance(repetition_penalty, Tensor) and repetition_penalty.numel() == 1):
            raise TypeError(f"repetition_penalty must be a number, got {type(repetition_penalty).__name__} "
                            f"{repetition_penalty!r}")
        if isinstance(repetition_penalty, Tensor):  # 1.1.4 divides by it: the same as by its value
            repetition_penalty = repetition_penalty.item()
        if start_tokens.dim() not in (1, 2):
            raise ValueError(f"start_tokens must have shape (t,) or (batch, t), got {tuple(start_tokens.shape)}")
        if start_tokens.shape[-1] == 0:
            raise ValueError("start_tokens must hold at least one token")
        # 1.1.4 samples range(seq_len) tokens: a bool counts as 0 / 1, a negative length as 0
        seq_len = max(0, check_int("seq_len", int(seq_len) if isinstance(seq_len, bool) else seq_len, -math.inf))
        _check_temperature(temperature)
        # use_cache is ours, and 1.1.4 took (and ignored) any keyword: values it cannot honour are
        # ignored with a one-time warning, and generation recomputes as 1.1.4 does
        if use_cache is not None and not isinstance(use_cache, bool):
            warn_ignored("AutoregressiveWrapper.generate", ["use_cache"], f"{use_cache!r} is not a bool (True / "
                         "False choose cached or recomputed generation); performer-pytorch 1.1.4 ignores it too")
            use_cache = None
        reason = self.cache_unsupported_reason()
        if use_cache and reason:
            warn_ignored("AutoregressiveWrapper.generate", ["use_cache=True"], f"cached generation would not be exact "
                         f"here: {reason}; it recomputes, as performer-pytorch 1.1.4 does")
            use_cache = False
        if use_cache is None:  # without a word when it recomputes: 1.1.4 always does, and warns of nothing
            use_cache = reason is None and not self._observed()

        was_training = self.net.training
        self.net.eval()
        try:
            return self._generate(start_tokens, seq_len, eos_token, temperature, filter_logits_fn, filter_thres,
                                  repetition_penalty, repetition_penalty_ctx, use_cache, kwargs)
        finally:
            self.net.train(was_training)

    def _generate(self, start_tokens, seq_len, eos_token, temperature, filter_logits_fn, filter_thres,
                  repetition_penalty, repetition_penalty_ctx, use_cache, kwargs) -> Tensor:
        num_dims = start_tokens.dim()
        if num_dims == 1:
            start_tokens = start_tokens[None, :]
        b, t = start_tokens.shape
        out = start_tokens
        # a tensor of several temperatures (one per row) is divided by, as 1.1.4 does
        scalar = not (isinstance(temperature, Tensor) and temperature.numel() > 1)
        greedy = scalar and bool(temperature == 0)
        unusual = scalar and bool(temperature < 0 or temperature == float("inf"))  # 1.1.4's numbers where it had any

        input_mask = kwargs.pop("mask", None)
        if num_dims == 1 and isinstance(input_mask, Tensor) and input_mask.dim() == 1:
            input_mask = input_mask[None, :]  # the mask of a 1-D prompt, batched as the prompt (1.1.4: IndexError)
        if input_mask is None:
            input_mask = torch.full_like(out, True, dtype=torch.bool, device=out.device)
        # a (1, t) mask shared by the batch, as 1.1.4's masked_fill broadcast it: expanded before it grows
        input_mask = _check_mask("mask", input_mask, b, t, out.device)
        # conditional generation: without an explicit context_mask, every context position counts
        context_mask = kwargs.pop("context_mask", None)
        if "context" in kwargs and not exists(context_mask):
            context = kwargs["context"]
            context_mask = torch.full(context.shape[:2], True, dtype=torch.bool, device=out.device)
        if exists(context_mask):
            kwargs.update(context_mask=context_mask)

        cache = DecodingCache() if use_cache else None
        for _ in range(seq_len):
            if exists(cache) and out.shape[1] > self.max_seq_len:
                cache = None  # the window slides from here on: every position moves each step
            if exists(cache):
                new = slice(cache.length, None)
                logits = self.net(out[:, new], mask=input_mask[:, new], cache=cache, **kwargs)[:, -1, :]
            else:
                window = slice(-self.max_seq_len, None)
                logits = self.net(out[:, window], mask=input_mask[:, window], **kwargs)[:, -1, :]
            if repetition_penalty > 1.0 and b == 1:  # 1.1.4 slices the batch (out[-ctx:]): all of it
                logits = repetition_penalty_fn(logits, out, theta=repetition_penalty)
            elif repetition_penalty > 1.0:  # 1.1.4 mixes the rows' tokens; each row its own recent ones
                logits = _penalize_rows(logits, out[:, -repetition_penalty_ctx:], repetition_penalty)
            if greedy:  # (1.1.4 divided by zero)
                sample = logits.argmax(dim=-1, keepdim=True)
            else:
                filtered_logits = filter_logits_fn(logits, thres=filter_thres)
                probs = F.softmax(filtered_logits / temperature, dim=-1)
                if unusual and bool(torch.isinf(filtered_logits).any()):  # a host sync for these temperatures only
                    raise ValueError(
                        f"temperature={temperature}: the filtered logits divided by it are no distribution (the "
                        "filter's -inf logits turn into +inf or NaN; performer-pytorch 1.1.4 crashed in "
                        "torch.multinomial); a negative or infinite temperature needs a filter that keeps every "
                        "token (top_k with filter_thres=0)"
                    )
                sample = torch.multinomial(probs, 1)

            out = torch.cat((out, sample), dim=-1)
            input_mask = F.pad(input_mask, (0, 1), value=True)
            if exists(eos_token) and (sample == eos_token).all():
                break

        out = out[:, t:]
        return out.squeeze(0) if num_dims == 1 else out

    def forward(self, x: Tensor, *, context_parallel_group: ProcessGroup | None = None, **kwargs) -> Tensor:
        """Next-token cross-entropy of x (b, n): the net sees x[:, :-1] and predicts x[:, 1:].

        context_parallel_group: x is this rank's contiguous block of sequences split over the
        group's ranks in rank order (performer_triton.distributed); its last target is the next
        rank's first token, and the loss returned is this rank's share of the whole sequence's:
        its targets' summed cross-entropy over the number of targets on every rank, so the sum
        over ranks (and of the gradients, an all-reduce) is the unsharded loss (and gradients)."""
        context_parallel_group = group_arg("AutoregressiveWrapper.forward", context_parallel_group)

        def check() -> None:
            if not isinstance(x, Tensor) or x.dim() != 2:
                raise ValueError(f"x must be token ids of shape (batch, length), got "
                                 f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
            if not exists(context_parallel_group) and x.shape[1] < 2:  # (1.1.4: a NaN loss of no targets)
                raise ValueError(f"x must have at least 2 tokens (the loss predicts x[:, 1:] from x[:, :-1]), "
                                 f"got length {x.shape[1]}")
            mask = kwargs.get("mask")
            if exists(context_parallel_group) and exists(mask) and (not isinstance(mask, Tensor) or mask.dim() != 2):
                # (the net checks the rest; without a group its IndexError is 1.1.4's)
                raise ValueError(f"mask must be a (batch, length) tensor, got "
                                 f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")

        _, refused = local_checks(check, context_parallel_group)  # (context parallelism: raised on every rank)
        mask = kwargs.pop("mask", None)
        if exists(context_parallel_group):
            ok = refused is None
            # the input dtype too: the targets' exchange sends the ids as they are
            cp = ContextParallel.gather(x.shape[1] if ok else 0, context_parallel_group,
                                        gather_device(context_parallel_group, x), batch=x.shape[0] if ok else -1,
                                        input_dtype=x.dtype if ok else None, where="AutoregressiveWrapper.forward",
                                        refused=refused)
            xo = with_neighbours(x, cp, before=0, after=1, dim=1)[:, 1:]
        else:
            xo = x[:, 1:]
        xi = x[:, : xo.shape[1]]
        # a mask given for the full sequence is trimmed to the input
        if exists(mask) and mask.shape[1] == x.shape[1]:
            mask = mask[:, : xi.shape[1]]
        kwargs.update(mask=mask)
        if exists(context_parallel_group):
            kwargs.update(context_parallel_group=context_parallel_group)
        out = self.net(xi, **kwargs)
        if not xo.is_floating_point():  # (cross_entropy takes int64 targets only; the embedding took any integer)
            xo = xo.long()
        if not exists(context_parallel_group):
            return F.cross_entropy(out.transpose(1, 2), xo, ignore_index=self.ignore_index)
        total = F.cross_entropy(out.transpose(1, 2), xo, ignore_index=self.ignore_index, reduction="sum")
        count = (xo != self.ignore_index).sum().to(total.dtype)
        dist.all_reduce(count, group=context_parallel_group)
        return total / count
