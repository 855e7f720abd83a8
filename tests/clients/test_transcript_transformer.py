"""TRISTAN-ORF/transcript_transformer (TIS Transformer / RiboTIE), transcript_transformer/models.py
(TranscriptSeqRiboEmb), transcript_loader.py (collate_fn) and transcript_transformer.py (train):
a bare ``Performer`` trunk with the program's own embeddings and performer-pytorch's
``FixedPositionalEmbedding`` (``from performer_pytorch.performer_pytorch import
FixedPositionalEmbedding``) used twice: added to the input (``x += self.pos_emb(x)``) and, built
on dim_head, handed to the trunk as its rotary ``pos_emb=`` keyword.

Kept: ``Performer(dim, depth, heads, dim_head, causal=False, nb_features, feature_redraw_interval,
generalized_attention, kernel_fn=torch.nn.ReLU(), reversible, ff_chunks, use_scalenorm, use_rezero,
ff_glu, ff_dropout, attn_dropout, local_attn_heads, local_window_size)`` with the program's
defaults (ribotie_defaults.yml: 4 of 6 heads local, dropout 0.1, softmax features); collate_fn's
batches (tokens 5/6 around each transcript, 7 padding, y = -1 outside it; ribo read-length counts
padded with 0.5); forward's x_mask (transcript plus its start/end tokens) passed as ``mask=`` with
``pos_emb=``; the masked-language-model pretraining on ribo data (``dist`` drawn with
``torch.empty(...).uniform_`` from the global generator, masked rows replaced in place,
``x[mask][torch.randperm(...)]`` shuffling, BCEWithLogitsLoss) and on nucleotide sequence
(``torch.randint`` randomisation, CrossEntropyLoss); the warm-up ``optimizer_step`` with Adam and
MultiplicativeLR; ``on_load_checkpoint``'s key surgery (the MLM head and, when max_seq_len
changed, ``pos_emb.emb`` / ``layer_pos_emb.emb`` popped) and ``load_state_dict(strict=False)``
into the TIS model, which is then fine-tuned; predict_step's softmax in eval.
Changed: PyTorch Lightning's loop and metrics are a plain loop; random data.
Shrunk: dim 42 -> 12, depth 8 -> 2, heads 6 -> 3 (2 local), dim_head 16 -> 4, nb_features 80 ->
8, local_window_size 256 -> 8 (transcripts of 5-11 nucleotides, padded), warmup 1500 -> 2 steps.
"""
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from common import assert_same, same_results

HP = dict(num_tokens=8, lr=1e-3, decay_rate=0.96, warmup_steps=2, dim=12, depth=2, heads=3, dim_head=4,
          causal=False, nb_features=8, feature_redraw_interval=1000, generalized_attention=False,
          reversible=False, ff_chunks=1, use_scalenorm=False, use_rezero=False, tie_embed=False, ff_glu=False,
          emb_dropout=0.1, ff_dropout=0.1, attn_dropout=0.1, local_attn_heads=2, local_window_size=8,
          mask_frac=0.85, rand_frac=0.10, metrics=[])


