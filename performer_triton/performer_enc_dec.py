"""performer-pytorch 1.1.4's PerformerEncDec: a PerformerLM encoder and a causal, cross-attending
PerformerLM decoder wrapped for autoregressive training and generation.

Keyword arguments are split by prefix: enc_* go to the encoder, dec_* to the decoder (prefix
removed). As in 1.1.4, arguments without either prefix are ignored (with a one-time warning),
among them the README's spelling ``tie_token_embed`` (the parameter is ``tie_token_embeds``:
a 1.1.4 checkpoint of that configuration has untied embeddings). key_stabilizer / exact_mask /
backend are keyword-only additions passed down.
"""
from __future__ import annotations

import numbers
import re
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

from .autoregressive_wrapper import AutoregressiveWrapper
from .performer_pytorch import PerformerLM
from .validation import BACKENDS, KEY_STABILIZERS, InputError, check_int, warn_ignored

# `from performer_triton.performer_enc_dec import *` binds what performer-pytorch 1.1.4's module binds, no more
__all__ = [
    "AutoregressiveWrapper", "DEC_PREFIX", "ENC_PREFIX", "PerformerEncDec", "PerformerLM",
    "extract_and_set_enc_dec_kwargs", "extract_enc_dec_kwargs", "group_by_key_prefix",
    "group_by_key_prefix_and_remove_prefix", "group_dict_by_key", "nn", "re", "string_begins_with",
    "torch"
]

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

ENC_PREFIX = "enc_"
DEC_PREFIX = "dec_"


