"""MSDProject (NonameUntitled/MSDProject), ``src/models/performer.py`` + ``src/models/baseline.py``
+ ``src/train.py``: gender prediction from bank-transaction sequences; Performer attention as the
``self_attn`` of ``nn.TransformerEncoderLayer``: ``PerformerAttention(nn.MultiheadAttention)``
holds ``FastAttention(dim_heads=embed_dim // num_heads, nb_features=256)`` (commit 48f9ec6;
commit 7bfb5da has ``FastAttention(hidden_dim // num_heads)``, default nb_features) and calls it
on ``reshape(bs, length, heads, head_dim).permute(0, 2, 1, 3)`` views (non-contiguous), in the
program's order ``self.attention(k, q, v)`` (keys as queries).

Kept: BaselineProjector (code / type embeddings, a Linear on sign(a) log(1 + |a|) of the amount,
position embeddings, ragged events scattered into a zero-padded batch by ``padded[mask] =
embedding``, a learned cls row, LayerNorm, trunc_normal init), BaselineEncoder
(``nn.TransformerEncoder(layer, num_layers)``, which deep-copies the layer and its FastAttention,
so every layer starts with the same projection matrix; ``_init_weights`` walking
``named_parameters()`` and raising on any name without 'weight' or 'bias'; an input projection,
``src_key_padding_mask=~mask``, an output projection to 1 logit, cls-only output), the train loop
(Adam lr 1e-4, BCEWithLogits on ``predicts.squeeze()``), and an eval pass under
``torch.no_grad``.
Changed: ``PerformerAttention.forward`` also takes ``**kwargs``: torch >= 2.0's
TransformerEncoderLayer passes ``is_causal``, a TypeError for the original signature with either
library; the layer's ``[0]`` on the returned tensor (meant for MHA's (output, weights) tuple: it
takes batch row 0 and broadcasts it over the batch) is kept as the program has it.
``get_activation_function('relu')`` is F.relu; random transactions.
Shrunk: embedding 12, hidden 16, 2 heads, 2 layers, dim_feedforward 32, nb_features 256 kept
(32 orthogonal blocks of 8), 3 users with 5 / 2 / 4 events, 3 steps.
"""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common import same_results

DEVICE = "cpu"