class TranscriptSeqRiboEmb(torch.nn.Module):
    def __init__(self, lib, use_seq, use_ribo, num_tokens, lr, decay_rate, warmup_steps, max_seq_len, dim, depth,
                 heads, dim_head, causal, nb_features, feature_redraw_interval, generalized_attention, reversible,
                 ff_chunks, use_scalenorm, use_rezero, tie_embed, ff_glu, emb_dropout, ff_dropout, attn_dropout,
                 local_attn_heads, local_window_size, mlm, mask_frac, rand_frac, metrics):
        super().__init__()
        self.hparams = SimpleNamespace(lr=lr, dim=dim, warmup_steps=warmup_steps, decay_rate=decay_rate)
        self.transformer = lib.module.Performer(
            dim=dim, depth=depth, heads=heads, dim_head=dim_head, causal=causal, nb_features=nb_features,
            feature_redraw_interval=feature_redraw_interval, generalized_attention=generalized_attention,
            kernel_fn=torch.nn.ReLU(), reversible=reversible, ff_chunks=ff_chunks, use_scalenorm=use_scalenorm,
            use_rezero=use_rezero, ff_glu=ff_glu, ff_dropout=ff_dropout, attn_dropout=attn_dropout,
            local_attn_heads=local_attn_heads, local_window_size=local_window_size)
        if mlm in ["ribo", "seq"]:
            self.mlm = True
            self.hparams.mask_c = mask_frac
            self.hparams.mask_m = self.hparams.mask_c + (1 - self.hparams.mask_c) * (1 - rand_frac)
            if mlm == "ribo":
                self.loss = torch.nn.BCEWithLogitsLoss()
                pos_label = 21
                self.ribo_mlm_emb = torch.nn.Embedding(1, dim)
            else:
                self.loss = torch.nn.CrossEntropyLoss()
                pos_label = num_tokens
                self.mask_token = 4
        else:
            self.mlm = False
            self.loss = torch.nn.CrossEntropyLoss()
            pos_label = 2
        self.ff_1 = torch.nn.Linear(dim, dim * 2)
        self.ff_2 = torch.nn.Linear(dim * 2, pos_label)
        self.relu = torch.nn.ReLU()
        self.dropout = torch.nn.Dropout(emb_dropout)
        if use_ribo:
            self.ff_emb_1 = torch.nn.Linear(1, dim)
            self.ff_emb_2 = torch.nn.Linear(dim, 6 * dim)
            self.ff_emb_3 = torch.nn.Linear(6 * dim, dim)
            self.tanh = torch.nn.Tanh()
            self.scalar_emb = torch.nn.Sequential(self.ff_emb_1, self.relu, self.ff_emb_2, self.relu, self.ff_emb_3,
                                                  self.tanh)
            self.ribo_count_emb = torch.nn.Embedding(1, dim)
            self.ribo_read_emb = torch.nn.Embedding(21, dim)
        if use_seq:
            self.nuc_emb = torch.nn.Embedding(num_tokens, dim)
        FixedPositionalEmbedding = lib.performer_pytorch.FixedPositionalEmbedding
        self.pos_emb = FixedPositionalEmbedding(dim, max_seq_len + 2)
        self.layer_pos_emb = FixedPositionalEmbedding(dim_head, max_seq_len + 2)

    def on_load_checkpoint(self, checkpoint):
        state_dict = checkpoint["state_dict"]
        if not self.mlm and "mlm" in checkpoint.keys() and checkpoint["mlm"]:
            for key in ["ff_2.weight", "ff_2.bias", "ff_1.weight", "ff_1.bias"]:
                state_dict.pop(key)
            checkpoint["mlm"] = False
        if self.pos_emb.emb.shape != state_dict["pos_emb.emb"].shape:
            state_dict.pop("pos_emb.emb")
            state_dict.pop("layer_pos_emb.emb")
        checkpoint["state_dict"] = state_dict

    def parse_embeddings(self, batch):
        xs = []
        if "ribo" in batch.keys():
            if batch["ribo"].shape[-1] == 1:
                xs.append(self.scalar_emb(batch["ribo"]) * self.ribo_count_emb.weight)
            else:
                counts = batch["ribo"].sum(dim=-1).unsqueeze(-1)
                xs.append(self.scalar_emb(counts) * self.ribo_count_emb.weight)
                x = torch.nan_to_num(torch.div(batch["ribo"], batch["ribo"].sum(axis=-1).unsqueeze(-1)))
                xs.append(torch.einsum("ikj,jl->ikl", [x, self.ribo_read_emb.weight]))
        if "seq" in batch.keys():
            xs.append(self.nuc_emb(batch["seq"]))
        return torch.sum(torch.stack(xs), dim=0)

    def rand_seq(self, x, dist, eval=False):
        mask = torch.logical_and(dist > self.hparams.mask_c, dist < self.hparams.mask_m)
        x[mask] = self.nuc_emb.weight[torch.full((mask.sum(),), self.mask_token)]
        if not eval:
            mask = dist > self.hparams.mask_m
            idx_vec = torch.randint(0, self.mask_token, (mask.sum(),))
            x[mask] = self.nuc_emb.weight[idx_vec]
        return x

    def rand_ribo(self, x, dist, eval=False):
        mask = torch.logical_and(dist > self.hparams.mask_c, dist < self.hparams.mask_m)
        x[mask] = self.ribo_mlm_emb.weight[torch.full((mask.sum(),), 0)]
        if not eval:
            mask = dist > self.hparams.mask_m
            x[mask] = x[mask][torch.randperm(mask.sum())]
        return x

    def forward(self, batch, eval=False):
        y_mask = batch["y"] != -1
        x_mask = torch.clone(y_mask)
        x_mask[:, 0] = 1
        x_mask[torch.arange(x_mask.shape[0]), x_mask.sum(dim=1)] = 1
        x = self.parse_embeddings(batch)
        if self.mlm:
            dist = torch.empty(batch["y"].shape).uniform_(0, 1)
            y_mask = torch.logical_and(dist > self.hparams.mask_c, y_mask)
            if "seq" in batch.keys():
                y_true = batch["seq"][torch.logical_and(x_mask, y_mask)]
                x = self.rand_seq(x, dist, eval)
            else:
                y_true = (batch["ribo"][torch.logical_and(x_mask, y_mask)] > 0).type(x.dtype)
                x = self.rand_ribo(x, dist, eval)
        else:
            y_true = batch["y"][y_mask].view(-1)
        x += self.pos_emb(x)
        x = self.dropout(x)
        layer_pos_emb = self.layer_pos_emb(x)
        x = self.transformer(x, pos_emb=layer_pos_emb, mask=x_mask)
        x = x[torch.logical_and(x_mask, y_mask)]
        x = x.view(-1, self.hparams.dim)
        x = F.relu(self.ff_1(x))
        x = self.ff_2(x)
        return x, y_true, y_mask

    def training_step(self, batch):
        y_hat, y_true, _ = self(batch)
        return self.loss(y_hat, y_true)

    def predict_step(self, batch):
        y_hat, y_true, y_mask = self(batch)
        splits = torch.cumsum(y_mask.sum(dim=1), 0, dtype=torch.long)
        return torch.tensor_split(F.softmax(y_hat, dim=1)[:, 1], splits)[:-1]

    def optimizer_step(self, global_step, optimizer, closure):
        if global_step < self.hparams.warmup_steps:
            lr_scale = min(1.0, float(global_step + 1) / self.hparams.warmup_steps)
            for pg in optimizer.param_groups:
                pg["lr"] = lr_scale * self.hparams.lr
        optimizer.step(closure=closure)


