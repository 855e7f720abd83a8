"""Functional FAVOR+ attention: validation, backend choice, then the custom op.

Shapes: q (b, h, n, d), k (b, h, s, d), v (b, h, s, e) -> (b, h, n, e).
"""
from __future__ import annotations

import importlib.util
import functools
import os
from typing import Callable, Union

import torch
from torch import Tensor

from .attention_state import AttentionState, check_state
from .feature_maps import CAUSAL_EPS, GIVEN_MAP, FeatureMap, check_stateful, keep_rows, resolve
from .kernels import extension_unsupported, unsupported
from .ops import favor, favor_with_state, transformed
from . import torch_backend
from .torch_backend import autocast_off, compute_dtype, finite_or_zero
from .validation import (
    BACKENDS,
    check_bool,
    check_choice,
    check_cu_seqlens,
    check_float,
    check_key_padding_mask,
    check_key_stabilizer,
    check_offsets,
    check_projection,
    check_qkv,
)

FeatureMapArg = Union[str, Callable[[Tensor], Tensor], FeatureMap]
HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_unsupported(q: Tensor, v: Tensor, *, fused: bool) -> str | None:
    """Why the Triton kernels cannot run these inputs, or None when they can.  fused: the
    kernels compute the features from q (their head dim counts), else q holds features."""
    if not HAS_TRITON:
        return "triton is not installed (it is available on Linux only)"
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            "the inputs are CPU tensors; the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 "
            "set before triton is imported to run them in Triton's interpreter"
        )
    if transformed():
        return "torch.func transforms (vmap, grad, jvp, ...) and forward-mode AD run on the PyTorch path"
    if q.device.type not in ("cpu", "cuda"):
        return f"the Triton kernels run on CUDA devices, got {q.device}"
    dims = dict(d=q.shape[-1], e=v.shape[-1]) if fused else dict(e=v.shape[-1])
    reason = unsupported(q.dtype, **dims)
    if reason is None and q.device.type == "cpu" and q.dtype == torch.bfloat16 and not _interpreter_bf16_dot_exact():
        reason = ("Triton's interpreter computes bfloat16 tl.dot wrongly (triton-lang/triton#11584); run bfloat16 "
                  "on CUDA, or float16 / float32 in the interpreter")
    return reason


@torch.compiler.assume_constant_result
def _interpreter_bf16_dot_exact() -> bool:
    """Triton's interpreter multiplies bf16 tiles right (_bf16_dot_probe, once per process); a
    constant of a compiled graph, as _tf32_allowed."""
    return _bf16_dot_probe()


@functools.cache
def _bf16_dot_probe() -> bool:
    from .kernels.feature_map import interpreter_dot_exact  # (needs triton: imported where it is there)

    return interpreter_dot_exact(torch.bfloat16)


AUTO_DEVICES = ("cuda",)  # where backend "auto" considers the kernels


def _use_triton(backend: str, q: Tensor, v: Tensor, fused: bool, *, extra: str | None = None,
                tf32: bool = True) -> bool:
    """Whether the call runs the Triton kernels: backend "triton" (ValueError saying why where they
    cannot), or "auto" for CUDA tensors they support.  extra: a further reason this call's kernels
    cannot take it (None: none).  tf32: the kernels' fp32 dots are TF32 (kernels/feature_map.py), so
    "auto" sends them fp32 only where PyTorch's own fp32 matmuls may use TF32
    (torch.set_float32_matmul_precision "high" or "medium"; with the default "highest" fp32 stays
    on the PyTorch path, cuBLAS in full fp32); False for kernels without a dot (the decode step).
    Only "triton" asks about CPU tensors (Triton's interpreter)."""
    if backend == "torch" or backend == "auto" and q.device.type not in AUTO_DEVICES:
        return False
    reason = triton_unsupported(q, v, fused=fused) or extra
    if backend == "triton":
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run here: {reason}")
        return True
    return reason is None and (not tf32 or q.dtype != torch.float32 or _tf32_allowed())


