"""Time and peak memory of attention implementations side by side: ours, performer-pytorch 1.1.4,
torch scaled_dot_product_attention (exact; FlashAttention on GPU), and on GPU PyTorch FAVOR+
features + flash-linear-attention's chunked linear attention.  d=64, m=256, fp32 on CPU and bf16
on GPU; forward and forward+backward, causal and non-causal, n from 1k (see conftest SIZES)."""
import pytest
import torch

from performer_triton.cli.benchmark import IMPLS, Case, make_inputs, peak_memory, step, verify


def rounds_for(run, budget_s: float = 3.0) -> int:
    import time

    t0 = time.perf_counter()
    run()
    return max(3, min(20, int(budget_s / max(time.perf_counter() - t0, 1e-6))))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_attention(benchmark, timed, device, impl, causal, backward, seq_len):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    case = Case(n=seq_len, causal=causal, backward=backward, m=256, dtype=dtype, device=device)
    reason = IMPLS[impl].unavailable(case)
    if reason is not None:
        pytest.skip(f"{impl}: {reason}")
    x = make_inputs(case)
    fn = IMPLS[impl].build(case, x)
    err = verify(IMPLS[impl], case, x, fn)
    timed()
    run = step(case, x, fn)
    benchmark.group = case.label
    benchmark.extra_info.update(impl=impl, version=IMPLS[impl].version(), max_rel_err=err,
                                peak_mib=round(peak_memory(run, device) / 2**20, 1))
    benchmark.pedantic(run, rounds=rounds_for(run), warmup_rounds=0, iterations=1)
