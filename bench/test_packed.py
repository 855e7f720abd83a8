"""Packed variable-length batches (cu_seqlens): one fused forward + backward over the whole pack
against one call per sequence (what performer_triton ran before the kernels took packs), side by
side in one run.  32 sequences of 64 to 2048 tokens (seeded), h=8 d=e=64 m=256 bf16, causal with
the prefix stabilizer and non-causal.  The fused pack runs on CUDA only (on a CPU the PyTorch path
runs each sequence alone, so there is nothing to compare): skipped elsewhere."""
import statistics
import time

import pytest
import torch

from performer_triton import favor_attention, gaussian_orthogonal_random_matrix

COUNT, SHORTEST, LONGEST = 32, 64, 2048
HEADS, HEAD_DIM, FEATURES = 8, 64, 256


def pack(device):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(SHORTEST, LONGEST + 1, (COUNT,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device, torch.int32)
    total = int(lengths.sum())
    q, k, v = (torch.randn(1, HEADS, total, HEAD_DIM, generator=gen).to(device, torch.bfloat16) for _ in range(3))
    P = gaussian_orthogonal_random_matrix(FEATURES, HEAD_DIM, generator=gen).to(device, torch.bfloat16)
    return q, k, v, P, cu


def median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up (compiles the kernels)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused pack runs on CUDA (a CPU runs each sequence alone)")
@pytest.mark.parametrize("case", [dict(causal=True, key_stabilizer="prefix"), dict(causal=False)],
                         ids=["causal-prefix", "noncausal"])
def test_fused_pack_against_one_call_per_sequence(benchmark, timed, case):
    q, k, v, P, cu = pack("cuda")
    bounds = cu.tolist()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def fused():
        out = favor_attention(*leaves, P, cu_seqlens=cu, **case)
        out.float().square().sum().backward()
        return out

    def per_sequence():
        outs = [favor_attention(*(t[:, :, a:b] for t in leaves), P, **case) for a, b in zip(bounds, bounds[1:])]
        out = torch.cat(outs, dim=2)
        out.float().square().sum().backward()
        return out

    a, b = fused().float(), per_sequence().float()
    assert ((a - b).norm() / b.norm()).item() <= 3e-2  # the bf16 budget of the kernel tests
    timed()
    t_fused, t_loop = median_seconds(fused), median_seconds(per_sequence)
    benchmark.group = "packed sequences: fwd+bwd, one fused pack vs one call per sequence"
    benchmark.extra_info.update(fused_ms=t_fused * 1e3, per_sequence_ms=t_loop * 1e3, speedup=t_loop / t_fused,
                                tokens=q.shape[2])
    benchmark.pedantic(fused, rounds=3, iterations=1)
    assert t_fused <= t_loop, benchmark.extra_info  # one launch set: never slower than the loop
