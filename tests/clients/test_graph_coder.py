"""gaarutyunov/graph-coder (commit 15b4052c): code generation from docstrings, source and AST
graphs, with performer-pytorch in two roles.

Kept: (1) graph_coder/modules/performer/fast_attention.py: ``FastAttention`` subclassing
``performer_pytorch.performer_pytorch.FastAttention`` and overriding ``forward(q, k, v,
key_padding_mask=None)`` with 1.1.4's module-level ``softmax_kernel`` / ``generalized_kernel`` /
``linear_attention`` and the parent's attributes (``no_projection``, ``generalized_attention``,
``kernel_fn``, ``projection_matrix``, ``causal``, ``causal_linear_fn``), zeroing padded keys,
values and outputs with a fairseq-style mask (True = pad); used by
modules/multihead_performer_attention.py (q/k/v projections of (T, B, C) inputs, heads
rearranged, ``FastAttention(head_dim, nb_features, causal=causal, generalized_attention,
kernel_fn=nn.ReLU(), no_projection=False)`` with nb_features passed positionally) inside
tokengt/tokengt_graph_encoder_layer.py (pre- or post-norm residual blocks, dropout, FFN).
(2) modules/performer/performer_encoder.py and performer_encoder_base.py: ``Performer`` built
with all 25 of 1.1.4's arguments passed positionally (``cast_tuple(local_attn_heads)`` among
them) behind ``FixedPositionalEmbedding`` / ``AbsolutePositionalEmbedding`` /
``AxialPositionalEmbedding`` + ``Always(None)`` imported from ``performer_pytorch.performer_pytorch``
(the rotary default and the two others), with ``x += self.pos_emb(x)`` done in place on the
caller's embedding, dropout, ``pos_emb=layer_pos_emb`` and a final LayerNorm; configs'
``PerformerEncoder(dim=8, depth=1, heads=2, causal=true, max_seq_len=1024)`` as text and code
encoders. models/generator: docstring and source embedded, each encoded and concatenated into
``memory`` (the graph layer's tokens appended too), ``nn.TransformerDecoder(tgt, memory)``,
``tanh(dense(.))``, the code head, cross-entropy; generation's ``_predict_code_token``
(temperature, the CTRL repetition penalty ``logits[list(idx)] /= penalty``, multinomial with
replacement).
Changed: TokenGT's graph tokenisation (Laplacian node ids, type ids) is replaced by random
token features with a padding mask; fairseq's LayerNorm / FairseqDropout are torch's; the
transformers top-k/top-p filter is a plain top-k; the DeepSpeed pipeline variant is left out.
Shrunk: hidden 8 (configs' micro size), 2 heads, 1 layer each, nb_features 6, sequences 5-9.
"""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from common import same_results, tokens

H, HEADS, VOCAB = 8, 2, 13


def graph_coder_fast_attention(lib):
    pp = lib.performer_pytorch

    class FastAttention(pp.FastAttention):
        def forward(self, q, k, v, key_padding_mask=None) -> torch.Tensor:
            device = q.device
            if self.no_projection:
                q = q.softmax(dim=-1)
                k = torch.exp(k) if self.causal else k.softmax(dim=-2)
            elif self.generalized_attention:
                create_kernel = partial(pp.generalized_kernel, kernel_fn=self.kernel_fn,
                                        projection_matrix=self.projection_matrix, device=device)
                q, k = map(create_kernel, (q, k))
            else:
                create_kernel = partial(pp.softmax_kernel, projection_matrix=self.projection_matrix, device=device)
                q = create_kernel(q, is_query=True)
                k = create_kernel(k, is_query=False)
            attn_fn = pp.linear_attention if not self.causal else self.causal_linear_fn
            if key_padding_mask is not None:
                k = k.masked_fill(key_padding_mask, 0.0)
                v = v.masked_fill(key_padding_mask, 0.0)
            out = attn_fn(q, k, v)
            if key_padding_mask is not None:
                out = out.masked_fill(key_padding_mask, 0.0)
            return out

    return FastAttention


class MultiheadPerformerAttention(nn.Module):
    """multihead_performer_attention.py with its MultiheadAttention base's parameters."""

    def __init__(self, lib, embed_dim, num_heads, performer_nb_features=None, performer_generalized_attention=False,
                 dropout=0.0, bias=True, causal=False):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout_module = nn.Dropout(dropout)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        for proj in (self.k_proj, self.v_proj, self.q_proj):
            nn.init.xavier_uniform_(proj.weight, gain=1 / 2 ** 0.5)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.constant_(self.out_proj.bias, 0.0)
        self.fast_attention = graph_coder_fast_attention(lib)(
            self.head_dim, performer_nb_features, causal=causal, generalized_attention=performer_generalized_attention,
            kernel_fn=nn.ReLU(), no_projection=False)

    def forward(self, query, key=None, value=None, key_padding_mask=None):
        q, k, v = self.q_proj(query), self.k_proj(query), self.v_proj(query)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(torch.bool)[:, None, :, None]
        q, k, v = map(lambda t: rearrange(t, "n b (h d) -> b h n d", h=self.num_heads), (q, k, v))
        attn = self.fast_attention(q, k, v, key_padding_mask)
        attn = rearrange(attn, "b h n d -> n b (h d)")
        return self.dropout_module(self.out_proj(attn))


