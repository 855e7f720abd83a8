"""performer-pytorch 1.1.4's PerformerEncDec: a PerformerLM encoder and a causal, cross-attending
PerformerLM decoder wrapped for autoregressive training and generation.

Keyword arguments are split by prefix: enc_* go to the encoder, dec_* to the decoder (prefix
removed). Differences from 1.1.4: the README spelling ``tie_token_embed`` is honoured (1.1.4
dropped it silently), arguments without either prefix raise TypeError, and key_stabilizer /
exact_mask / backend are accepted and passed down.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .autoregressive_wrapper import AutoregressiveWrapper
from .performer import PerformerLM

__all__ = ["DEC_PREFIX", "ENC_PREFIX", "PerformerEncDec", "extract_and_set_enc_dec_kwargs", "extract_enc_dec_kwargs"]

ENC_PREFIX = "enc_"
DEC_PREFIX = "dec_"


def group_by_key_prefix_and_remove_prefix(prefix: str, d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(entries whose key starts with prefix, prefix removed; the other entries)."""
    with_prefix = {key[len(prefix) :]: val for key, val in d.items() if key.startswith(prefix)}
    rest = {key: val for key, val in d.items() if not key.startswith(prefix)}
    return with_prefix, rest


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


class PerformerEncDec(nn.Module):
    """Encoder-decoder. ``dim`` and ``no_projection`` are shared; everything else comes as
    enc_<name> / dec_<name> PerformerLM arguments. The decoder is always causal and cross-attends.

    Keyword-only additions: tie_token_embed (README alias of tie_token_embeds), key_stabilizer
    (decoder self-attention; the encoder is not causal), exact_mask and backend (both halves).
    """

    def __init__(
        self,
        dim: int,
        ignore_index: int = 0,
        pad_value: int = 0,
        tie_token_embeds: bool = False,
        no_projection: bool = False,
        *,
        tie_token_embed: bool | None = None,
        key_stabilizer: str = "global",
        exact_mask: bool = False,
        backend: str = "auto",
        **kwargs,
    ):
        super().__init__()
        enc_kwargs, dec_kwargs, unknown = extract_enc_dec_kwargs(kwargs)
        if unknown:
            raise TypeError(
                f"unexpected keyword argument(s) {sorted(unknown)}: PerformerEncDec takes encoder and decoder "
                f"arguments prefixed with {ENC_PREFIX!r} / {DEC_PREFIX!r}"
            )
        if "dim" in enc_kwargs or "dim" in dec_kwargs:
            raise TypeError("pass dim once to PerformerEncDec, not as enc_dim / dec_dim: both halves share it")
        if tie_token_embed is not None and bool(tie_token_embed) != bool(tie_token_embeds):
            if tie_token_embeds:
                raise ValueError("tie_token_embed and tie_token_embeds disagree; pass one of them")
            tie_token_embeds = tie_token_embed

        for half in (enc_kwargs, dec_kwargs):
            half.update(dim=dim, no_projection=no_projection)
            half.setdefault("exact_mask", exact_mask)
            half.setdefault("backend", backend)
        dec_kwargs.update(causal=True, cross_attend=True)
        dec_kwargs.setdefault("key_stabilizer", key_stabilizer)

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
        encodings = self.enc(seq_in, return_encodings=True, **enc_kwargs)
        return self.dec.generate(seq_out_start, seq_len, context=encodings, **{**dec_kwargs, **kwargs})

    def forward(self, seq_in: Tensor, seq_out: Tensor, enc_mask: Tensor | None = None, **kwargs) -> Tensor:
        """Decoder next-token loss of seq_out (b, m) given seq_in (b, n)."""
        enc_kwargs, dec_kwargs, kwargs = extract_and_set_enc_dec_kwargs(kwargs)
        if kwargs:
            raise TypeError(f"unexpected keyword argument(s) {sorted(kwargs)}: prefix them with 'enc_' or 'dec_'")
        encodings = self.enc(seq_in, mask=enc_mask, return_encodings=True, **enc_kwargs)
        return self.dec(seq_out, context=encodings, context_mask=enc_mask, **dec_kwargs)
