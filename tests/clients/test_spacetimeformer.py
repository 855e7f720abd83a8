"""QData/spacetimeformer (spacetimeformer/spacetimeformer_model/nn/attn.py, nn/encoder.py,
nn/model.py's ``_attn_switch("performer")``; https://github.com/QData/spacetimeformer).

``PerformerAttention(FastAttention)`` is a subclass that
- passes ``kernel_fn="N/A"`` (a string, unused by the softmax map) or ``nn.ReLU()`` (its "relu"
  kernel: generalized attention), ``nb_features=max(100, int(d log d))``;
- registers its own ``calls_since_last_redraw`` buffer and calls
  ``self.redraw_projection_matrix(queries.device)`` itself every ``redraw_interval`` calls;
- feeds transposed (B, H, L, E) views of (B, L, H, E) projections to ``super().forward``;
- with ``output_attn=True`` attends over one-hot values (B, 1, S, S): one value head broadcast
  against H query heads, value width S.
``AttentionLayer`` reads the output back with ``out.view(B, L, -1)`` on its transposed view: with
several heads that view raises in 1.1.4 under current torch (the output is not laid out for it),
and must raise the same way here; with one head (and with ``.reshape``) the program runs.

Kept: PerformerAttention, AttentionLayer, the post-norm EncoderLayer (local and global attention,
1x1 convolutions), a cross attention of decoder tokens over the encoding, a linear forecaster;
q/k width 6, value width 5 (d_qk != d_v). Shrunk: d_model 16, 2 layers, 12 encoder and 7 decoder
steps, redraw interval 2 (redraws inside training), Adam for 4 steps, float64.
"""
from functools import partial
from math import log

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common import ORIGINAL, OURS, changed, default_dtype, run, same_results