class TokenGTGraphEncoderLayer(nn.Module):
    def __init__(self, lib, embedding_dim, ffn_embedding_dim, num_attention_heads, dropout, performer_nb_features,
                 performer_generalized_attention, layernorm_style, causal):
        super().__init__()
        self.layernorm_style = layernorm_style
        self.dropout_module = nn.Dropout(dropout)
        self.self_attn = MultiheadPerformerAttention(lib, embedding_dim, num_attention_heads, performer_nb_features,
                                                     performer_generalized_attention, dropout=dropout, causal=causal)
        self.self_attn_layer_norm = nn.LayerNorm(embedding_dim)
        self.feedforward = nn.Sequential(nn.Linear(embedding_dim, ffn_embedding_dim), nn.GELU(), nn.Dropout(dropout),
                                         nn.Linear(ffn_embedding_dim, embedding_dim), nn.Dropout(dropout))
        self.final_layer_norm = nn.LayerNorm(embedding_dim)

    def forward(self, x, padding_mask=None):  # x: T x B x C
        if self.layernorm_style == "prenorm":
            residual = x
            x = self.self_attn_layer_norm(x)
            x = self.self_attn(query=x, key=x, value=x, key_padding_mask=padding_mask)
            x = residual + self.dropout_module(x)
            x = x + self.feedforward(self.final_layer_norm(x))
        else:
            residual = x
            x = self.self_attn(query=x, key=x, value=x, key_padding_mask=padding_mask)
            x = self.self_attn_layer_norm(residual + self.dropout_module(x))
            x = self.final_layer_norm(x + self.feedforward(x))
        return x


