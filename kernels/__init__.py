"""Triton kernels for FAVOR+ attention (installed as performer_triton.kernels).

What the kernels compile in, defined here with torch only (no triton import) so the PyTorch
path and the feature-map registry (performer_triton.feature_maps) use the same values on machines
without triton: the feature-map codes (the FEATURE constexpr of every kernel), the eps constants
of the FAVOR+ numerics and the scalars every path computes alike (head_scale, feature_ratio,
causal_coef), the input dtypes and the widest head dims the kernels take. `launchers` is the one
table from attention mode to the (forward, backward) launch functions.
"""
import torch

SOFTMAX = 0  # positive random features (1.1.4's softmax_kernel), computed in the kernels
RELU = 1  # generalized attention with ReLU, computed in the kernels
GIVEN = 2  # features precomputed by the caller, read as (rows, m) tiles

SOFTMAX_EPS = 1e-4  # added to softmax random features (1.1.4's softmax_kernel eps)
GENERALIZED_EPS = 1e-3  # added to generalized features (1.1.4's kernel_epsilon)
CAUSAL_EPS = 1e-6  # added to every key-feature prefix sum in the causal denominator


def head_scale(d: int) -> float:
    """dn = d**-0.25, the scale of rows x in dash = (dn x) @ P^T (1 for d = 0: GIVEN)."""
    return d**-0.25 if d else 1.0


def feature_ratio(m: int) -> float:
    """ratio = m**-0.5, the factor of every softmax feature (1.1.4's softmax_kernel)."""
    return m**-0.5


def feature_eps(feature: int) -> float:
    """The eps each feature of a map holds (1.1.4's): SOFTMAX_EPS, GENERALIZED_EPS for RELU, and
    none added to GIVEN features (the caller's already hold theirs)."""
    return {SOFTMAX: SOFTMAX_EPS, RELU: GENERALIZED_EPS}.get(feature, 0.0)


def causal_coef(feature: int, m: int, causal_eps: float) -> float:
    """The causal normaliser's eps in the ratio-free form the kernels, the PyTorch path and the
    decoder compute in: causal_eps / ratio for SOFTMAX (its features carry ratio), else causal_eps."""
    return causal_eps / feature_ratio(m) if feature == SOFTMAX else causal_eps


# Widest q/k (d) and v (e) head dim the kernels take, in every dtype they take: the widest the
# compile report checks spill-free (kernels/NOTES.md, "Wide heads").
MAX_HEAD_DIM = 128
# ... and with a state or packed sequences (extension_unsupported)
MAX_EXTENSION_HEAD_DIM = 64
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the input dtypes the kernels take


def unsupported(dtype: torch.dtype, **dims: int) -> str | None:
    """Why the kernels cannot take inputs of dtype with these head dims (name=value), or None."""
    if dtype not in DTYPES:
        return f"the Triton kernels take float16, bfloat16 and float32 inputs, got {dtype}"
    wide = {name: value for name, value in dims.items() if value > MAX_HEAD_DIM}
    if wide:
        return f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got " + ", ".join(
            f"{name} = {value}" for name, value in wide.items())
    return None


def extension_unsupported(what: str, dtype, feature: int, d: int, e: int) -> str | None:
    """Why the kernels' extensions cannot take these inputs, or None: the causal forward from a
    state (what = "a state": kernels.causal.causal_fwd_state) and packed sequences (what =
    "packed sequences": the launchers' cu_seqlens) take fp16/bf16 with the fused maps and heads up
    to 64 wide, the configurations the compile report finds spill-free on sm_90a (kernels/NOTES.md
    "Attention state", "Packed sequences"); the others run on the PyTorch path or one sequence at
    a time.  d = 0 for GIVEN."""
    if feature == GIVEN:
        return f"the kernels take {what} with their own feature maps (softmax, relu), not given features"
    if getattr(dtype, "itemsize", 4) != 2:
        return f"the kernels take {what} for float16 and bfloat16 inputs, got {dtype}"
    if max(d, e) > MAX_EXTENSION_HEAD_DIM:
        return f"the kernels take {what} for head dims up to {MAX_EXTENSION_HEAD_DIM}, got {max(d, e)}"
    return None


def launchers(causal: bool):
    """(forward, backward, saved_states) functions of one attention mode, with one signature:
    fwd(q, k, v, projection, *, feature, prefix, causal_eps)
        -> (out, q_max, k_max, k_scale, rden, states);
    bwd(grad_out, q, k, v, projection, out, q_max, k_max, k_scale, rden, states, *, feature,
    prefix, causal_eps) -> (dq, dk, dv);
    saved_states(q, k, v, projection, *, feature, prefix) -> empty buffers shaped as fwd's states
    (the key states the backward reads instead of recomputing them; the custom op's fake).
    causal_eps (CAUSAL_EPS in every 1.1.4 path) is the eps of the causal normaliser; non-causal
    has none and ignores it, as its saved_states ignores prefix (the causal chunks depend on it).
    Imports triton on first use."""
    if causal:
        from .causal import causal_bwd, causal_fwd, saved_states

        return causal_fwd, causal_bwd, saved_states
    from .noncausal import noncausal_bwd, noncausal_fwd, saved_states

    return noncausal_fwd, noncausal_bwd, saved_states
