"""performer_triton: fused Triton FAVOR+ (Performer) attention, a drop-in successor of
performer-pytorch 1.1.4."""
from . import functional, reference
from .fast_attention import FastAttention
from .functional import favor_attention, linear_attention
from .projection import gaussian_orthogonal_random_matrix, orthogonal_matrix_chunk

__version__ = "0.1.0"

__all__ = [
    "FastAttention",
    "favor_attention",
    "functional",
    "gaussian_orthogonal_random_matrix",
    "linear_attention",
    "orthogonal_matrix_chunk",
    "reference",
]
