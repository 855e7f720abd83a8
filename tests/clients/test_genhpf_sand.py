"""GenHPF (hoon9405/GenHPF), the SAnD baseline: ``models/performer.py`` ``PerformerPred``
(``from performer_pytorch import Performer``) over flattened EHR event codes
(``main.py``'s ``model_configs['SAnD']``: structure 'fl', emb_type 'codebase', pred_model
'performer_pred', n_layers 4), ``models/input2emb.py`` ``FeatEmb``, ``models/emb2out.py``
``PredOutPutLayer``, ``models/ehr_model.py`` ``GenHPF`` (with ``from_pretrained``) and
``trainers/base_trainer.py`` ``BaseTrainer``.

Kept: ``Performer(dim=pred_dim, depth=n_layers, heads=n_heads, dim_head=64, local_attn_heads=0,
local_window_size=256, causal=False, ff_mult=4, nb_features=64, feature_redraw_interval=1000,
reversible=True, ff_chunks=1, generalized_attention=True, kernel_fn=nn.ReLU(),
use_scalenorm=False, use_rezero=False, ff_glu=False, ff_dropout=dropout, attn_dropout=dropout,
cross_attend=False, no_projection=False, auto_check_redraw=True, qkv_bias=True,
attn_out_bias=True, shift_tokens=True)`` (every argument spelled out, as the program does) called
as ``performer_encoder(x, mask=input_ids.eq(0))``: the program passes a mask that is True at the
*padding* (1.1.4 reads True as "keep"), so the real tokens are masked and the pads kept, and a row
without padding is masked entirely; FeatEmb (code + type embeddings with padding_idx=0, sinusoidal
positions with dropout, LayerNorm eps 1e-12); mean pooling over ``input_ids != 0``; one
binary (mortality) and one multi-class (final acuity) head; BaseTrainer's ``_set_seed`` (the
global torch seed reset to seed + num_updates before every training step), Adam(lr 3e-4,
weight_decay 1e-3), ``valid_step`` under ``torch.no_grad`` with ``model.eval()`` between
training steps; a checkpoint ``{'model': state_dict, 'optimizer': ...}`` through
``torch.save`` / ``torch.load`` into a freshly built model with GenHPF.from_pretrained's
finetune filtering (codebase: keys with 'emb_type' or 'pos_enc' dropped, ``strict=False``) and
the optimizer state restored, then more steps.
Changed: the registry / argparse plumbing is inlined; criterion = BCE-with-logits + cross entropy;
random codes with trailing padding.
Shrunk: pred_dim = embed_dim 32, 2 heads, dim_head 64 -> 16, nb_features 64 -> 8, 4 layers -> 2,
feature_redraw_interval 1000 -> 3 (so redraws happen, from the reseeded stream), dropout 0.2,
batch 3 x 12 codes, 3 + 2 steps.
"""
import io
import math
from functools import partial

import torch
from torch import nn

from common import same_results

ARGS = dict(pred_dim=32, embed_dim=32, n_heads=2, n_layers=2, dropout=0.2, max_seq_len=12, vocab=40, seed=42)


class PositionalEncoding(nn.Module):
    def __init__(self, d_model, dropout, max_len):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(1, max_len, d_model)
        pe[0, :, 0::2] = torch.sin(position * div_term)
        pe[0, :, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x):
        return self.dropout(x + self.pe[:, : x.size(1)])


