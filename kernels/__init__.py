"""Triton kernels for FAVOR+ attention (installed as performer_triton.kernels)."""
