"""Triton kernels for FAVOR+ attention (installed as performer_triton.kernels).

The feature-map codes are defined here, free of any triton import, so the PyTorch path can
use them on machines without triton.
"""
SOFTMAX = 0  # positive random features (1.1.4's softmax_kernel)
RELU = 1  # generalized attention with ReLU
GIVEN = 2  # features precomputed by the caller
FEATURE_NAMES = {SOFTMAX: "softmax", RELU: "relu", GIVEN: "given"}
