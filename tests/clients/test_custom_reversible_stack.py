"""A recurrent-state Performer variant's own reversible stack (public code index, file id
15821294935, with variants 33528524882 and 15584811901; the repository is not named there): it
imports ``Deterministic`` and ``route_args`` from ``performer_pytorch.reversible`` and builds its
own ``ReversibleBlock_`` (f returns ``(output, states)``; RNG recorded with
``record_rng=self.training`` in the no-grad forward and replayed with ``set_rng=True`` in
``backward_pass``, which sets ``requires_grad`` on the reconstructed halves and reads their
``.grad``), its own autograd ``Function`` over the blocks and a ``ReversibleSequence_`` whose
forward routes keywords with ``route_args(self.args_route, kwargs, len(blocks))`` and reads an
``inferring_states`` flag that no layer is routed.

Kept: those three classes (the training route, ``inferring_states=False``; the state-returning
route needs the program's own attention), with f a causal ``SelfAttention`` (dropout, rotary
``pos_emb`` from ``FixedPositionalEmbedding``, a key mask) returning ``(out, None)`` and g
``PreLayerNorm(Chunk(FeedForward(dropout)))``, as the program's layers are; ``ProjectionUpdater``
called by hand after each optimizer step. Changed: the program's recurrent attention is 1.1.4's
SelfAttention (what its f wraps). Shrunk: dim 16, 2 blocks, 2 heads of 8, nb_features 10, vocab
11, batches of 2 x 17 with a padded tail, redraw interval 2, 4 Adam steps; float64.
"""
import torch
from torch import nn
from torch.autograd.function import Function
from torch.nn import functional as F

from common import same_results, tokens

DIM, VOCAB, N = 16, 11, 17


def program(lib, rec):
    pp, Deterministic, route_args = lib.performer_pytorch, lib.reversible.Deterministic, lib.reversible.route_args

    class ReversibleBlock_(nn.Module):
        def __init__(self, f, g):
            super().__init__()
            self.f, self.g = Deterministic(f), Deterministic(g)

        def forward(self, x, f_args={}, g_args={}):
            x1, x2 = torch.chunk(x, 2, dim=2)
            with torch.no_grad():
                f_x2, states = self.f(x2, record_rng=self.training, **f_args)
                y1 = x1 + f_x2
                y2 = x2 + self.g(y1, record_rng=self.training, **g_args)
            return torch.cat([y1, y2], dim=2), states

        def backward_pass(self, y, dy, f_args={}, g_args={}):
            y1, y2 = torch.chunk(y, 2, dim=2)
            dy1, dy2 = torch.chunk(dy, 2, dim=2)
            with torch.enable_grad():
                y1.requires_grad = True
                gy1 = self.g(y1, set_rng=True, **g_args)
                torch.autograd.backward(gy1, dy2)
            with torch.no_grad():
                x2 = y2 - gy1
                dx1 = dy1 + y1.grad
                y1.grad = None
            with torch.enable_grad():
                x2.requires_grad = True
                fx2, _ = self.f(x2, set_rng=True, **f_args)
                torch.autograd.backward(fx2, dx1, retain_graph=True)
            with torch.no_grad():
                x1 = y1 - fx2
                dx2 = dy2 + x2.grad
                x2.grad = None
                return torch.cat([x1, x2.detach()], dim=2), torch.cat([dx1, dx2], dim=2)

    class _ReversibleFunction_(Function):
        @staticmethod
        def forward(ctx, x, blocks, args):
            ctx.args = args
            for block, kwarg in zip(blocks, args):
                x, _ = block(x, f_args=kwarg["f_args"], g_args=kwarg["g_args"])
            ctx.y, ctx.blocks = x.detach(), blocks
            return x

        @staticmethod
        def backward(ctx, dy):
            y = ctx.y
            for block, kwargs in zip(ctx.blocks[::-1], ctx.args[::-1]):
                y, dy = block.backward_pass(y, dy, **kwargs)
            return dy, None, None

    class ReversibleSequence_(nn.Module):
        def __init__(self, blocks, args_route={}):
            super().__init__()
            self.args_route = args_route
            self.blocks = nn.ModuleList([ReversibleBlock_(f=f, g=g) for f, g in blocks])

        def forward(self, x, **kwargs):
            x = torch.cat([x, x], dim=-1)
            args = [{"f_args": a[0], "g_args": a[1]} for a in route_args(self.args_route, kwargs, len(self.blocks))]
            assert not kwargs["inferring_states"]  # (the training route)
            x = _ReversibleFunction_.apply(x, self.blocks, args)
            return torch.stack(x.chunk(2, dim=-1)).sum(dim=0)

    class AttentionWithStates(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(DIM)
            self.attn = pp.SelfAttention(DIM, causal=True, heads=2, dim_head=8, nb_features=10, dropout=0.1)

        def forward(self, x, pos_emb=None, mask=None):
            return self.attn(self.norm(x), pos_emb=pos_emb, mask=mask), None

    torch.manual_seed(0)
    blocks = [(AttentionWithStates(), pp.PreLayerNorm(DIM, pp.Chunk(2, pp.FeedForward(DIM, mult=2, dropout=0.1),
                                                                   along_dim=1))) for _ in range(2)]
    route = {"mask": ((True, False),) * 2, "pos_emb": ((True, False),) * 2}
    net = nn.ModuleDict(dict(emb=nn.Embedding(VOCAB, DIM), layers=ReversibleSequence_(blocks, route),
                             out=nn.Linear(DIM, VOCAB))).double()
    rotary = pp.FixedPositionalEmbedding(8, 32).double()
    updater = lib.module.ProjectionUpdater(net["layers"], feature_redraw_interval=2)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(4):
        x = tokens((2, N), VOCAB, step)
        mask = torch.ones(2, N, dtype=torch.bool)
        mask[1, -3:] = False
        h = net["emb"](x)
        logits = net["out"](net["layers"](h, mask=mask, pos_emb=rotary(h), inferring_states=False))
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:])
        loss.backward()
        rec.log("loss", loss)
        rec.optimizer_step(optimizer, net)
        updater.redraw_projections()
        rec.projections("redrawn", net)


def test_a_reversible_stack_built_on_deterministic_and_route_args_trains_as_with_performer_pytorch():
    theirs, ours = same_results(program)
    assert not ours.warnings  # route_args drops the program's own flag silently, as 1.1.4's
    redrawn = theirs.rec.entries["redrawn"]
    assert not torch.equal(redrawn[0][0], redrawn[-1][0])  # ProjectionUpdater redrew every 2 calls
