"""Run in a fresh process by tests/test_compile.py: compile whole models and train them from the
very first call (forward and backward), comparing loss and gradients with eager execution.
Prints one line per model, "<name> <loss rel err> <max grad rel err>"."""
import sys

import torch

from performer_triton import PerformerEncDec, PerformerLM

LM = dict(num_tokens=64, max_seq_len=64, dim=32, depth=2, heads=2, dim_head=16, nb_features=24)
MODELS = {
    "lm-causal": lambda: PerformerLM(**LM, causal=True),
    "lm-noncausal-local": lambda: PerformerLM(**LM, local_attn_heads=1, local_window_size=16),
    "lm-causal-reversible-prefix": lambda: PerformerLM(**LM, causal=True, reversible=True, key_stabilizer="prefix"),
    # exact masks with the prefix stabilizer: each batch row compacted on the host (a graph break)
    "lm-causal-prefix-exact-mask": lambda: PerformerLM(**LM, causal=True, key_stabilizer="prefix", exact_mask=True,
                                                       local_attn_heads=1, local_window_size=16),
    "encdec": lambda: PerformerEncDec(dim=32, enc_num_tokens=64, enc_depth=1, enc_heads=2, enc_dim_head=16,
                                      enc_max_seq_len=64, dec_num_tokens=64, dec_depth=1, dec_heads=2,
                                      dec_dim_head=16, dec_max_seq_len=64),
}


def mask(n: int) -> torch.Tensor:
    """Row 0 left-padded, row 1 with a hole: (2, n) bool, True = keep."""
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[0, :5], keep[1, 9:12] = False, False
    return keep


def step(model, run, x, y, masked: bool = False):
    """One training step's loss through run (model or its compiled form); gradients land in
    model's parameters."""
    if isinstance(model, PerformerEncDec):
        loss = run(x, y)
    else:
        loss = (run(x, mask=mask(x.shape[1])) if masked else run(x)).logsumexp(-1).mean()
    loss.backward()
    return loss.detach()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(names):
    for name in names:
        results = []
        for compiled in (False, True):
            torch.manual_seed(0)
            model = MODELS[name]().train()
            x, y = torch.randint(1, 64, (2, 40)), torch.randint(1, 64, (2, 33))
            run = torch.compile(model) if compiled else model
            torch.manual_seed(1)
            loss = step(model, run, x, y, masked="mask" in name)
            results.append((loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (eager_loss, eager_grads), (loss, grads) = results
        grad_err = max(rel(g, e) for g, e in zip(grads, eager_grads))
        print(name, rel(loss, eager_loss), grad_err, len(grads) == len(eager_grads), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
