"""A vision transformer with stochastic positional encoding (SPE) and Performer features, from a
public repository found through a code search (code index file 45294236297; the index names no
repository): a timm-derived ``vision_transformer`` whose ``AttentionPerf`` does ``import
performer_pytorch.performer_pytorch as prf_torch`` and calls the module-level functions through
the alias. ``self.create_projection = partial(prf_torch.gaussian_orthogonal_random_matrix,
nb_rows=self.m, nb_columns=self.head_dim)`` with ``m = int(head_dim * kernel_ratio)``, 0.5: fewer
rows than columns, a partial block only; the matrix is a plain attribute ``self.w`` (not a buffer,
not in the state_dict), moved with ``self.w.to(device)`` at each call. Queries and keys go through
SineSPE and its gated filter (``num_realizations`` columns, scaled by ``R ** -0.25``), then
``prf_torch.softmax_kernel(..., is_query=True/False, device=device)`` (kernel "sm", the program's
setting) or ``prf_torch.generalized_kernel(..., device=device)`` (its "relu" branch),
``prf_torch.linear_attention(qp, kp, v)`` with v of head_dim columns, and ``y = v + dp(proj(y))``.

Kept: AttentionPerf (its own LayerNorm inside the block's), the block, patch embedding, CLS token
and position embeddings, the classifier on the CLS token; SineSPE and the gated SPEFilter (from the
SPE reference code, code index file 39243421667, as the program's SPE.py uses them: the code built
from the (B, N) shape, the filter holding its SPE), both drawing noise from the global generator at
every forward. Changed: timm's DropPath (rate 0) is an Identity, its Mlp a Sequential (fc1, GELU,
dropout, fc2, dropout), its weight init written out (truncated normal 0.02 on Linear weights and
the embeddings, zero biases, LayerNorm ones and zeros); random images and labels. Added: three direct calls of
``gaussian_orthogonal_random_matrix`` (rows below, above a block's width, ``scaling=1``). Shrunk:
8x8 images, 4x4 patches (5 tokens), embed 32, depth 2, 2 heads of 16, num_realizations 16 (= the
head width, as the program's 64), 5 sines, 5 classes, batch 2, 3 SGD-momentum steps with dropout
0.1, an eval forward; float64 through ``torch.set_default_dtype`` (the noise and the projection
are drawn in the default dtype).
"""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common import default_dtype, same_results


class SineSPE(nn.Module):
    def __init__(self, num_heads, in_features, num_realizations, num_sines):
        super().__init__()
        self.num_heads, self.in_features = num_heads, in_features
        self.num_realizations, self.num_sines = num_realizations, num_sines
        self.freqs, self.offsets, self.gains = (nn.Parameter(torch.randn(num_heads, in_features, num_sines))
                                                for _ in range(3))
        self.gains.data[...] = 1.0
        self.freqs.data[...] -= 4.0

    def forward(self, shape):
        n = shape[1]
        positions = torch.linspace(0, n - 1, n, device=self.freqs.device)[None, None, :, None]
        freqs = torch.sigmoid(self.freqs[:, :, None, :]) / 2.0

        def omega(phases):
            return torch.stack([phases.cos(), phases.sin()], -1).view(1, self.num_heads, self.in_features, n, -1)

        omega_q = omega(2 * math.pi * freqs * positions + self.offsets[:, :, None, :])
        omega_k = omega(2 * math.pi * freqs * positions)
        z = torch.randn(1, self.num_heads, self.in_features, 2 * self.num_sines, self.num_realizations)
        gains = F.softplus(self.gains).repeat(1, 1, 2)
        z = z / math.sqrt(self.in_features * self.num_sines * 2) * gains[None, ..., None]
        return (omega_q @ z).permute(0, 3, 1, 2, 4), (omega_k @ z).permute(0, 3, 1, 2, 4)


class SPEFilter(nn.Module):
    def __init__(self, spe):
        super().__init__()
        self.spe = [spe]  # not a submodule
        self.gate = nn.Parameter(torch.randn(spe.num_heads, spe.in_features) - 2.0)

    def forward(self, queries, keys, code):
        spe = self.spe[0]
        qbar, kbar = (c[:, : queries.shape[1]] for c in code)
        noise = torch.randn(spe.num_heads, spe.in_features, spe.num_realizations) / math.sqrt(spe.in_features)
        gate = torch.sigmoid(self.gate[..., None])
        qbar, kbar = ((1.0 - gate) * c + gate * noise for c in (qbar, kbar))
        return (qbar * queries[..., None]).sum(-2), (kbar * keys[..., None]).sum(-2)


