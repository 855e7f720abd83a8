"""A ViT attention-comparison program from a public repository found through a code search (code
index file 18569455982; the index names no repository): ``from performer_pytorch import
SelfAttention as PerformerAttention``, and a ``PerformerWrapper`` swapped in for a HF-ViT layer's
attention whose ``forward(x, head_mask=None, output_attentions=False)`` builds a *new*
``PerformerAttention(dim=768, heads=12, causal=False)`` on every call (``.cuda()`` dropped here)
and returns ``(attn(x),)``: fresh Linear weights and a fresh projection drawn from the global
generator at each forward, so the attention has no parameters of the model's and gradients
reach only its input.

Kept: dim 768 and 12 heads (dim_head default 64, nb_features int(64 log 64) = 266), the
per-call construction in the default dtype, a HF-ViT-style pre-norm layer around it (LayerNorm,
wrapper, residual, LayerNorm, GELU MLP with dropout, residual), patch embedding, a CLS token and
position embeddings, a classifier on the CLS token. Changed: random images and labels. Shrunk: 2
layers, MLP width 64, 4x4 patches of a 16x16 image (17 tokens), batch 2, 2 SGD steps or two
no-grad eval forwards; float64 through ``torch.set_default_dtype`` (the wrapper builds its module
in the default dtype).
"""
import pytest
import torch
from torch import nn

from common import default_dtype, same_results

DIM, HEADS = 768, 12


def build(lib):
    PerformerAttention = lib.module.SelfAttention

    class PerformerWrapper(nn.Module):
        def forward(self, x, head_mask=None, output_attentions=False):
            attn = PerformerAttention(dim=DIM, heads=HEADS, causal=False)
            return (attn(x),)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
            self.attention = PerformerWrapper()
            self.mlp = nn.Sequential(nn.Linear(DIM, 64), nn.GELU(), nn.Linear(64, DIM), nn.Dropout(0.1))

        def forward(self, x):
            x = x + self.attention(self.ln1(x))[0]
            return x + self.mlp(self.ln2(x))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, DIM, 4, 4)
            self.cls = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
            self.pos = nn.Parameter(torch.randn(1, 17, DIM) * 0.02)
            self.layers = nn.ModuleList([Layer() for _ in range(2)])
            self.head = nn.Linear(DIM, 10)

        def forward(self, img):
            x = self.patch(img).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
            for layer in self.layers:
                x = layer(x)
            return self.head(x[:, 0])

    return ViT


def program(lib, rec, train):
    with default_dtype(torch.float64):
        torch.manual_seed(0)
        model = build(lib)()
        rec.log("state_dict", [(k, tuple(v.shape)) for k, v in model.state_dict().items()])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        img, labels = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
        if train:
            for _ in range(2):
                logits = model(img)
                loss = nn.functional.cross_entropy(logits, labels)
                loss.backward()
                rec.log("logits", logits)
                rec.log("loss", loss)
                rec.optimizer_step(optimizer, model)
            rec.params("final parameters", model)
        else:
            model.eval()
            with torch.no_grad():
                rec.log("eval logits", [model(img), model(img)])


@pytest.mark.parametrize("train", [True, False], ids=["train", "no_grad eval"])
def test_vit_performer_wrapper_runs_as_performer_pytorch(train):
    theirs, ours = same_results(lambda lib, rec: program(lib, rec, train))
    assert not any("attention" in name for name in dict(theirs.rec.entries["state_dict"][0]))
    if not train:  # a new attention at each call: the same images give other logits
        first, second = theirs.rec.entries["eval logits"][0]
        assert not torch.allclose(first, second)
    assert not ours.warnings
