"""TencentAILabHealthcare/scBERT, pretrain.py and finetune.py: single-cell gene-expression
BERT (PerformerLM over binned expression of every gene), masked-expression pretraining and
cell-type fine-tuning with a frozen encoder.

pretrain.py kept: PerformerLM(num_tokens=CLASS, dim, depth, max_seq_len=SEQ_LEN, heads,
local_attn_heads=0); each cell's bins clipped to CLASS - 2 plus a trailing 0 token, cells picked
with ``random.randint``; the masking (15% of non-special tokens chosen by topk of ``torch.rand``,
90% of them replaced by the mask token, labels PAD elsewhere, from the global generator);
``loss_fn(logits.transpose(1, 2), labels) / GRADIENT_ACCUMULATION`` with
CrossEntropyLoss(ignore_index=PAD_TOKEN_ID); clip_grad_norm_(1e2) and Adam step every
GRADIENT_ACCUMULATION batches; the accuracy over softmax(logits)[..., 1:-1]; validation under
no_grad in eval mode.
finetune.py kept: the encoder state loaded from a checkpoint, every parameter frozen but
``model.norm`` and ``model.performer.net.layers[-2]``, ``model.to_out`` replaced by scBERT's
conv + MLP classifier head (``Identity``), CrossEntropyLoss, clip_grad_norm_(1e6), Adam,
softmax/argmax predictions with UNASSIGN_THRES.
Changed: scBERT runs a vendored performer_pytorch whose PerformerLM takes
``g2v_position_emb=True`` (gene2vec position embeddings); 1.1.4 has no such argument, so the
gene-identity embedding is 1.1.4's learned absolute one (``rotary_position_emb=False``).
DistributedDataParallel / DistributedSampler become one process with a shuffled DataLoader,
scBERT's CosineAnnealingWarmupRestarts becomes torch's CosineAnnealingWarmRestarts.
Shrunk: 16906 genes -> 19, dim 200 -> 16, depth 6 -> 2, heads 10 -> 2, batch 3 -> 2, gradient
accumulation 60 -> 2, 2 epochs of 8 cells, feature_redraw_interval 1000 -> 3, float64.
"""
import io
import math
import random
from functools import reduce

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common import changed, same_results

BIN_NUM = 5
GENE_NUM = 19
SEQ_LEN = GENE_NUM + 1
CLASS = BIN_NUM + 2
MASK_PROB = 0.15
REPLACE_PROB = 0.9
MASK_TOKEN_ID = CLASS - 1
PAD_TOKEN_ID = CLASS - 1
MASK_IGNORE_TOKEN_IDS = [0]
BATCH_SIZE = 2
GRADIENT_ACCUMULATION = 2
LEARNING_RATE = 1e-4
EPOCHS = 2
UNASSIGN_THRES = 0.0
DIM = 16

_cells = np.random.default_rng(0)
EXPRESSION = np.minimum(_cells.poisson(1.5, size=(12, GENE_NUM)) * (_cells.random((12, GENE_NUM)) < 0.6), 9)
LABELS = _cells.integers(0, 3, size=12)


def performer_lm(lib):
    return lib.module.PerformerLM(
        num_tokens=CLASS, dim=DIM, depth=2, max_seq_len=SEQ_LEN, heads=2, local_attn_heads=0,
        rotary_position_emb=False, feature_redraw_interval=3,
    )


# the masking of pretrain.py: which tokens to mask, then which of those get the mask token


def tokens_equal_to_any(t, token_ids):
    return reduce(lambda acc, el: acc | (t == el), token_ids, torch.full_like(t, False, dtype=torch.bool))


def choose_masked(maskable, prob):
    batch, seq_len = maskable.shape
    max_masked = math.ceil(prob * seq_len)
    num_tokens = maskable.sum(dim=-1, keepdim=True)
    positions = torch.arange(seq_len).repeat(batch, 1)
    beyond_quota = (positions >= (num_tokens * prob).ceil())[:, :max_masked]
    scores = torch.rand((batch, seq_len)).masked_fill(~maskable, -1e9)
    _, chosen = scores.topk(max_masked, dim=-1)
    chosen = (chosen + 1).masked_fill_(beyond_quota, 0)
    masked = torch.zeros((batch, seq_len + 1))
    masked.scatter_(-1, chosen, 1)
    return masked[:, 1:].bool()


def data_mask(data):
    no_mask = tokens_equal_to_any(data, set([*MASK_IGNORE_TOKEN_IDS, PAD_TOKEN_ID]))
    mask = choose_masked(~no_mask, MASK_PROB)
    replace = torch.zeros_like(data).float().uniform_(0, 1) < REPLACE_PROB
    masked_input = data.clone().detach().masked_fill(mask * replace, MASK_TOKEN_ID)
    labels = data.masked_fill(~mask, PAD_TOKEN_ID)
    return masked_input, labels


class SCDataset(Dataset):
    def __init__(self, data, label=None, random_pick=True):
        super().__init__()
        self.data, self.label, self.random_pick = data, label, random_pick

    def __getitem__(self, index):
        row = random.randint(0, self.data.shape[0] - 1) if self.random_pick else index
        full_seq = self.data[row].copy()
        full_seq[full_seq > (CLASS - 2)] = CLASS - 2
        full_seq = torch.cat((torch.from_numpy(full_seq).long(), torch.tensor([0])))
        return full_seq if self.label is None else (full_seq, self.label[row])

    def __len__(self):
        return self.data.shape[0]


