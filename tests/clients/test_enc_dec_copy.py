"""lucidrains/performer-pytorch, examples/toy_tasks/enc_dec_copy.py: PerformerEncDec learning
to copy a random source sequence (tgt = [1, src, src]), with generation; at the repository's
last commit and at 0efa590, whose model also gets ``amp_enabled=True``.

Kept: the encoder/decoder arguments (enc_depth=1, dec_depth=3, reversible on both sides,
enc_/dec_feature_redraw_interval, enc_/dec_nb_features; 0efa590's unprefixed
``amp_enabled=True``, which 1.1.4 silently ignores and we ignore with one warning), a new batch from ``next(cycle())`` every
step (torch.randint from the global generator), ``model(src, tgt, enc_mask=src_mask,
dec_mask=tgt_mask)`` with a full-length dec_mask (the wrapper trims it), the autocast /
GradScaler calls (CUDA-only in the program: disabled here, they pass the loss and step through),
Adam, and every GENERATE_EVERY steps ``model.generate(src, start_tokens, ENC_SEQ_LEN,
enc_mask=src_mask)`` in eval mode, then training again.
Shrunk: dim 512 -> 16, heads 8 -> 2, batch 32 -> 4, ENC_SEQ_LEN 32 -> 6, nb_features 64 -> 16,
4 steps, generation at step 2, redraw interval 1000 -> 2, float64 on CPU.
"""
import pytest
import torch

from common import changed, same_results

NUM_BATCHES = 4
BATCH_SIZE = 4
LEARNING_RATE = 1e-4
GENERATE_EVERY = 2
NUM_TOKENS = 16 + 2
ENC_SEQ_LEN = 6
DEC_SEQ_LEN = 2 * ENC_SEQ_LEN + 1


def cycle():
    while True:
        prefix = torch.ones((BATCH_SIZE, 1)).long()
        src = torch.randint(2, NUM_TOKENS, (BATCH_SIZE, ENC_SEQ_LEN)).long()
        tgt = torch.cat((prefix, src, src), 1)
        src_mask = torch.ones(BATCH_SIZE, ENC_SEQ_LEN).bool()
        tgt_mask = torch.ones(BATCH_SIZE, tgt.shape[1]).bool()
        yield (src, tgt, src_mask, tgt_mask)


def enc_dec_program(version):
    extra = {"amp_enabled": True} if version == "0efa590" else {}
    return lambda lib, rec: program(lib, rec, extra)


def program(lib, rec, extra):
    torch.manual_seed(0)
    model = lib.module.PerformerEncDec(
        dim=16,
        enc_num_tokens=NUM_TOKENS,
        enc_depth=1,
        enc_heads=2,
        enc_max_seq_len=ENC_SEQ_LEN,
        enc_reversible=True,
        enc_feature_redraw_interval=2,
        enc_nb_features=16,
        dec_num_tokens=NUM_TOKENS,
        dec_depth=3,
        dec_heads=2,
        dec_max_seq_len=DEC_SEQ_LEN,
        dec_reversible=True,
        dec_feature_redraw_interval=2,
        dec_nb_features=16,
        **extra,
    ).double()

    torch.manual_seed(1)
    optim = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    rec.projections("projections", model)

    for i in range(NUM_BATCHES):
        model.train()
        src, tgt, src_mask, tgt_mask = next(cycle())
        with torch.autocast("cuda", enabled=False):
            loss = model(src, tgt, enc_mask=src_mask, dec_mask=tgt_mask)
        scaler.scale(loss).backward()
        rec.log("loss", loss)
        rec.grads("grads", model)
        scaler.step(optim)
        scaler.update()
        optim.zero_grad()
        rec.projections("projections", model)

        if i != 0 and i % GENERATE_EVERY == 0:
            model.eval()
            src, _, src_mask, _ = next(cycle())
            src, src_mask = src[:1], src_mask[:1]
            start_tokens = (torch.ones((1, 1)) * 1).long()
            sample = model.generate(src, start_tokens, ENC_SEQ_LEN, enc_mask=src_mask)
            incorrects = (src != sample).long().abs().sum()  # newer torch has no abs() of bool
            rec.log("sample", sample)
            rec.log("incorrects", incorrects)
    rec.params("final parameters", model)


@pytest.mark.parametrize("version", ["e8c7d1e", "0efa590"])
def test_enc_dec_copy_trains_and_generates_as_performer_pytorch(version):
    theirs, ours = same_results(enc_dec_program(version))
    assert changed(theirs.rec.entries["projections"]), "the run must cross a projection redraw"
    assert theirs.rec.entries["sample"][0].shape == (1, ENC_SEQ_LEN)
    assert sum("'amp_enabled'" in w for w in ours.warnings) == (version == "0efa590"), ours.warnings
