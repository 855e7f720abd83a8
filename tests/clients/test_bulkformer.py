"""BulkFormer (a masked gene-expression model; code index file 71504813142, the index names no
repository): continuous tokens (a gene embedding, RMS-normalised, plus a sinusoidal encoding of
each expression value scaled by the visible fraction) through a graph block, then
``Performer(dim, depth, heads, dim_head, ff_mult=4, nb_features, feature_redraw_interval=None,
reversible=False, generalized_attention=False, no_projection=False, causal=False,
local_attn_heads=0, attn_dropout, ff_dropout)`` (every 1.1.4 argument spelled out) and an
immediate ``performer.fix_projection_matrices_()``; a masked-expression MSE trained with AdamW and
gradient clipping; a checkpoint ``torch.save({"model", "opt"})`` loaded into a fresh model, and
into one built on the other library (the state_dict keys, proj_updater's duplicate
``instance.*`` entries and its call counter included, load strictly both ways).

Changed: the program's GCNConv (torch_geometric) is a dense normalised-adjacency equivalent.
Shrunk: 24 genes, dim 32, depth 2, 4 heads of 8, nb_features 16, batch 3, 4 steps with dropout on;
float64.
"""
import io
import math

import torch
import torch.nn.functional as F
from torch import nn

from common import ORIGINAL, OURS, same_results

GENES, DIM = 24, 32


class ExpressionEncoding(nn.Module):
    def __init__(self, dim, base=100.0, mask_value=-10.0):
        super().__init__()
        self.mask_value = mask_value
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).double() / dim)), persistent=False)

    def forward(self, e):
        masked = e.eq(self.mask_value)
        phases = e.masked_fill(masked, 0.0).unsqueeze(-1) * self.inv_freq
        enc = torch.cat((phases.sin(), phases.cos()), -1) * math.sqrt(2.0)
        return enc.masked_fill(masked.unsqueeze(-1), 0.0)


class DenseGCNBlock(nn.Module):
    def __init__(self, dim, hidden, adj):
        super().__init__()
        self.norm, self.inp = nn.LayerNorm(dim), nn.Linear(dim, hidden, bias=False)
        self.lin, self.out = nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, dim, bias=False)
        self.drop, self.scale = nn.Dropout(0.1), nn.Parameter(torch.full((dim,), 0.01))
        dinv = adj.sum(1).clamp_min(1e-12).rsqrt()
        self.register_buffer("A", dinv[:, None] * adj * dinv[None, :], persistent=False)

    def forward(self, h):
        u = self.A @ self.lin(self.inp(self.norm(h)))
        return h + self.scale * self.drop(self.out(F.gelu(u)))


def bulkformer(lib, adj):
    class BulkFormer(nn.Module):
        def __init__(self):
            super().__init__()
            self.gene_embedding = nn.Embedding(GENES, DIM)
            nn.init.normal_(self.gene_embedding.weight, 0.0, 1.0 / math.sqrt(DIM))
            self.enc, self.expression_scale = ExpressionEncoding(DIM), nn.Parameter(torch.tensor(1.0))
            self.input_norm, self.graph_block, self.pre = nn.LayerNorm(DIM), DenseGCNBlock(DIM, 12, adj), nn.LayerNorm(DIM)
            self.performer = lib.module.Performer(
                dim=DIM, depth=2, heads=4, dim_head=8, ff_mult=4, nb_features=16, feature_redraw_interval=None,
                reversible=False, generalized_attention=False, no_projection=False, causal=False, local_attn_heads=0,
                attn_dropout=0.05, ff_dropout=0.1)
            self.performer.fix_projection_matrices_()
            self.output_norm = nn.LayerNorm(DIM)
            self.head = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.Dropout(0.1), nn.Linear(DIM, 1))

        def forward(self, e):
            genes = F.rms_norm(self.gene_embedding.weight, (DIM,), eps=1e-8).unsqueeze(0).expand(e.shape[0], -1, -1)
            visible = e.ne(-10.0).to(e.dtype).mean(1)
            scale = (0.9 / visible.clamp_min(0.05)).clamp(max=2.0)
            h = self.input_norm(genes + self.expression_scale * self.enc(e) * scale[:, None, None])
            h = self.performer(self.pre(self.graph_block(h)))
            return self.head(self.output_norm(h)).squeeze(-1)

    return BulkFormer().double()


def program(lib, rec):
    torch.manual_seed(0)
    adj = (torch.rand(GENES, GENES) < 0.3).double()
    adj = ((adj + adj.T) > 0).double().fill_diagonal_(0)
    model = bulkformer(lib, adj)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(4):
        model.train()
        expression = torch.rand(3, GENES, dtype=torch.float64) * 5
        masked = torch.rand(3, GENES) < 0.15
        loss = F.mse_loss(model(expression.masked_fill(masked, -10.0))[masked], expression[masked])
        optimizer.zero_grad()
        loss.backward()
        rec.log("loss", loss)
        rec.grads("grads", model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    rec.params("params", model)
    rec.log("buffers", dict(model.named_buffers()))
    rec.log("state_dict keys", sorted(model.state_dict()))
    model.eval()
    x = torch.rand(2, GENES, dtype=torch.float64)
    with torch.no_grad():
        rec.log("eval", model(x))
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict()}, saved)
    for target in (lib, OURS if lib is ORIGINAL else ORIGINAL):  # its own library, then the other one
        saved.seek(0)
        checkpoint = torch.load(saved, weights_only=False)
        fresh = bulkformer(target, adj)
        result = fresh.load_state_dict(checkpoint["model"])
        rec.log("load", [list(result.missing_keys), list(result.unexpected_keys)])
        with torch.no_grad():
            rec.log("eval after load", fresh.eval()(x))


def test_bulkformer_trains_and_checkpoints_across_libraries_as_performer_pytorch():
    theirs, ours = same_results(program)
    assert ours.rec.entries["load"] == [[[], []], [[], []]]
    same, other = ours.rec.entries["eval after load"]
    assert torch.equal(same, ours.rec.entries["eval"][0])  # (1.1.4's model on our weights: its own rounding)
    assert torch.allclose(other, same, rtol=1e-12, atol=1e-12)
    assert "performer.proj_updater.calls_since_last_redraw" in ours.rec.entries["state_dict keys"][0]
