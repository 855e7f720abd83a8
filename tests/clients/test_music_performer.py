"""A public PyTorch Lightning symbolic-music generator, ``MusicPerformer(pl.LightningModule)``
(``from performer_pytorch.performer_pytorch import PerformerLM`` and ``from
performer_pytorch.autoregressive_wrapper import AutoregressiveWrapper``, the submodule paths):
a causal PerformerLM over MIDI tokens with ReZero, rotary positions, local heads and reversible
layers, sampled with a repetition penalty and a temperature at each validation.

Kept: ``PerformerLM(num_tokens, max_seq_len, dim, depth, heads, causal=True, nb_features=256,
no_projection=False, feature_redraw_interval=1000, reversible=True, ff_chunks=10,
use_scalenorm=False, use_rezero=True, ff_glu=True, emb_dropout=0.1, ff_dropout=0.1,
attn_dropout=0.1, local_attn_heads=4, local_window_size=36, rotary_position_emb=True,
shift_tokens=False)`` wrapped in ``AutoregressiveWrapper``; ``forward(x) =
self.transformer(x.long(), return_loss=True)`` (``return_loss`` reaches no layer: dropped
silently by 1.1.4, with a one-time warning by us); AdamW with weight decay;
validation_step's ``generate(start_tokens=x.long(), seq_len, repetition_penalty, temperature)``
from a 1-D prime (``batch[0][1][:init_len]``, so generate returns 1-D tokens), with the default
top-k filter; the ``x.tolist() + sample.tolist()`` token list.
Changed: Lightning's loop is a plain loop (training steps, then the validation step), the MIDI
tokenizer and its dump are left out; random tokens.
Shrunk: vocab 30, sequence 20, hidden 24, 2 layers, 6 heads (4 local, dim_head left at 64),
nb_features 256 -> 16, local_window_size 36 -> 6 (a window that does not divide the sequence),
ff_chunks 10 -> 2, batch 2, 3 steps, init_len 5, 8 generated tokens (the window slides).
"""
from functools import partial

import torch

from common import changed, same_results, tokens

HP = dict(vocab_size=30, sequence_len=20, hidden_size=24, num_encoders=2, num_heads=6, learning_rate=1e-3,
          weight_decay=0.01, init_len_generate=5, seq_len_generate=8, repetition_penalty=1.2, temperature=0.9)


class MusicPerformer(torch.nn.Module):
    def __init__(self, lib, hparams, local_window_size=6, nb_features=16, ff_chunks=2, feature_redraw_interval=1000):
        super().__init__()
        self._hparams = hparams
        self.transformer = lib.performer_pytorch.PerformerLM(
            num_tokens=hparams["vocab_size"], max_seq_len=hparams["sequence_len"], dim=hparams["hidden_size"],
            depth=hparams["num_encoders"], heads=hparams["num_heads"], causal=True, nb_features=nb_features,
            no_projection=False, feature_redraw_interval=feature_redraw_interval, reversible=True,
            ff_chunks=ff_chunks, use_scalenorm=False, use_rezero=True, ff_glu=True, emb_dropout=0.1, ff_dropout=0.1,
            attn_dropout=0.1, local_attn_heads=4, local_window_size=local_window_size, rotary_position_emb=True,
            shift_tokens=False)
        self.transformer = lib.autoregressive_wrapper.AutoregressiveWrapper(self.transformer)

    def forward(self, x):
        return self.transformer(x.long(), return_loss=True)

    def training_step(self, batch, batch_idx):
        return self(batch[0])

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            x = batch[0][1][: self._hparams["init_len_generate"]]
            sample = self.transformer.generate(start_tokens=x.long(), seq_len=self._hparams["seq_len_generate"],
                                               repetition_penalty=self._hparams["repetition_penalty"],
                                               temperature=self._hparams["temperature"])
            return sample, [[int(i) for i in x.tolist() + sample.tolist()]]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self._hparams["learning_rate"],
                                 weight_decay=self._hparams["weight_decay"])


def program(lib, rec, dtype=torch.float64, **model_kwargs):
    torch.manual_seed(0)
    model = MusicPerformer(lib, HP, **model_kwargs).to(dtype)
    optimizer = model.configure_optimizers()
    model.train()
    for step in range(3):
        batch = [tokens((2, HP["sequence_len"] + 1), HP["vocab_size"], step)]
        loss = model.training_step(batch, step)
        loss.backward()
        rec.log("loss", loss)
        rec.optimizer_step(optimizer, model)
    sample, midi_tokens = model.validation_step([tokens((2, HP["sequence_len"]), HP["vocab_size"], 50)], 0)
    rec.log("sample", sample)
    rec.log("midi tokens", midi_tokens)
    rec.log("training mode restored", model.training)
    loss = model.training_step([tokens((2, HP["sequence_len"] + 1), HP["vocab_size"], 60)], 3)  # next epoch
    loss.backward()
    rec.log("loss after generation", loss)
    rec.grads("grads after generation", model)


def test_music_performer_trains_and_samples_as_performer_pytorch():
    theirs, ours = same_results(program)
    assert theirs.rec.entries["sample"][0].shape == (HP["seq_len_generate"],)
    assert theirs.rec.entries["training mode restored"] == [True]
    assert any("return_loss" in w for w in ours.warnings)


def test_music_performer_redraws_while_training():
    """feature_redraw_interval 2: the projections are redrawn from the global generator between
    steps, the same matrices in both libraries."""
    theirs, _ = same_results(partial(program, feature_redraw_interval=2))
    assert changed(theirs.rec.entries["projections"])


def test_music_performer_float32_within_1e_5():
    same_results(partial(program, dtype=torch.float32), rel=1e-5)