def group_dict_by_key(cond: Callable[[str], bool], d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(entries whose key satisfies cond, the other entries)."""
    return {k: v for k, v in d.items() if cond(k)}, {k: v for k, v in d.items() if not cond(k)}


def string_begins_with(prefix: str, str: str) -> bool:
    """Whether str starts with prefix, a regular expression as in 1.1.4."""
    return bool(re.match(f"^{prefix}", str))


def group_by_key_prefix(prefix: str, d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return group_dict_by_key(lambda key: string_begins_with(prefix, key), d)


def group_by_key_prefix_and_remove_prefix(prefix: str, d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(entries whose key starts with prefix, prefix removed; the other entries)."""
    with_prefix, rest = group_by_key_prefix(prefix, d)
    return {key[len(prefix) :]: val for key, val in with_prefix.items()}, rest


def extract_enc_dec_kwargs(kwargs: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(encoder kwargs, decoder kwargs, the rest)."""
    enc_kwargs, kwargs = group_by_key_prefix_and_remove_prefix(ENC_PREFIX, kwargs)
    dec_kwargs, kwargs = group_by_key_prefix_and_remove_prefix(DEC_PREFIX, kwargs)
    return enc_kwargs, dec_kwargs, kwargs


def extract_and_set_enc_dec_kwargs(kwargs: dict[str, Any]) -> tuple[dict, dict, dict]:
    """As extract_enc_dec_kwargs; an encoder mask also becomes the decoder's context_mask."""
    enc_kwargs, dec_kwargs, kwargs = extract_enc_dec_kwargs(kwargs)
    if "mask" in enc_kwargs:
        dec_kwargs.setdefault("context_mask", enc_kwargs["mask"])
    return enc_kwargs, dec_kwargs, kwargs


# PerformerEncDec's own unprefixed options: name -> (whether a value is one of its values, default)
_SHARED_OPTIONS = {
    "key_stabilizer": (lambda x: x in KEY_STABILIZERS, "global"),
    "exact_mask": (lambda x: isinstance(x, bool), False),
    "backend": (lambda x: x in BACKENDS, "auto"),
    "redraw_seed": (lambda x: x is None or isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0, None),
}


class PerformerEncDec(nn.Module):
    """Encoder-decoder. ``dim`` and ``no_projection`` are shared; everything else comes as
    enc_<name> / dec_<name> PerformerLM arguments. The decoder is always causal and cross-attends.

    Keyword-only additions: key_stabilizer (decoder self-attention; the encoder is not causal),
    exact_mask and backend (both halves), redraw_seed (the encoder's; the decoder draws from
    redraw_seed + 1, so the two halves' matrices differ; enc_/dec_redraw_seed set them apart).
    """

    def __init__(
        self,
        dim: int,
        ignore_index: int = 0,
        pad_value: int = 0,
        tie_token_embeds: bool = False,
        no_projection: bool = False,
        *,
        key_stabilizer: str = "global",
        exact_mask: bool = False,
        backend: str = "auto",
        redraw_seed: int | None = None,
        **kwargs,
    ):
        super().__init__()
        enc_kwargs, dec_kwargs, unknown = extract_enc_dec_kwargs(kwargs)
        if "tie_token_embed" in unknown:
            warn_ignored("PerformerEncDec", ["tie_token_embed"], "as in performer-pytorch 1.1.4; the parameter "
                         "that ties the token embeddings is tie_token_embeds")
        warn_ignored("PerformerEncDec", set(unknown) - {"tie_token_embed"},
                     f"as in performer-pytorch 1.1.4: encoder and decoder arguments take the prefixes "
                     f"{ENC_PREFIX!r} / {DEC_PREFIX!r}")
        if "dim" in enc_kwargs or "dim" in dec_kwargs:
            raise InputError("pass dim once to PerformerEncDec, not as enc_dim / dec_dim: both halves share it")
        # ours, unprefixed; 1.1.4 took (and ignored) any unprefixed keyword: a value that is not one
        # of ours is ignored with a one-time warning (the default stands), never an error
        options = dict(key_stabilizer=key_stabilizer, exact_mask=exact_mask, backend=backend, redraw_seed=redraw_seed)
        for name, (valid, default) in _SHARED_OPTIONS.items():
            if not valid(options[name]):
                warn_ignored("PerformerEncDec", [name], f"{options[name]!r} is not one of its values (the default, "
                             f"{default!r}, stands); performer-pytorch 1.1.4 ignores it too")
                options[name] = default
        key_stabilizer, exact_mask, backend, redraw_seed = options.values()

        for half in (enc_kwargs, dec_kwargs):
            half.update(dim=dim, no_projection=no_projection)
            half.setdefault("exact_mask", exact_mask)
            half.setdefault("backend", backend)
        dec_kwargs.update(causal=True, cross_attend=True)
        dec_kwargs.setdefault("key_stabilizer", key_stabilizer)
        if redraw_seed is not None:
            redraw_seed = check_int("redraw_seed", redraw_seed, 0)
            enc_kwargs.setdefault("redraw_seed", redraw_seed)
            dec_kwargs.setdefault("redraw_seed", redraw_seed + 1)

        enc = PerformerLM(**enc_kwargs)
        dec = PerformerLM(**dec_kwargs)
        if tie_token_embeds:
            enc.token_emb = dec.token_emb

        self.enc = enc
        self.dec = AutoregressiveWrapper(dec, ignore_index=ignore_index, pad_value=pad_value)

    @torch.no_grad()
    def generate(self, seq_in: Tensor, seq_out_start: Tensor, seq_len: int, **kwargs) -> Tensor:
        """Encode seq_in (b, n), then sample seq_len decoder tokens after seq_out_start (b, t).
        enc_mask / enc_* go to the encoder; other kwargs (use_cache, ...) to the decoder's generate."""
        enc_kwargs, dec_kwargs, kwargs = extract_and_set_enc_dec_kwargs(kwargs)
        modes = [(module, module.training) for module in self.enc.modules()]  # (each: some may be frozen in eval)
        updater = self.enc.performer.proj_updater
        # the encoding in eval, as the decoder's generate runs: 1.1.4's had its dropout on (issue
        # 10); but its redraw counter keeps its mode: 1.1.4 encoded a training model in training
        # mode, so the call counts towards (or makes) the encoder's next redraw where 1.1.4's did,
        # in Performer.forward after the input's checks (a call refused there counts nothing)
        self.enc.eval()
        updater.training = dict(modes)[updater]  # (its flag alone: train() would reach the layers it holds)
        try:
            encodings = self.enc(seq_in, return_encodings=True, **enc_kwargs)
        finally:  # as they were: 1.1.4 left the encoder's modes alone
            for module, training in modes:
                module.training = training
        return self.dec.generate(seq_out_start, seq_len, context=encodings, **{**dec_kwargs, **kwargs})

    def forward(self, seq_in: Tensor, seq_out: Tensor, enc_mask: Tensor | None = None, *,
                context_parallel_group: ProcessGroup | None = None, **kwargs) -> Tensor:
        """Decoder next-token loss of seq_out (b, m) given seq_in (b, n).

        context_parallel_group: seq_in and seq_out (and enc_mask) are this rank's contiguous
        blocks of both sequences split over the group's ranks in rank order; the loss is this
        rank's share (AutoregressiveWrapper.forward)."""
        enc_kwargs, dec_kwargs, kwargs = extract_and_set_enc_dec_kwargs(kwargs)
        warn_ignored("PerformerEncDec.forward", kwargs, "as in performer-pytorch 1.1.4: prefix them with 'enc_' or 'dec_'")
        if context_parallel_group is not None:
            enc_kwargs.update(context_parallel_group=context_parallel_group)
            dec_kwargs.update(context_parallel_group=context_parallel_group)
        encodings = self.enc(seq_in, mask=enc_mask, return_encodings=True, **enc_kwargs)
        return self.dec(seq_out, context=encodings, context_mask=enc_mask, **dec_kwargs)
