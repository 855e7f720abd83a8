"""Argument checks shared by the public entry points: every bad input gets a ValueError or
TypeError that names the argument, what was received and what was expected."""
from __future__ import annotations

import math
import numbers
import operator
import warnings
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch._dynamo.comptime import comptime

KEY_STABILIZERS = ("global", "prefix")


class InputError(ValueError, AssertionError):
    """Bad input where performer-pytorch 1.1.4 asserted (sequence longer than max_seq_len, head
    counts, context to self-attention, ...): a ValueError that code written for 1.1.4, catching
    AssertionError, still catches."""


class DtypeError(TypeError, RuntimeError):
    """A dtype where performer-pytorch 1.1.4's torch calls raised RuntimeError (q, k, v of
    different dtypes, integer inputs, an input of another dtype than the weights, float token
    ids, integer masks): a TypeError that code written for 1.1.4, catching RuntimeError, still
    catches."""


class ShapeError(ValueError, RuntimeError):
    """q, k, v (or features) whose shapes do not fit together, where performer-pytorch 1.1.4's
    einsums raised RuntimeError: a ValueError that code written for 1.1.4, catching
    RuntimeError, still catches."""


class TokenRangeError(ValueError, IndexError):
    """Token ids outside the vocabulary, where 1.1.4's embedding raised IndexError: a ValueError
    that code written for 1.1.4, catching IndexError, still catches."""


BACKENDS = ("auto", "triton", "torch")


def check_tensor(name: str, t: object, ndim: int) -> Tensor:
    """t as a floating-point tensor of ndim dimensions (TypeError / ValueError naming it)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise DtypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    return t


def check_generator(generator: object) -> None:
    """generator: a private torch.Generator to draw from, or None (the global RNG)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__} {generator!r}")


def check_feature_input(data: object, projection_matrix: object, what: str, *, optional: bool = False) -> None:
    """The arguments of 1.1.4's module-level feature functions (`what`): data (..., n, d), rank >= 2,
    and projection_matrix (m, d) (or None where optional)."""
    if not isinstance(data, Tensor):
        raise TypeError(f"{what}: data must be a torch.Tensor, got {type(data).__name__}")
    if data.dim() < 2:
        raise ShapeError(f"{what}: data must have at least 2 dimensions (..., n, d), got shape {tuple(data.shape)}")
    if projection_matrix is None and optional:
        return
    if not isinstance(projection_matrix, Tensor):
        raise TypeError(f"{what}: projection_matrix must be a torch.Tensor{' or None' if optional else ''}, got "
                        f"{type(projection_matrix).__name__}")
    d, shape = data.shape[-1], projection_matrix.shape
    if len(shape) != 2 or d != shape[1] and 1 not in (d, shape[1]):  # (1.1.4's einsum broadcasts a d of 1)
        raise ShapeError(f"{what}: projection_matrix must have shape (nb_features, {data.shape[-1]}) for data of shape "
                         f"{tuple(data.shape)}, got {tuple(projection_matrix.shape)}")