class PerformerEncoder(nn.Module):
    """performer_encoder.py + performer_encoder_base.py."""

    def __init__(self, lib, *, max_seq_len, dim, depth, heads, dim_head=64, local_attn_heads=0,
                 local_window_size=256, causal=False, ff_mult=4, nb_features=None, feature_redraw_interval=1000,
                 reversible=False, ff_chunks=1, ff_glu=False, emb_dropout=0.0, ff_dropout=0.0, attn_dropout=0.0,
                 generalized_attention=False, kernel_fn=nn.ReLU(), use_scalenorm=False, use_rezero=False,
                 cross_attend=False, no_projection=False, rotary_position_emb=True, axial_position_emb=False,
                 axial_position_shape=None, auto_check_redraw=True, qkv_bias=False, attn_out_bias=False,
                 shift_tokens=False):
        super().__init__()
        pp = lib.performer_pytorch
        self.performer = lib.module.Performer(
            dim, depth, heads, dim_head, pp.cast_tuple(local_attn_heads), local_window_size, causal, ff_mult,
            nb_features, feature_redraw_interval, reversible, ff_chunks, generalized_attention, kernel_fn,
            use_scalenorm, use_rezero, ff_glu, ff_dropout, attn_dropout, cross_attend, no_projection,
            auto_check_redraw, qkv_bias, attn_out_bias, shift_tokens)
        if rotary_position_emb:
            self.pos_emb = pp.FixedPositionalEmbedding(dim, max_seq_len)
            self.layer_pos_emb = pp.FixedPositionalEmbedding(dim_head, max_seq_len)
        elif axial_position_emb:
            axial_position_shape = pp.default(axial_position_shape, (-(-max_seq_len // 64), 64))
            self.pos_emb = pp.AxialPositionalEmbedding(dim, axial_position_shape)
            self.layer_pos_emb = pp.Always(None)
        else:
            self.pos_emb = pp.AbsolutePositionalEmbedding(dim, max_seq_len)
            self.layer_pos_emb = pp.Always(None)
        self.dropout = nn.Dropout(emb_dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, **kwargs):
        x += self.pos_emb(x)
        x = self.dropout(x)
        layer_pos_emb = self.layer_pos_emb(x)
        x = self.performer(x, pos_emb=layer_pos_emb, **kwargs)
        return self.norm(x)


class Generator(nn.Module):
    """models/generator: text and code layers (embedding + PerformerEncoder), the graph layer
    (TokenGT layer over graph tokens), TransformerDecoder, dense + tanh, code head."""

    def __init__(self, lib, positions="rotary", layernorm_style="postnorm", generalized=False):
        super().__init__()
        enc = dict(dim=H, depth=1, heads=HEADS, causal=True, max_seq_len=64, dim_head=4, nb_features=6,
                   emb_dropout=0.1, ff_dropout=0.1, attn_dropout=0.1, rotary_position_emb=positions == "rotary",
                   axial_position_emb=positions == "axial", axial_position_shape=(8, 8))
        self.embedding = nn.Embedding(VOCAB, H, padding_idx=0)
        self.text_encoder = PerformerEncoder(lib, **enc)
        self.code_encoder = PerformerEncoder(lib, **enc)
        self.graph_features = nn.Linear(5, H)
        self.graph_layer = TokenGTGraphEncoderLayer(lib, H, 16, HEADS, 0.1, 6, generalized, layernorm_style,
                                                    causal=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(d_model=H, nhead=2, dim_feedforward=16,
                                                                        dropout=0.1, activation="relu"), num_layers=1)
        self.dense = nn.Linear(H, H)
        self.code = nn.Linear(H, VOCAB, bias=False)

    def forward(self, docstring, source, graph, graph_padding):
        emb = self.embedding(docstring)
        tgt, memory = emb, self.text_encoder(emb)
        g = self.graph_layer(self.graph_features(graph).transpose(0, 1), graph_padding).transpose(0, 1)
        memory = torch.cat([memory, g], dim=1)
        tgt = torch.cat([tgt, g.masked_fill(graph_padding[..., None], 0.0)], dim=1)
        emb = self.embedding(source)
        tgt = torch.cat([tgt, emb], dim=1)
        memory = torch.cat([memory, self.code_encoder(emb)], dim=1)
        out = self.decoder(tgt, memory)
        return self.code(torch.tanh(self.dense(out))[:, -source.shape[1]:])


def batch(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    graph_padding = torch.zeros(2, 6, dtype=torch.bool)
    graph_padding[1, 4:] = True
    return (tokens((2, 5), VOCAB, seed, low=1), tokens((2, 7), VOCAB, seed + 1, low=1),
            torch.randn(2, 6, 5, generator=g, dtype=torch.float64).to(dtype), graph_padding)


def program(lib, rec, dtype=torch.float64, **variant):
    torch.manual_seed(0)
    model = Generator(lib, **variant).to(dtype)
    rec.log("state_dict keys", list(model.state_dict()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(3):
        docstring, source, graph, graph_padding = batch(step, dtype)
        logits = model(docstring, source, graph, graph_padding)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), source[:, 1:].reshape(-1))
        loss.backward()
        rec.log("loss", loss)
        rec.optimizer_step(optimizer, model)
    model.eval()
    docstring, source, graph, graph_padding = batch(10, dtype)
    source, graph, graph_padding, docstring = source[:1, :2], graph[:1], graph_padding[:1], docstring[:1]
    with torch.no_grad():
        for _ in range(4):  # _predict_code_token, temperature 0.8, repetition penalty 1.3
            logits = model(docstring, source, graph, graph_padding)[0, -1, :] / 0.8
            idx = set(source.view(-1).tolist())
            logits[list(idx)] /= 1.3
            top = torch.topk(logits, 5)
            filtered = torch.full_like(logits, float("-inf")).scatter(0, top.indices, top.values)
            next_token = torch.multinomial(F.softmax(filtered.unsqueeze(0), dim=-1), num_samples=1, replacement=True)
            source = torch.cat([source, next_token], dim=1)
    rec.log("generated source", source)


VARIANTS = {
    "rotary, post-norm": dict(),
    "absolute, pre-norm, generalized": dict(positions="absolute", layernorm_style="prenorm", generalized=True),
    "axial": dict(positions="axial"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_graph_coder_trains_and_generates_as_performer_pytorch(variant):
    theirs, ours = same_results(partial(program, **VARIANTS[variant]))
    assert not ours.warnings


def test_graph_coder_float32_within_1e_5():
    same_results(partial(program, dtype=torch.float32), rel=1e-5)


def test_positional_construction_matches_keywords():
    """The 25 positional arguments land where 1.1.4 puts them (same modules, same keys)."""
    from common import ORIGINAL, OURS

    for lib in (ORIGINAL, OURS):
        enc = PerformerEncoder(lib, max_seq_len=16, dim=8, depth=2, heads=2, dim_head=4, local_attn_heads=(1, 0),
                               local_window_size=4, causal=True, nb_features=5, reversible=True, ff_chunks=2,
                               ff_glu=True, use_rezero=True, shift_tokens=True)
        attn = [m for m in enc.modules() if isinstance(m, lib.performer_pytorch.SelfAttention)]
        assert [a.local_heads if hasattr(a, "local_heads") else a.heads - a.global_heads for a in attn] == [1, 0]
        assert all(a.fast_attention.nb_features == 5 and a.fast_attention.causal for a in attn)
        assert type(enc.performer.net).__name__ == "ReversibleSequence"