class FeatEmb(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.input_ids_embedding = nn.Embedding(a["vocab"], a["embed_dim"], padding_idx=0)
        self.type_ids_embedding = nn.Embedding(7, a["embed_dim"], padding_idx=0)
        self.pos_encoder = PositionalEncoding(a["embed_dim"], a["dropout"], a["max_seq_len"])
        self.layer_norm = nn.LayerNorm(a["embed_dim"], eps=1e-12)

    def forward(self, input_ids, type_ids, **kwargs):
        x = self.input_ids_embedding(input_ids)
        x += self.type_ids_embedding(type_ids)
        x = self.pos_encoder(x)
        return self.layer_norm(x)


class PerformerPred(nn.Module):
    def __init__(self, lib, a, **perf):
        super().__init__()
        self.performer_encoder = lib.module.Performer(
            dim=a["pred_dim"], depth=a["n_layers"], heads=a["n_heads"], dim_head=16, local_attn_heads=0,
            local_window_size=256, causal=False, ff_mult=4, nb_features=8, feature_redraw_interval=3,
            reversible=True, ff_chunks=1, generalized_attention=True, kernel_fn=nn.ReLU(), use_scalenorm=False,
            use_rezero=False, ff_glu=False, ff_dropout=a["dropout"], attn_dropout=a["dropout"], cross_attend=False,
            no_projection=False, auto_check_redraw=True, qkv_bias=True, attn_out_bias=True, shift_tokens=True)

    def forward(self, x, input_ids, **kwargs):
        src_pad_mask = input_ids.eq(0).to(x.device)
        return self.performer_encoder(x, mask=src_pad_mask)


class PredOutPutLayer(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.pred_dim = a["pred_dim"]
        self.final_proj = nn.ModuleDict({"mortality": nn.Linear(a["pred_dim"], 1),
                                         "final_acuity": nn.Linear(a["pred_dim"], 6)})

    def forward(self, x, input_ids, **kwargs):
        B, S = input_ids.shape
        mask = (input_ids != 0).unsqueeze(dim=2).to(x.device).expand(B, S, self.pred_dim)
        x = (x * mask).sum(dim=1) / mask.sum(dim=1)
        return {"pred_output": {k: layer(x) for k, layer in self.final_proj.items()}}


class GenHPF(nn.Module):
    def __init__(self, lib, a):
        super().__init__()
        self.emb_type_model = FeatEmb(a)
        self.pred_model = PerformerPred(lib, a)
        self.emb2out_model = PredOutPutLayer(a)

    @classmethod
    def from_pretrained(cls, lib, a, checkpoint):
        model = cls(lib, a)
        state_dict = torch.load(checkpoint, map_location="cpu")["model"]
        state_dict = {k: v for k, v in state_dict.items() if ("emb_type" not in k) and ("pos_enc" not in k)}
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        return model, missing, unexpected

    def forward(self, **kwargs):
        x = self.emb_type_model(**kwargs)
        x = self.pred_model(x, **kwargs)
        return {"logits": self.emb2out_model(x, **kwargs)}


def batch(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, ARGS["vocab"], (3, ARGS["max_seq_len"]), generator=g)
    lengths = [12, 7, 9]  # row 0 has no padding: the program's inverted mask masks all of it
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
    types = torch.where(ids == 0, 0, torch.randint(1, 7, ids.shape, generator=g))
    labels = {"mortality": torch.randint(0, 2, (3, 1), generator=g).to(dtype),
              "final_acuity": torch.randint(0, 6, (3,), generator=g)}
    return dict(input_ids=ids, type_ids=types), labels


def criterion(model, sample):
    out = model(**sample[0])["logits"]["pred_output"]
    return (nn.functional.binary_cross_entropy_with_logits(out["mortality"], sample[1]["mortality"])
            + nn.functional.cross_entropy(out["final_acuity"], sample[1]["final_acuity"]))


def train(model, optimizer, rec, steps, first_update, dtype):
    for i in range(steps):
        num_updates = first_update + i
        torch.manual_seed(ARGS["seed"] + num_updates)  # BaseTrainer._set_seed
        model.train()
        optimizer.zero_grad()
        loss = criterion(model, batch(num_updates, dtype))
        loss.backward()
        rec.log("loss", loss)
        rec.grads("grads", model)
        optimizer.step()
        rec.projections("projections", model)
        with torch.no_grad():  # valid_step
            model.eval()
            rec.log("valid loss", criterion(model, batch(1000 + num_updates, dtype)))


def program(lib, rec, dtype=torch.float64):
    torch.manual_seed(ARGS["seed"])
    model = GenHPF(lib, ARGS).to(dtype)
    rec.log("state_dict keys", list(model.state_dict()))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, weight_decay=0.001)
    train(model, optimizer, rec, 3, 0, dtype)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1}, buf)
    buf.seek(0)
    torch.manual_seed(7)
    model2, missing, unexpected = GenHPF.from_pretrained(lib, ARGS, buf)
    model2 = model2.to(dtype)
    rec.log("missing keys", sorted(missing))
    rec.log("unexpected keys", sorted(unexpected))
    buf.seek(0)
    optimizer2 = torch.optim.Adam(model2.parameters(), lr=3e-4, weight_decay=0.001)
    optimizer2.load_state_dict(torch.load(buf)["optimizer"])
    rec.params("reloaded params", model2)
    train(model2, optimizer2, rec, 2, 3, dtype)


def test_genhpf_sand_trains_and_resumes_as_with_performer_pytorch():
    theirs, ours = same_results(program)
    assert theirs.rec.entries["missing keys"][0] == ["emb_type_model.input_ids_embedding.weight",
                                                    "emb_type_model.layer_norm.bias",
                                                    "emb_type_model.layer_norm.weight",
                                                    "emb_type_model.pos_encoder.pe",
                                                    "emb_type_model.type_ids_embedding.weight"]
    assert theirs.rec.entries["unexpected keys"][0] == []
    projections = theirs.rec.entries["projections"]
    assert any(not torch.equal(a, b) for a, b in zip(projections[0], projections[-1]))
    assert ours.warnings == []


def test_genhpf_sand_float32_within_1e_5():
    same_results(partial(program, dtype=torch.float32), rel=1e-5)
