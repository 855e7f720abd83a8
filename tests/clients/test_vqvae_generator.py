"""ludziej/vqvae, generator/modules/performer.py and generator/model.py: a Jukebox-style audio
token generator (LevelGenerator) whose transformer is a Performer assembled from
performer-pytorch's parts.

Kept: the Performer class of generator/modules/performer.py built from
``from performer_pytorch import SelfAttention, CrossAttention, ProjectionUpdater`` and
``from performer_pytorch.reversible import ReversibleSequence, SequentialSequence`` with its own
ReZero / PreLayerNorm / Chunk / FeedForward wrappers, the routes ``{'mask': ..., 'pos_emb': ...}``,
and ``ProjectionUpdater(self.net, feature_redraw_interval)`` redrawing every FastAttention it
finds inside (ours must find ours); LevelGenerator's use: ``Performer(causal=True,
use_rezero=rezero, nb_features=feature_map_dims, dim, depth, heads, dim_head, ff_mult,
feature_redraw_interval)``, token embedding + start layer + transformer + final norm + output
layer, the shifted cross-entropy with label_smoothing, Adam; generation with
``logits_to_sample`` (``repetition_penalty_fn(logits, prev_out[:, -ctx:], theta)`` and ``top_k``
from ``performer_pytorch.autoregressive_wrapper``, multinomial with replacement) over a sliding
n_ctx window from random starting tokens, the transformer in eval mode and restored after.
Changed: the VQ-VAE tokenizer and the conditioner are replaced by random tokens and a learned
position embedding; PyTorch Lightning's loop by a plain one. Both the default SequentialSequence
and the Performer's ``reversible=True`` are run.
Shrunk: dim 16, depth 2, heads 2, dim_head 8, feature_map_dims 16, n_ctx 12, 32 bins,
feature_redraw_interval 2, 4 steps, 5 generated tokens, float64.
"""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common import changed, same_results

BINS = 32
N_CTX = 12
DIM = 16


def cast_tuple(val):
    return (val,) if not isinstance(val, tuple) else val


def default(val, d):
    return val if val is not None else d


class ReZero(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(1e-3))
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(x, **kwargs) * self.g


class PreLayerNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(self.norm(x), **kwargs)


class Chunk(nn.Module):
    def __init__(self, chunks, fn, along_dim=-1):
        super().__init__()
        self.dim, self.chunks, self.fn = along_dim, chunks, fn

    def forward(self, x, **kwargs):
        if self.chunks == 1:
            return self.fn(x, **kwargs)
        return torch.cat([self.fn(c, **kwargs) for c in x.chunk(self.chunks, dim=self.dim)], dim=self.dim)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, dropout=0.0, activation=None, glu=False):
        super().__init__()
        activation = default(activation, nn.GELU)
        self.glu = glu
        self.w1 = nn.Linear(dim, dim * mult * (2 if glu else 1))
        self.act = activation()
        self.dropout = nn.Dropout(dropout)
        self.w2 = nn.Linear(dim * mult, dim)

    def forward(self, x, **kwargs):
        if not self.glu:
            x = self.act(self.w1(x))
        else:
            x, v = self.w1(x).chunk(2, dim=-1)
            x = self.act(x) * v
        return self.w2(self.dropout(x))


class Performer(nn.Module):
    def __init__(self, lib, dim, depth, heads, dim_head, local_attn_heads=0, local_window_size=256, causal=False,
                 ff_mult=4, nb_features=None, feature_redraw_interval=1000, reversible=False, ff_chunks=1,
                 generalized_attention=False, kernel_fn=nn.ReLU(), use_scalenorm=False, use_rezero=False,
                 ff_glu=False, ff_dropout=0.0, attn_dropout=0.0, cross_attend=False, no_projection=False,
                 auto_check_redraw=True, qkv_bias=True, attn_out_bias=True):
        super().__init__()
        layers = nn.ModuleList([])
        local_attn_heads = cast_tuple(local_attn_heads)
        local_attn_heads = local_attn_heads * depth if len(local_attn_heads) == 1 else local_attn_heads
        wrapper_fn = ReZero if use_rezero else partial(PreLayerNorm, dim)
        for _, local_heads in zip(range(depth), local_attn_heads):
            attn = lib.module.SelfAttention(
                dim, causal=causal, heads=heads, dim_head=dim_head, local_heads=local_heads,
                local_window_size=local_window_size, nb_features=nb_features,
                generalized_attention=generalized_attention, kernel_fn=kernel_fn, dropout=attn_dropout,
                no_projection=no_projection, qkv_bias=qkv_bias, attn_out_bias=attn_out_bias,
            )
            ff = Chunk(ff_chunks, FeedForward(dim, mult=ff_mult, dropout=ff_dropout, glu=ff_glu), along_dim=1)
            layers.append(nn.ModuleList([wrapper_fn(attn), wrapper_fn(ff)]))
            if not cross_attend:
                continue
            layers.append(nn.ModuleList([
                wrapper_fn(lib.module.CrossAttention(dim, heads=heads, dim_head=dim_head, nb_features=nb_features)),
                wrapper_fn(Chunk(ff_chunks, FeedForward(dim, mult=ff_mult, dropout=ff_dropout, glu=ff_glu), along_dim=1)),
            ]))
        execute_type = lib.reversible.ReversibleSequence if reversible else lib.reversible.SequentialSequence
        route_attn = ((True, False),) * depth * (2 if cross_attend else 1)
        route_context = ((False, False), (True, False)) * depth
        attn_route_map = {"mask": route_attn, "pos_emb": route_attn}
        context_route_map = {"context": route_context, "context_mask": route_context} if cross_attend else {}
        self.net = execute_type(layers, args_route={**attn_route_map, **context_route_map})
        self.auto_check_redraw = auto_check_redraw
        self.proj_updater = lib.module.ProjectionUpdater(self.net, feature_redraw_interval)

    def fix_projection_matrices_(self):
        self.proj_updater.feature_redraw_interval = None

    def forward(self, x, **kwargs):
        if self.auto_check_redraw:
            self.proj_updater.redraw_projections()
        return self.net(x, **kwargs)


