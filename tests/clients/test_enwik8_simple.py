"""lucidrains/performer-pytorch, examples/enwik8_simple/train.py: the character-level enwik8
language model, AutoregressiveWrapper(PerformerLM(causal=True, ...)), at the repository's last
commit (968d334, the 1.1.4-era example: reversible, nb_features=256, use_scalenorm,
shift_tokens, local_attn_heads=(8, 8, 8, 6, 4, 2)) and at its first (1dbec06: nb_features=64).

Kept: the model arguments; the random crops of TextSamplerDataset (torch.randint per item)
through a DataLoader; gradient accumulation with ``model(x, return_loss=True)`` (``return_loss``
reaches no layer: 1.1.4 drops it silently, we drop it with one warning); the autocast / GradScaler
calls with ``scaler.unscale_`` (CUDA-only in the program: disabled here, they pass everything
through); clip_grad_norm_(0.5); Adam; validation in eval mode under no_grad;
``random.choice(val_dataset)[:-1]`` as prime and ``model.generate(inp, GENERATE_LENGTH)`` from a
1-D prime as long as max_seq_len (so the window slides); the first version's generation at i == 0.
Shrunk: dim 512 -> 16, heads 8 -> 4, depth 6 -> 3 with local heads (4, 3, 1) (all, most, few),
local_window_size (the default) 256 -> 8, nb_features 256/64 -> 16, SEQ_LEN 4096/1024 -> 24,
batch 4 -> 2, 4 -> 2 accumulation steps, 3 batches, validation/generation every 2 batches, 6
generated tokens, random bytes for enwik8, float64 on CPU instead of .cuda(), and
feature_redraw_interval 1000 -> 3 so the projections are redrawn during the run.
"""
import random

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from common import changed, same_results, tokens

NUM_BATCHES = 3
BATCH_SIZE = 2
GRADIENT_ACCUMULATE_EVERY = 2
LEARNING_RATE = 1e-4
VALIDATE_EVERY = 2
GENERATE_EVERY = 2
GENERATE_LENGTH = 6
SEQ_LEN = 24

BYTES = tokens((1200,), 256, seed=0).to(torch.uint8)  # stands in for enwik8
DATA_TRAIN, DATA_VAL = BYTES[:1000], BYTES[1000:]


def cycle(loader):
    while True:
        for data in loader:
            yield data


class TextSamplerDataset(Dataset):
    def __init__(self, data, seq_len):
        super().__init__()
        self.data = data
        self.seq_len = seq_len

    def __getitem__(self, index):
        rand_start = torch.randint(0, self.data.size(0) - self.seq_len - 1, (1,))
        return self.data[rand_start : rand_start + self.seq_len + 1].long()

    def __len__(self):
        return self.data.size(0) // self.seq_len


VERSIONS = {
    "968d334": dict(
        depth=3, heads=4, causal=True, reversible=True, nb_features=16, use_scalenorm=True, shift_tokens=True,
        local_attn_heads=(4, 3, 1), local_window_size=8,
    ),
    "1dbec06": dict(depth=2, heads=2, causal=True, nb_features=16),
}


def enwik8_program(version):
    return lambda lib, rec: program(lib, rec, version)


def program(lib, rec, version):
    torch.manual_seed(0)
    model = lib.module.PerformerLM(
        num_tokens=256, dim=16, max_seq_len=SEQ_LEN, **VERSIONS[version], feature_redraw_interval=3
    )
    model = lib.autoregressive_wrapper.AutoregressiveWrapper(model)
    model.double()

    torch.manual_seed(1)
    random.seed(1)
    train_dataset = TextSamplerDataset(DATA_TRAIN, SEQ_LEN)
    val_dataset = TextSamplerDataset(DATA_VAL, SEQ_LEN)
    train_loader = cycle(DataLoader(train_dataset, batch_size=BATCH_SIZE))
    val_loader = cycle(DataLoader(val_dataset, batch_size=BATCH_SIZE))
    optim = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    rec.projections("projections", model)

    for i in range(NUM_BATCHES):
        model.train()
        for __ in range(GRADIENT_ACCUMULATE_EVERY):
            with torch.autocast("cuda", enabled=False):
                loss = model(next(train_loader), return_loss=True)
            scaler.scale(loss).backward()
            rec.log("training loss", loss)
        scaler.unscale_(optim)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        rec.grads("clipped grads", model)
        scaler.step(optim)
        scaler.update()
        optim.zero_grad()
        rec.projections("projections", model)

        if i % VALIDATE_EVERY == 0:
            model.eval()
            with torch.no_grad():
                rec.log("validation loss", model(next(val_loader), return_loss=True))

        if i % GENERATE_EVERY == 0 and (i != 0 or version == "1dbec06"):
            model.eval()
            inp = random.choice(val_dataset)[:-1]
            sample = model.generate(inp, GENERATE_LENGTH)
            rec.log("prime", inp)
            rec.log("sample", sample)
    rec.params("final parameters", model)


@pytest.mark.parametrize("version", list(VERSIONS))
def test_enwik8_simple_trains_and_samples_as_performer_pytorch(version):
    theirs, ours = same_results(enwik8_program(version))
    assert changed(theirs.rec.entries["projections"]), "the run must cross a projection redraw"
    assert theirs.rec.entries["sample"][0].shape == (GENERATE_LENGTH,)
    assert sum("'return_loss'" in w for w in ours.warnings) == 1, ours.warnings
