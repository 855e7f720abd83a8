"""A module from a public repository found through a code search (code index file 6904305727; the
index names no repository) that says it overwrites the Performer implementation: ``from
performer_pytorch import SelfAttention``, ``from performer_pytorch import performer_pytorch`` and
``from performer_pytorch.performer_pytorch import default, exists, rearrange, empty``; it replaces
the module global ``performer_pytorch.orthogonal_matrix_chunk`` with its own (a ``torch.randn``
block, ``torch.linalg.qr(..., mode="complete")`` of its CPU copy, ``q.t()`` back on the device),
then subclasses ``CustomSelfAttention(SelfAttention)``: ``__init__`` sets
``self.local_attn.rel_pos = None`` inside a bare ``try`` (a logged "No Local Attention" when
``local_attn`` is None), and ``forward`` re-implements 1.1.4's ``Attention.forward`` without
rotary positions, with ``context_mask = mask``, ``v.masked_fill_`` in place on the global heads'
slice and ``local_attn(lq, lk, lv, input_mask=mask)`` for the local heads.

Kept: the patch (the library's projection draws go through it: at construction and at
``fast_attention.redraw_projection_matrix(device)``) and the subclass. Changed: the program's
caller is not in the file: a plausible one trains each attention on random inputs with a padded
key mask, MSE to zero, Adam, and redraws the projection before the last step; the patched
function records its calls, and a second run whose patch returns ``-q.t()`` (a library that drew its own
blocks instead of calling the patch would give other numbers than 1.1.4 there). Shrunk: dim 32,
4 heads of 8, nb_features 16, global heads only and one local head (window 4), 8 tokens, batch 2,
4 steps; float64.
"""
import logging
from functools import partial

import torch
import torch.nn.functional as F

from common import same_results

log = logging.getLogger(__name__)


def build(lib, sign, calls, logged):
    pp = lib.performer_pytorch
    default, exists, rearrange, empty = pp.default, pp.exists, pp.rearrange, pp.empty

    def orthogonal_matrix_chunk(cols, device=None):
        calls.append(cols)
        block = torch.randn((cols, cols), device=device)
        q, r = (t.to(device) for t in torch.linalg.qr(block.cpu(), mode="complete"))
        return sign * q.t()

    class CustomSelfAttention(lib.module.SelfAttention):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            try:
                self.local_attn.rel_pos = None
            except:  # noqa: E722 (the program's)
                log.warning("No Local Attention")
                logged.append("No Local Attention")

        def forward(self, x, pos_emb=None, context=None, mask=None, context_mask=None, pos=None,
                    pos_projection=False, **kwargs):
            assert not exists(context)
            h, gh = self.heads, self.global_heads
            context, context_mask = default(context, x), mask
            q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=h) for t in (self.to_q(x), self.to_k(context),
                                                                            self.to_v(context)))
            (q, lq), (k, lk), (v, lv) = ((t[:, :gh], t[:, gh:]) for t in (q, k, v))
            attn_outs = []
            if not empty(q):
                if exists(context_mask):
                    v.masked_fill_(~context_mask[:, None, :, None], 0.0)
                attn_outs.append(self.fast_attention(q, k, v))
            if not empty(lq):
                attn_outs.append(self.local_attn(lq, lk, lv, input_mask=mask))
            out = rearrange(torch.cat(attn_outs, dim=1), "b h n d -> b n (h d)")
            return self.dropout(self.to_out(out))

    return orthogonal_matrix_chunk, CustomSelfAttention


def program(lib, rec, sign):
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    calls, logged = [], []
    patch, CustomSelfAttention = build(lib, sign, calls, logged)
    saved = lib.performer_pytorch.orthogonal_matrix_chunk
    lib.performer_pytorch.orthogonal_matrix_chunk = patch
    try:
        torch.manual_seed(5)
        for local_heads in (0, 1):
            calls.clear()
            logged.clear()
            attn = CustomSelfAttention(dim=32, heads=4, dim_head=8, nb_features=16, local_heads=local_heads,
                                       local_window_size=4, dropout=0.1)
            rec.log("patched chunk calls", list(calls))
            rec.log("logged", list(logged))
            rec.log("state_dict", [(k, tuple(v.shape)) for k, v in attn.state_dict().items()])
            rec.projections("projections", attn)
            optimizer = torch.optim.Adam(attn.parameters(), lr=1e-3)
            mask = torch.ones(2, 8, dtype=torch.bool)
            mask[1, 6:] = False
            for step in range(4):
                if step == 3:
                    attn.fast_attention.redraw_projection_matrix(torch.device("cpu"))
                    rec.log("patched chunk calls", list(calls))
                    rec.projections("redrawn projections", attn)
                out = attn(torch.randn(2, 8, 32), mask=mask)
                loss = F.mse_loss(out, torch.zeros_like(out))
                loss.backward()
                rec.log("output", out)
                rec.log("loss", loss)
                rec.optimizer_step(optimizer, attn)
    finally:
        lib.performer_pytorch.orthogonal_matrix_chunk = saved
        torch.set_default_dtype(default_dtype)


def test_monkeypatched_orthogonal_chunk_runs_as_performer_pytorch():
    runs = {sign: same_results(partial(program, sign=sign)) for sign in (1, -1)}
    for theirs, ours in runs.values():
        assert theirs.rec.entries["patched chunk calls"] == [[8, 8], [8, 8, 8, 8]] * 2  # two 8x8 blocks a draw
        assert theirs.rec.entries["logged"] == [["No Local Attention"], []]  # local_attn is None without local heads
        assert not torch.equal(theirs.rec.entries["projections"][0][0], theirs.rec.entries["redrawn projections"][0][0])
        assert not ours.warnings
    # the sign flip reaches the projection (q.t() of the patch, rows scaled by the norms of a Gaussian
    # draw made after it): both libraries drew their blocks from the patch
    plus, minus = (runs[sign][0].rec.entries["projections"][0][0] for sign in (1, -1))
    torch.testing.assert_close(minus, -plus, rtol=0, atol=0)