def check_int(name: str, value: object, minimum: int, error: type[Exception] = InputError) -> int:
    """value as a Python int: any integer 1.1.4 takes (int, numpy integers, 0-d integer tensors;
    not bool).  A TypeError for anything else, `error` below minimum."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if number < minimum:
        raise error(f"{name} must be >= {minimum}, got {number}")
    return number


def check_float(name: str, value: object, minimum: float) -> float:
    """value as a finite float >= minimum (a Python or numpy real, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value}")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    """value as a bool (TypeError otherwise: a string or None is not silently true or false)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """value as one of choices (ValueError listing them)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def check_key_stabilizer(key_stabilizer: object, causal: bool) -> str:
    """One of KEY_STABILIZERS, and "prefix" for causal attention only."""
    check_choice("key_stabilizer", key_stabilizer, KEY_STABILIZERS)
    if key_stabilizer == "prefix" and not causal:
        raise ValueError("key_stabilizer='prefix' applies to causal attention only (causal=False here); non-causal "
                         "attention accepts 'global'")
    return key_stabilizer  # type: ignore[return-value]


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, q_name: str = "q", k_name: str = "k") -> None:
    """q (b, h, n, d), k (b, h, s, d), v (b, h, s, e): shapes, dtypes and devices agree."""
    for name, t in ((q_name, q), (k_name, k), ("v", v)):
        check_tensor(name, t, 4)
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise DtypeError(f"{q_name}, {k_name}, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if len({q.device, k.device, v.device}) != 1:
        raise ValueError(f"{q_name}, {k_name}, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ShapeError(
            f"{q_name}, {k_name}, v must share (batch, heads), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[2] != v.shape[2]:
        raise ShapeError(f"{k_name} and v must have the same length, got {k.shape[2]} and {v.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ShapeError(
            f"{q_name} and {k_name} must have the same last dimension, got {q.shape[3]} and {k.shape[3]}"
        )
    if q.shape[3] == 0:  # before any math: the features scale by d ** -0.25 (a ZeroDivisionError)
        names, shapes = ((q_name, f"shape {tuple(q.shape)}") if q_name == k_name else  # keys_state passes k twice
                         (f"{q_name} and {k_name}", f"shapes {tuple(q.shape)} and {tuple(k.shape)}"))
        raise ValueError(f"{names} must have a last dimension (head dim / features) >= 1, got {shapes}")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(
            f"causal attention takes at most as many queries as keys ({q_name} is the last n of the s positions "
            f"of {k_name}), got {q_name} of length {q.shape[2]} and {k_name} of length {k.shape[2]}"
        )
    if q.shape[2] > 0 and k.shape[2] == 0:
        raise ValueError(f"{k_name} has length 0 but {q_name} has {q.shape[2]} positions: nothing to attend to")


def check_projection(projection: object, q: Tensor, *, fixed_by: str | None = None, name: str = "q") -> Tensor:
    """The (m, d) projection for the head dim d of q (the call's argument called name).  fixed_by:
    the feature that sends it no gradient (a projection that requires grad is then an error while
    autograd records)."""
    p = check_tensor("projection_matrix", projection, 2)
    if p.shape[1] != q.shape[-1]:
        raise ValueError(
            f"projection_matrix must have shape (nb_features, {q.shape[-1]}) to match the head dim of {name}, "
            f"got {tuple(p.shape)}"
        )
    if p.shape[0] < 1:
        raise ValueError(f"projection_matrix must have at least one row, got {tuple(p.shape)}")
    if p.device != q.device:
        raise ValueError(f"projection_matrix must be on {name}'s device {q.device}, got {p.device}")
    if fixed_by and p.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"projection_matrix requires grad, but {fixed_by} keep it fixed (no gradient flows into it); pass "
            "projection_matrix.detach() (favor_attention without them sends it gradients, as performer-pytorch does)"
        )
    return p


def check_key_padding_mask(mask: object, k: Tensor) -> Tensor:
    """mask as a bool (b, s) tensor on k's device (k (b, h, s, d)), True = keep."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise DtypeError(f"key_padding_mask must be a bool tensor (True = keep), got {mask.dtype}")
    b, s = k.shape[0], k.shape[2]
    if tuple(mask.shape) != (b, s):
        raise ValueError(f"key_padding_mask must have shape (batch, key length) = ({b}, {s}), got {tuple(mask.shape)}")
    if mask.device != k.device:
        raise ValueError(f"key_padding_mask must be on {k.device}, got {mask.device}")
    return mask


_WARNED: set[tuple[str, str]] = set()


def warn_ignored(where: str, names: Iterable[str], why: str = "performer-pytorch 1.1.4 ignores it too") -> None:
    """One warning per (where, name) for arguments accepted and ignored as 1.1.4 does (a
    drop-in never turns 1.1.4's silent acceptance into an error).  Under torch.compile it is
    given while the call is traced (torch.compile cannot trace warnings.warn: fullgraph=True
    would fail on the argument), not by the compiled graph."""
    names = tuple(names)
    if torch.compiler.is_compiling():  # (torch.export's non-strict tracing runs the fallback)
        comptime(_warn_while_tracing, lambda: _warn_once(where, names, why))
        return
    _warn_once(where, names, why)


def ignored_unless(where: str, name: str, value: object, kind: type | tuple[type, ...], what: str) -> Any:
    """value when it is None or a kind; anything else 1.1.4 took (and ignored) among a call's
    keywords is ignored with a one-time warning (warn_ignored): None.  what names kind."""
    if value is None or isinstance(value, kind):
        return value
    warn_ignored(where, [name], f"a {type(value).__name__}, not {what}; performer-pytorch 1.1.4 ignores it too")
    return None


def _warn_while_tracing(ctx) -> None:
    """warn_ignored's warning, run by torch.compile at trace time with warn_ignored's locals
    (a comptime function may not close over variables)."""
    _warn_once(*(ctx.get_local(name).as_python_constant() for name in ("where", "names", "why")))


def _warn_once(where: str, names: tuple[str, ...], why: str) -> None:
    for name in sorted(names):
        if (where, name) not in _WARNED:
            _WARNED.add((where, name))
            warnings.warn(f"{where}: argument {name!r} is ignored ({why})", UserWarning, stacklevel=4)


def ignored_kwargs(where: str, kwargs: dict[str, Any]) -> None:
    """warn_ignored for the non-None keyword arguments in kwargs."""
    warn_ignored(where, (key for key, value in kwargs.items() if value is not None))


def check_cu_seqlens(cu_seqlens: object, q: Tensor, k: Tensor, initial_state: object) -> None:
    """A packed batch: cu_seqlens a 1-D int32 / int64 tensor of N + 1 offsets, q, k, v of batch 1
    with one length, one initial state per sequence; in eager mode the offsets themselves, read
    once on the host (rising from 0 to the packed length).  A compiled graph skips that read (a
    host sync): the kernels clamp the offsets they read, and the PyTorch path, which reads them
    anyway, checks them there (check_offsets)."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32,
                                                                                              torch.int64):
        got = f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, Tensor) else type(
            cu_seqlens).__name__
        raise TypeError(f"cu_seqlens must be a 1-D int32 or int64 tensor of N + 1 sequence offsets, got {got}")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q, k, v hold the packed sequences as (1, h, total, .), got batch {q.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"cu_seqlens packs queries and keys alike: q and k need one length, got {q.shape[2]} and "
                         f"{k.shape[2]}")
    count = cu_seqlens.shape[0] - 1
    if count < 1:
        raise ValueError(f"cu_seqlens must hold N + 1 >= 2 offsets, got {cu_seqlens.shape[0]}")
    if cu_seqlens.device not in (q.device, torch.device("cpu")):
        raise ValueError(f"cu_seqlens must be on q's device {q.device} or the CPU, got {cu_seqlens.device}")
    if initial_state is not None:
        check_state_tuple(initial_state, "initial_state")
        batches = [t.shape[0] if t.dim() else None for t in initial_state]
        if any(n != count for n in batches):
            raise ValueError(f"with cu_seqlens, initial_state holds one state per sequence: batch {count} expected in "
                             f"hz, v_sum, ref and stab, got {batches}")
    if host_reads(cu_seqlens):
        check_offsets(cu_seqlens.tolist(), q.shape[2])


def in_transform() -> bool:
    """A torch.func transform (vmap, grad, jvp, ...) is active: no in-place op without a batching
    rule (baddbmm_, addcmul_, tril_ would run one example at a time, with a warning), and no value
    steering Python (vmap cannot turn a batched value into one Python value)."""
    return torch._C._are_functorch_transforms_active()


def host_reads(*tensors: torch.Tensor) -> bool:
    """Checks may read the values of tensors on the host: not while torch.compile traces (a graph
    break), under torch.func's transforms (in_transform), or of meta tensors (which hold none)."""
    return not (torch.compiler.is_compiling() or in_transform() or any(t.is_meta for t in tensors))


def check_offsets(bounds: list[int], total: int) -> list[int]:
    """cu_seqlens read on the host: rising from 0 to the packed length total."""
    if bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the packed length {total} (N + 1 >= 2 offsets), got "
                         f"{bounds[:8]}{' ...' if len(bounds) > 8 else ''}")
    return bounds