def build(lib, kernel):
    prf_torch = lib.performer_pytorch

    class AttentionPerf(nn.Module):
        def __init__(self, dim, in_dim, head_cnt, kernel_ratio=0.5, dp1=0.1, num_realizations=16):
            super().__init__()
            self.emb, self.head_cnt, self.head_dim = in_dim * head_cnt, head_cnt, in_dim
            self.qkv = nn.Linear(dim, 3 * self.emb)
            self.dp = nn.Dropout(dp1)
            self.proj = nn.Linear(self.emb, self.emb)
            self.norm1 = nn.LayerNorm(dim)
            self.m = int(self.head_dim * kernel_ratio)
            self.create_projection = partial(prf_torch.gaussian_orthogonal_random_matrix, nb_rows=self.m,
                                             nb_columns=self.head_dim)
            self.w = self.create_projection()
            self.num_realizations = num_realizations
            self.spe = SineSPE(head_cnt, in_dim, num_realizations, num_sines=5)
            self.filter = SPEFilter(self.spe)

        def attn(self, x):
            B, N, C = x.shape
            device = x.device
            q, k, v = self.qkv(x).reshape(B, N, 3, self.head_cnt, C // self.head_cnt).permute(2, 0, 3, 1, 4)
            q, k = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3)
            q, k = self.filter(q, k, self.spe(q.shape[:2]))
            q, k = (t.permute(0, 2, 1, 3) / self.num_realizations**0.25 for t in (q, k))
            if kernel == "sm":
                qp = prf_torch.softmax_kernel(q, projection_matrix=self.w.to(device), is_query=True, device=device)
                kp = prf_torch.softmax_kernel(k, projection_matrix=self.w.to(device), is_query=False, device=device)
            else:
                qp, kp = (prf_torch.generalized_kernel(t, projection_matrix=self.w.to(device), device=device)
                          for t in (q, k))
            y = prf_torch.linear_attention(qp, kp, v)
            y = y.permute(0, 2, 1, 3).flatten(-2) / math.sqrt(self.num_realizations)
            return v.permute(0, 2, 1, 3).flatten(-2) + self.dp(self.proj(y))

        def forward(self, x):
            return self.attn(self.norm1(x))

    class Block(nn.Module):
        def __init__(self, dim, num_heads, drop, norm_layer):
            super().__init__()
            self.norm1, self.norm2 = norm_layer(dim), norm_layer(dim)
            self.attn = AttentionPerf(dim, dim // num_heads, head_cnt=num_heads, dp1=drop)
            self.drop_path = nn.Identity()
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(drop), nn.Linear(4 * dim, dim),
                                     nn.Dropout(drop))

        def forward(self, x):
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))

    class VisionTransformer(nn.Module):
        def __init__(self, img_size=8, patch_size=4, num_classes=5, embed_dim=32, depth=2, num_heads=2,
                     drop_rate=0.1):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, embed_dim))
            self.pos_drop = nn.Dropout(drop_rate)
            norm_layer = partial(nn.LayerNorm, eps=1e-6)
            self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, drop_rate, norm_layer) for _ in range(depth)))
            self.norm = norm_layer(embed_dim)
            self.head = nn.Linear(embed_dim, num_classes)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

        def forward_features(self, x):
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            return self.norm(self.blocks(self.pos_drop(x + self.pos_embed)))[:, 0]

        def forward(self, x):
            return self.head(self.forward_features(x))

    return VisionTransformer


def program(lib, rec, kernel):
    with default_dtype(torch.float64):
        torch.manual_seed(11)
        model = build(lib, kernel)()
        rec.log("state_dict", [(k, tuple(v.shape)) for k, v in model.state_dict().items()])
        rec.log("w", [block.attn.w for block in model.blocks])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            logits = model(torch.randn(2, 3, 8, 8))
            loss = F.cross_entropy(logits, torch.randint(0, 5, (2,)))
            loss.backward()
            rec.log("logits", logits)
            rec.log("loss", loss)
            rec.optimizer_step(optimizer, model)
        rec.params("final parameters", model)
        model.eval()
        with torch.no_grad():
            rec.log("eval logits", model(torch.randn(2, 3, 8, 8)))
        gorm = lib.performer_pytorch.gaussian_orthogonal_random_matrix
        rec.log("projection helper", [gorm(nb_rows=rows, nb_columns=16, scaling=scaling)
                                      for rows, scaling in ((8, 0), (20, 0), (7, 1))])


@pytest.mark.parametrize("kernel", ["sm", "relu"])
def test_vit_spe_trains_as_performer_pytorch(kernel):
    theirs, ours = same_results(partial(program, kernel=kernel))
    assert not any(name.endswith(".w") for name, _ in theirs.rec.entries["state_dict"][0])
    assert [tuple(w.shape) for w in theirs.rec.entries["w"][0]] == [(8, 16)] * 2
    assert not ours.warnings
