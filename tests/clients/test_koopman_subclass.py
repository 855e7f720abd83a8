"""A public Koopman / GPT-2-style spatio-temporal model (code index file 9087547314; the index names
no repository) that subclasses both performer-pytorch classes it imports:

- ``FastAttentionM(FastAttention)`` overrides ``forward``: it reads ``self.no_projection``,
  ``self.generalized_attention``, ``self.projection_matrix`` and ``self.causal``, makes features
  with its own ``softmax_kernel`` (which also returns the unnormalized features, part of its
  loss) and attends with its own ``linear_attention``;
- ``CrossAttentionM(CrossAttention)`` calls ``super().__init__(dim=, dim_head=, heads=)`` and then
  replaces ``self.fast_attention`` with ``FastAttentionM(dim_head)`` at the default nb_features
  (two projection draws from the global generator per layer); the block replaces ``to_q``,
  ``to_k``, ``to_v`` with bias-free Linears after construction; the forward reads ``self.heads``,
  ``self.to_out``, ``self.dropout``, cuts the keys into two shifted windows and
  ``masked_fill_``s the values.

Kept: the block (four LayerNorms, two GPT-2 MLPs, the cross attention of the prediction tokens
over the context), the per-layer loop and the q/k unnormalized feature outputs. Changed:
transformers' Conv1D -> nn.Linear (the same affine map); the loss is an MSE on the predictions
plus a small term on the unnormalized features. Shrunk: embedding 32 -> 8, attention width
128 -> 16 (2 heads of 8), 8 -> 2 layers, 25 context tokens, Adam for 2 steps, float64.
"""
import math
from functools import partial

import torch
from einops import rearrange, repeat
from torch import nn

from common import same_results

DIM_EMBD, DIM_ATTN, HEADS = 8, 16, 2