def calls_observed(module: nn.Module, base: type, *, backward: bool = False) -> bool:
    """Whether code of the caller's would see module's calls, so that computing its result another
    way (fused, or from a cache) would be noticed: a forward other than base's (a subclass's, or one
    put on the instance), or forward hooks (and with backward, backward hooks) on it, on any
    submodule, or global ones."""
    if not runs_base_forward(module, base):
        return True
    kinds = ("_forward_hooks", "_forward_pre_hooks") + (("_backward_hooks", "_backward_pre_hooks") if backward else ())
    if any(getattr(nn.modules.module, f"_global{kind}", None) for kind in kinds):
        return True
    return any(getattr(m, kind, None) for m in module.modules() for kind in kinds)


def runs_base_forward(module: nn.Module, base: type) -> bool:
    """Whether module is a base whose forward is base's: not overridden by a subclass or on the
    instance, compiled or not (torch.compile(module), or module.forward = torch.compile(module.forward))."""
    module = getattr(module, "_orig_mod", module)
    if not isinstance(module, base) or type(module).forward is not base.forward:
        return False
    forward = vars(module).get("forward")
    if forward is None:
        return True
    compiled = getattr(forward, "_torchdynamo_orig_callable", None)  # torch.compile's wrapper
    return getattr(compiled, "__func__", None) is base.forward and getattr(compiled, "__self__", None) is module


def check_state_tuple(state: object, what: str) -> None:
    """state as an AttentionState's four tensors, hz 4-D (TypeError / ValueError naming `what`)."""
    if not isinstance(state, tuple) or len(state) != 4 or not all(isinstance(t, Tensor) for t in state):
        raise TypeError(f"{what} must be an AttentionState (hz, v_sum, ref, stab), got {type(state).__name__}")
    if state[0].dim() != 4:
        raise ValueError(f"{what}.hz must have shape (b, h, m, e + 1), got {tuple(state[0].shape)}")
