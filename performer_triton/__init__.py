"""performer_triton: fused Triton FAVOR+ (Performer) attention, a drop-in successor of
performer-pytorch 1.1.4 (same exports: swap `performer_pytorch` for `performer_triton`)."""
__version__ = "0.1.0"  # before the imports: ops.py puts it into torch.compile's cache key

from . import feature_maps, functional
from .attention_state import AttentionState
from .autoregressive_wrapper import AutoregressiveWrapper
from .convert import replace_fast_attention
from .decoding import DecodingCache
from .fast_attention import FastAttention
from .functional import favor_attention, linear_attention
from .performer_pytorch import CrossAttention, Performer, PerformerLM, ProjectionUpdater, SelfAttention
from .performer_enc_dec import PerformerEncDec
from .projection import gaussian_orthogonal_random_matrix, orthogonal_matrix_chunk

# `from performer_triton import *` binds what performer-pytorch 1.1.4's does (its classes and, as it
# has no __all__, its submodules), no more: the functional API and the other additions are imported
# by name
__all__ = [
    "AutoregressiveWrapper",
    "CrossAttention",
    "FastAttention",
    "Performer",
    "PerformerEncDec",
    "PerformerLM",
    "ProjectionUpdater",
    "SelfAttention",
    "autoregressive_wrapper",
    "performer_enc_dec",
    "performer_pytorch",
    "reversible",
]
