"""Decoding cost per token vs prefix length: cached recurrent state (O(1) per token) against
recomputing the whole prefix each step (1.1.4's generate).  A leak-free causal PerformerLM,
checked first: the cached step's logits equal the recomputed ones."""
import statistics
import time

import torch

from performer_triton import PerformerLM
from performer_triton.decoding import DecodingCache

LENGTHS = (128, 512, 1024, 2048, 4096)
STEPS = 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def model_and_tokens():
    torch.manual_seed(0)
    model = PerformerLM(
        num_tokens=256, max_seq_len=max(LENGTHS) + STEPS, dim=256, depth=2, heads=4, dim_head=64,
        causal=True, key_stabilizer="prefix",
    ).to(DEVICE).eval()
    tokens = torch.randint(0, 256, (1, max(LENGTHS) + STEPS), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return model, tokens


@torch.no_grad()
def cached_per_token(model, tokens, length: int) -> float:
    """Median seconds of one cached decoding step after a prefix of `length` tokens."""
    cache = DecodingCache()
    model(tokens[:, :length], cache=cache)
    times = []
    for i in range(length, length + STEPS):
        sync()
        t0 = time.perf_counter()
        model(tokens[:, i : i + 1], cache=cache)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def recompute_per_token(model, tokens, length: int, repeats: int = 3) -> float:
    """Median seconds of one step by recomputing the whole prefix (what 1.1.4's generate does)."""
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        model(tokens[:, : length + 1])
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def test_time_per_token_is_flat_with_the_cache(benchmark):
    model, tokens = model_and_tokens()
    cache = DecodingCache()
    model(tokens[:, :300], cache=cache)
    step = model(tokens[:, 300:301], cache=cache)[:, -1]
    full = model(tokens[:, :301])[:, -1]
    assert torch.allclose(step, full, rtol=1e-4, atol=1e-4), (step - full).abs().max()

    cached = {n: cached_per_token(model, tokens, n) for n in LENGTHS}
    recompute = {n: recompute_per_token(model, tokens, n) for n in LENGTHS}
    benchmark.group = "generation: time per token"
    benchmark.extra_info.update(
        {f"cached_ms_{n}": cached[n] * 1e3 for n in LENGTHS} | {f"recompute_ms_{n}": recompute[n] * 1e3 for n in LENGTHS}
    )
    first, last = LENGTHS[0], LENGTHS[-1]
    benchmark.extra_info.update(cached_growth=cached[last] / cached[first], recompute_growth=recompute[last] / recompute[first])
    cache = DecodingCache()
    model(tokens[:, :last], cache=cache)
    position = iter(range(last, last + STEPS))
    benchmark.pedantic(lambda: model(tokens[:, next(position) :][:, :1], cache=cache), rounds=STEPS, iterations=1)
    assert cached[last] < 1.5 * cached[first], benchmark.extra_info  # flat: O(1) per token
    assert recompute[last] > 4 * recompute[first], benchmark.extra_info  # grows with the prefix
