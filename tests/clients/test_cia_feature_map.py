"""CIA, Sony CSL's Piano Inpainting Application (CIA/model/attentions/attentions.py and
CIA/model/performer.py): a Performer re-assembled from performer-pytorch's module-level kernel
functions and building blocks, with its own feature-map module instead of FastAttention.

Kept: ``from performer_pytorch.performer_pytorch import causal_linear_attention,
causal_linear_attention_noncuda, default, empty, exists, gaussian_orthogonal_random_matrix,
generalized_kernel, linear_attention, softmax_kernel`` and ``Chunk, FeedForward, PreLayerNorm,
PreScaleNorm, ProjectionUpdater, cast_tuple``; ``FeatureMap`` (its ``create_projection =
partial(gaussian_orthogonal_random_matrix, nb_rows=..., nb_columns=..., scaling=...)`` buffer,
``redraw_projection_matrix(device)`` calling it with ``device=``, ``softmax_kernel(...,
projection_matrix=..., device=...)`` with is_query True / False, or ``generalized_kernel`` with
kernel_fn); ``FastAttention_`` (probes ``fast_transformers`` and, without it, takes
``causal_linear_attention_noncuda``; ``linear_attention`` when not causal) called on the
features; ``Attention_`` (separate to_q / to_k / to_v without bias, the padded values zeroed in
place with ``v.masked_fill_``, rotary positions on q and k before the feature map, dropout);
``_Performer_``'s layers (PreLayerNorm or PreScaleNorm around the attention and around
``Chunk(ff_chunks, FeedForward(dim, mult, dropout, glu), along_dim=1)``, ``cast_tuple`` of
local_attn_heads) and ``ProjectionUpdater(self.net, feature_redraw_interval)`` checked at each
forward: it finds no FastAttention in this model, so nothing is ever redrawn by it (1.1.4), and
ours must not redraw CIA's feature maps either; a manual ``redraw_projection_matrix`` of every
FeatureMap.
Changed: CIA's own rotary helper (apply_pe.apply_rotary_pos_emb_) is replaced by 1.1.4's
``apply_rotary_pos_emb`` with its ``FixedPositionalEmbedding``, and CIA's gated / reversible
execute types by a plain residual loop over the (out, state) pairs; the recurrent-state paths
(``states``, ``inferring_states``) are left out; piano-roll tokens are random.
Shrunk: dim 512 -> 16, 2 layers, 2 heads of 8, nb_features 16, sequence 10, 4 Adam steps.
"""
import math
from functools import partial

import pytest
import torch
import torch.nn as nn
from einops import rearrange

from common import same_results, tokens

DIM, HEADS, DEPTH, VOCAB, N = 16, 2, 2, 11, 10


