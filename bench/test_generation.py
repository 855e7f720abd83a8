"""Decoding cost per token vs prefix length: cached recurrent state (O(1) per token; on CUDA the
fused decode step) against recomputing the whole prefix each step (1.1.4's generate).  A
leak-free causal PerformerLM, checked first: the cached step's logits equal the recomputed ones.
And chunked prefill (state passing): tokens per second by chunk length."""
import contextlib
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


@contextlib.contextmanager
def one_cpu_thread():
    """On CPU, one thread while a single-token step is timed: with torch's two, a descheduled
    OpenMP thread of a shared machine stalls every parallel region (60-140 ms bursts per ~1 ms
    step at some prefix lengths, review R22)."""
    threads = torch.get_num_threads()
    if DEVICE == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def cached_per_token(model, tokens, length: int) -> float:
    """Median seconds of one cached decoding step after a prefix of `length` tokens."""
    cache = DecodingCache()
    model(tokens[:, :length], cache=cache)
    times = []
    with one_cpu_thread():
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
def test_time_per_token_is_flat_with_the_cache(benchmark, timed):
    model, tokens = model_and_tokens()
    cache = DecodingCache()
    model(tokens[:, :300], cache=cache)
    step = model(tokens[:, 300:301], cache=cache)[:, -1]
    full = model(tokens[:, :301])[:, -1]
    assert torch.allclose(step, full, rtol=1e-4, atol=1e-4), (step - full).abs().max()
    timed()

    # the fastest of three interleaved rounds per length: a busy spell of the machine hits one
    cached = {n: min(t) for n, t in zip(LENGTHS, zip(*[[cached_per_token(model, tokens, n) for n in LENGTHS]
                                                          for _ in range(3)]))}
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


PREFILL_LENGTH = 8192
PREFILL_CHUNKS = (256, 1024, 4096, 8192)


@torch.no_grad()
def test_prefill_throughput_by_chunk_length(benchmark, timed):
    """Chunked prefill (favor_attention with initial_state / output_final_state, issue 13): tokens
    per second of one causal attention layer over an 8192-token prompt fed in chunks of 256 to
    8192; the chained outputs equal the single call's (checked first).  b=1 h=8 d=e=64 m=256."""
    from performer_triton import favor_attention, gaussian_orthogonal_random_matrix

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, PREFILL_LENGTH, 64, generator=gen).to(DEVICE) for _ in range(3))
    P = gaussian_orthogonal_random_matrix(256, 64, generator=gen).to(DEVICE)

    def prefill(chunk: int):
        outs, state = [], None
        for a in range(0, PREFILL_LENGTH, chunk):
            out, state = favor_attention(q[:, :, a : a + chunk], k[:, :, a : a + chunk], v[:, :, a : a + chunk], P,
                                         causal=True, key_stabilizer="prefix", initial_state=state,
                                         output_final_state=True)
            outs.append(out)
        return torch.cat(outs, dim=2)

    whole = favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix")
    assert torch.allclose(prefill(1024), whole, rtol=1e-4, atol=1e-5)
    timed()
    seconds = {}
    for chunk in PREFILL_CHUNKS:
        times = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            prefill(chunk)
            sync()
            times.append(time.perf_counter() - t0)
        seconds[chunk] = statistics.median(times)
    benchmark.group = "prefill: tokens per second by chunk length"
    benchmark.extra_info.update({f"tokens_per_s_chunk{c}": PREFILL_LENGTH / seconds[c] for c in PREFILL_CHUNKS})
    benchmark.pedantic(lambda: prefill(1024), rounds=3, iterations=1)
    # chaining costs little: chunks of 1024 keep at least half the one-call throughput
    assert seconds[1024] < 2.0 * seconds[PREFILL_LENGTH], benchmark.extra_info
