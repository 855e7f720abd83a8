"""Layer sequences with keyword routing: plain residual (SequentialSequence) and reversible
(ReversibleSequence, activations recomputed in backward), with performer-pytorch 1.1.4's classes,
attribute names (so state_dict keys match) and behaviour.

As in 1.1.4, a keyword argument that no layer is routed to is dropped: silently by route_args (a
program's own sequence may pass flags of its own), with a one-time warning naming it by the
sequences of a Performer (real programs pass such arguments, e.g.
AutoregressiveWrapper(model)(x, return_loss=True)).
"""
from __future__ import annotations

import warnings
from operator import itemgetter  # noqa: F401  (a 1.1.4 module-level name)
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import Function
from torch.utils.checkpoint import get_device_states, set_device_states

from .validation import InputError, ignored_kwargs

# `from performer_triton.reversible import *` binds what performer-pytorch 1.1.4's module binds, no more
__all__ = [
    "Deterministic", "Function", "ReversibleBlock", "ReversibleSequence", "SequentialSequence",
    "get_device_states", "itemgetter", "nn", "route_args", "set_device_states", "torch"
]

Routes = dict[str, Sequence[tuple[bool, bool]]]


def route_args(router: Routes, args: dict[str, Any], depth: int) -> list[tuple[dict, dict]]:
    """Split keyword arguments into per-layer (f_args, g_args) following ``router``, which maps a
    name to one (to_f, to_g) pair of flags per layer; others are dropped (as 1.1.4: a program's own
    sequence may pass flags of its own)."""
    routed: list[tuple[dict, dict]] = [({}, {}) for _ in range(depth)]
    for key, val in args.items():
        if key not in router:
            continue
        for (f_args, g_args), (to_f, to_g) in zip(routed, router[key]):
            if to_f:
                f_args[key] = val
            if to_g:
                g_args[key] = val
    return routed


def _layer_args(router: Routes, args: dict[str, Any], depth: int) -> list[tuple[dict, dict]]:
    """route_args for the sequences of a Performer, warning once about what no layer takes."""
    ignored_kwargs("Performer.forward", {key: val for key, val in args.items() if key not in router})
    return route_args(router, args, depth)


def _check_routes(router: Routes, depth: int, *, strict: bool = True) -> None:
    """A route per layer for every key: an InputError (1.1.4's SequentialSequence asserted), or
    with strict=False a warning, as 1.1.4's ReversibleSequence took any length (the routes pair
    up with the layers as far as both go; the rest are dropped)."""
    for key, routes in router.items():
        if len(routes) == depth:
            continue
        message = f"route for {key!r} has {len(routes)} entries, the sequence has {depth} layers"
        if strict:
            raise InputError(message)
        warnings.warn(f"{message}: only the first {min(len(routes), depth)} layers are routed (as performer-pytorch "
                      f"1.1.4)", UserWarning, stacklevel=3)


