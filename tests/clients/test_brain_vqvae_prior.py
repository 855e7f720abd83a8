"""A MONAI-based 3D brain VQ-VAE + Performer prior project (models/performer.py,
training_functions.py ``train_performer``, train_performer.py, and its likelihood script): an
autoregressive PerformerLM over VQ-VAE codes whose random features are redrawn by hand.

Kept: the ``Performer(TransformerBase)`` wrapper around ``PerformerLM(num_tokens=vocab_size,
max_seq_len, dim, depth, heads, local_attn_heads=0, local_window_size=256, ff_mult, ff_glu,
rotary_position_emb=True, axial_position_emb=False, emb/ff/attn dropout, causal=True,
auto_check_redraw=False)`` (so the model never redraws on its own) and its ``ordering`` with an
``index_sequence``; train_performer's epochs: codes reordered by the ordering and shifted right
behind a BOS token (``F.pad(..., (1, 0), "constant", n_embed)``), ``F.cross_entropy(logits
.transpose(1, 2), target)``, clip_grad_norm_(1), Adam + ExponentialLR, and after every
``redrawn_freq`` epochs the manual redraw through performer-pytorch's internals:
``find_modules(model, FastAttention)`` (``from performer_pytorch.performer_pytorch import
find_modules, FastAttention``), ``fast_attention.redraw_projection_matrix(device)`` (positional
device) and ``raw_model.model.performer.proj_updater.calls_since_last_redraw.zero_()``;
eval_performer under no_grad; the checkpoint dict (``model.state_dict()``, optimizer, scheduler)
saved, loaded into a fresh model with ``load_state_dict`` and training resumed; mlflow's
``log_model`` / ``load_model`` as what it does with a PyTorch model (``torch.save`` of the whole
module object, ``torch.load(weights_only=False)``), and the likelihood script on the loaded
model: softmax, ``torch.gather`` of the targets' probabilities, summed log.
Changed: the VQ-VAE encoder is random codes; no DataParallel (CPU); TransformerBase (not in the
index) is taken to be an nn.Module whose forward calls ``self.model``.
Shrunk: latent grid 28^3 -> 2 x 3 x 2 (12 codes), 32 codes -> 9 (+BOS), n_embd 256 -> 16,
10 layers -> 2, 8 heads -> 2 (dim_head left at 64), batch 256 -> 3, 3 epochs of 2 batches.
"""
import io
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import changed, same_results, tokens

N_EMBED, GRID = 9, (2, 3, 2)