class LevelGenerator(nn.Module):
    def __init__(self, lib, reversible, dim=DIM, depth=2, heads=2, dim_head=8, ff_mult=2, feature_redraw_interval=2,
                 feature_map_dims=16, rezero=True, label_smoothing=0.1, token_dim=DIM):
        super().__init__()
        self.lib = lib
        self.label_smoothing = label_smoothing
        trans_args = dict(dim=dim, depth=depth, heads=heads, dim_head=dim_head, ff_mult=ff_mult,
                          feature_redraw_interval=feature_redraw_interval)
        self.transformer = Performer(lib, causal=True, use_rezero=rezero, nb_features=feature_map_dims,
                                     reversible=reversible, **trans_args)
        self.start_layer = nn.Sequential(nn.Linear(token_dim, dim), nn.ReLU())
        self.x_emb = nn.Embedding(BINS, token_dim)
        self.pos_emb = nn.Embedding(N_CTX, token_dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.to_out = nn.Linear(dim, BINS, bias=False)

    def embed(self, tokens):
        return self.x_emb(tokens) + self.pos_emb(torch.arange(tokens.shape[1]))

    def get_transformer_logits(self, x_emb):
        x = self.start_layer(x_emb)
        x = self.transformer(x)
        return self.to_out(self.final_layer_norm(x))

    def forward(self, tokens):
        embedding = self.embed(tokens)
        x_in, x_tok = embedding[:, :-1], tokens[:, 1:]
        out = self.get_transformer_logits(x_in)
        y, y_true = out.reshape(-1, BINS), x_tok.reshape(-1)
        return F.cross_entropy(y, y_true, label_smoothing=self.label_smoothing)

    def logits_to_sample(self, logits, prev_out, temperature=1.0, filter_thres=0.9, repetition_penalty=1.0,
                         repetition_penalty_ctx=32):
        ar = self.lib.autoregressive_wrapper
        if repetition_penalty > 1.0:
            logits = ar.repetition_penalty_fn(logits, prev_out[:, -repetition_penalty_ctx:], theta=repetition_penalty)
        filtered_logits = ar.top_k(logits, thres=filter_thres)
        probs = F.softmax(filtered_logits / temperature, dim=-1)
        return torch.multinomial(probs, 1, replacement=True)

    @torch.no_grad()
    def autoregressive_generate_prior(self, start_tokens, seq_len, **sampling_kwargs):
        was_training = self.transformer.training
        b, t = start_tokens.shape
        self.transformer.eval()
        tokens = start_tokens
        for i in range(t, seq_len):
            ctx_start = max(i - N_CTX + 1, 0)
            logits = self.get_transformer_logits(self.embed(tokens[:, ctx_start:i]))[:, -1, :]
            sample_token = self.logits_to_sample(logits, prev_out=tokens, **sampling_kwargs)
            tokens = torch.cat((tokens, sample_token), dim=1)
        self.transformer.train(was_training)
        return tokens[:, t:]


def vqvae_program(reversible):
    def program(lib, rec):
        torch.manual_seed(0)
        model = LevelGenerator(lib, reversible).double()
        torch.manual_seed(1)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        rec.projections("projections", model)
        for _ in range(4):
            model.train()
            tokens = torch.randint(0, BINS, (2, N_CTX))
            loss = model(tokens)
            loss.backward()
            rec.log("loss", loss)
            rec.optimizer_step(optimizer, model)  # optimizer.step(); optimizer.zero_grad()
        beginning = torch.randint(BINS, (2, 10))
        out = model.autoregressive_generate_prior(beginning, 15, repetition_penalty=1.2, repetition_penalty_ctx=8)
        rec.log("generated tokens", out)
        rec.log("transformer training after generation", model.transformer.training)

    return program


@pytest.mark.parametrize("reversible", [False, True], ids=["sequential", "reversible"])
def test_vqvae_level_generator_trains_and_samples_as_performer_pytorch(reversible):
    theirs, _ = same_results(vqvae_program(reversible))
    assert changed(theirs.rec.entries["projections"]), "the run must cross a projection redraw"
    assert theirs.rec.entries["generated tokens"][0].shape == (2, 5)