@torch.compiler.assume_constant_result
def _tf32_allowed() -> bool:
    """PyTorch's own fp32 matmuls may use TF32; read once per compiled graph (a Python string,
    which torch.compile cannot trace)."""
    return torch.get_float32_matmul_precision() != "highest"


def _autocast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Under torch.autocast, floating inputs in the autocast dtype (what a matmul would see),
    before any dtype check or backend choice; anything else passes through to the checks.
    float64 is not cast, as autocast casts none (1.1.4's einsums stay fp64 in a .double() model)."""
    if not all(isinstance(t, Tensor) and t.is_floating_point() for t in tensors):
        return tensors
    device_type = tensors[0].device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t if t.dtype == torch.float64 else t.to(dtype) for t in tensors)
    return tensors


@autocast_off
def pytorch_features(q: Tensor, k: Tensor, fmap: FeatureMap, projection: Tensor | None, *, causal: bool,
                     key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """fmap's (q', k') (b, h, n, m), (b, h, s, m) made in PyTorch (where the kernels do not make
    them: a key mask, no_projection, a kernel_fn), in the compute dtype with autocast off: fp32 for
    16-bit rows, whose fp16 gradients of tiny key features overflow (inf x 0 = NaN in exp's backward)."""
    dtype = compute_dtype(q.dtype)
    projection = None if projection is None else projection.to(dtype)
    return fmap.features(q.to(dtype), k.to(dtype), projection, causal=causal, key_padding_mask=key_padding_mask)


def _empty_result(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Zeros (b, h, n, e) for a call with nothing to attend or nothing to return (b, h, n or e is
    0, or s with a state), connected to q, k and v: each gets a zero gradient, as from 1.1.4's
    einsums (torch.autograd.grad finds every input used)."""
    return _connected(q[..., :0] @ v[..., :0, :], k)


def _connected(out: Tensor, *xs: Tensor) -> Tensor:
    """out plus an exact 0 made from each of xs (a sum of none of their elements): they get zero
    gradients through it, also where out does not depend on them."""
    return out + sum(x[..., :0].sum() for x in xs)


def _last(rows: int, out: Tensor) -> Tensor:
    """out without its first `rows` positions (the placeholders of _after); out itself when none:
    no view of an op's output on the common path."""
    return out[..., rows:, :] if rows else out


def _after(rows: int, q: Tensor, fill: float) -> Tensor:
    """q (b, h, n, .) after `rows` rows of `fill`.  Causal attention with n queries and s > n keys
    (bottom-right aligned, as FlashAttention: the KV-cache call) runs as s positions whose first
    s - n queries are placeholders; their outputs are dropped, and each query's output depends on
    its own row and the keys only.  fill keeps the placeholders' features finite and positive."""
    if rows == 0:
        return q
    return torch.cat((q.new_full((*q.shape[:2], rows, q.shape[3]), fill), q), dim=2)


def favor_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection_matrix: Tensor | None,
    *,
    causal: bool = False,
    key_stabilizer: str = "global",
    feature_map: FeatureMapArg = "softmax",
    key_padding_mask: Tensor | None = None,
    backend: str = "auto",
    initial_state: AttentionState | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> Tensor | tuple[Tensor, AttentionState]:
    """FAVOR+ attention.  q (b,h,n,d), k (b,h,s,d), v (b,h,s,e), projection_matrix (m,d) -> (b,h,n,e).

    feature_map: "softmax" (positive random features, fused), "relu" (generalized attention,
    fused), "none" (1.1.4's no_projection) or a callable kernel_fn (generalized attention with
    that kernel; performer_triton.feature_maps); the last two compute features in PyTorch and
    use the fused linear attention.
    key_stabilizer: "global" (1.1.4) or "prefix" (causal only; out_i depends on positions <= i).
    key_padding_mask: (b, s) bool, True = keep; padded keys are excluded from the numerator,
    the normaliser and the stabilizer (with "prefix": each sequence without its padded
    positions).  Causal queries share the keys' positions: those at padded positions give 0.
    Non-causal queries are the caller's (cross attention): a NaN query gives a NaN row, and its
    gradient reaches every key's, even where the loss leaves the row out.
    backend: "auto" (Triton on CUDA when supported, else PyTorch), "triton", "torch".
    causal with fewer queries than keys (n < s): the queries are the last n of the s positions
    (bottom-right aligned, the KV-cache call).
    initial_state, output_final_state (causal; softmax features with key_stabilizer="prefix"):
    start from the keys a state holds (performer_triton.attention_state) and also return the state
    after this call's keys, (out, state); gradients flow into the initial state's hz and v_sum.
    Forward and backward run on the fused kernels where they run (fp16/bf16, softmax / relu, heads
    up to 64), else on the PyTorch path.
    cu_seqlens: packed variable-length sequences (FlashAttention's convention): q, k, v of shape
    (1, h, total, .) and N + 1 int32 offsets; each sequence attends within itself with its own
    stabilizers, states (if any) are per sequence, (N, h, ...).  Softmax / relu attention (causal
    with or without states, non-causal without) runs on the kernels as one fused forward and
    backward over the whole pack (eager mode reads the offsets once to check them; compiled
    graphs do not); the other cases run one sequence at a time.
    """
    q, k, v = _autocast(q, k, v)
    check_bool("causal", causal)
    check_bool("output_final_state", output_final_state)
    check_qkv(q, k, v, causal=causal)
    check_key_stabilizer(key_stabilizer, causal)
    check_choice("backend", backend, BACKENDS)
    fmap = resolve(feature_map)
    prefix = causal and key_stabilizer == "prefix" and fmap.stabilized
    if cu_seqlens is not None:
        if key_padding_mask is not None:
            raise ValueError("cu_seqlens packs sequences without padding: key_padding_mask does not apply")
        check_cu_seqlens(cu_seqlens, q, k, initial_state)
        stateless = initial_state is None and not output_final_state
        fused = fmap.fused and (stateless or causal) and q.shape[2] > 0
        if fused and extension_unsupported("packed sequences", q.dtype, fmap.code, q.shape[3], v.shape[3]) is None \
                and _use_triton(backend, q, v, True):
            cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
            if not stateless:  # per-sequence states in the same fused launches
                return _favor_with_state(q, k, v, projection_matrix, fmap, key_stabilizer, None, backend,
                                         initial_state, output_final_state, causal=True, cu_seqlens=cu_seqlens)
            projection = check_projection(projection_matrix, q, fixed_by="packed sequences (cu_seqlens) on the "
                                          "fused kernels").to(q.dtype).contiguous()
            return favor(q, k, v, projection, causal, fmap.code, prefix, True, CAUSAL_EPS, cu_seqlens)[0]

        def one(q_i, k_i, v_i, state):
            return favor_attention(q_i, k_i, v_i, projection_matrix, causal=causal, key_stabilizer=key_stabilizer,
                                   feature_map=feature_map, backend=backend, initial_state=state,
                                   output_final_state=output_final_state)

        return _packed(one, q, k, v, cu_seqlens, initial_state, output_final_state)
    if fmap.needs_projection:
        projection_matrix = check_projection(projection_matrix, q)
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, k)
    if initial_state is not None or output_final_state:
        return _favor_with_state(q, k, v, projection_matrix, fmap, key_stabilizer, key_padding_mask, backend,
                                 initial_state, output_final_state, causal=causal)
    if 0 in q.shape[:3] or v.shape[3] == 0:  # no batch, heads, queries or value columns: nothing to compute
        return _empty_result(q, k, v)
    if prefix and key_padding_mask is not None:
        if torch.compiler.is_exporting():  # (a traced mask cannot steer Python; vmap's: _prefix_padded)
            raise NotImplementedError(_PREFIX_PADDED_ON_THE_HOST + "torch.export (a graph of data-dependent shapes); "
                                      "export without the mask, or with key_stabilizer='global'")
        return _prefix_padded(q, k, v, projection_matrix, key_padding_mask, fmap, backend)

    fused = fmap.fused and key_padding_mask is None
    use_triton = _use_triton(backend, q, v, fused)
    before = k.shape[2] - q.shape[2] if causal else 0  # placeholder queries (_after)
    if fused:
        projection = projection_matrix.to(q.dtype).contiguous()
        if projection.requires_grad and torch.is_grad_enabled():
            return _last(before, _learned_projection(_after(before, q, 0.0), k, v, projection, causal, fmap.code,
                                                     prefix, backend))
        return _last(before, favor(_after(before, q, 0.0), k, v, projection, causal, fmap.code, prefix,
                                   use_triton)[0])
    # features made in PyTorch (a key mask, no_projection, a kernel_fn) are made in fp32 for 16-bit
    # rows, as the op computes anyway: in fp16 the gradients of tiny key features overflow (inf x 0
    # = NaN in exp's backward); the kernels still run where the 16-bit inputs would have (TF32 dots)
    out_dtype, compute = q.dtype, compute_dtype(q.dtype)
    if causal and fmap.rescales_keys and out_dtype != torch.float64:
        # 1.1.4's causal no_projection, exp(k): for large keys its prefix sums span more than fp32's
        # exponent range (one shift per head leaves early rows without any key and eps: 0 / 0, inf
        # gradients), so these features and their attention run in float64 (rows of d features)
        # (backend="triton" too: README, "What runs where")
        compute, use_triton = torch.float64, False
    if compute != out_dtype:
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
        projection_matrix = None if projection_matrix is None else projection_matrix.to(compute)
    keep_q = None
    if key_padding_mask is not None:  # selection: padded values (NaN, inf) never multiply a zero
        v = keep_rows(v, key_padding_mask)
        if causal:  # the queries are the last n positions: padded ones give 0, as with "prefix"
            keep_q = key_padding_mask[:, before:]
            q = keep_rows(q, keep_q)
    value_scale = None
    if causal and fmap.rescales_keys:
        # keys shifted into the dtype's range leave features up to max / (e n) (_exp_shift): values
        # divided by a power of 2 (exact) to |v| <= 1, so that features times values stay finite too
        v_max = finite_or_zero(v.detach()).abs().amax(dim=(-1, -2), keepdim=True)  # (b, h, 1, 1)
        value_scale = torch.exp2(torch.ceil(torch.log2(v_max.clamp_min(1.0))))
        v = v / value_scale
    q_features, k_features = pytorch_features(q, k, fmap, projection_matrix, causal=causal,
                                              key_padding_mask=key_padding_mask)
    eps = fmap.causal_eps(k, key_padding_mask) if causal else CAUSAL_EPS
    out = _last(before, _given_attention(_after(before, q_features, 1.0), k_features, v, causal, eps, use_triton))
    if value_scale is not None:
        out = out * value_scale
    return keep_rows(out, keep_q).to(out_dtype)


def _learned_projection(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, causal: bool, feature: int,
                        prefix: bool, backend: str) -> Tensor:
    """Fused-map attention whose projection takes gradients (a trainable matrix: performer-pytorch's
    einsums send it gradients): the PyTorch path's forward as plain operations that autograd
    records, on any device (the fused op's backward has no gradient for the projection); autograd
    then keeps (n, m) features for the backward, as performer-pytorch does."""
    if backend == "triton":
        raise ValueError("backend='triton': the fused kernels send no gradient to projection_matrix, which requires "
                         "grad; use backend='auto' or 'torch', or pass projection_matrix.detach()")
    return torch_backend.favor_fwd(q, k, v, projection, causal=causal, feature=feature, prefix=prefix)[0]


def _is_right_padding(keep: Tensor) -> bool:
    """Every row of the (b, s) bool mask is True up to some length, then False."""
    return not bool((keep[:, 1:] & ~keep[:, :-1]).any())


_PREFIX_PADDED_ON_THE_HOST = ("key_stabilizer='prefix' with a key_padding_mask reads the mask on the host (it compacts "
                              "each sequence): not under ")


@torch.compiler.disable  # reads the mask on the host: one graph break, here
def _prefix_padded(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, keep: Tensor, fmap: FeatureMap,
                   backend: str) -> Tensor:
    """Causal softmax attention with the prefix stabilizer and key_padding_mask keep (b, s): each
    batch row with its padded positions taken out, kept keys in their order (causality among them
    holds, and the prefix stabilizer runs over kept keys only).  The queries are the last n of the
    s positions; those at padded positions get 0.  Right padding needs no compaction (no kept query
    sees a later key): one call with the padded rows zeroed by selection, so that NaN or inf there
    reaches no gradient either."""
    n, s = q.shape[2], k.shape[2]
    keep_q = keep[:, s - n:]  # (b, n)
    try:
        right_padding = _is_right_padding(keep)
    except RuntimeError as error:  # vmap: a batched mask cannot steer Python (grad, jvp: unbatched, fine)
        raise NotImplementedError(_PREFIX_PADDED_ON_THE_HOST + "torch.func's vmap; loop over the batch") from error
    if right_padding:
        q, k, v = keep_rows(q, keep_q), keep_rows(k, keep), keep_rows(v, keep)
        out = favor_attention(q, k, v, projection, causal=True, key_stabilizer="prefix", feature_map=fmap,
                              backend=backend)
        return keep_rows(out, keep_q)
    rows = []
    for i in range(q.shape[0]):
        kq, kk = keep_q[i].nonzero()[:, 0], keep[i].nonzero()[:, 0]
        out = q.new_zeros(q.shape[1], n, v.shape[3])  # (h, n, e)
        if kq.numel():
            kept = favor_attention(q[i:i + 1, :, kq], k[i:i + 1, :, kk], v[i:i + 1, :, kk], projection, causal=True,
                                   key_stabilizer="prefix", feature_map=fmap, backend=backend)
            out = out.index_copy(1, kq, kept[0])
        rows.append(out)
    out = torch.stack(rows)
    # no row with a kept query: zeros that autograd must still see (no pass over out otherwise)
    return out if keep_q.any() else _connected(out, q, k, v)


def _packed(call, q: Tensor, k: Tensor, v: Tensor, cu_seqlens, initial_state, output_final_state: bool):
    """call(q_i, k_i, v_i, state_i) on every sequence of a packed batch (cu_seqlens: N + 1
    offsets into the length of q, k, v, batch 1, checked by check_cu_seqlens), outputs
    concatenated along the sequence and final states along the batch."""
    bounds = check_offsets([int(x) for x in cu_seqlens.tolist()], q.shape[2])
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        state = None if initial_state is None else AttentionState(*(t[i : i + 1] for t in initial_state))
        result = call(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state)
        out, final = result if output_final_state else (result, None)
        outs.append(out)
        finals.append(final)
    out = torch.cat(outs, dim=2)
    if not output_final_state:
        return out
    return out, AttentionState(*(torch.cat(parts, dim=0) for parts in zip(*finals)))


def _check_causal_state(causal: bool) -> None:
    if not causal:
        raise ValueError("initial_state / output_final_state: causal attention only (a state holds the keys before "
                         "the queries)")


def _favor_with_state(q, k, v, projection, fmap: FeatureMap, key_stabilizer: str, key_padding_mask, backend: str,
                      initial_state, output_final_state: bool, *, causal: bool, cu_seqlens: Tensor | None = None):
    """favor_attention from a state (checks, then the features and _with_state); cu_seqlens: a
    pack the fused kernels take (int32 on q's device), one state per sequence."""
    what = "initial_state / output_final_state"
    _check_causal_state(causal)
    if fmap.stabilized and key_stabilizer != "prefix":
        raise ValueError(f"{what} with softmax features need key_stabilizer='prefix': the global stabilizer is a "
                         "max over every key of the sequence, keys a state has not seen yet")
    if key_padding_mask is not None:
        raise ValueError(f"{what}: key_padding_mask is not supported; pass the kept keys only")
    check_stateful(fmap, what)
    if fmap.fused:
        projection = check_projection(projection, q, fixed_by="initial_state / output_final_state")
        projection = projection.to(q.dtype).contiguous()
        return _with_state(q, k, v, projection, fmap.code, fmap.stabilized, CAUSAL_EPS, initial_state,
                           output_final_state, backend, 0.0, cu_seqlens)
    q_features, k_features = pytorch_features(q, k, fmap, projection, causal=True)
    result = _with_state(q_features, k_features, v.to(q_features.dtype), None, GIVEN_MAP.code, False, CAUSAL_EPS,
                         initial_state, output_final_state, backend, 1.0)
    return (result[0].to(v.dtype), result[1]) if output_final_state else result.to(v.dtype)


def _with_state(q: Tensor, k: Tensor, v: Tensor, projection: Tensor | None, feature: int, prefix: bool, eps: float,
                initial_state, output_final_state: bool, backend: str, fill: float, cu_seqlens: Tensor | None = None):
    """The stateful causal op (ops.favor_with_state) on rows the op takes: q, k, or their features
    (GIVEN, projection None); cu_seqlens a pack for the kernels (its caller checked that they take
    it).  -> out, or (out, final state)."""
    use_triton = _use_triton(backend, q, v, projection is not None, extra=extension_unsupported(
        "a state", q.dtype, feature, 0 if projection is None else q.shape[3], v.shape[3]))
    (b, h, n, _), s, e = q.shape, k.shape[2], v.shape[3]
    m = k.shape[3] if projection is None else projection.shape[0]
    if cu_seqlens is not None:
        b = cu_seqlens.shape[0] - 1  # a state per sequence
    if initial_state is None:
        compute = compute_dtype(q.dtype)
        initial_state = AttentionState.empty(b, h, m, e, dtype=compute, device=q.device)
    else:
        initial_state = check_state(initial_state, b, h, m, e, q.device, softmax=prefix)
    if s == 0:  # no keys: the state as it was (a copy: the final state is never an input), in the
        # dtype a call with keys returns it in
        out = _empty_result(q, k, v)
        final = AttentionState(*(t.to(compute_dtype(q.dtype), copy=True) for t in initial_state))
        return (out, final) if output_final_state else out
    before = s - n  # placeholder queries (_after)
    outs = favor_with_state(_after(before, q, fill), k, v, projection, feature, prefix, float(eps), *initial_state,
                       use_triton, cu_seqlens)
    out = _last(before, outs[0])
    return (out, AttentionState(*outs[5:9])) if output_final_state else out


def _given_attention(q_features: Tensor, k_features: Tensor, v: Tensor, causal: bool, eps, use_triton: bool) -> Tensor:
    """The GIVEN op with eps (a float, or (b, h, 1, 1) for keys scaled per head) in the causal
    normaliser. A float is the op's causal_eps; a per-head eps enters as one extra key before the
    sequence, features eps and value 0, seen by every query (its own extra query's output is
    dropped), with the op's causal_eps 0: every term of the normaliser stays positive."""
    if causal and isinstance(eps, Tensor):
        def first(t: Tensor, fill) -> Tensor:  # (b, h, 1, .)
            return torch.zeros_like(t[..., :1, :]).add_(fill)

        q_features, k_features, v = (
            torch.cat((first(t, fill), t), dim=-2) for t, fill in ((q_features, 1.0), (k_features, eps), (v, 0.0))
        )
        return favor(q_features, k_features, v, None, causal, GIVEN_MAP.code, False, use_triton, 0.0)[0][..., 1:, :]
    return favor(q_features, k_features, v, None, causal, GIVEN_MAP.code, False, use_triton, float(eps))[0]


# Given features whose largest |entry| (per query row, per head of keys) lies beyond 2^+-32 have
# q' . k' products that over- or underflow fp32 (inf / NaN or 0 where the exact result is finite)
FEATURE_RANGE = 2.0**32


def _in_range(x: Tensor, dims) -> Tensor:
    """x times a power of 2 per slice over dims (detached, exact) that brings the largest |entry|
    of a slice to [1, 2) where it lies outside [1 / FEATURE_RANGE, FEATURE_RANGE]; other slices
    (zero, non-finite, in range) times 1."""
    if x.numel() == 0:
        return x
    peak = x.detach().abs().amax(dim=dims, keepdim=True).to(torch.float64)
    outside = peak.isfinite() & (peak > 0) & ((peak > FEATURE_RANGE) | (peak < 1.0 / FEATURE_RANGE))
    power = torch.where(outside, -torch.floor(torch.log2(peak)), 0.0)
    # in two halves: 2^power itself leaves the dtype's range for subnormal peaks (2^133 for fp32)
    half = torch.floor(power / 2)
    return x * torch.exp2(half).to(x.dtype) * torch.exp2(power - half).to(x.dtype)


def linear_attention(
    q_features: Tensor, k_features: Tensor, v: Tensor, *, causal: bool = False, backend: str = "auto",
    eps: float = CAUSAL_EPS, initial_state: AttentionState | None = None, output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> Tensor | tuple[Tensor, AttentionState]:
    """Linear attention on precomputed (positive) features, fused.
    q_features (b,h,n,m), k_features (b,h,s,m), v (b,h,s,e) -> (b,h,n,e).

    Non-causal: (q' @ (k'^T v)) / (q' . sum k'); causal adds eps (1.1.4's 1e-6) to every key-feature
    prefix sum; with fewer queries than keys the queries are the last n positions. Query features
    of any magnitude, and non-causal key features (rows and heads whose q' . k' products would
    leave fp32's range are scaled exactly first); causal key features whose prefix sums stay
    finite in fp32 (the causal eps is not scale-free).
    initial_state, output_final_state, cu_seqlens: as favor_attention's (states causal only).
    """
    q_features, k_features, v = _autocast(q_features, k_features, v)
    check_bool("causal", causal)
    check_bool("output_final_state", output_final_state)
    check_qkv(q_features, k_features, v, causal=causal, q_name="q_features", k_name="k_features")
    check_choice("backend", backend, BACKENDS)
    eps = check_float("eps", eps, 0.0)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q_features, k_features, initial_state)

        def one(q_i, k_i, v_i, state):
            return linear_attention(q_i, k_i, v_i, causal=causal, backend=backend, eps=eps, initial_state=state,
                                    output_final_state=output_final_state)

        return _packed(one, q_features, k_features, v, cu_seqlens, initial_state, output_final_state)
    # the result is invariant to a positive scale of each query row (and, non-causal, of the keys of
    # a head: causal eps is not), so features out of range are brought in exactly first
    q_features = _in_range(q_features, -1)
    if not causal:
        k_features = _in_range(k_features, (-2, -1))
    if initial_state is not None or output_final_state:
        _check_causal_state(causal)
        return _with_state(q_features, k_features, v, None, GIVEN_MAP.code, False, float(eps), initial_state,
                           output_final_state, backend, 1.0)
    if 0 in q_features.shape[:3] or v.shape[3] == 0:
        return _empty_result(q_features, k_features, v)
    use_triton = _use_triton(backend, q_features, v, False)
    before = k_features.shape[2] - q_features.shape[2] if causal else 0  # placeholder queries (_after)
    return _last(before, _given_attention(_after(before, q_features, 1.0), k_features, v, causal, float(eps),
                                          use_triton))
