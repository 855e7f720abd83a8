"""Model configurations shared by the module, checkpoint and generation tests."""
from __future__ import annotations


def enc_dec_kwargs(
    num_tokens: int, *, dim: int = 32, heads: int = 4, dim_head: int | None = 8, max_seq_len: int = 40,
    enc_depth: int = 1, dec_depth: int = 1, **extra,
) -> dict:
    """PerformerEncDec keyword arguments with the same vocabulary, heads, head dim and length on
    both sides (enc_* / dec_*), plus ``extra`` as given (e.g. dec_nb_features=20)."""
    side = dict(num_tokens=num_tokens, heads=heads, max_seq_len=max_seq_len)
    if dim_head is not None:
        side["dim_head"] = dim_head
    kwargs = {f"{prefix}_{key}": value for prefix in ("enc", "dec") for key, value in side.items()}
    return dict(dim=dim, enc_depth=enc_depth, dec_depth=dec_depth, **kwargs, **extra)
