"""Kitware/geowatch, geowatch/tasks/fusion/architectures/optional/performer_attention.py: a
multi-head self-attention built by subclassing performer-pytorch's FastAttention.

Kept: ``FastMultiheadSelfAttention(FastAttention)`` sets ``embed_dim`` and ``num_heads`` before
calling ``super().__init__(dim_heads, nb_features=int(dim_heads * log(dim_heads)), ortho_scaling=0,
causal=False, generalized_attention=False, kernel_fn=nn.ReLU(), no_projection=False)`` (every
constructor argument of 1.1.4, positional dim_heads), overrides ``forward(x, key_padding_mask=None)``
and calls ``super().forward(q, q, q)`` on the (S, B, E) input rearranged to heads (no q/k/v
projections: query, key and value are the same non-contiguous view); geowatch wraps it in a
residual pre-LayerNorm block followed by a residual MLP with dropout.
Shrunk: embedding 24, 3 heads of 8 (nb_features int(8 log 8) = 16), S = 7, B = 5, 3 Adam steps.
"""
import math

import einops
import torch
from torch import nn

from common import changed, same_results

EMBED, HEADS, CLASSES = 24, 3, 2


def attention_class(lib):
    class FastMultiheadSelfAttention(lib.module.FastAttention):
        def __init__(self, embed_dim, num_heads):
            self.embed_dim = embed_dim
            self.num_heads = num_heads
            assert embed_dim % num_heads == 0
            dim_heads = embed_dim // num_heads
            nb_features = int(dim_heads * math.log(dim_heads))
            super().__init__(dim_heads, nb_features=nb_features, ortho_scaling=0, causal=False,
                             generalized_attention=False, kernel_fn=nn.ReLU(), no_projection=False)

        def forward(self, x, key_padding_mask=None):
            if key_padding_mask is not None:
                raise NotImplementedError
            q = einops.rearrange(x, "s b (h e) -> b h s e", e=self.dim_heads)
            a = super().forward(q, q, q)
            return einops.rearrange(a, "b h s e -> s b (h e)", e=self.dim_heads)

    return FastMultiheadSelfAttention


class ResidualSequential(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


def model_of(lib):
    attention = attention_class(lib)(EMBED, HEADS)
    return nn.Sequential(
        ResidualSequential(nn.LayerNorm(EMBED), attention),
        ResidualSequential(nn.Linear(EMBED, EMBED), nn.Dropout(0.1), nn.GELU(), nn.Linear(EMBED, EMBED)),
        nn.Linear(EMBED, CLASSES),
    )


def program(lib, rec):
    torch.manual_seed(3)
    model = model_of(lib).double()
    attention = model[0][1]
    rec.log("subclass attributes", [attention.embed_dim, attention.num_heads, attention.dim_heads, attention.nb_features])
    rec.projections("projections", model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(3):
        x = torch.randn(7, 5, EMBED, dtype=torch.float64) * 2  # (S, B, E)
        y = torch.randint(0, CLASSES, (7, 5))
        out = model(x)
        loss = nn.functional.cross_entropy(out.reshape(-1, CLASSES), y.reshape(-1))
        loss.backward()
        rec.log("output", out)
        rec.log("loss", loss)
        rec.optimizer_step(optimizer, model)
    model.eval()
    with torch.no_grad():
        rec.log("eval output", model(torch.randn(4, 2, EMBED, dtype=torch.float64)))
    rec.params("final parameters", model)


def test_geowatch_fastattention_subclass_trains_as_performer_pytorch():
    theirs, ours = same_results(program)
    assert theirs.rec.entries["subclass attributes"][0] == [EMBED, HEADS, 8, 16]
    assert not changed(theirs.rec.entries["projections"]), "a standalone FastAttention never redraws"
    assert not ours.warnings