def collate(lens, seed, use_seq, dtype):
    """transcript_loader.collate_fn on random transcripts of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    max_len = max(lens)
    ys, seqs, ribos = [], [], []
    for n in lens:
        y = torch.zeros(n, dtype=torch.long)
        y[torch.randint(0, n, (1,), generator=g)] = 1
        ys.append(torch.cat([torch.tensor([-1]), y, torch.full((1 + max_len - n,), -1)]))
        seqs.append(torch.cat([torch.tensor([5]), torch.randint(0, 4, (n,), generator=g), torch.tensor([6]),
                               torch.full((max_len - n,), 7)]))
        counts = torch.randint(0, 3, (n, 21), generator=g).to(dtype) * (torch.rand(n, 21, generator=g) < 0.2)
        ribos.append(torch.cat([torch.zeros(1, 21, dtype=dtype), counts, torch.zeros(1, 21, dtype=dtype),
                                torch.full((max_len - n, 21), 0.5, dtype=dtype)]))
    batch = {"y": torch.stack(ys)}
    if use_seq:
        batch["seq"] = torch.stack(seqs)
    else:
        batch["ribo"] = torch.stack(ribos)
    return batch


def train(model, batches, rec, tag, steps):
    optimizer = torch.optim.Adam(model.parameters(), lr=model.hparams.lr)
    scheduler = torch.optim.lr_scheduler.MultiplicativeLR(optimizer, lr_lambda=lambda epoch: model.hparams.decay_rate)
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        optimizer.zero_grad()

        def closure():
            loss = model.training_step(batch)
            loss.backward()
            rec.log(f"{tag} loss", loss)
            return loss

        model.optimizer_step(step, optimizer, closure)
        rec.grads(f"{tag} grads", model)
        if step % 2 == 1:
            scheduler.step()  # one "epoch" per two batches
    rec.params(f"{tag} parameters", model)


def program(lib, rec, dtype=torch.float64, mlm_input="ribo"):
    use_seq = mlm_input == "seq"
    torch.manual_seed(0)
    pre = TranscriptSeqRiboEmb(lib, use_seq, not use_seq, max_seq_len=11, mlm=mlm_input, **HP).to(dtype)
    rec.log("pretrain state_dict keys", list(pre.state_dict()))
    batches = [collate([9, 5, 11], 1, use_seq, dtype), collate([7, 8], 2, use_seq, dtype)]
    train(pre, batches, rec, "pretrain", 4)
    checkpoint = {"state_dict": {k: v.clone() for k, v in pre.state_dict().items()}, "mlm": pre.mlm}

    # train: a TIS model from the pretrained checkpoint (Lightning's load_from_checkpoint, strict=False)
    torch.manual_seed(1)
    model = TranscriptSeqRiboEmb(lib, use_seq, not use_seq, max_seq_len=13, mlm=False,
                                 **{**HP, "lr": 5e-4}).to(dtype)
    model.on_load_checkpoint(checkpoint)
    missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    rec.log("missing keys", sorted(missing))
    rec.log("unexpected keys", sorted(unexpected))
    batches = [collate([10, 12, 6], 3, use_seq, dtype), collate([13, 4], 4, use_seq, dtype)]
    train(model, batches, rec, "train", 4)

    model.eval()
    with torch.no_grad():
        probs = model.predict_step(collate([13, 3, 8], 5, use_seq, dtype))
    rec.log("predicted probabilities", list(probs))


def test_ribo_pretraining_then_tis_training_as_performer_pytorch():
    theirs, ours = same_results(program)
    assert theirs.rec.entries["missing keys"][0] == ["ff_1.bias", "ff_1.weight", "ff_2.bias", "ff_2.weight",
                                                     "layer_pos_emb.emb", "pos_emb.emb"]
    assert theirs.rec.entries["unexpected keys"][0] == ["ribo_mlm_emb.weight"]
    assert not ours.warnings


def test_sequence_pretraining_then_tis_training_as_performer_pytorch():
    same_results(partial(program, mlm_input="seq"))


def test_float32_within_1e_5():
    same_results(partial(program, dtype=torch.float32), rel=1e-5)


def test_checkpoint_crosses_libraries():
    """A performer-pytorch checkpoint of this model loads strictly into performer_triton's model
    (and back) and predicts the same."""
    from common import ORIGINAL, OURS

    models = {}
    for lib in (ORIGINAL, OURS):
        torch.manual_seed(0)
        models[lib.name] = TranscriptSeqRiboEmb(lib, False, True, max_seq_len=13, mlm=False, **HP).double().eval()
    theirs, ours = models["performer_pytorch"], models["performer_triton"]
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    batch = collate([13, 3, 8], 5, False, torch.float64)
    with torch.no_grad():
        assert_same(list(ours.predict_step(batch)), list(theirs.predict_step(batch)), "predictions")
    theirs.load_state_dict(ours.state_dict(), strict=True)
