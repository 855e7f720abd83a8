"""PathFormer, a single-cell gene-pathway transformer (pretraining on expression prediction, cell
type annotation), from a public repository found through a code search (code index file
9206813954; the index names no repository). Its attention module starts with ``from
performer_pytorch.performer_pytorch import *``, which supplies ``FastAttention``, ``default``,
``exists``, ``empty``, ``rearrange``, ``partial``, ``softmax_kernel``, ``generalized_kernel``,
``linear_attention`` and ``apply_rotary_pos_emb``. ``nFastAttention(FastAttention)`` overrides
``forward`` with an ``output_attentions`` path: it reads ``self.no_projection``,
``self.generalized_attention``, ``self.kernel_fn``, ``self.projection_matrix``, ``self.causal``
and ``self.causal_linear_fn``, and materializes the attention map by running the attention
function per head on (b, n, m) features with an identity value matrix, in float32 on purpose,
averaged over the heads. ``nAttention`` re-implements 1.1.4's ``Attention`` around it (dim_head
64 whatever the width, bias-free q/k/v) and returns ``(out, weights)``; the cross-attention
blocks use it, the encoder's self-attention blocks ``nn.MultiheadAttention``, the decoder's
``nAttention``.

Kept: the embedding block (Conv1d of the counts, an Embedding of the gene ids), the pathway
encoder (learned pathway tokens cross-attending over the genes, self-attention, Conv1d
projector), the decoder (gene queries over the pathways, fast self-attention, dropout, Linear,
ReLU), the annotation head (a class token, ``nn.MultiheadAttention``, MLP, dropout 0.2); the
program's sequence: pretraining steps on an MSE of the predicted expression, then
``get_mid_embeding(..., output_attentions=True)`` and ``get_gene_prediction(...,
output_attentions=True)`` in eval, then annotation steps on cross-entropy. Changed: random
counts, gene ids, targets and labels; the ``LocalAttention`` branch left out (no layer of the
program has local heads); the attention maps, float32 in the program, are compared to 1e-5
(float32 rounding of the same float64 features), the rest to 1e-10. Added: ``nFastAttention``
called directly with ``output_attentions=True`` in its causal, generalized and no_projection
settings, and the map its loop means (the head mean of the 4-D attention of identity values);
the causal maps are where the libraries differ (README "Differences": 1.1.4's
``causal_linear_attention_noncuda`` on 3-D features carries its prefix sums along the wrong
dimension; ours are that map). Shrunk: embedding 16, 4 heads, 6 pathways, 20 genes, 10 input
and 7 predicted genes, batch 2, 3 + 2 Adam steps; float64 through ``torch.set_default_dtype``.
"""
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from common import assert_same, default_dtype, same_results

G, L, LD = 20, 10, 7  # genes, input genes, predicted genes


def star_import(module):
    """What ``from <module> import *`` binds."""
    names = {}
    exec(f"from {module.__name__} import *", names)
    return SimpleNamespace(**names)


