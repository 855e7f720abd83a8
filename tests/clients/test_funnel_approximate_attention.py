"""A Funnel-Transformer variant with Performer attention (code index file 35045771435; the index
names no repository): ``FunnelRelMultiheadAttention`` with ``approximate_attention`` holds one
``FastAttention(dim_heads=d_head, nb_features=d_model)`` and calls it four times per forward,
for the content, content-to-position, position-to-content and position-to-position terms, and sums
them. The position heads are (n, heads, d_head) tensors broadcast over the batch with
``.expand(b, -1, -1, -1)`` (a stride-0 batch) and every operand is ``.permute(0, 2, 1, 3)``-ed
into (b, h, n, d) (non-contiguous); after the first block the queries are average-pooled to half
the length, so queries (6) and keys (12) differ in length.

Kept: the relative-bias parameters (uniform 0..0.1) added to the scaled query and key heads, the
LayerNorm'ed position heads, the residual LayerNorm, the pooling between blocks. Shrunk: d_model
32, 4 heads of 8, two blocks, length 12, batch 2, 3 AdamW steps, a gradient into the input on the
first; nb_features d_model (the program's) and None; float64.
"""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common import same_results

D_MODEL, N_HEAD, D_HEAD = 32, 4, 8


def program(lib, rec, nb_features):
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_head = nn.Linear(D_MODEL, N_HEAD * D_HEAD, bias=False)
            self.k_head, self.v_head = nn.Linear(D_MODEL, N_HEAD * D_HEAD), nn.Linear(D_MODEL, D_MODEL)
            self.pos_q_head, self.pos_k_head = nn.Linear(D_MODEL, N_HEAD * D_HEAD), nn.Linear(D_MODEL, N_HEAD * D_HEAD)
            self.pos_qln, self.pos_kln = nn.LayerNorm(N_HEAD * D_HEAD), nn.LayerNorm(N_HEAD * D_HEAD)
            self.c2p_bias = nn.Parameter(torch.zeros(N_HEAD, D_HEAD).uniform_(0, 0.1))
            self.p2c_bias = nn.Parameter(torch.zeros(N_HEAD, D_HEAD).uniform_(0, 0.1))
            self.layer_norm = nn.LayerNorm(D_MODEL)
            self.attn = lib.module.FastAttention(dim_heads=D_HEAD, nb_features=nb_features)

        def forward(self, query, key, value, pos_q, pos_k):
            b, sl, cl = query.shape[0], query.shape[1], key.shape[1]
            q_head = self.q_head(query).view(b, sl, N_HEAD, D_HEAD) * D_HEAD ** -0.5
            k_head = self.k_head(key).view(b, cl, N_HEAD, D_HEAD)
            v_head = self.v_head(value).view(b, cl, N_HEAD, D_MODEL // N_HEAD).permute(0, 2, 1, 3)
            pos_q_head = self.pos_qln(self.pos_q_head(pos_q)).view(sl, N_HEAD, D_HEAD).expand(b, -1, -1, -1)
            pos_k_head = self.pos_kln(self.pos_k_head(pos_k)).view(cl, N_HEAD, D_HEAD).expand(b, -1, -1, -1)
            c2p_q = q_head + self.c2p_bias * D_HEAD ** -0.5
            p2c_k = k_head + self.p2c_bias * D_HEAD ** -0.5
            terms = [(q_head, k_head), (c2p_q, pos_k_head), (pos_q_head, p2c_k), (pos_q_head, pos_k_head)]
            out = sum(self.attn(q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v_head).permute(0, 2, 1, 3)
                      for q, k in terms)
            return self.layer_norm(query + out.reshape(b, sl, D_MODEL))

    torch.manual_seed(0)
    layers = nn.ModuleList([Attention(), Attention()]).double()
    pos = nn.Parameter(torch.randn(16, D_MODEL, dtype=torch.float64) * 0.1)
    out = nn.Linear(D_MODEL, 3).double()
    optimizer = torch.optim.AdamW([*layers.parameters(), pos, *out.parameters()], lr=1e-3)
    torch.manual_seed(1)
    for step in range(3):
        x = torch.randn(2, 12, D_MODEL, dtype=torch.float64, requires_grad=step == 0)
        h = layers[0](x, x, x, pos[:12], pos[:12])
        pooled = F.avg_pool1d(h.transpose(1, 2), 2, 2).transpose(1, 2)
        pos_pooled = F.avg_pool1d(pos[:12].t()[None], 2, 2)[0].t()
        h = layers[1](pooled, h, h, pos_pooled, pos[:12])
        loss = F.cross_entropy(out(h).flatten(0, 1), torch.arange(12) % 3)
        loss.backward()
        rec.log("hidden", h)
        rec.log("loss", loss)
        rec.log("position grad", pos.grad)
        if x.grad is not None:
            rec.log("input grad", x.grad)
        rec.optimizer_step(optimizer, layers)


@pytest.mark.parametrize("nb_features", [D_MODEL, None])
def test_funnel_approximate_attention_trains_as_performer_pytorch(nb_features):
    theirs, ours = same_results(partial(program, nb_features=nb_features))
    assert ours.rec.entries["hidden"][0].shape == (2, 6, D_MODEL)
    assert len(ours.rec.entries["input grad"]) == 1