def build(lib, reshape):
    class PerformerAttention(lib.module.FastAttention):
        def __init__(self, mask_flag=False, dim_heads=None, ortho_scaling=0, feature_redraw_interval=1000,
                     kernel="softmax"):
            super().__init__(
                dim_heads=dim_heads,
                ortho_scaling=ortho_scaling,
                nb_features=max(100, int(dim_heads * log(dim_heads))),
                causal=mask_flag,
                generalized_attention=kernel == "relu",
                kernel_fn=nn.ReLU() if kernel == "relu" else "N/A",
            )
            self.redraw_interval = feature_redraw_interval
            self.register_buffer("calls_since_last_redraw", torch.tensor(0))

        def forward(self, queries, keys, values, attn_mask, output_attn=False):
            if self.training:
                if self.calls_since_last_redraw >= self.redraw_interval:
                    self.redraw_projection_matrix(queries.device)
                    self.calls_since_last_redraw.zero_()
                else:
                    self.calls_since_last_redraw += 1
            v = super().forward(queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
            return v.transpose(1, 2), None

    class AttentionLayer(nn.Module):
        def __init__(self, attention, d_model, d_queries_keys, d_values, n_heads):
            super().__init__()
            self.inner_attention = attention()
            self.query_projection = nn.Linear(d_model, d_queries_keys * n_heads)
            self.key_projection = nn.Linear(d_model, d_queries_keys * n_heads)
            self.value_projection = nn.Linear(d_model, d_values * n_heads)
            self.out_projection = nn.Linear(d_values * n_heads, d_model)
            self.n_heads = n_heads

        def forward(self, queries, keys, values, attn_mask, output_attn=False):
            B, L, _ = queries.shape
            _, S, _ = keys.shape
            H = self.n_heads
            queries = self.query_projection(queries).view(B, L, H, -1)
            keys = self.key_projection(keys).view(B, S, H, -1)
            values = self.value_projection(values).view(B, S, H, -1)
            out, attn = self.inner_attention(queries=queries, keys=keys, values=values, attn_mask=attn_mask,
                                             output_attn=output_attn)
            if output_attn and attn is None:
                onehot_values = torch.eye(S).unsqueeze(0).repeat(B, 1, 1).unsqueeze(2).to(values)
                with torch.no_grad():
                    attn, _ = self.inner_attention(queries=queries, keys=keys, values=onehot_values,
                                                   attn_mask=attn_mask)
                    attn = attn.transpose(2, 1)
            out = out.reshape(B, L, -1) if reshape else out.view(B, L, -1)
            return self.out_projection(out), attn

    class EncoderLayer(nn.Module):
        def __init__(self, global_attention, local_attention, d_model, d_ff):
            super().__init__()
            self.local_attention = local_attention
            self.global_attention = global_attention
            self.conv1 = nn.Conv1d(in_channels=d_model, out_channels=d_ff, kernel_size=1)
            self.conv2 = nn.Conv1d(in_channels=d_ff, out_channels=d_model, kernel_size=1)
            self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.dropout = nn.Dropout(0.1)

        def forward(self, x, output_attn=False):
            new_x, _ = self.local_attention(x, x, x, attn_mask=None, output_attn=output_attn)
            x = self.norm1(x + self.dropout(new_x))
            new_x, attn = self.global_attention(x, x, x, attn_mask=None, output_attn=output_attn)
            x = self.norm2(x + self.dropout(new_x))
            new_x = self.dropout(F.gelu(self.conv1(x.transpose(-1, 1))))
            new_x = self.dropout(self.conv2(new_x).transpose(-1, 1))
            return self.norm3(x + new_x), attn

    def attn_switch(d_model, n_heads, kernel):
        attention = partial(PerformerAttention, dim_heads=6, kernel=kernel, feature_redraw_interval=2)
        return AttentionLayer(attention, d_model, d_queries_keys=6, d_values=5, n_heads=n_heads)

    class Model(nn.Module):
        def __init__(self, kernel, n_heads, d_model=16):
            super().__init__()
            self.embed = nn.Linear(3, d_model)
            self.layers = nn.ModuleList([
                EncoderLayer(attn_switch(d_model, n_heads, kernel), attn_switch(d_model, n_heads, kernel), d_model, 32)
                for _ in range(2)])
            self.cross = attn_switch(d_model, n_heads, kernel)
            self.dec_embed = nn.Linear(3, d_model)
            self.forecaster = nn.Linear(d_model, 1)

        def forward(self, enc, dec, output_attn=False):
            x = self.embed(enc)
            attns = []
            for layer in self.layers:
                x, a = layer(x, output_attn=output_attn)
                attns.append(a)
            d = self.dec_embed(dec)
            y, ca = self.cross(d, x, x, attn_mask=None, output_attn=output_attn)
            return self.forecaster(d + y), attns + [ca]

    return Model


def program(kernel, n_heads, reshape):
    def run_program(lib, rec):
        with default_dtype(torch.float64):
            torch.manual_seed(0)
            model = build(lib, reshape)(kernel, n_heads)
            rec.log("state_keys", list(model.state_dict()))
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            enc, dec, target = torch.randn(2, 12, 3), torch.randn(2, 7, 3), torch.randn(2, 7, 1)
            for _ in range(4):  # redraws on the third call of every attention
                pred, _ = model(enc, dec)
                loss = F.mse_loss(pred, target)
                loss.backward()
                rec.log("loss", loss)
                rec.optimizer_step(opt, model)
            rec.log("state", model.state_dict())
            model.eval()
            with torch.no_grad():
                pred, attns = model(enc, dec, output_attn=True)
            rec.log("eval", pred)
            rec.log("attention maps", attns)

    return run_program


@pytest.mark.parametrize("kernel", ["relu", "softmax"])
@pytest.mark.parametrize("n_heads, reshape", [(1, False), (4, True)], ids=["as-written", "reshape"])
def test_spacetimeformer_performer_attention_as_performer_pytorch(kernel, n_heads, reshape):
    theirs, _ = same_results(program(kernel, n_heads, reshape))
    maps = theirs.rec.entries["attention maps"][0]  # the one-hot value head broadcast against every head
    assert [tuple(a.shape) for a in maps] == [(2, n_heads, 12, 12)] * 2 + [(2, n_heads, 7, 12)]
    assert changed(theirs.rec.entries["projections"])  # the subclass's own redraws ran


def test_spacetimeformer_view_of_several_heads_raises_as_in_performer_pytorch():
    """The program as written, 4 heads: ``out.view(B, L, -1)`` of the attention's transposed
    output raises in 1.1.4; the same error here (not a silently different layout)."""
    errors = []
    for lib in (ORIGINAL, OURS):
        with pytest.raises(RuntimeError, match="view size is not compatible") as info:
            run(program("softmax", 4, False), lib)
        errors.append(type(info.value))
    assert errors[0] is errors[1]