def pretrain(lib, rec):
    torch.manual_seed(0)
    model = performer_lm(lib).double()
    torch.manual_seed(1)
    random.seed(1)
    train_loader = DataLoader(SCDataset(EXPRESSION[:8]), batch_size=BATCH_SIZE, shuffle=True)
    val_loader = DataLoader(SCDataset(EXPRESSION[8:]), batch_size=BATCH_SIZE)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=2)
    loss_fn = nn.CrossEntropyLoss(ignore_index=PAD_TOKEN_ID, reduction="mean")
    softmax = nn.Softmax(dim=-1)
    rec.projections("projections", model)

    for epoch in range(1, EPOCHS + 1):
        model.train()
        running_loss, cum_acc = 0.0, 0.0
        for index, data in enumerate(train_loader, start=1):
            data, labels = data_mask(data)
            logits = model(data)
            loss = loss_fn(logits.transpose(1, 2), labels) / GRADIENT_ACCUMULATION
            loss.backward()
            if index % GRADIENT_ACCUMULATION == 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), int(1e2))
                rec.optimizer_step(optimizer, model)  # optimizer.step(); optimizer.zero_grad()
            running_loss += loss.item()
            final = softmax(logits)[..., 1:-1].argmax(dim=-1) + 1
            pred_num = (labels != PAD_TOKEN_ID).sum(dim=-1)
            correct_num = ((labels != PAD_TOKEN_ID) * (final == labels)).sum(dim=-1)
            cum_acc += torch.true_divide(correct_num, pred_num).nan_to_num().mean().item()
            rec.log("masked input", data)
            rec.log("loss", loss)
        rec.log("epoch loss", running_loss / index)
        rec.log("epoch accuracy", 100 * cum_acc / index)
        scheduler.step()

        model.eval()
        with torch.no_grad():
            for data in val_loader:
                data, labels = data_mask(data)
                logits = model(data)
                rec.log("validation loss", loss_fn(logits.transpose(1, 2), labels))
                rec.log("validation predictions", softmax(logits)[..., 1:-1].argmax(dim=-1) + 1)
    checkpoint = io.BytesIO()
    torch.save({"epoch": EPOCHS, "model_state_dict": model.state_dict()}, checkpoint)
    return checkpoint.getvalue()


class Identity(nn.Module):
    """scBERT's classifier head: a (1, dim) convolution over each gene, then an MLP over genes."""

    def __init__(self, dropout=0.0, h_dim=100, out_dim=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, (1, DIM))
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(in_features=SEQ_LEN, out_features=512, bias=True)
        self.act1 = nn.ReLU()
        self.dropout1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(in_features=512, out_features=h_dim, bias=True)
        self.act2 = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(in_features=h_dim, out_features=out_dim, bias=True)

    def forward(self, x):
        x = self.act(self.conv1(x[:, None, :, :]))
        x = x.view(x.shape[0], -1)
        x = self.dropout1(self.act1(self.fc1(x)))
        x = self.dropout2(self.act2(self.fc2(x)))
        return self.fc3(x)


def finetune(checkpoint):
    def program(lib, rec):
        torch.manual_seed(0)
        model = performer_lm(lib)
        ckpt = torch.load(io.BytesIO(checkpoint))
        model.load_state_dict(ckpt["model_state_dict"])
        for param in model.parameters():
            param.requires_grad = False
        for param in model.norm.parameters():
            param.requires_grad = True
        for param in model.performer.net.layers[-2].parameters():
            param.requires_grad = True
        model.to_out = Identity(dropout=0.0, h_dim=128, out_dim=3)
        model = model.double()

        torch.manual_seed(1)
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        loss_fn = nn.CrossEntropyLoss(weight=None)
        train_dataset = SCDataset(EXPRESSION[:8], torch.from_numpy(LABELS[:8]), random_pick=False)
        val_dataset = SCDataset(EXPRESSION[8:], torch.from_numpy(LABELS[8:]), random_pick=False)
        rec.projections("projections", model)
        for epoch in range(1, EPOCHS + 1):
            model.train()
            for index, (data, labels) in enumerate(DataLoader(train_dataset, batch_size=BATCH_SIZE), start=1):
                logits = model(data)
                loss = loss_fn(logits, labels)
                loss.backward()
                rec.log("loss", loss)
                if index % GRADIENT_ACCUMULATION == 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), int(1e6))
                    rec.optimizer_step(optimizer, model)  # optimizer.step(); optimizer.zero_grad()
            model.eval()
            with torch.no_grad():
                for data_v, labels_v in DataLoader(val_dataset, batch_size=BATCH_SIZE):
                    final_prob = nn.Softmax(dim=-1)(model(data_v))
                    final = final_prob.argmax(dim=-1)
                    final[np.amax(np.array(final_prob), axis=-1) < UNASSIGN_THRES] = -1
                    rec.log("validation probabilities", final_prob)
                    rec.log("predictions", final)
        rec.params("final parameters", model)

    return program


def test_scbert_pretraining_as_performer_pytorch():
    theirs, ours = same_results(pretrain)
    assert changed(theirs.rec.entries["projections"]), "the run must cross a projection redraw"
    # both checkpoints hold the same keys (scBERT saves and reloads model_state_dict)
    assert list(torch.load(io.BytesIO(ours.result))["model_state_dict"]) == list(
        torch.load(io.BytesIO(theirs.result))["model_state_dict"]
    )


def test_scbert_finetuning_a_frozen_encoder_as_performer_pytorch():
    checkpoint = same_results(pretrain)[0].result  # 1.1.4's checkpoint, loaded by both
    theirs, _ = same_results(finetune(checkpoint))
    assert changed(theirs.rec.entries["projections"]), "the run must cross a projection redraw"
    grads = theirs.rec.entries["grads"][0]
    assert any(g is None for g in grads.values()) and any(g is not None for g in grads.values())
