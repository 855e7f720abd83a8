"""RNA-MSM's Performer attention from the multimolecule project (code index file 20880116505; the
index names no path inside the repository): ``PerformerAttention`` subclasses a fairseq-style
``MultiheadAttention`` and replaces its attention by ``FastAttention(dim_heads=
attention_head_size, nb_features=config.num_features)``. Hidden states come time-major (T, B, D);
q, k, v are ``rearrange(t, "t b (h d) -> b h t d")`` views (non-contiguous), and the key padding
mask (True = padding) is applied as ``v.masked_fill_(key_padding_mask[:, None, :, None], 0)`` in
place on that view before the call; ``output_attentions`` returns the attention output next to the
projected context; the block is pre-LayerNorm with a dropout residual.

Kept: the projections' initialisation (xavier_uniform with gain 2^-1/2 on q, k, v, plain on the
output, zero output bias), the rearranges, the in-place fill, the returned attention output.
Shrunk: hidden 32, 4 heads of 8, 2 layers, T = 10, batch 3 with two padded rows, 3 Adam steps with
dropout 0.1, then an eval forward; nb_features 64 (the config's) and None; float64.
"""
import math
from functools import partial

import pytest
import torch
from einops import rearrange
from torch import nn

from common import same_results


def program(lib, rec, nb_features):
    class MultiheadAttention(nn.Module):
        def __init__(self, hidden, heads):
            super().__init__()
            self.num_attention_heads, self.attention_head_size = heads, hidden // heads
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(hidden, hidden) for _ in range(4))
            for proj in (self.k_proj, self.v_proj, self.q_proj):
                nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))
            nn.init.xavier_uniform_(self.out_proj.weight)
            nn.init.constant_(self.out_proj.bias, 0.0)

    class PerformerAttention(MultiheadAttention):
        def __init__(self, hidden, heads):
            super().__init__(hidden, heads)
            self._attention_fn = lib.module.FastAttention(dim_heads=self.attention_head_size,
                                                          nb_features=nb_features)

        def forward(self, hidden_states, key_padding_mask=None, output_attentions=False):
            q, k, v = (rearrange(proj(hidden_states), "t b (h d) -> b h t d", h=self.num_attention_heads)
                       for proj in (self.q_proj, self.k_proj, self.v_proj))
            if key_padding_mask is not None:
                v.masked_fill_(key_padding_mask[:, None, :, None], 0)
            probs = self._attention_fn(q, k, v)
            context = self.out_proj(rearrange(probs, "b h t d -> t b (h d)"))
            return (context, probs) if output_attentions else (context,)

    class Block(nn.Module):
        def __init__(self, hidden, heads):
            super().__init__()
            self.layer, self.dropout, self.layer_norm = PerformerAttention(hidden, heads), nn.Dropout(0.1), nn.LayerNorm(hidden)

        def forward(self, h, **kwargs):
            hidden, *rest = self.layer(self.layer_norm(h), **kwargs)
            return (h + self.dropout(hidden), *rest)

    torch.manual_seed(0)
    model = nn.ModuleList([Block(32, 4) for _ in range(2)]).double()
    head = nn.Linear(32, 5).double()
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-3)
    torch.manual_seed(1)
    T, B = 10, 3
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, 7:] = True
    padding[2, 4:] = True
    for _ in range(3):
        h = torch.randn(T, B, 32, dtype=torch.float64)
        for block in model:
            h, probs = block(h, key_padding_mask=padding, output_attentions=True)
            rec.log("attention output", probs)
        loss = head(h).logsumexp(-1).mean()
        loss.backward()
        rec.log("loss", loss)
        optimizer.step()
        rec.grads("grads", model)
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        rec.log("eval", model[0](torch.randn(T, B, 32, dtype=torch.float64))[0])
    rec.projections("projections", model)


@pytest.mark.parametrize("nb_features", [64, None])
def test_rnamsm_attention_trains_as_performer_pytorch(nb_features):
    theirs, ours = same_results(partial(program, nb_features=nb_features))
    probs = ours.rec.entries["attention output"]
    assert len(probs) == 6 and probs[0].shape == (3, 4, 10, 8)
