"""mlpen/Nystromformer, the Long Range Arena code (reorganized_code/encoders/backbones/
efficient_attentions/attention_performer.py, efficient_attention.py, LRA/model.py,
LRA/model_wrapper.py, LRA/run_tasks.py): the Performer baseline, a standalone FastAttention.

Kept: ``FastAttention(dim_heads=head_dim, nb_features=rp_dim, causal=False,
kernel_fn=nn.ReLU() or torch.exp)`` by ``kernel_type`` (generalized_attention stays False, so
both libraries ignore kernel_fn and use softmax features: both kernel types are run), called as
``attn_fn(Q / sqrt(sqrt(head_dim)), K / sqrt(sqrt(head_dim)) * mask[:, None, :, None],
V * mask[:, None, :, None])`` on padded sequences (float masks); the W_q/W_k/W_v split-heads
attention, the pre-norm blocks with dropout (separate or ``shared_weight`` blocks), learned token
and position embeddings, CLS pooling with ``append_cls``, the SC head, per-example
CrossEntropyLoss(reduction="none") and accuracy; run_tasks.py's step: batch split into
``accumu_steps`` chunks, ``loss.mean() / accumu_steps`` backward per chunk, AdamW(eps=1e-6,
weight_decay), OneCycleLR, GradScaler (disabled: CUDA-only), eval steps under no_grad.
Changed: the program casts Q, K, V and the mask with ``.float()`` under a disabled autocast;
here they are cast to float64 (``.double()``), the dtype the comparison runs in.
A standalone FastAttention is never redrawn by 1.1.4: the projections stay fixed.
Shrunk: dim 64 -> 16, 2 heads of 8, rp_dim 256 -> 16, hidden 128 -> 32, 2 layers, sequences of
20 tokens (vocab 12, padded to random lengths), batch 4 in 2 chunks, 4 training steps.
"""
import math

import pytest
import torch
from torch import nn

from common import changed, same_results

CONFIG = dict(
    dim=16, embedding_dim=16, head_dim=8, num_head=2, rp_dim=16, hidden_dim=32, dropout_prob=0.1,
    num_layers=2, vocab_size=12, max_seq_len=20, num_classes=3, pooling_mode="CLS", mixed_precision=False,
    attn_type="performer",
)
TRAINING = dict(batch_size=4, learning_rate=1e-3, warmup=2, num_train_steps=4, weight_decay=0.01, lr_decay="linear")
ACCUMU_STEPS = 2


class PerformerAttention(nn.Module):
    def __init__(self, lib, config):
        super().__init__()
        self.head_dim = config["head_dim"]
        self.rp_dim = config["rp_dim"]
        self.kernel_type = config["kernel_type"]
        if self.kernel_type == "relu":
            self.attn_fn = lib.module.FastAttention(
                dim_heads=self.head_dim, nb_features=self.rp_dim, causal=False, kernel_fn=nn.ReLU()
            )
        elif self.kernel_type == "exp":
            self.attn_fn = lib.module.FastAttention(
                dim_heads=self.head_dim, nb_features=self.rp_dim, causal=False, kernel_fn=torch.exp
            )

    def forward(self, Q, K, V, mask):
        return self.attn_fn(
            Q / math.sqrt(math.sqrt(self.head_dim)),
            K / math.sqrt(math.sqrt(self.head_dim)) * mask[:, None, :, None],
            V * mask[:, None, :, None],
        )


class Attention(nn.Module):
    def __init__(self, lib, config):
        super().__init__()
        self.dim, self.head_dim, self.num_head = config["dim"], config["head_dim"], config["num_head"]
        self.W_q = nn.Linear(self.dim, self.num_head * self.head_dim)
        self.W_k = nn.Linear(self.dim, self.num_head * self.head_dim)
        self.W_v = nn.Linear(self.dim, self.num_head * self.head_dim)
        self.attn = PerformerAttention(lib, config)
        self.ff = nn.Linear(self.num_head * self.head_dim, self.dim)

    def forward(self, X, mask):
        Q, K, V = (self.split_heads(w(X)) for w in (self.W_q, self.W_k, self.W_v))
        with torch.autocast("cuda", enabled=False):
            attn_out = self.attn(Q.double(), K.double(), V.double(), mask.double())  # .float() upstream
        return self.ff(self.combine_heads(attn_out))

    def combine_heads(self, X):
        X = X.transpose(1, 2)
        return X.reshape(X.size(0), X.size(1), self.num_head * self.head_dim)

    def split_heads(self, X):
        return X.reshape(X.size(0), X.size(1), self.num_head, self.head_dim).transpose(1, 2)


class Block(nn.Module):
    def __init__(self, lib, config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config["dim"])
        self.mha = Attention(lib, config)
        self.dropout1 = nn.Dropout(p=config["dropout_prob"])
        self.norm2 = nn.LayerNorm(config["dim"])
        self.mlpblock = nn.Sequential(
            nn.Linear(config["dim"], config["hidden_dim"]),
            nn.GELU(),
            nn.Dropout(p=config["dropout_prob"]),
            nn.Linear(config["hidden_dim"], config["dim"]),
            nn.Dropout(p=config["dropout_prob"]),
        )

    def forward(self, X, mask):
        X = self.dropout1(self.mha(self.norm1(X), mask)) + X
        return self.mlpblock(self.norm2(X)) + X


