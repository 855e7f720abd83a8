"""Triton kernels for FAVOR+ attention (installed as performer_triton.kernels).

The feature-map codes are defined here, free of any triton import, so the PyTorch path can
use them on machines without triton.
"""
SOFTMAX = 0  # positive random features (1.1.4's softmax_kernel)
RELU = 1  # generalized attention with ReLU
GIVEN = 2  # features precomputed by the caller
FEATURE_NAMES = {SOFTMAX: "softmax", RELU: "relu", GIVEN: "given"}

# Widest q/k (d) and v (e) head dims the kernels take, by input dtype: the widest the compile
# report checks spill-free (kernels/NOTES.md, "Wide heads").
MAX_HEAD_DIM = {"float16": 128, "bfloat16": 128, "float32": 128}


def max_head_dim(dtype) -> int:
    """MAX_HEAD_DIM for a torch dtype (0 for dtypes the kernels do not take)."""
    return MAX_HEAD_DIM.get(str(dtype).replace("torch.", ""), 0)