def build(lib):
    pp = star_import(lib.performer_pytorch)
    default, exists, empty, rearrange, partial = pp.default, pp.exists, pp.empty, pp.rearrange, pp.partial
    assert callable(pp.apply_rotary_pos_emb)  # used only with pos_emb, which the program never passes

    class nFastAttention(pp.FastAttention):
        def forward(self, q, k, v, output_attentions=False):
            device = q.device
            if self.no_projection:
                q = q.softmax(dim=-1)
                k = torch.exp(k) if self.causal else k.softmax(dim=-2)
            elif self.generalized_attention:
                kernel = partial(pp.generalized_kernel, kernel_fn=self.kernel_fn,
                                 projection_matrix=self.projection_matrix, device=device)
                q, k = kernel(q), kernel(k)
            else:
                kernel = partial(pp.softmax_kernel, projection_matrix=self.projection_matrix, device=device)
                q, k = kernel(q, is_query=True), kernel(k, is_query=False)
            attn_fn = pp.linear_attention if not self.causal else self.causal_linear_fn
            out = attn_fn(q, k, v)
            if not output_attentions:
                return out
            eye = torch.eye(v.shape[-2]).to(device)[None, None].repeat(v.shape[0], v.shape[1], 1, 1)
            weights = torch.zeros(1, q.shape[0], q.shape[2], k.shape[2]).to(device).to(torch.float32)
            for head in range(q.shape[1]):
                weights += attn_fn(*(t[:, head].to(torch.float32) for t in (q, k, eye)))
            return out, weights / q.shape[1]

    class nAttention(nn.Module):
        def __init__(self, dim, causal=False, heads=8, dim_head=64, nb_features=None, generalized_attention=False,
                     kernel_fn=nn.ReLU(), dropout=0.0, no_projection=False, qkv_bias=False, attn_out_bias=True):
            super().__init__()
            inner_dim = default(dim_head, dim // heads) * heads
            self.fast_attention = nFastAttention(inner_dim // heads, nb_features, causal=causal,
                                                 generalized_attention=generalized_attention, kernel_fn=kernel_fn,
                                                 no_projection=no_projection)
            self.heads = self.global_heads = heads
            self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner_dim, bias=qkv_bias) for _ in range(3))
            self.to_out = nn.Linear(inner_dim, dim, bias=attn_out_bias)
            self.dropout = nn.Dropout(dropout)

        def forward(self, x, context=None, mask=None, context_mask=None, output_attentions=False):
            cross_attend = exists(context)
            context = default(context, x)
            context_mask = default(context_mask, mask) if not cross_attend else context_mask
            q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                       for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
            q, k, v = (t[:, : self.global_heads] for t in (q, k, v))
            weights = None
            if not empty(q):
                if exists(context_mask):
                    v.masked_fill_(~context_mask[:, None, :, None], 0.0)
                out = self.fast_attention(q, k, v, output_attentions=output_attentions)
                out, weights = out if output_attentions else (out, None)
            out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))
            return self.dropout(out), weights

    def mlp(dim, hidden):
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    class SelfAttentionBlock(nn.Module):
        def __init__(self, dim, heads, fast):
            super().__init__()
            self.fast = fast
            self.self_attn = nAttention(dim, heads=heads) if fast else nn.MultiheadAttention(dim, heads,
                                                                                             batch_first=True)
            self.norm0, self.norm1, self.mlp0 = nn.LayerNorm(dim), nn.LayerNorm(dim), mlp(dim, 2 * dim)

        def forward(self, x, output_attentions=False):
            if self.fast:
                out, weights = self.self_attn(x, output_attentions=output_attentions)
            else:
                out, weights = self.self_attn(x, x, x, need_weights=output_attentions)
            x = self.norm0(x + out)
            return self.norm1(x + self.mlp0(x)), weights

    class CrossUpdateBlock(nn.Module):
        def __init__(self, dim, heads, bidirectional):
            super().__init__()
            self.bidirectional = bidirectional
            self.cross_attn = nAttention(dim, heads=heads)
            if bidirectional:
                self.cross_attn_bi = nAttention(dim, heads=heads)
            self.norm0, self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(4))
            self.mlp0, self.mlp1 = mlp(dim, 2 * dim), mlp(dim, 2 * dim)

        def forward(self, query, context, output_attentions=False):
            out, weights0 = self.cross_attn(query, context=context, output_attentions=output_attentions)
            query = self.norm0(query + out)
            query = self.norm1(query + self.mlp0(query))
            weights1 = None
            if self.bidirectional:
                out, weights1 = self.cross_attn_bi(context, context=query, output_attentions=output_attentions)
                context = self.norm2(context + out)
                context = self.norm3(context + self.mlp1(context))
            return query, context, weights0, weights1

    class EmbeddingBlock(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.count2vector, self.gene2vector = nn.Conv1d(1, dim, 1), nn.Embedding(G, dim)

        def forward(self, x, gene=False):
            return self.gene2vector(x) if gene else self.count2vector(x.unsqueeze(1)).permute(0, 2, 1)

    class PathwayEncoder(nn.Module):
        def __init__(self, dim, n_pathway, heads, cross_depth=1, self_depth=1):
            super().__init__()
            self.pathway_embedding = nn.Embedding(n_pathway, dim)
            self.cross_extract_blocks = nn.ModuleList(CrossUpdateBlock(dim, heads, i != cross_depth - 1)
                                                      for i in range(cross_depth))
            self.self_attn_blocks = nn.ModuleList(SelfAttentionBlock(dim, heads, fast=False)
                                                  for _ in range(self_depth))
            self.projector = nn.Conv1d(dim, dim, 1)

        def forward(self, count_emb, gene_emb, output_attentions=False):
            pathways = self.pathway_embedding.weight.unsqueeze(0).repeat(count_emb.shape[0], 1, 1)
            genes, maps = count_emb + gene_emb, {}
            for i, block in enumerate(self.cross_extract_blocks):
                pathways, genes, w0, w1 = block(pathways, genes, output_attentions=output_attentions)
                maps[f"encoder_cross_extract_blocks_{i}_0"], maps[f"encoder_cross_extract_blocks_{i}_1"] = [w0], [w1]
            for i, block in enumerate(self.self_attn_blocks):
                pathways, weights = block(pathways, output_attentions=output_attentions)
                maps[f"encoder_self_attn_blocks_{i}"] = [weights]
            pathways = self.projector(pathways.transpose(1, 2)).transpose(1, 2)
            return (pathways, maps) if output_attentions else pathways

    class PathwayDecoder(nn.Module):
        def __init__(self, dim, heads, extract_depth=1, self_depth=1):
            super().__init__()
            self.decode_extraction_blocks = nn.ModuleList(CrossUpdateBlock(dim, heads, i != extract_depth - 1)
                                                          for i in range(extract_depth))
            self.self_attn_blocks = nn.ModuleList(SelfAttentionBlock(dim, heads, fast=True) for _ in range(self_depth))
            self.to_out = nn.ModuleList([nn.Dropout(0.1), nn.Linear(dim, 1), nn.ReLU()])

        def forward(self, pathways, genes, output_attentions=False):
            maps = {}
            for i, block in enumerate(self.decode_extraction_blocks):
                genes, pathways, w0, w1 = block(genes, pathways, output_attentions=output_attentions)
                maps[f"decoder_extract_blocks_{i}_0"], maps[f"decoder_extract_blocks_{i}_1"] = [w0], [w1]
            for i, block in enumerate(self.self_attn_blocks):
                genes, weights = block(genes, output_attentions=output_attentions)
                maps[f"decoder_self_attn_blocks_{i}"] = [weights]
            for layer in self.to_out:
                genes = layer(genes)
            return (genes, maps) if output_attentions else genes

    class AnnotationDecoder(nn.Module):
        def __init__(self, dim, heads, num_class):
            super().__init__()
            self.class_token = nn.Embedding(1, dim)
            self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.norm0, self.norm1, self.mlp0 = nn.LayerNorm(dim), nn.LayerNorm(dim), mlp(dim, 2 * dim)
            self.dropout, self.predictor = nn.Dropout(0.2), nn.Linear(dim, num_class)

        def forward(self, pathways):
            token = self.class_token.weight.unsqueeze(0).repeat(pathways.shape[0], 1, 1)
            token = self.norm0(token + self.cross_attn(token, pathways, pathways)[0])
            token = self.norm1(token + self.mlp0(token))
            return self.predictor(self.dropout(token))

    class PathFormerPretrain(nn.Module):
        def __init__(self, dim=16, n_pathway=6, heads=4):
            super().__init__()
            self.Embedding_block = EmbeddingBlock(dim)
            self.PathwayEncoder = PathwayEncoder(dim, n_pathway, heads)
            self.PathwayDecoder = PathwayDecoder(dim, heads)

        def get_mid_embeding(self, count_x, gene_x, output_attentions=False):
            count_e, gene_e = self.Embedding_block(count_x), self.Embedding_block(gene_x, gene=True)
            return self.PathwayEncoder(count_e, gene_e, output_attentions=output_attentions)

        def get_gene_prediction(self, gene_x, pathway_emb, output_attentions=False):
            return self.PathwayDecoder(pathway_emb, self.Embedding_block(gene_x, gene=True),
                                       output_attentions=output_attentions)

        def forward(self, count_x, gene_x, gene_d):
            pathways = self.get_mid_embeding(count_x, gene_x)
            return self.PathwayDecoder(pathways, self.Embedding_block(gene_d, gene=True), output_attentions=False)

    class PathFormerAnnotator(nn.Module):
        def __init__(self, dim=16, num_class=3, n_pathway=6, heads=4):
            super().__init__()
            self.Embedding_block = EmbeddingBlock(dim)
            self.PathwayEncoder = PathwayEncoder(dim, n_pathway, heads)
            self.Downstream = AnnotationDecoder(dim, heads, num_class)

        def forward(self, count_x, gene_x):
            count_e, gene_e = self.Embedding_block(count_x), self.Embedding_block(gene_x, gene=True)
            return self.Downstream(self.PathwayEncoder(count_e, gene_e))

    return SimpleNamespace(pretrain=PathFormerPretrain, annotator=PathFormerAnnotator, fast=nFastAttention)


def program(lib, rec):
    """Records the float64 results; returns the float32 attention maps (non-causal, causal)."""
    with default_dtype(torch.float64):
        torch.manual_seed(2)
        classes = build(lib)
        model = classes.pretrain()
        rec.log("state_dict", [(k, tuple(v.shape)) for k, v in model.state_dict().items()])
        rec.projections("projections", model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(3):
            count, gene, gene_d = torch.rand(2, L), torch.randint(0, G, (2, L)), torch.randint(0, G, (2, LD))
            prediction = model(count, gene, gene_d)
            loss = F.mse_loss(prediction, torch.rand(2, LD, 1))
            loss.backward()
            rec.log("prediction", prediction)
            rec.log("loss", loss)
            rec.optimizer_step(optimizer, model)
        model.eval()
        with torch.no_grad():
            count, gene, gene_d = torch.rand(2, L), torch.randint(0, G, (2, L)), torch.randint(0, G, (2, LD))
            pathways, encoder_maps = model.get_mid_embeding(count, gene, output_attentions=True)
            prediction, decoder_maps = model.get_gene_prediction(gene_d, pathways, output_attentions=True)
            rec.log("eval pathways", pathways)
            rec.log("eval prediction", prediction)
        annotator = classes.annotator()
        rec.log("annotator state_dict", [(k, tuple(v.shape)) for k, v in annotator.state_dict().items()])
        optimizer = torch.optim.Adam(annotator.parameters(), lr=1e-3)
        for _ in range(2):
            logits = annotator(torch.rand(2, L), torch.randint(0, G, (2, L)))[:, 0]
            loss = F.cross_entropy(logits, torch.randint(0, 3, (2,)))
            loss.backward()
            rec.log("annotator logits", logits)
            rec.optimizer_step(optimizer, annotator)
        probe_maps = []
        for setting in ("causal", "generalized_attention", "no_projection"):
            fast = classes.fast(8, 12, **{setting: True})
            q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)
            out, weights = fast(q, k, v, output_attentions=True)
            rec.log(f"{setting} output", out)
            # the map the per-head loop means: the (b, h, n, d) attention of identity values, head mean
            rec.log(f"{setting} map of 4-D calls", fast(q, k, torch.eye(5).expand(2, 2, 5, 5)).mean(1)[None])
            probe_maps.append(weights)
        return {**encoder_maps, **decoder_maps, "probes": probe_maps[1:]}, probe_maps[0]


def test_pathformer_runs_as_performer_pytorch():
    theirs, ours = same_results(program)
    (their_maps, their_causal), (our_maps, our_causal) = theirs.result, ours.result
    assert their_maps["decoder_self_attn_blocks_0"][0].dtype == torch.float32
    assert their_maps["encoder_cross_extract_blocks_0_1"] == [None]  # the last cross block is one-way
    assert_same(our_maps, their_maps, "attention maps", rel=1e-5)
    reference = theirs.rec.entries["causal map of 4-D calls"][0]
    torch.testing.assert_close(our_causal, reference.float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(their_causal, reference.float(), atol=1e-2)  # README "Differences"
    for name, probe in zip(("generalized_attention", "no_projection"), our_maps["probes"]):
        torch.testing.assert_close(probe, theirs.rec.entries[f"{name} map of 4-D calls"][0].float(),
                                   rtol=1e-5, atol=1e-6)
    assert not ours.warnings