class Model(nn.Module):
    def __init__(self, lib, config):
        super().__init__()
        self.num_layers, self.shared_weight = config["num_layers"], config["shared_weight"]
        self.word_embeddings = nn.Embedding(config["vocab_size"], config["embedding_dim"])
        nn.init.normal_(self.word_embeddings.weight, std=0.02)
        self.position_embeddings = nn.Embedding(config["max_seq_len"], config["embedding_dim"])
        nn.init.normal_(self.position_embeddings.weight, std=0.02)
        self.dropout = nn.Dropout(p=config["dropout_prob"])
        if self.shared_weight:
            self.encoder = Block(lib, config)
        else:
            self.encoders = nn.ModuleList([Block(lib, config) for _ in range(self.num_layers)])
        self.norm = nn.LayerNorm(config["dim"])

    def forward(self, input_ids, mask):
        batch_size, seq_len = input_ids.size()
        position_ids = torch.arange(seq_len, dtype=torch.long)[None, :].repeat(batch_size, 1)
        X = self.dropout(self.word_embeddings(input_ids) + self.position_embeddings(position_ids))
        for encoder in [self.encoder] * self.num_layers if self.shared_weight else self.encoders:
            X = encoder(X, mask)
        return self.norm(X) * mask[:, :, None]


def append_cls(inp, mask, vocab_size):
    batch_size = inp.size(0)
    cls_id = ((vocab_size - 1) * torch.ones(batch_size, dtype=torch.long)).long()
    cls_mask = torch.ones(batch_size, dtype=mask.dtype)
    return torch.cat([cls_id[:, None], inp[:, :-1]], dim=-1), torch.cat([cls_mask[:, None], mask[:, :-1]], dim=-1)


class ModelForSC(nn.Module):
    def __init__(self, lib, config):
        super().__init__()
        self.pooling_mode, self.vocab_size = config["pooling_mode"], config["vocab_size"]
        self.model = Model(lib, config)
        self.mlpblock = nn.Sequential(
            nn.Linear(config["dim"], config["hidden_dim"]), nn.ReLU(), nn.Linear(config["hidden_dim"], config["num_classes"])
        )

    def forward(self, input_ids_0, mask_0, label):
        input_ids_0, mask_0 = append_cls(input_ids_0, mask_0, self.vocab_size)
        token_out = self.model(input_ids_0, mask_0)
        seq_scores = self.mlpblock(token_out[:, 0, :])
        seq_loss = nn.CrossEntropyLoss(reduction="none")(seq_scores, label)
        seq_accu = (seq_scores.argmax(dim=-1) == label).to(torch.float32)
        return {"loss": seq_loss, "accu": seq_accu}


def lra_batch():
    lengths = torch.randint(5, CONFIG["max_seq_len"] + 1, (TRAINING["batch_size"],))
    mask = (torch.arange(CONFIG["max_seq_len"])[None, :] < lengths[:, None]).double()
    input_ids = torch.randint(1, CONFIG["vocab_size"] - 1, (TRAINING["batch_size"], CONFIG["max_seq_len"]))
    input_ids = input_ids * mask.long()
    return {"input_ids_0": input_ids, "mask_0": mask, "label": torch.randint(0, CONFIG["num_classes"], (TRAINING["batch_size"],))}


def lra_program(kernel_type, shared_weight):
    config = dict(CONFIG, kernel_type=kernel_type, shared_weight=shared_weight)

    def program(lib, rec):
        torch.manual_seed(0)
        model = ModelForSC(lib, config).double()
        torch.manual_seed(1)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=TRAINING["learning_rate"], betas=(0.9, 0.999), eps=1e-6,
            weight_decay=TRAINING["weight_decay"],
        )
        lr_scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer=optimizer, max_lr=TRAINING["learning_rate"],
            pct_start=TRAINING["warmup"] / TRAINING["num_train_steps"], anneal_strategy=TRAINING["lr_decay"],
            total_steps=TRAINING["num_train_steps"],
        )
        amp_scaler = torch.amp.GradScaler("cuda", enabled=False)
        rec.projections("projections", model)

        def step(component):
            optimizer.zero_grad()
            batch = lra_batch()
            chunks = [{} for _ in range(ACCUMU_STEPS)]
            for key in batch:
                for idx, inp in enumerate(torch.chunk(batch[key], ACCUMU_STEPS, dim=0)):
                    chunks[idx][key] = inp
            outputs = {}
            with torch.no_grad() if component != "train" else torch.enable_grad():
                for partial_inputs in chunks:
                    partial_outputs = model(**partial_inputs)
                    for key in partial_outputs:
                        partial_outputs[key] = partial_outputs[key].mean() / ACCUMU_STEPS
                        outputs[key] = outputs[key] + partial_outputs[key] if key in outputs else partial_outputs[key]
                    if component == "train":
                        amp_scaler.scale(partial_outputs["loss"]).backward()
            if component == "train":
                rec.grads("grads", model)
                amp_scaler.step(optimizer)
                amp_scaler.update()
                lr_scheduler.step()
                rec.projections("projections", model)
            rec.log(f"{component} loss", outputs["loss"])
            rec.log(f"{component} accuracy", outputs["accu"])

        model.train()
        for _ in range(TRAINING["num_train_steps"]):
            step("train")
        model.eval()
        step("dev")
        rec.params("final parameters", model)

    return program


@pytest.mark.parametrize("kernel_type, shared_weight", [("exp", False), ("relu", True)])
def test_lra_performer_baseline_trains_as_performer_pytorch(kernel_type, shared_weight):
    theirs, _ = same_results(lra_program(kernel_type, shared_weight))
    assert not changed(theirs.rec.entries["projections"]), "1.1.4 never redraws a standalone FastAttention"