def make_model(lib, nb_features):
    FastAttention = lib.module.FastAttention

    class PerformerAttention(nn.MultiheadAttention):
        def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                     kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
            super().__init__(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout, bias=bias,
                             add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim,
                             batch_first=batch_first, device=device, dtype=dtype)
            assert embed_dim % num_heads == 0
            if nb_features is None:  # commit 7bfb5da
                self.attention = FastAttention(embed_dim // num_heads)
            else:
                self.attention = FastAttention(dim_heads=embed_dim // num_heads, nb_features=nb_features)

        def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, **kwargs):
            bs, length, dim = key.shape
            head_dim = dim // self.num_heads
            k = key.reshape(bs, length, self.num_heads, head_dim).permute(0, 2, 1, 3)
            q = query.reshape(bs, length, self.num_heads, head_dim).permute(0, 2, 1, 3)
            v = value.reshape(bs, length, self.num_heads, head_dim).permute(0, 2, 1, 3)
            v = self.attention(k, q, v)
            return v.permute(0, 2, 1, 3).reshape(bs, length, dim)

    class PerformerAttentionLayer(nn.TransformerEncoderLayer):
        def __init__(self, d_model, nhead, dim_feedforward=None, dropout=0.0, activation=F.relu, layer_norm_eps=1e-5,
                     batch_first=False, norm_first=False, device=None, dtype=None):
            super().__init__(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward or 4 * d_model,
                             dropout=dropout, activation=activation, layer_norm_eps=layer_norm_eps,
                             batch_first=batch_first, norm_first=norm_first, device=device, dtype=dtype)
            self.self_attn = PerformerAttention(embed_dim=d_model, num_heads=nhead)

    class BaselineProjector(nn.Module):
        def __init__(self, embedding_dim, num_types, num_codes, max_sequence_len, dropout=0.1, r=0.02):
            super().__init__()
            self._embedding_dim = embedding_dim
            self._types_embedding = nn.Embedding(num_types + 2, embedding_dim)
            self._codes_embedding = nn.Embedding(num_codes + 2, embedding_dim)
            self._amount_layer = nn.Linear(1, embedding_dim)
            self._position_embedding = nn.Embedding(max_sequence_len + 1, embedding_dim)
            self._dropout = nn.Dropout(p=dropout)
            self._layernorm = nn.LayerNorm(embedding_dim)
            with torch.no_grad():
                for emb in (self._types_embedding, self._codes_embedding, self._position_embedding):
                    nn.init.trunc_normal_(emb.weight.data, std=r, a=-2 * r, b=2 * r)
                nn.init.uniform_(self._amount_layer.weight.data, a=r, b=r)
                nn.init.uniform_(self._amount_layer.bias.data, a=r, b=r)
            self._embeddings = nn.Parameter(torch.ones(1, embedding_dim))
            torch.nn.init.orthogonal_(self._embeddings)

        def forward(self, inputs):
            amount = inputs["amount"]
            amount = torch.sign(amount) * torch.log(1.0 + torch.abs(amount))
            embedding = (self._dropout(self._codes_embedding(inputs["mcc_code"]))
                         + self._dropout(self._types_embedding(inputs["transaction_type"]))
                         + self._dropout(self._amount_layer(amount.unsqueeze(-1)))
                         + self._position_embedding(inputs["positions"]))
            lengths = inputs["lengths"]
            batch_size, max_len = lengths.shape[0], lengths.max().item()
            padded = torch.zeros(batch_size, max_len, self._embedding_dim, dtype=embedding.dtype, device=DEVICE)
            mask = torch.arange(end=max_len, device=DEVICE)[None].tile([batch_size, 1]) < lengths[:, None]
            padded[mask] = embedding
            padded = torch.cat([self._embeddings[None].tile([batch_size, 1, 1]), padded], dim=1)
            mask = torch.cat([mask.new_ones(batch_size, 1), mask], dim=1)
            return self._layernorm(padded), mask

    class BaselineEncoder(nn.Module):
        def __init__(self, hidden_size, num_heads, num_layers, dim_feedforward, dropout, input_dim, output_dim,
                     r=0.02):
            super().__init__()
            self._input_projection = nn.Linear(input_dim, hidden_size)
            layer = PerformerAttentionLayer(d_model=hidden_size, nhead=num_heads, dim_feedforward=dim_feedforward,
                                            dropout=dropout, activation=F.relu, batch_first=True)
            self._encoder = nn.TransformerEncoder(layer, num_layers)
            self._output_projection = nn.Linear(hidden_size, output_dim)
            with torch.no_grad():
                for key, value in self.named_parameters():
                    if "weight" in key:
                        if "norm" in key:
                            nn.init.ones_(value.data)
                        else:
                            nn.init.trunc_normal_(value.data, std=r, a=-2 * r, b=2 * r)
                    elif "bias" in key:
                        nn.init.zeros_(value.data)
                    else:
                        raise ValueError(f"Unknown transformer weight: {key}")

        def forward(self, embeddings, attention_mask):
            embeddings = self._input_projection(embeddings)
            embeddings = self._encoder(src=embeddings, src_key_padding_mask=~attention_mask)
            return self._output_projection(embeddings)[:, 0, :], attention_mask[:, 0]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self._projector = BaselineProjector(12, num_types=5, num_codes=20, max_sequence_len=8)
            self._encoder = BaselineEncoder(16, 2, 2, 32, 0.1, input_dim=12, output_dim=1)

        def forward(self, inputs):
            embeddings, mask = self._projector(inputs)
            return self._encoder(embeddings, mask)[0]

    return Model


def users(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 2, 4])
    n = int(lengths.sum())
    return dict(mcc_code=torch.randint(0, 22, (n,), generator=g), transaction_type=torch.randint(0, 7, (n,), generator=g),
                amount=(torch.randn(n, generator=g) * 300).to(dtype),
                positions=torch.cat([torch.arange(int(l)) for l in lengths]), lengths=lengths,
                labels=torch.tensor([1, 0, 1]))


def program(lib, rec, nb_features=256, dtype=torch.float64):
    torch.manual_seed(42)
    model = make_model(lib, nb_features)().to(dtype)
    rec.log("named parameters", [n for n, _ in model.named_parameters()])
    rec.log("state_dict keys", list(model.state_dict()))
    proj = [m.projection_matrix for m in model.modules() if hasattr(m, "projection_matrix")]
    rec.log("projections", proj)
    assert len(proj) == 2 and torch.equal(proj[0], proj[1])  # deep-copied layers
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_function = nn.BCEWithLogitsLoss()
    for step in range(3):
        model.train()
        inputs = users(step, dtype)
        predicts = model(inputs).squeeze()
        loss = loss_function(predicts, inputs["labels"].to(dtype))
        optimizer.zero_grad()
        loss.backward()
        rec.log("loss", loss)
        rec.grads("grads", model)
        optimizer.step()
        model.eval()
        with torch.no_grad():
            rec.log("eval predicts", model(users(100 + step, dtype)).squeeze())


@pytest.mark.parametrize("nb_features", [256, None])
def test_msd_transformer_encoder_with_fast_attention(nb_features):
    theirs, ours = same_results(partial(program, nb_features=nb_features))
    assert ours.warnings == []


def test_msd_float32_within_1e_5():
    same_results(partial(program, dtype=torch.float32), rel=1e-5)
