"""tenexcoder/huggingface-tutorials, performer/hf_port.py, performer/load.py and
performer/finetune.py: porting distilgpt2's weights into a causal, reversible PerformerLM,
loading them, and fine-tuning the result as a language model.

Kept: hf_port.py's key mapping (GPT-2's wte / ln_f / h.i.ln_1 / attn.c_attn split in three /
attn.c_proj / ln_2 / mlp.c_fc and mlp.c_proj transposed, written to 1.1.4's reversible keys
``performer.net.blocks.i.f.net.fn.to_q.weight`` ...), ``torch.save`` / ``torch.load`` of the
ported state, load.py's ``PerformerLM(**gpt2_config, causal=True, reversible=True)`` and
``model(x, mask=mask)`` on a full-length input, finetune.py's ``AutoregressiveWrapper(model)``
called as ``self.model(x, return_loss=return_loss)`` (``return_loss`` reaches no layer: ignored
by 1.1.4, warned about once by us), and its AdamW parameter groups chosen by parameter *name*
(no decay for "bias" and "LayerNorm.weight": the names must be 1.1.4's).
Changed: the ported state was written for an older performer-pytorch (absolute position
embedding, q/k/v and output biases); 1.1.4's strict ``load_state_dict`` rejects it. Both
libraries must reject it alike (RuntimeError, same missing and unexpected keys); the run then
loads it with ``strict=False``. Random GPT-2 weights and tokens replace distilgpt2 and wikitext;
a plain loop replaces PyTorch Lightning.
Shrunk: vocab 50257 -> 50, max_seq_len 1024 -> 16, dim 768 -> 128 with 2 heads of the default
64 (so q/k/v stay square, as in distilgpt2), depth 6 -> 2, batch 6 -> 2, lr 2e-5 -> 1e-3,
feature_redraw_interval 1000 -> 2, 3 steps, float64.
"""
import collections
import io

import pytest
import torch

from common import changed, same_results

GPT2_CONFIG = {"num_tokens": 50, "max_seq_len": 16, "dim": 128, "depth": 2, "heads": 2}