def gelu(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def softmax_kernel(data, *, projection_matrix, is_query, normalize_data=True, eps=1e-4, device=None):
    """The program's own feature map: 1.1.4's, also returning ratio exp(dash - diag)."""
    b, h, *_ = data.shape
    data_normalizer = (data.shape[-1] ** -0.25) if normalize_data else 1.0
    ratio = projection_matrix.shape[0] ** -0.5
    projection = repeat(projection_matrix, "j d -> b h j d", b=b, h=h).type_as(data)
    data_dash = torch.einsum("...id,...jd->...ij", (data_normalizer * data), projection)
    diag_data = ((data**2).sum(-1) / 2.0 * (data_normalizer**2)).unsqueeze(-1)
    unnormalized = ratio * torch.exp(data_dash - diag_data)
    dims = -1 if is_query else (-1, -2)
    features = unnormalized * torch.exp(-torch.amax(data_dash, dim=dims, keepdim=True).detach()) + ratio * eps
    return features.type_as(data), unnormalized.type_as(data)


def linear_attention(q, k, v):
    k_cumsum = k.sum(dim=-2)
    d_inv = 1.0 / torch.einsum("...nd,...d->...n", q, k_cumsum.type_as(q))
    context = torch.einsum("...nd,...ne->...de", k, v)
    return torch.einsum("...de,...nd,...n->...ne", context, q, d_inv)


def build(lib):
    class FastAttentionM(lib.module.FastAttention):
        def forward(self, q, k, v):
            if self.no_projection:
                q, k = q.softmax(dim=-1), (torch.exp(k) if self.causal else k.softmax(dim=-2))
                q_unnorm = k_unnorm = None
            elif self.generalized_attention:
                raise NotImplementedError
            else:
                features = partial(softmax_kernel, projection_matrix=self.projection_matrix, device=q.device)
                q, q_unnorm = features(q, is_query=True)
                k, k_unnorm = features(k, is_query=False)
            attend = linear_attention if not self.causal else self.causal_linear_fn
            return attend(q, k, v), q_unnorm, k_unnorm

    class CrossAttentionM(lib.module.CrossAttention):
        def __init__(self, dim, dim_head, heads):
            super().__init__(dim=dim, dim_head=dim_head, heads=heads)
            self.fast_attention = FastAttentionM(dim_head)

        def forward(self, x, context=None, context_mask=None):
            h = self.heads
            q, k, v = self.to_q(x.reshape(-1, x.size(-2), x.size(-1))), self.to_k(context), self.to_v(context)
            q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=h) for t in (q, k, v))
            k, v = k.unsqueeze(0), v.unsqueeze(0)
            s = k.size(-2) * 2 // 50  # two windows shifted by s keys
            k = torch.cat([k[:, :, :, :-s], k[:, :, :, s:]], dim=0)
            v = torch.cat([v[:, :, :, :-s], v[:, :, :, s:]], dim=0)
            k, v = k.reshape(-1, *k.size()[-3:]), v.reshape(-1, *v.size()[-3:])
            if context_mask is not None:
                v.masked_fill_(~context_mask[:, None, :, None], 0.0)
            out, q_unnorm, k_unnorm = self.fast_attention(q, k, v)
            out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))
            return self.dropout(out), q_unnorm, k_unnorm

    class MLP(nn.Module):
        def __init__(self, hidden, nx, pdrop=0.1):
            super().__init__()
            self.c_fc, self.c_proj, self.dropout = nn.Linear(nx, hidden), nn.Linear(hidden, nx), nn.Dropout(pdrop)

        def forward(self, x):
            return self.dropout(self.c_proj(gelu(self.c_fc(x))))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(DIM_ATTN), nn.LayerNorm(DIM_EMBD)
            self.ln_4 = nn.LayerNorm(DIM_ATTN)
            self.mlp2 = MLP(DIM_ATTN, DIM_ATTN)
            self.attn = CrossAttentionM(dim=DIM_ATTN, dim_head=DIM_ATTN // HEADS, heads=HEADS)
            self.attn.to_q = nn.Linear(DIM_ATTN, DIM_ATTN, bias=False)
            self.attn.to_k = nn.Linear(DIM_EMBD, DIM_ATTN, bias=False)
            self.attn.to_v = nn.Linear(DIM_EMBD, DIM_ATTN, bias=False)

        def forward(self, x, y):
            y = self.mlp2(self.ln_4(y)) + y
            attended, q_unnorm, k_unnorm = self.attn(self.ln_1(y), context=self.ln_2(x))
            return y + attended.reshape(*y.size()), q_unnorm.unsqueeze(2), k_unnorm.unsqueeze(2)

    class Model(nn.Module):
        def __init__(self, n_layer=2):
            super().__init__()
            self.h = nn.ModuleList([Block() for _ in range(n_layer)])
            self.out = nn.Linear(DIM_ATTN, 4)

        def forward(self, ctx, pred_token):
            qs, ks = [], []
            for i, block in enumerate(self.h):
                pred_token, q, k = block(ctx[i], pred_token)
                qs.append(q)
                ks.append(k)
            return self.out(pred_token), torch.cat(qs, 2), torch.cat(ks, 2)

    return Model


def program(lib, rec):
    torch.manual_seed(0)
    model = build(lib)().double()
    rec.log("state_dict keys", sorted(model.state_dict()))
    rec.projections("projections", model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        ctx = torch.randn(2, 2, 25, DIM_EMBD, dtype=torch.float64)  # per layer: (windows x batch, keys, dim)
        tokens = torch.randn(2, 2, 3, DIM_ATTN, dtype=torch.float64)
        target = torch.randn(2, 2, 3, 4, dtype=torch.float64)
        pred, q_unnorm, k_unnorm = model(ctx, tokens)
        loss = ((pred - target) ** 2).sum(-1).mean() + 1e-3 * (q_unnorm.mean() + k_unnorm.mean())
        loss.backward()
        rec.log("predictions", pred)
        rec.log("unnormalized features", [q_unnorm, k_unnorm])
        rec.log("loss", loss)
        rec.optimizer_step(optimizer, model)
    rec.params("final parameters", model)


def test_koopman_subclasses_train_as_performer_pytorch():
    theirs, _ = same_results(program)
    nb_features = [p.shape for p in theirs.rec.entries["projections"][0]]
    assert nb_features == [torch.Size([16, 8])] * 2, nb_features  # the replaced FastAttention's d log d rows
