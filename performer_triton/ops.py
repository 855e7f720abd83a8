"""torch.library custom ops for FAVOR+ attention, with autograd and fake (meta) kernels.

One forward op and one backward op. The forward also returns the key states its backward reads
(kernels.launchers: the fused kernels' chunk states; the PyTorch path's non-causal context),
saved by autograd in place of a second walk over the keys. `use_triton` picks the
implementation: the fused Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
or the chunked pure-PyTorch path (performer_triton.torch_backend). Both follow the launcher
contract of kernels/NOTES.md, so the op is opaque to torch.compile (no graph breaks) and passes
torch.library.opcheck.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import __version__, torch_backend
from .feature_maps import KERNEL_MAPS
from .kernels import CAUSAL_EPS, launchers
from .validation import in_transform


def _tag_compile_caches() -> None:
    """torch.compile's on-disk caches key a graph by its code, not by what the custom ops in it
    compute or save (pytorch/pytorch#144344): a graph cached under an older release replayed its
    backward with the older ops' saved tensors. This release joins torch's cache key tag (kept
    with any tag the user set), so an upgrade compiles afresh once."""
    tag = f"performer_triton-{__version__}"
    current = torch.compiler.config.cache_key_tag
    if tag not in current.split("+"):
        torch.compiler.config.cache_key_tag = f"{current}+{tag}" if current else tag


_tag_compile_caches()


def _unit_stride(t: Tensor) -> Tensor:
    """Kernels take any batch/head/sequence strides but need a unit last-dim stride. A size-1
    last dim may carry any stride (and .contiguous() keeps it): only index 0 is read, so its
    stride is set to 1 in place of a copy."""
    if t.stride(-1) == 1:
        return t
    if t.shape[-1] == 1:
        return t.as_strided(t.shape, (*t.stride()[:-1], 1))
    return t.contiguous()


def _favor_fwd(
    q: Tensor, k: Tensor, v: Tensor, projection: Optional[Tensor], causal: bool, feature: int, prefix: bool,
    use_triton: bool, causal_eps: float = CAUSAL_EPS, cu_seqlens: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """(out, q_max, k_max, k_scale, rden, states); see kernels/NOTES.md. causal_eps: the eps added
    to every key-feature prefix sum of the causal normaliser (1.1.4's 1e-6). cu_seqlens: packed
    sequences in q, k, v (1, h, total, .), on the fused kernels only."""
    q, k, v = map(_unit_stride, (q, k, v))
    flags = dict(feature=feature, prefix=prefix, causal_eps=causal_eps) | _pack_flags(cu_seqlens, use_triton)
    if use_triton:
        return launchers(causal)[0](q, k, v, projection, **flags)
    return torch_backend.favor_fwd(q, k, v, projection, causal=causal, **flags)


favor_fwd = torch.library.custom_op("performer_triton::favor_fwd", _favor_fwd, mutates_args=())


def _pack_flags(cu_seqlens: Optional[Tensor], use_triton: bool) -> dict:
    """The launchers' cu_seqlens keyword: only where given (the PyTorch path takes none)."""
    if cu_seqlens is None:
        return {}
    if not use_triton:
        raise ValueError("cu_seqlens: the ops take packed sequences on the fused kernels only; "
                         "performer_triton.favor_attention runs the PyTorch path one sequence at a time")
    return dict(cu_seqlens=cu_seqlens)


@favor_fwd.register_fake
def _(q, k, v, projection, causal, feature, prefix, use_triton, causal_eps=CAUSAL_EPS, cu_seqlens=None):
    b, h, n, _ = q.shape
    s, e = k.shape[2], v.shape[3]
    softmax = KERNEL_MAPS[feature].stabilized

    def stat(rows: int) -> Tensor:  # fp32 statistics, fp64 for fp64 inputs
        return q.new_empty((b, h, rows), dtype=torch_backend.compute_dtype(q.dtype))

    if use_triton:
        states = launchers(causal)[2](q, k, v, projection, feature=feature, prefix=prefix,
                                      **_pack_flags(cu_seqlens, use_triton))
    else:
        states = torch_backend.saved_like(q, v, projection, causal)
    # the non-causal kernels take their key maxima on tiles: no per-row key statistics
    key_rows = s if softmax and (causal or not use_triton) else 0
    return (
        q.new_empty((b, h, n, e)),
        stat(n if softmax else 0),
        stat(key_rows),
        stat(key_rows),
        stat(n),
        states,
    )


def _favor_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Optional[Tensor],
    out: Tensor,
    q_max: Tensor,
    k_max: Tensor,
    k_scale: Tensor,
    rden: Tensor,
    states: list[Tensor],
    causal: bool,
    feature: int,
    prefix: bool,
    use_triton: bool,
    causal_eps: float = CAUSAL_EPS,
    cu_seqlens: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for favor_fwd."""
    grad_out, q, k, v = map(_unit_stride, (grad_out, q, k, v))
    args = (grad_out, q, k, v, projection, out, q_max, k_max, k_scale, rden)
    flags = dict(feature=feature, prefix=prefix, causal_eps=causal_eps) | _pack_flags(cu_seqlens, use_triton)
    if use_triton:
        return launchers(causal)[1](*args, states, **flags)
    return torch_backend.favor_bwd(*args, causal=causal, saved=states, **flags)[:3]


favor_bwd = torch.library.custom_op("performer_triton::favor_bwd", _favor_bwd, mutates_args=())


@favor_bwd.register_fake
def _(grad_out, q, k, v, projection, out, q_max, k_max, k_scale, rden, states, causal, feature, prefix, use_triton,
      causal_eps=CAUSAL_EPS, cu_seqlens=None):
    # contiguous, whatever the inputs' strides: what every implementation returns (a fake with
    # other strides than the real op corrupts aot_autograd's output replay under torch.compile)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    # the dispatcher drops trailing arguments equal to their defaults (causal_eps, cu_seqlens)
    q, k, v, projection, causal, feature, prefix, use_triton, *rest = inputs
    causal_eps, cu_seqlens = (*rest, *(CAUSAL_EPS, None)[len(rest):])
    out, q_max, k_max, k_scale, rden, states = output
    ctx.save_for_backward(q, k, v, projection, out, q_max, k_max, k_scale, rden, cu_seqlens, *states)
    ctx.flags = (causal, feature, prefix, use_triton, causal_eps)
    ctx.mark_non_differentiable(q_max, k_max, k_scale, rden, *states)
    # the gradients of the statistics and states are never used: no zero tensors of their size
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, *unused_grads, bwd=favor_bwd):
    q, k, v, projection, out, q_max, k_max, k_scale, rden, cu_seqlens, *states = ctx.saved_tensors
    if grad_out is None:  # only reached through the non-differentiable outputs
        grad_out = torch.zeros_like(out)
    causal, feature, prefix, _, causal_eps = ctx.flags
    if _graph_needed(cu_seqlens, grad_out):
        dq, dk, dv = _differentiable_grads(
            lambda q, k, v: torch_backend.favor_fwd(q, k, v, projection, causal=causal, feature=feature, prefix=prefix,
                                                    causal_eps=causal_eps)[:1], (q, k, v), (grad_out,))
    else:
        dq, dk, dv = bwd(grad_out, q, k, v, projection, out, q_max, k_max, k_scale, rden, states, *ctx.flags,
                         cu_seqlens=cu_seqlens)
    # one gradient per argument the op was called with: the dispatcher drops trailing arguments
    # equal to their defaults (causal_eps, cu_seqlens), and a list output makes autograd count exactly
    return dq, dk, dv, *(None,) * (len(ctx.needs_input_grad) - 3)


def _graph_needed(cu_seqlens: Optional[Tensor], *grads: Optional[Tensor]) -> bool:
    """The backward runs as plain operations (_differentiable_grads): under create_graph, or with
    gradients batched by torch's legacy vmap (torch.autograd.grad(is_grads_batched=True),
    torch.autograd.functional.jacobian(vectorize=True)), which takes no batching rule of a custom
    op and has no loop fallback for ops with list arguments."""
    def legacy_batched(t: Tensor) -> bool:
        keys = str(torch._C._dispatch_keys(t))  # "DispatchKeySet(A, B, ...)"
        return "Batched" in keys[keys.find("(") + 1 : -1].split(", ")

    needed = torch.is_grad_enabled() or any(g is not None and legacy_batched(g) for g in grads)
    if needed and cu_seqlens is not None:
        raise NotImplementedError("a backward with create_graph=True or batched gradients through packed sequences "
                                  "(cu_seqlens)")
    return needed


def _differentiable_grads(forward, inputs: tuple[Tensor, ...], grads: tuple[Optional[Tensor], ...]
                          ) -> tuple[Optional[Tensor], ...]:
    """Gradients of forward(*inputs) (outputs paired with grads; None: no gradient) for the inputs
    that require grad, with a graph of their own (forces trained as -dE/dx, gradient penalties,
    Hessian-vector products; 1.1.4's einsums allow them): forward is the PyTorch path again, under
    autograd (its statistics detached, as the backward treats them).  On any device, for either
    implementation of the op's forward; autograd keeps the intermediates, O(n m) per head."""
    needs = [x.requires_grad for x in inputs]
    with torch.enable_grad():
        # one graph node per role: q, k, v may be one tensor, or depend on each other (q = x @ w, k = x)
        inputs = tuple(x.view_as(x) for x in inputs)
        outputs = forward(*inputs)
    # outputs that depend on no input needing grad (the final state of a call whose keys need none)
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
    if not pairs:
        return tuple(None for _ in needs)
    found = iter(torch.autograd.grad([o for o, _ in pairs], [x for x, need in zip(inputs, needs) if need],
                                     [g for _, g in pairs], create_graph=True, allow_unused=True))
    return tuple(next(found) if need else None for need in needs)


favor_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- with a state
# Causal attention that starts from a state and returns the state after its keys
# (performer_triton.attention_state), forward and backward on the fused kernels (use_triton;
# the kernels' key states saved as favor_fwd's) or the PyTorch path; hz0, v_sum0 and the final
# hz, v_sum are differentiable, the references and stabilizers are constants (as every stabilizer).


def _favor_state_fwd(
    q: Tensor, k: Tensor, v: Tensor, projection: Optional[Tensor], feature: int, prefix: bool, causal_eps: float,
    hz0: Tensor, v_sum0: Tensor, ref0: Tensor, stab0: Tensor, use_triton: bool, cu_seqlens: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """(out, q_max, k_max, k_scale, rden, hz, v_sum, ref, stab, states): causal favor_fwd from the
    state (hz0, v_sum0, ref0, stab0), the state after the last key in the compute dtype, and the
    key states the backward reads (the kernels', or the PyTorch path's states before each chunk).
    cu_seqlens: a pack (favor_fwd's), the states per sequence, on the kernels only."""
    q, k, v = map(_unit_stride, (q, k, v))
    if use_triton:
        from .kernels.causal import causal_fwd_state  # imports triton

        *outs, states, final = causal_fwd_state(q, k, v, projection, [hz0, v_sum0, ref0, stab0], feature=feature,
                                                prefix=prefix, causal_eps=causal_eps,
                                                **_pack_flags(cu_seqlens, use_triton))
        return (*outs, *final, states)
    _pack_flags(cu_seqlens, use_triton)
    return _torch_state_fwd(q, k, v, projection, feature, prefix, causal_eps, hz0, v_sum0, ref0, stab0)


def _torch_state_fwd(q, k, v, projection, feature, prefix, causal_eps, hz0, v_sum0, ref0, stab0):
    """favor_state_fwd's outputs from the PyTorch path."""
    out, q_max, k_max, k_scale, rden, saved = torch_backend.favor_fwd(
        q, k, v, projection, causal=True, feature=feature, prefix=prefix, causal_eps=causal_eps,
        initial=(hz0, v_sum0, ref0, stab0), final=True)
    return out, q_max, k_max, k_scale, rden, *saved[2:], saved[:2]


favor_state_fwd = torch.library.custom_op("performer_triton::favor_state_fwd", _favor_state_fwd, mutates_args=())


@favor_state_fwd.register_fake
def _(q, k, v, projection, feature, prefix, causal_eps, hz0, v_sum0, ref0, stab0, use_triton, cu_seqlens=None):
    b, h, n, _ = q.shape
    s = k.shape[2]
    softmax = KERNEL_MAPS[feature].stabilized
    compute = torch_backend.compute_dtype(q.dtype)

    def like(t: Tensor) -> Tensor:
        return t.new_empty(t.shape, dtype=compute)

    if use_triton:
        states = launchers(True)[2](q, k, v, projection, feature=feature, prefix=prefix, state=True,
                                    **_pack_flags(cu_seqlens, True))
    else:
        states = torch_backend.saved_like(q, v, projection, True)
    return (q.new_empty((b, h, n, v.shape[3])), *(q.new_empty((b, h, rows), dtype=compute) for rows in
            (n if softmax else 0, s if softmax else 0, s if softmax else 0, n)),
            like(hz0), like(v_sum0), like(ref0), like(stab0), states)


def _favor_state_bwd(
    grad_out: Tensor, grad_hz: Optional[Tensor], grad_v_sum: Optional[Tensor],
    q: Tensor, k: Tensor, v: Tensor, projection: Optional[Tensor], out: Tensor, q_max: Tensor, k_max: Tensor,
    k_scale: Tensor, rden: Tensor, hz0: Tensor, v_sum0: Tensor, ref0: Tensor, stab0: Tensor, ref: Tensor,
    states: list[Tensor], feature: int, prefix: bool, causal_eps: float, use_triton: bool,
    cu_seqlens: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d hz0, d v_sum0) for favor_state_fwd; grad_hz, grad_v_sum: the final state's
    gradients (None: it had none), ref its reference, states the forward's key states."""
    grad_out, q, k, v = map(_unit_stride, (grad_out, q, k, v))
    if use_triton:
        from .kernels.causal import causal_bwd_state  # imports triton

        dq, dk, dv, d_hz0, d_vs0 = causal_bwd_state(
            grad_out, grad_hz, grad_v_sum, q, k, v, projection, out, q_max, k_max, k_scale, rden, states,
            [hz0, v_sum0, ref0, stab0], feature=feature, prefix=prefix, causal_eps=causal_eps,
            **_pack_flags(cu_seqlens, use_triton))
        return dq, dk, dv, d_hz0.to(hz0.dtype), d_vs0.to(v_sum0.dtype)
    _pack_flags(cu_seqlens, use_triton)
    final = None
    if grad_hz is not None or grad_v_sum is not None:
        final = ((None, None, ref, None), grad_hz, grad_v_sum)
    dq, dk, dv, (d_hz0, d_vs0) = torch_backend.favor_bwd(
        grad_out, q, k, v, projection, out, q_max, k_max, k_scale, rden, causal=True, feature=feature, prefix=prefix,
        causal_eps=causal_eps, saved=states, initial=(hz0, v_sum0, ref0, stab0), final=final)
    return dq, dk, dv, d_hz0, d_vs0


favor_state_bwd = torch.library.custom_op("performer_triton::favor_state_bwd", _favor_state_bwd, mutates_args=())


@favor_state_bwd.register_fake
def _(grad_out, grad_hz, grad_v_sum, q, k, v, projection, out, q_max, k_max, k_scale, rden, hz0, v_sum0, ref0, stab0,
      ref, states, feature, prefix, causal_eps, use_triton, cu_seqlens=None):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), hz0.new_empty(hz0.shape),
            v_sum0.new_empty(v_sum0.shape))


def _setup_state_context(ctx, inputs, output):
    # the dispatcher drops a trailing cu_seqlens equal to its default
    q, k, v, projection, feature, prefix, causal_eps, hz0, v_sum0, ref0, stab0, use_triton, *rest = inputs
    cu_seqlens = rest[0] if rest else None
    out, q_max, k_max, k_scale, rden, _, _, ref, stab, states = output
    ctx.save_for_backward(q, k, v, projection, out, q_max, k_max, k_scale, rden, hz0, v_sum0, ref0, stab0, ref,
                          cu_seqlens, *states)
    ctx.flags = (feature, prefix, causal_eps, use_triton)
    ctx.mark_non_differentiable(q_max, k_max, k_scale, rden, ref, stab, *states)
    ctx.set_materialize_grads(False)


def _state_backward(ctx, grad_out, _q_max, _k_max, _k_scale, _rden, grad_hz, grad_v_sum, _ref, _stab, *_states,
                    bwd=favor_state_bwd):
    (q, k, v, projection, out, q_max, k_max, k_scale, rden, hz0, v_sum0, ref0, stab0, ref, cu_seqlens,
     *states) = ctx.saved_tensors
    if grad_out is None:  # only the final state is used
        grad_out = torch.zeros_like(out)
    feature, prefix, causal_eps, _ = ctx.flags
    if _graph_needed(cu_seqlens, grad_out, grad_hz, grad_v_sum):

        def forward(q, k, v, hz0, v_sum0):
            out, _, _, _, _, hz, v_sum, *_ = _torch_state_fwd(q, k, v, projection, feature, prefix, causal_eps, hz0,
                                                              v_sum0, ref0, stab0)
            return out, hz, v_sum

        dq, dk, dv, d_hz0, d_vs0 = _differentiable_grads(forward, (q, k, v, hz0, v_sum0),
                                                          (grad_out, grad_hz, grad_v_sum))
        return (dq, dk, dv, None, None, None, None, d_hz0, d_vs0, *(None,) * (len(ctx.needs_input_grad) - 9))
    dq, dk, dv, d_hz0, d_vs0 = bwd(grad_out, grad_hz, grad_v_sum, q, k, v, projection, out, q_max, k_max,
                                   k_scale, rden, hz0, v_sum0, ref0, stab0, ref, states, *ctx.flags,
                                   cu_seqlens=cu_seqlens)
    # one gradient per argument the op was called with (a trailing default cu_seqlens is dropped)
    return (dq, dk, dv, None, None, None, None, d_hz0, d_vs0, *(None,) * (len(ctx.needs_input_grad) - 9))


favor_state_fwd.register_autograd(_state_backward, setup_context=_setup_state_context)


# ----------------------------------------------------------------------------- eager calls
# torch.library's dispatch of a custom op with autograd (op -> autograd -> backend ->
# dynamo-disabled wrapper, again for the backward op) cost host time the H200 run could not hide:
# 2.3 ms per causal fwd+bwd of 1.55 ms of kernels (bench/RESULTS.md).  Eager calls of the fused
# kernels on plain tensors run each op's implementation, setup_context and backward as one
# autograd.Function instead; compile, fake tensors and the PyTorch path keep the ops.


class _Eager(torch.autograd.Function):
    """op = (implementation, setup_context, backward, backward implementation) of a custom op
    whose last output is a list of tensors (returned flat: autograd tracks tensors, not lists).
    A backward that builds a graph (create_graph) takes the op's own route for it, as the custom
    op does (_differentiable_grads; with a state, NotImplementedError)."""

    @staticmethod
    def forward(ctx, op, *inputs):
        fwd, setup, *_ = ctx.op = op
        outputs = fwd(*inputs)
        setup(ctx, inputs, outputs)
        return *outputs[:-1], *outputs[-1]

    @staticmethod
    def backward(ctx, *grads):
        _, _, backward, bwd = ctx.op
        # backward counts its gradients from needs_input_grad, which here counts op too
        return None, *backward(ctx, *grads, bwd=bwd)[:-1]


_FAVOR = (_favor_fwd, _setup_context, _backward, _favor_bwd)
_FAVOR_STATE = (_favor_state_fwd, _setup_state_context, _state_backward, _favor_state_bwd)


def _plain_eager(inputs: tuple) -> bool:
    """Tensor inputs plain (or parameters), outside torch.compile, torch.jit tracing, functorch
    transforms and torch function or dispatch modes (fake and meta tensors, FlopCounterMode, vmap;
    torch.device as a context manager too): where the op's dispatch does nothing."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or in_transform():
        return False
    if _get_current_dispatch_mode() is not None or torch._C._is_torch_function_mode_enabled():
        return False
    return all(type(t) in (Tensor, torch.nn.Parameter) for t in inputs if isinstance(t, Tensor))


# ----------------------------------------------------------------------------- torch.func
# A custom op with register_autograd fails under torch.func's transforms (its generated
# autograd.Function has no setup_context: pytorch/pytorch#179652) and has no batching rule, and
# forward-mode AD through it gives zero tangents without an error.  Under a transform or forward
# AD the ops' PyTorch path runs as plain torch operations instead: autograd, vmap and forward AD
# then derive everything from them (the same numbers; autograd keeps the forward's intermediates,
# O(n m) per head, where the op saves O(m e)).


def transformed() -> bool:
    """A torch.func transform (vmap, grad, jvp, jacrev, ...) or forward-mode AD is active, outside
    torch.compile (which traces transforms itself and keeps the ops)."""
    if torch.compiler.is_compiling():
        return False
    return in_transform() or torch.autograd.forward_ad._current_level >= 0


def _batched_alike(*tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    """The tensors plus an exact zero batched as all of them together: the PyTorch path writes
    products into tensors made from one input, which vmap refuses when another input carries a
    batch dimension that one lacks (adding 0 changes no value; -0 becomes +0)."""
    zero = sum(torch.zeros_like(t.sum()) for t in tensors if t is not None)
    return [None if t is None else t + zero.to(t.dtype) for t in tensors]


def _vmap_by_loop(op):
    """A batching rule for op: one call per entry of the batch, outputs stacked (vmap of the
    backward ops under torch.autograd.functional.jacobian(vectorize=True) or is_grads_batched,
    whose forward ran outside the transform)."""

    def entry(arg, dim, i: int):
        if isinstance(arg, (list, tuple)):
            dims = dim if isinstance(dim, (list, tuple)) else [dim] * len(arg)
            return [entry(a, d, i) for a, d in zip(arg, dims)]
        return arg if dim is None else arg.select(dim, i)

    def stack(parts: list):  # -> (stacked, out_dims) of one output: a tensor, or a list of them
        if isinstance(parts[0], (list, tuple)):
            return [torch.stack(column) for column in zip(*parts)], [0] * len(parts[0])
        return torch.stack(parts), 0

    def rule(info, in_dims, *args, **kwargs):
        calls = [op(*(entry(a, d, i) for a, d in zip(args, in_dims)), **kwargs) for i in range(info.batch_size)]
        outputs, out_dims = zip(*(stack(list(column)) for column in zip(*calls)))
        return tuple(outputs), tuple(out_dims)

    op.register_vmap(rule)


for _op in (favor_fwd, favor_bwd, favor_state_fwd, favor_state_bwd):
    _vmap_by_loop(_op)


def _call(op, custom_op, fixed: int, use_triton: bool, *inputs):
    if use_triton and _plain_eager(inputs):
        outputs = _Eager.apply(op, *inputs)
        return *outputs[:fixed], list(outputs[fixed:])
    return custom_op(*inputs)


def favor(
    q: Tensor, k: Tensor, v: Tensor, projection: Optional[Tensor], causal: bool, feature: int, prefix: bool,
    use_triton: bool, causal_eps: float = CAUSAL_EPS, cu_seqlens: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """favor_fwd with autograd, eager fused calls without the op's dispatch (_Eager), under torch.func
    the PyTorch path as plain operations (packs excepted: the callers split them)."""
    if transformed():
        if use_triton or cu_seqlens is not None:
            raise RuntimeError("torch.func transforms and forward-mode AD run the PyTorch path, one sequence at a time")
        q, k, v, projection = _batched_alike(q, k, v, projection)
        return torch_backend.favor_fwd(q, k, v, projection, causal=causal, feature=feature, prefix=prefix,
                                       causal_eps=causal_eps)
    return _call(_FAVOR, favor_fwd, 5, use_triton, q, k, v, projection, causal, feature, prefix, use_triton,
                 causal_eps, cu_seqlens)


def favor_with_state(
    q: Tensor, k: Tensor, v: Tensor, projection: Optional[Tensor], feature: int, prefix: bool, causal_eps: float,
    hz0: Tensor, v_sum0: Tensor, ref0: Tensor, stab0: Tensor, use_triton: bool, cu_seqlens: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """favor_state_fwd with autograd, eager fused calls without the op's dispatch (_Eager), under
    torch.func the PyTorch path as plain operations (as favor)."""
    if transformed():
        if use_triton or cu_seqlens is not None:
            raise RuntimeError("torch.func transforms and forward-mode AD run the PyTorch path, one sequence at a time")
        q, k, v, projection, hz0, v_sum0, ref0, stab0 = _batched_alike(q, k, v, projection, hz0, v_sum0, ref0, stab0)
        return _torch_state_fwd(q, k, v, projection, feature, prefix, causal_eps, hz0, v_sum0, ref0, stab0)
    return _call(_FAVOR_STATE, favor_state_fwd, 9, use_triton, q, k, v, projection, feature, prefix, causal_eps,
                 hz0, v_sum0, ref0, stab0, use_triton, cu_seqlens)