class Deterministic(nn.Module):
    """Runs ``net``; can record the RNG states of one call and replay them for the recomputation
    in the reversible backward, so dropout draws the same masks twice."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.cpu_state: Tensor | None = None
        self.cuda_in_fwd: bool | None = None
        self.gpu_devices: list | None = None
        self.gpu_states: list | None = None

    def record_rng(self, *args: Tensor) -> None:
        self.cpu_state = torch.get_rng_state()
        if torch.cuda._initialized:
            self.cuda_in_fwd = True
            self.gpu_devices, self.gpu_states = get_device_states(*args)

    def forward(self, *args, record_rng: bool = False, set_rng: bool = False, **kwargs):
        if record_rng:
            self.record_rng(*args)
        if not set_rng:
            return self.net(*args, **kwargs)
        devices = self.gpu_devices if self.cuda_in_fwd else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(self.cpu_state)
            if self.cuda_in_fwd:
                set_device_states(self.gpu_devices, self.gpu_states)
            return self.net(*args, **kwargs)


class ReversibleBlock(nn.Module):
    """y1 = x1 + f(x2), y2 = x2 + g(y1) on the two halves of the last dim; backward_pass
    reconstructs the inputs from the outputs instead of storing them."""

    def __init__(self, f: nn.Module, g: nn.Module):
        super().__init__()
        self.f = Deterministic(f)
        self.g = Deterministic(g)

    def forward(self, x: Tensor, f_args: dict = {}, g_args: dict = {}) -> Tensor:  # noqa: B006 (1.1.4's, never mutated)
        # RNG states are recorded in eval too (1.1.4 recorded them only in training, so a backward
        # through an eval-mode model had no state to replay); recording draws nothing
        with torch.no_grad():
            return self.coupled(x, f_args, g_args, record_rng=True)

    def coupled(self, x: Tensor, f_args: dict | None = None, g_args: dict | None = None, **rng) -> Tensor:
        """[x1, x2] -> [y1, y2] = [x1 + f(x2), x2 + g(y1)] (rng: Deterministic's record_rng / set_rng)."""
        x1, x2 = x.chunk(2, dim=2)
        y1 = x1 + self.f(x2, **rng, **(f_args or {}))
        return torch.cat((y1, x2 + self.g(y1, **rng, **(g_args or {}))), dim=2)

    def backward_pass(
        self, y: Tensor, dy: Tensor, f_args: dict = {}, g_args: dict = {}  # noqa: B006 (1.1.4's, never mutated)
    ) -> tuple[Tensor, Tensor]:
        """(block output y, dL/dy) -> (block input x, dL/dx)."""
        f_args, g_args = f_args or {}, g_args or {}
        y1, y2 = y.chunk(2, dim=2)
        dy1, dy2 = dy.chunk(2, dim=2)

        # g: x2 = y2 - g(y1); its vector-Jacobian product adds to dy1
        y1 = y1.detach().requires_grad_()
        with torch.enable_grad():
            gy1 = self.g(y1, set_rng=True, **g_args)
            if gy1.requires_grad:
                torch.autograd.backward(gy1, dy2)
        with torch.no_grad():
            x2 = y2 - gy1
            dx1 = dy1 + _grad(y1)
        del gy1

        # f: x1 = y1 - f(x2); its vector-Jacobian product adds to dy2
        x2 = x2.detach().requires_grad_()
        with torch.enable_grad():
            fx2 = self.f(x2, set_rng=True, **f_args)
            if fx2.requires_grad:
                torch.autograd.backward(fx2, dx1)  # (fx2 is read below for its values only: no graph kept)
        with torch.no_grad():
            x1 = y1 - fx2
            dx2 = dy2 + _grad(x2)
            return torch.cat((x1, x2.detach()), dim=2), torch.cat((dx1, dx2), dim=2)


def _grad(t: Tensor) -> Tensor:
    """t.grad, zeros when the layer's output did not depend on t (attention's shortcut for an
    empty batch or sequence returns zeros not connected to its input)."""
    return torch.zeros_like(t) if t.grad is None else t.grad


class _ReversibleFunction(Function):
    """The blocks in sequence, activations recomputed from the output in backward.  grad_args: the
    tensors of the layers' arguments that require grad (cross-attention's context: an encoder's
    output), inputs of the function so that their gradients reach their graph with x's, in the
    outer backward (1.1.4 ran that graph's backward from inside every block's, retaining it, which
    the donated buffers of a compiled backward refuse)."""

    @staticmethod
    def forward(ctx, x: Tensor, blocks: nn.ModuleList, args: list[dict], *grad_args: Tensor) -> Tensor:
        for block, kwargs in zip(blocks, args):
            x = block(x, **kwargs)
        ctx.y = x.detach()
        ctx.blocks = blocks
        ctx.args = args
        ctx.grad_ids = [id(t) for t in grad_args]
        return x

    @staticmethod
    def backward(ctx, dy: Tensor):
        # each grad_args tensor enters every block's recomputation as one leaf, whose gradient
        # adds up over the blocks
        leaves = {i: None for i in ctx.grad_ids}

        def leaf(value: Any) -> Any:
            if id(value) in leaves:
                if leaves[id(value)] is None:
                    leaves[id(value)] = value.detach().requires_grad_()
                return leaves[id(value)]
            return value

        args = [{name: {key: leaf(value) for key, value in routed.items()} for name, routed in kwargs.items()}
                for kwargs in ctx.args]
        y = ctx.y
        for block, kwargs in zip(reversed(ctx.blocks), reversed(args)):
            y, dy = block.backward_pass(y, dy, **kwargs)
        return (dy, None, None, *(None if leaves[i] is None else leaves[i].grad for i in ctx.grad_ids))


class SequentialSequence(nn.Module):
    """x = x + f(x); x = x + g(x) for every (f, g) layer pair, keywords routed per layer."""

    def __init__(self, layers: nn.ModuleList, args_route: Routes = {}):  # noqa: B006 (1.1.4's; not kept)
        super().__init__()
        args_route = args_route or {}
        _check_routes(args_route, len(layers))
        self.layers = layers
        self.args_route = args_route

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        args = _layer_args(self.args_route, kwargs, len(self.layers))
        for (f, g), (f_args, g_args) in zip(self.layers, args):
            x = x + f(x, **f_args)
            x = x + g(x, **g_args)
        return x


class ReversibleSequence(nn.Module):
    """Reversible residual layers on [x, x] (features doubled), outputs summed back to x's width."""

    def __init__(self, blocks: Sequence[Sequence[nn.Module]], args_route: Routes = {}):  # noqa: B006 (1.1.4's; not kept)
        super().__init__()
        args_route = args_route or {}
        _check_routes(args_route, len(blocks), strict=False)
        self.args_route = args_route
        self.blocks = nn.ModuleList([ReversibleBlock(f=f, g=g) for f, g in blocks])

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        x = torch.cat((x, x), dim=-1)
        args = [
            {"f_args": f_args, "g_args": g_args}
            for f_args, g_args in _layer_args(self.args_route, kwargs, len(self.blocks))
        ]
        if torch.is_grad_enabled() and kwargs.get("cache") is not None:
            # a decoding cache moves on with every call of a layer: the backward's recomputation
            # would add the keys to it twice (wrong gradients, a corrupted cache), so under
            # autograd the blocks run as plain residual layers, activations kept (same outputs)
            for block, kw in zip(self.blocks, args):
                x = block.coupled(x, **kw)
        else:
            trained = any(p.requires_grad for p in self.blocks.parameters())
            if torch.is_grad_enabled() and trained and not x.requires_grad:
                # the blocks' parameters reach autograd only through x (their gradients accumulate
                # in the function's backward): an input without grad (frozen embeddings) left the
                # output without a grad_fn and the blocks untrained, as in 1.1.4
                x = x.detach().requires_grad_()
            grad_args = {id(v): v for kw in args for routed in kw.values() for v in routed.values()
                         if isinstance(v, Tensor) and v.requires_grad} if torch.is_grad_enabled() else {}
            x = _ReversibleFunction.apply(x, self.blocks, args, *grad_args.values())
        return torch.stack(x.chunk(2, dim=-1)).sum(dim=0)
