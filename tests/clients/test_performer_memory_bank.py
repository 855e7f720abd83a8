"""A low-light image enhancement U-Net (an EnlightenGAN-style ``Unet_resize_conv``) from a public
repository found through a code search (code index file 59758063637; the index names no
repository), with a ``PerformerMemoryBank`` between its encoder and decoder: ``from
performer_pytorch import SelfAttention as Performer_self`` and ``CrossAttention as
Performer_cross``, both built as ``(dim=feature_dim, heads=4, dim_head=feature_dim // 4,
causal=False)``. Self-attention runs on ``x.flatten(2).transpose(1, 2)`` (a non-contiguous view)
and its output goes back by ``.transpose(1, 2).view(B, C, H, W)``; once the bank holds features,
cross attention of the same tokens attends over the ``top_k`` most similar stored feature maps
(``k * H * W`` context tokens), mixed with the self-attention by a learned sigmoid gate, plus
``gamma * x``.

Kept: the memory bank (cosine-similarity retrieval, access counts in training, duplicates
skipped, least-accessed entries replaced when full), both attentions, gamma and gamma_proj.
Changed: the bank's CUDA buffers are CPU float64; a conv stem and head stand in for the U-Net;
random images and targets, an L1 loss. Shrunk: feature_dim 128 -> 16, 20x20 maps -> 5x5 (25
tokens, 50 context tokens), capacity 100 -> 5, top_k 5 -> 2, 4 Adam steps (the bank fills and
replaces), then an eval forward of another batch size.
"""
import torch
import torch.nn.functional as F
from torch import nn

from common import same_results

C, S = 16, 5


def build(lib):
    Performer_self, Performer_cross = lib.module.SelfAttention, lib.module.CrossAttention

    class PerformerMemoryBank(nn.Module):
        def __init__(self, feature_dim=C, capacity=5, top_k=2):
            super().__init__()
            self.sim_threshold, self.capacity, self.top_k = 0.95, capacity, top_k
            self.similar_feats = torch.zeros(capacity, feature_dim, dtype=torch.float64)
            self.original_feats = torch.zeros(capacity, feature_dim, S, S, dtype=torch.float64)
            self.access_counts = torch.zeros(capacity, dtype=torch.int64)
            self.current_size = 0
            self.cross_attn = Performer_cross(dim=feature_dim, heads=4, dim_head=feature_dim // 4, causal=False)
            self.self_attn = Performer_self(dim=feature_dim, heads=4, dim_head=feature_dim // 4, causal=False)
            self.gamma = nn.Parameter(torch.tensor(0.1))
            self.gamma_proj = nn.Sequential(nn.Conv2d(feature_dim * 2, feature_dim, 1), nn.SELU(),
                                            nn.Conv2d(feature_dim, 1, 1), nn.Sigmoid())

        def _calc_similarity(self, q):
            if self.current_size == 0:
                return None
            qn, mn = F.normalize(q, dim=-1), F.normalize(self.similar_feats[: self.current_size], dim=-1)
            return F.cosine_similarity(qn.unsqueeze(1), mn.unsqueeze(0), dim=2)

        def retrieve_similar(self, q):
            sim = self._calc_similarity(q)
            if sim is None:
                return None
            self.top_k = min(self.current_size, self.top_k)
            _, top_idx = torch.topk(sim, k=self.top_k, dim=1)
            if self.training:
                counts = torch.zeros_like(self.access_counts)
                counts.scatter_add_(0, top_idx.view(-1), torch.ones_like(top_idx.view(-1)))
                self.access_counts += counts
            return self.original_feats[top_idx.view(-1)].view(*top_idx.shape, *self.original_feats.shape[1:])

        @torch.no_grad()
        def add_feature(self, new_sim, new_orig):
            if self.current_size > 0:
                keep = ~(self._calc_similarity(new_sim) > self.sim_threshold).any(dim=1)
                new_sim, new_orig = new_sim[keep], new_orig[keep]
                if new_sim.size(0) == 0:
                    return
            nb, cs = new_sim.size(0), self.current_size
            bank = (self.similar_feats, self.original_feats, self.access_counts)
            if cs + nb > self.capacity:  # the least accessed go; the front entries take their places
                sel = min(cs + nb - self.capacity, cs)
                _, ridx = torch.topk(self.access_counts[:cs], k=sel, largest=False)
                for t, new in zip(bank, (new_sim, new_orig, None)):
                    t[ridx] = t[:sel].clone()
                    t[:sel] = 0 if new is None else new[:sel].clone()
                self.current_size = self.capacity
            else:
                for t, new in zip(bank, (new_sim, new_orig, None)):
                    t[nb: cs + nb] = t[:cs].clone()
                    t[:nb] = 0 if new is None else new.clone()
                self.current_size += nb

        def forward(self, x):
            B, Cc, H, W = x.shape
            x_flat = x.flatten(2).transpose(1, 2)
            sim_feat = F.adaptive_avg_pool2d(x, 1).squeeze(-1).squeeze(-1)
            out = self.self_attn(x_flat).transpose(1, 2).view(B, Cc, H, W)
            mem = self.retrieve_similar(sim_feat)
            if mem is not None:
                k, mh, mw = mem.shape[1], mem.shape[3], mem.shape[4]
                context = mem.permute(0, 1, 3, 4, 2).contiguous().view(B, k * (mh * mw), Cc)
                ca_out = self.cross_attn(x_flat, context=context).transpose(1, 2).view(B, Cc, H, W)
                g = self.gamma_proj(torch.concat([out, ca_out], dim=1))
                out = (1 - g) * out + g * ca_out
            if self.training:
                self.add_feature(sim_feat, x)
            return self.gamma * x + out

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, C, 3, padding=1)
            self.memory_bank = PerformerMemoryBank()
            self.head = nn.Conv2d(C, 3, 3, padding=1)

        def forward(self, img):
            return self.head(self.memory_bank(F.selu(self.stem(img))))

    return Net


def program(lib, rec):
    torch.manual_seed(3)
    net = build(lib)().double()
    rec.log("state_dict", [(k, tuple(v.shape)) for k, v in net.state_dict().items()])
    rec.projections("projections", net)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(4):
        img, target = torch.randn(2, 3, S, S, dtype=torch.float64), torch.rand(2, 3, S, S, dtype=torch.float64)
        out = net(img)
        loss = F.l1_loss(out, target)
        loss.backward()
        rec.log("output", out)
        rec.log("loss", loss)
        rec.optimizer_step(optimizer, net)
        bank = net.memory_bank
        rec.log("bank", [bank.current_size, bank.access_counts, bank.similar_feats, bank.original_feats])
    net.eval()
    with torch.no_grad():
        rec.log("eval output", net(torch.randn(3, 3, S, S, dtype=torch.float64)))


def test_performer_memory_bank_trains_as_performer_pytorch():
    theirs, ours = same_results(program)
    sizes, feats = zip(*((b[0], b[2]) for b in theirs.rec.entries["bank"]))
    assert sizes == (2, 3, 5, 5), sizes  # a duplicate skipped at the second step, full at the third
    assert not torch.equal(feats[3][:2], feats[2][:2]), "the fourth step replaces the least accessed"
    assert theirs.rec.entries["grads"][1]["memory_bank.cross_attn.to_q.weight"] is not None  # the bank was read
    assert not ours.warnings
