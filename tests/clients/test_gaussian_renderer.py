"""FastAttentionRenderer of a public 3D Gaussian splatting project (a GRAPHDECO-derived
scene/gaussian_model.py that imports ``from performer_pytorch import CrossAttention,
SelfAttention, FastAttention``): FastAttention inside a module with its own projections.

Kept: input LayerNorm, one fused ``qkv`` Linear, heads split with einops, a learnable temperature
``tau`` dividing q and k by sqrt(clamp(tau, 1e-4)) (its gradient goes through FastAttention's
features), ``.contiguous()`` inputs, an output Linear, a (N, in_dim) input unsqueezed to batch 1,
and the constructor probe ``try: FastAttention(dim_head=...) except TypeError:
FastAttention(dim_heads=...)`` (1.1.4 has no ``dim_head``: the program relies on the TypeError).
Shrunk: hidden 40 in 4 heads (head dim 10, not a power of two), nb_features 24, 50 points, MSE to
a random target, 3 Adam steps; causal False (the program's default) and True; tau 1 (its
default) and 0.05 (sharpened q and k).
"""
import pytest
import torch
from einops import rearrange
from torch import nn

from common import same_results


def renderer_class(lib):
    FastAttention = lib.module.FastAttention

    class FastAttentionRenderer(nn.Module):
        def __init__(self, in_dim=4, hidden_dim=500, output_dim=4, heads=10, nb_features=256, causal=False,
                     use_input_ln=True, temp_init=1):
            super().__init__()
            assert hidden_dim % heads == 0
            self.h = heads
            self.dh = hidden_dim // heads
            self.in_norm = nn.LayerNorm(in_dim) if use_input_ln else nn.Identity()
            self.qkv = nn.Linear(in_dim, 3 * hidden_dim, bias=True)
            self.out = nn.Linear(hidden_dim, output_dim, bias=True)
            try:
                self.fast_attn = FastAttention(dim_head=self.dh, nb_features=nb_features, causal=causal)
                self.probe = "dim_head"
            except TypeError:
                self.fast_attn = FastAttention(dim_heads=self.dh, nb_features=nb_features, causal=causal)
                self.probe = "dim_heads"
            self.tau = nn.Parameter(torch.tensor(float(temp_init)))

        def forward(self, x):
            if x.dim() == 2:
                x = x.unsqueeze(0)
            qkv = self.qkv(self.in_norm(x))
            q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.h) for t in qkv.chunk(3, dim=-1))
            sqrt_tau = torch.clamp(self.tau, min=1e-4).sqrt()
            out = self.fast_attn((q / sqrt_tau).contiguous(), (k / sqrt_tau).contiguous(), v.contiguous())
            return self.out(rearrange(out, "b h n d -> b n (h d)"))

    return FastAttentionRenderer


def program(lib, rec, causal, temp_init):
    torch.manual_seed(2)
    model = renderer_class(lib)(in_dim=4, hidden_dim=40, output_dim=4, heads=4, nb_features=24, causal=causal,
                                temp_init=temp_init).double()
    rec.log("constructor probe", model.probe)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    points = torch.randn(50, 4, dtype=torch.float64) * 3
    target = torch.randn(1, 50, 4, dtype=torch.float64)
    for _ in range(3):
        out = model(points)
        loss = nn.functional.mse_loss(out, target)
        loss.backward()
        rec.log("output", out)
        rec.log("loss", loss)
        rec.optimizer_step(optimizer, model)
    rec.params("final parameters", model)


@pytest.mark.parametrize("causal, temp_init", [(False, 1), (True, 1), (False, 0.05), (True, 0.05)])
def test_renderer_with_learnable_temperature_trains_as_performer_pytorch(causal, temp_init):
    theirs, _ = same_results(lambda lib, rec: program(lib, rec, causal, temp_init))
    assert theirs.rec.entries["constructor probe"] == ["dim_heads"]
    assert all(g["tau"].abs() > 0 for g in theirs.rec.entries["grads"])  # the temperature does learn
