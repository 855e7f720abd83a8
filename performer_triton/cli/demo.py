"""`performer-triton demo`: train a small causal, leak-free PerformerLM on text and sample from it.

The default corpus is the source of a few modules of Python's standard library (always present,
no download). Bytes are tokens (vocabulary 256). Generation uses the cached decoder: each new
token updates per-layer recurrent state in O(1).
"""
from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch
from tqdm import tqdm

from performer_triton import AutoregressiveWrapper, PerformerLM

DEFAULT_MODULES = ("argparse", "collections", "dataclasses", "functools", "pathlib", "textwrap", "typing")


def default_corpus() -> bytes:
    """Concatenated source text of some standard-library modules."""
    import importlib

    texts = [inspect.getsource(importlib.import_module(name)) for name in DEFAULT_MODULES]
    return "\n".join(texts).encode("utf-8")


def load_corpus(path: str | None) -> bytes:
    if path is None:
        return default_corpus()
    data = Path(path).read_bytes()
    if len(data) < 1024:
        raise ValueError(f"--text {path}: need at least 1024 bytes of text, got {len(data)}")
    return data


def build_model(seq_len: int, device: torch.device):
    model = PerformerLM(
        num_tokens=256,
        max_seq_len=seq_len,
        dim=128,
        depth=2,
        heads=4,
        dim_head=32,
        causal=True,
        nb_features=64,
        feature_redraw_interval=100_000,  # fixed features: the cached decoder reads them
        key_stabilizer="prefix",
    )
    return AutoregressiveWrapper(model).to(device)


def run(args) -> int:
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = torch.frombuffer(bytearray(load_corpus(args.text)), dtype=torch.uint8).long()
    seq_len, batch = args.seq_len, args.batch_size
    steps = args.steps if args.steps is not None else (1000 if device.type == "cuda" else 200)
    if data.numel() <= seq_len + 1:
        raise ValueError(f"corpus has {data.numel()} bytes, need more than seq_len + 1 = {seq_len + 1}")
    model = build_model(seq_len, device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device {device}; corpus {data.numel():,} bytes; model {n_params / 1e6:.2f}M parameters; "
          f"{steps} steps of {batch} x {seq_len} tokens")

    def batch_of(n: int) -> torch.Tensor:
        starts = torch.randint(0, data.numel() - seq_len - 1, (n,))
        return torch.stack([data[s : s + seq_len + 1] for s in starts]).to(device)

    first = last = None
    tokens, t0 = 0, time.perf_counter()
    bar = tqdm(range(steps), desc="train", unit="step")
    for _ in bar:
        model.train()
        loss = model(batch_of(batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        tokens += batch * seq_len
        value = loss.item()
        first = value if first is None else first
        last = value if last is None else 0.9 * last + 0.1 * value
        bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):,.0f}")
    bar.close()
    print(f"loss: start {first:.3f} -> end {last:.3f} (smoothed); "
          f"{tokens / (time.perf_counter() - t0):,.0f} training tokens/s")

    model.eval()
    prompt = batch_of(1)[:, :64]
    t0 = time.perf_counter()
    sample = model.generate(prompt, args.generate, temperature=0.8, use_cache=True)
    elapsed = time.perf_counter() - t0
    text = bytes(sample[0].tolist()).decode("utf-8", errors="replace")
    print(f"--- prompt ---\n{bytes(prompt[0].tolist()).decode('utf-8', errors='replace')}")
    print(f"--- sample ({args.generate} tokens, cached decoding, {args.generate / elapsed:,.0f} tokens/s) ---\n{text}")
    return 0 if last < first else 1