def cia_classes(lib):
    pp = lib.performer_pytorch
    default, empty, exists = pp.default, pp.empty, pp.exists
    gaussian_orthogonal_random_matrix, generalized_kernel = pp.gaussian_orthogonal_random_matrix, pp.generalized_kernel
    softmax_kernel, linear_attention = pp.softmax_kernel, pp.linear_attention
    causal_linear_attention, causal_linear_attention_noncuda = pp.causal_linear_attention, pp.causal_linear_attention_noncuda

    class FeatureMap(nn.Module):
        def __init__(self, dim_heads, nb_features=None, ortho_scaling=0, causal=False, generalized_attention=False,
                     kernel_fn=nn.ReLU(), no_projection=False):
            super().__init__()
            nb_features = default(nb_features, int(dim_heads * math.log(dim_heads)))
            self.dim_heads = dim_heads
            self.nb_features = nb_features
            self.ortho_scaling = ortho_scaling
            self.create_projection = partial(gaussian_orthogonal_random_matrix, nb_rows=self.nb_features,
                                             nb_columns=dim_heads, scaling=ortho_scaling)
            projection_matrix = self.create_projection()
            self.register_buffer("projection_matrix", projection_matrix)
            self.generalized_attention = generalized_attention
            self.kernel_fn = kernel_fn
            self.no_projection = no_projection

        @torch.no_grad()
        def redraw_projection_matrix(self, device):
            projections = self.create_projection(device=device)
            self.projection_matrix.copy_(projections)
            del projections

        def forward(self, q, k):
            device = q.device
            if self.generalized_attention:
                create_kernel = partial(generalized_kernel, kernel_fn=self.kernel_fn,
                                        projection_matrix=self.projection_matrix, device=device)
                q, k = map(create_kernel, (q, k))
            else:
                create_kernel = partial(softmax_kernel, projection_matrix=self.projection_matrix, device=device)
                q = create_kernel(q, is_query=True)
                k = create_kernel(k, is_query=False)
            return q, k

    class FastAttention_(nn.Module):
        def __init__(self, causal=False):
            super().__init__()
            self.causal = causal
            if causal:
                try:
                    import fast_transformers.causal_product.causal_product_cuda  # noqa: F401
                    self.causal_linear_fn = partial(causal_linear_attention)
                except ImportError:
                    self.causal_linear_fn = causal_linear_attention_noncuda

        def forward(self, q, k, v, states, inferring_states):
            assert states is None and not inferring_states  # the recurrent paths are not reproduced
            attn_fn = linear_attention if not self.causal else self.causal_linear_fn
            return attn_fn(q, k, v), None

    class Attention_(nn.Module):
        def __init__(self, dim, causal=False, heads=8, dim_head=64, local_heads=0, nb_features=None,
                     generalized_attention=False, kernel_fn=nn.ReLU(), dropout=0.0, no_projection=False,
                     qkv_bias=False, attn_out_bias=True):
            super().__init__()
            assert dim % heads == 0
            self.dim_head = default(dim_head, dim // heads)
            inner_dim = dim_head * heads
            self.feature_map = FeatureMap(dim_head, nb_features, generalized_attention=generalized_attention,
                                          kernel_fn=kernel_fn, no_projection=no_projection)
            self.fast_attention = FastAttention_(causal)
            self.heads = heads
            self.global_heads = heads - local_heads
            self.to_q = nn.Linear(dim, inner_dim, bias=qkv_bias)
            self.to_k = nn.Linear(dim, inner_dim, bias=qkv_bias)
            self.to_v = nn.Linear(dim, inner_dim, bias=qkv_bias)
            self.to_out = nn.Linear(inner_dim, dim, bias=attn_out_bias)
            self.dropout = nn.Dropout(dropout)

        def forward(self, x, pos_emb=None, context=None, mask=None, context_mask=None, **kwargs):
            h, gh = self.heads, self.global_heads
            cross_attend = exists(context)
            context = default(context, x)
            context_mask = default(context_mask, mask) if not cross_attend else context_mask
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
            q, k, v = map(lambda t: rearrange(t, "b n (h d) -> b h n d", h=h), (q, k, v))
            (q, lq), (k, lk), (v, lv) = map(lambda t: (t[:, :gh], t[:, gh:]), (q, k, v))
            attn_outs = []
            if not empty(q):
                if exists(context_mask):
                    global_mask = context_mask[:, None, :, None]
                    v.masked_fill_(~global_mask, 0.0)
                if exists(pos_emb) and not cross_attend:
                    q, k = lib.performer_pytorch.apply_rotary_pos_emb(q, k, pos_emb)
                q, k = self.feature_map(q, k)
                out, state = self.fast_attention(q, k, v, kwargs["states"], kwargs["inferring_states"])
                attn_outs.append(out)
            out = torch.cat(attn_outs, dim=1)
            out = rearrange(out, "b h n d -> b n (h d)")
            return self.dropout(self.to_out(out)), state

    class Performer_(nn.Module):
        def __init__(self, dim, depth, heads, local_attn_heads=0, causal=False, ff_mult=4, features=None,
                     feature_redraw_interval=100000, ff_chunks=1, generalized_attention=False, kernel_fn=nn.ReLU(),
                     use_scalenorm=False, ff_glu=False, ff_dropout=0.0, attn_dropout=0.0, auto_check_redraw=True):
            super().__init__()
            dim_head = dim // heads
            local_attn_heads = pp.cast_tuple(local_attn_heads)
            local_attn_heads = local_attn_heads * depth if len(local_attn_heads) == 1 else local_attn_heads
            wrapper_fn = partial(pp.PreScaleNorm, dim) if use_scalenorm else partial(pp.PreLayerNorm, dim)
            layers = nn.ModuleList([])
            for _, local_heads in zip(range(depth), local_attn_heads):
                layers.append(nn.ModuleList([
                    wrapper_fn(Attention_(dim, causal=causal, heads=heads, dim_head=dim_head, local_heads=local_heads,
                                          nb_features=features, generalized_attention=generalized_attention,
                                          kernel_fn=kernel_fn, dropout=attn_dropout)),
                    wrapper_fn(pp.Chunk(ff_chunks, pp.FeedForward(dim, mult=ff_mult, dropout=ff_dropout, glu=ff_glu),
                                        along_dim=1)),
                ]))
            self.net = layers
            self.auto_check_redraw = auto_check_redraw
            self.proj_updater = pp.ProjectionUpdater(self.net, feature_redraw_interval)

        def forward(self, x, **kwargs):
            if self.auto_check_redraw:
                self.proj_updater.redraw_projections()
            for attn, ff in self.net:
                out, _ = attn(x, **kwargs)
                x = x + out
                x = x + ff(x)
            return dict(x=x)

    return FeatureMap, Performer_


class Model(nn.Module):
    """CIA's Performer_ (dropout, trunk, final norm) between a token embedding and a head."""

    def __init__(self, lib, **kwargs):
        super().__init__()
        _, Performer_ = cia_classes(lib)
        self.token_emb = nn.Embedding(VOCAB, DIM)
        self.layer_pos_emb = lib.performer_pytorch.FixedPositionalEmbedding(DIM // HEADS, N)
        self.dropout = nn.Dropout(0.1)
        self.performer = Performer_(DIM, DEPTH, HEADS, **kwargs)
        self.norm = nn.LayerNorm(DIM)
        self.to_out = nn.Linear(DIM, VOCAB)

    def forward(self, x, mask):
        h = self.dropout(self.token_emb(x))
        out = self.performer(h, pos_emb=self.layer_pos_emb(h), mask=mask, states=None, inferring_states=False)
        return self.to_out(self.norm(out["x"]))


VARIANTS = {
    "causal softmax": dict(causal=True, features=16, ff_glu=True),
    "softmax scalenorm": dict(causal=False, features=16, use_scalenorm=True, ff_chunks=2),
    "causal generalized": dict(causal=True, features=16, generalized_attention=True, kernel_fn=nn.ReLU()),
    "generalized gelu": dict(causal=False, generalized_attention=True, kernel_fn=nn.GELU()),
}


def program(lib, rec, variant="causal softmax", dtype=torch.float64):
    FeatureMap, _ = cia_classes(lib)
    torch.manual_seed(0)
    model = Model(lib, feature_redraw_interval=2, ff_dropout=0.1, attn_dropout=0.1, **VARIANTS[variant]).to(dtype)
    rec.log("state_dict keys", list(model.state_dict()))
    maps = [m for m in model.modules() if isinstance(m, FeatureMap)]
    rec.log("feature maps", [tuple(m.projection_matrix.shape) for m in maps])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    mask = torch.ones(3, N, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 4:] = False
    for step in range(4):
        x = tokens((3, N), VOCAB, step)
        logits = model(x, mask)
        loss = nn.functional.cross_entropy(logits[mask], tokens((3, N), VOCAB, 100 + step)[mask])
        loss.backward()
        rec.log("loss", loss)
        rec.log("calls since last redraw", int(model.performer.proj_updater.calls_since_last_redraw))
        rec.grads("grads", model)
        optimizer.step()
        optimizer.zero_grad()
        rec.log("projections", [m.projection_matrix.clone() for m in maps])
    for m in maps:
        m.redraw_projection_matrix(torch.device("cpu"))
    rec.log("redrawn projections", [m.projection_matrix.clone() for m in maps])
    model.eval()
    with torch.no_grad():
        rec.log("eval logits", model(tokens((2, N), VOCAB, 7), torch.ones(2, N, dtype=torch.bool)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cia_feature_map_trains_as_performer_pytorch(variant):
    theirs, ours = same_results(partial(program, variant=variant))
    projections = theirs.rec.entries["projections"]
    assert all(all(torch.equal(a, b) for a, b in zip(projections[0], p)) for p in projections), \
        "ProjectionUpdater finds no FastAttention here: CIA's feature maps are never redrawn by it"
    assert theirs.rec.entries["calls since last redraw"] == [1, 2, 0, 1]


def test_cia_float32_within_1e_5():
    same_results(partial(program, dtype=torch.float32), rel=1e-5)