class Performer(nn.Module):
    """models/performer.py's wrapper (TransformerBase is an nn.Module)."""

    def __init__(self, lib, ordering, vocab_size, max_seq_len, n_embd, n_layer, n_heads=8, local_attn_heads=0,
                 local_window_size=256, ff_mult=4, ff_glu=True, rotary_position_emb=True, axial_position_emb=False,
                 emb_dropout=0.0, ff_dropout=0.0, attn_dropout=0.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.model = lib.module.PerformerLM(
            num_tokens=vocab_size, max_seq_len=max_seq_len, dim=n_embd, depth=n_layer, heads=n_heads,
            local_attn_heads=local_attn_heads, local_window_size=local_window_size, ff_mult=ff_mult, ff_glu=ff_glu,
            rotary_position_emb=rotary_position_emb, axial_position_emb=axial_position_emb, emb_dropout=emb_dropout,
            ff_dropout=ff_dropout, attn_dropout=attn_dropout, causal=True, auto_check_redraw=False)
        self.ordering = ordering

    def forward(self, x):
        return self.model(x)


class Ordering3D:
    """img2seq_ordering.Ordering3D's raster scan of a transposed grid: just its index_sequence."""

    def __init__(self, dimensions):
        self.index_sequence = np.arange(np.prod(dimensions)).reshape(dimensions).transpose(2, 0, 1).flatten()


def model_of(lib, dtype):
    return Performer(lib, Ordering3D(GRID), vocab_size=N_EMBED + 1, max_seq_len=int(np.prod(GRID)), n_embd=16,
                     n_layer=2, n_heads=2, ff_mult=4, ff_glu=False, rotary_position_emb=True,
                     axial_position_emb=False, emb_dropout=0.1, ff_dropout=0.1, attn_dropout=0.1).to(dtype)


def encode(raw_model, seed):
    """vqvae.encode_code(img) -> reshape -> ordering -> BOS pad, as train_epoch_performer does."""
    encoded = tokens((3, *GRID), N_EMBED, seed).reshape(3, -1)
    encoded = encoded[:, raw_model.ordering.index_sequence]
    encoded = F.pad(encoded, (1, 0), "constant", N_EMBED)
    return encoded[:, :-1], encoded[:, 1:]


def train_epoch(model, optimizer, scheduler, epoch, rec):
    model.train()
    raw_model = model.module if hasattr(model, "module") else model
    for step in range(2):
        encoded_in, encoded_out = encode(raw_model, 10 * epoch + step)
        optimizer.zero_grad(set_to_none=True)
        logits = model(encoded_in)
        loss = F.cross_entropy(logits.transpose(1, 2), encoded_out)
        loss.backward()
        rec.grads("grads", model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1)
        optimizer.step()
        scheduler.step()
        rec.log("loss", loss)


@torch.no_grad()
def eval_epoch(model, rec):
    model.eval()
    raw_model = model.module if hasattr(model, "module") else model
    encoded_in, encoded_out = encode(raw_model, 99)
    rec.log("val loss", F.cross_entropy(model(encoded_in).transpose(1, 2), encoded_out))


def train_performer(lib, model, optimizer, scheduler, start_epoch, n_epochs, redrawn_freq, rec):
    find_modules, FastAttention = lib.performer_pytorch.find_modules, lib.performer_pytorch.FastAttention
    raw_model = model.module if hasattr(model, "module") else model
    device = torch.device("cpu")
    for epoch in range(start_epoch, n_epochs):
        train_epoch(model, optimizer, scheduler, epoch, rec)
        rec.projections("projections before the manual redraw", model)
        rec.log("calls since last redraw", int(raw_model.model.performer.proj_updater.calls_since_last_redraw))
        if (epoch + 1) % redrawn_freq == 0:
            fast_attentions = find_modules(model, FastAttention)
            rec.log("FastAttention modules found", len(fast_attentions))
            for fast_attention in fast_attentions:
                fast_attention.redraw_projection_matrix(device)
            raw_model.model.performer.proj_updater.calls_since_last_redraw.zero_()
        rec.projections("projections", model)
        eval_epoch(model, rec)
    return {"epoch": n_epochs, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict()}


def program(lib, rec, dtype=torch.float64):
    torch.manual_seed(2)  # set_determinism(seed=args.seed)
    model = model_of(lib, dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.99999)
    checkpoint = train_performer(lib, model, optimizer, scheduler, 0, 2, 1, rec)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)

    # resume from checkpoint.pth in a new process: a fresh model, optimizer and scheduler
    torch.manual_seed(2)
    model = model_of(lib, dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.99999)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    rec.projections("resumed projections", model)
    train_performer(lib, model, optimizer, scheduler, checkpoint["epoch"], 3, 1, rec)

    # log_mlflow / mlflow.pytorch.load_model: the whole module pickled
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    transformer = torch.load(buffer, weights_only=False)
    transformer.eval()
    with torch.no_grad():
        encoded_in, encoded_out = encode(transformer, 123)
        logits = transformer(encoded_in)
        probs = F.softmax(logits, dim=-1)
        selected_probs = torch.gather(probs, 2, encoded_out.unsqueeze(2).long()).squeeze(2)
        rec.log("likelihood", torch.sum(torch.log(selected_probs), dim=-1))
    rec.log("unpickled state_dict equal", all(torch.equal(a, b) for a, b in
                                              zip(transformer.state_dict().values(), model.state_dict().values())))


def test_manual_redraw_training_resume_and_pickling_as_performer_pytorch():
    theirs, ours = same_results(program)
    assert theirs.rec.entries["FastAttention modules found"] == [2, 2, 2]
    assert theirs.rec.entries["calls since last redraw"] == [0, 0, 0]  # auto_check_redraw=False: not even counted
    projections = theirs.rec.entries["projections"]
    assert changed(projections), "the manual redraw draws new matrices"
    assert theirs.rec.entries["unpickled state_dict equal"] == [True]
    assert not ours.warnings


def test_float32_within_1e_5():
    same_results(partial(program, dtype=torch.float32), rel=1e-5)