def distilgpt2_state():
    """GPT-2 transformer state_dict names and shapes (Conv1D weights are (in, out)), random values."""
    g = torch.Generator().manual_seed(0)
    d, v, p = GPT2_CONFIG["dim"], GPT2_CONFIG["num_tokens"], GPT2_CONFIG["max_seq_len"]
    shapes = {"wte.weight": (v, d), "wpe.weight": (p, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(GPT2_CONFIG["depth"]):
        shapes.update({
            f"h.{i}.ln_1.weight": (d,), f"h.{i}.ln_1.bias": (d,),
            f"h.{i}.attn.c_attn.weight": (d, 3 * d), f"h.{i}.attn.c_attn.bias": (3 * d,),
            f"h.{i}.attn.c_proj.weight": (d, d), f"h.{i}.attn.c_proj.bias": (d,),
            f"h.{i}.ln_2.weight": (d,), f"h.{i}.ln_2.bias": (d,),
            f"h.{i}.mlp.c_fc.weight": (d, 4 * d), f"h.{i}.mlp.c_fc.bias": (4 * d,),
            f"h.{i}.mlp.c_proj.weight": (4 * d, d), f"h.{i}.mlp.c_proj.bias": (d,),
        })
    return {k: 0.05 * torch.randn(s, generator=g) for k, s in shapes.items()}


def hf_port(model_state):
    dim = GPT2_CONFIG["dim"]
    performer_state = collections.OrderedDict()
    performer_state["token_emb.weight"] = model_state["wte.weight"]
    performer_state["pos_emb.weight"] = model_state["wpe.weight"]
    performer_state["norm.weight"] = model_state["ln_f.weight"]
    performer_state["norm.bias"] = model_state["ln_f.bias"]
    attn_id = ["to_q", "to_k", "to_v"]
    for layer_idx in range(GPT2_CONFIG["depth"]):
        src = "h." + str(layer_idx)
        dst = "performer.net.blocks." + str(layer_idx)
        performer_state[dst + ".f.net.norm.weight"] = model_state[src + ".ln_1.weight"]
        performer_state[dst + ".f.net.norm.bias"] = model_state[src + ".ln_1.bias"]
        qkv_w = model_state[src + ".attn.c_attn.weight"].split(dim, dim=1)
        qkv_b = model_state[src + ".attn.c_attn.bias"].split(dim, dim=0)
        for idx, (w, b) in enumerate(zip(qkv_w, qkv_b)):
            performer_state[dst + ".f.net.fn." + attn_id[idx] + ".weight"] = w
            performer_state[dst + ".f.net.fn." + attn_id[idx] + ".bias"] = b
        performer_state[dst + ".f.net.fn.to_out.weight"] = model_state[src + ".attn.c_proj.weight"]
        performer_state[dst + ".f.net.fn.to_out.bias"] = model_state[src + ".attn.c_proj.bias"]
        performer_state[dst + ".g.net.norm.weight"] = model_state[src + ".ln_2.weight"]
        performer_state[dst + ".g.net.norm.bias"] = model_state[src + ".ln_2.bias"]
        performer_state[dst + ".g.net.fn.fn.w1.weight"] = torch.einsum("ij->ji", model_state[src + ".mlp.c_fc.weight"])
        performer_state[dst + ".g.net.fn.fn.w1.bias"] = model_state[src + ".mlp.c_fc.bias"]
        performer_state[dst + ".g.net.fn.fn.w2.weight"] = torch.einsum("ij->ji", model_state[src + ".mlp.c_proj.weight"])
        performer_state[dst + ".g.net.fn.fn.w2.bias"] = model_state[src + ".mlp.c_proj.bias"]
    buffer = io.BytesIO()
    torch.save(performer_state, buffer)
    return buffer.getvalue()


PORTED = hf_port(distilgpt2_state())


def build(lib):
    return lib.module.PerformerLM(**GPT2_CONFIG, causal=True, reversible=True, feature_redraw_interval=2)


def load_strict(lib, rec):
    torch.manual_seed(0)
    model = build(lib)
    with pytest.raises(RuntimeError) as error:
        model.load_state_dict(torch.load(io.BytesIO(PORTED)))
    rec.log("strict load error names PerformerLM", "PerformerLM" in str(error.value))
    missing, unexpected = model.load_state_dict(torch.load(io.BytesIO(PORTED)), strict=False)
    rec.log("missing keys", sorted(missing))
    rec.log("unexpected keys", sorted(unexpected))


def load_and_finetune(lib, rec):
    torch.manual_seed(0)
    model = build(lib)
    model.load_state_dict(torch.load(io.BytesIO(PORTED)), strict=False)
    model.double()

    torch.manual_seed(1)
    x = torch.randint(0, GPT2_CONFIG["num_tokens"], (1, GPT2_CONFIG["max_seq_len"]))
    mask = torch.ones_like(x).bool()
    rec.log("load.py output", model(x, mask=mask))  # (1, max_seq_len, vocab_size)

    wrapped = lib.autoregressive_wrapper.AutoregressiveWrapper(model)
    no_decay = ["bias", "LayerNorm.weight"]
    groups = [
        {"params": [p for n, p in wrapped.named_parameters() if not any(nd in n for nd in no_decay)], "weight_decay": 0.01},
        {"params": [p for n, p in wrapped.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    rec.log("decayed parameter names", [n for n, _ in wrapped.named_parameters() if not any(nd in n for nd in no_decay)])
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    rec.projections("projections", wrapped)
    for _ in range(3):
        batch = torch.randint(0, GPT2_CONFIG["num_tokens"], (2, GPT2_CONFIG["max_seq_len"]))
        loss = wrapped(batch, return_loss=True)  # LitGpt.training_step -> forward(x, return_loss=True)
        loss.backward()
        rec.log("loss", loss)
        rec.optimizer_step(optimizer, wrapped)  # optimizer.step(); optimizer.zero_grad()
    rec.params("final parameters", wrapped)


def test_ported_distilgpt2_state_is_rejected_alike_by_strict_loading():
    theirs, _ = same_results(load_strict)
    assert theirs.rec.entries["unexpected keys"][0], "the ported state has keys 1.1.4 does not know"


def test_ported_distilgpt2_loads_and_finetunes_as_performer_pytorch():
    theirs, ours = same_results(load_and_finetune)
    assert changed(theirs.rec.entries["projections"]), "the run must cross a projection redraw"
    assert sum("'return_loss'" in w for w in ours.warnings) == 1, ours.warnings
