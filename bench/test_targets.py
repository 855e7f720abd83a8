"""The performance targets of the issues, each measured side by side with its peer in one run
(interleaved repetitions, medians) after both were checked for correctness.  The ratio is
asserted and stored in the benchmark's extra_info; the regression suite times ours.

CPU targets (b=1 h=8 d=64, fp32): causal fwd+bwd at n=4096 (m=266) >= 5x faster and >= 20x less
peak memory than performer-pytorch 1.1.4; non-causal fwd+bwd not slower (issue 15: >= 1.5x
faster); causal fwd+bwd at n=16384 faster than torch's exact scaled_dot_product_attention.
Efficiency of the PyTorch path (issue 15): minimal FLOPs / time / the rate of a 2048^3 sgemm
timed interleaved with it, fwd+bwd at n = 4096 and 16384: >= 50% causal, >= 60% non-causal.
GPU targets (H100, bf16, b=2 h=8 d=64 m=256): causal fwd+bwd at n=8192 >= 10x faster than
performer-pytorch with fast-transformers, faster than PyTorch features + fla's chunk linear
attention; faster than SDPA (FlashAttention) from n=4096 up; non-causal within 1.5x of the H100
roofline time.
Recorded on GPU, not asserted (for bench/gpu_check.sh): our fwd and fwd+bwd times at the target
shape (n=8192), and the causal fwd+bwd sweep against every peer at n from --sizes (default 1k..64k).
"""
import dataclasses
import statistics
import time

import pytest
import torch

from hardware import favor_flops_and_bytes, h100_roofline_seconds

from performer_triton.cli.benchmark import IMPLS, Case, make_inputs, side_by_side, step, verify

CUDA = torch.cuda.is_available()
needs_cpu = pytest.mark.skipif(CUDA, reason="a CPU target (this machine has CUDA: run on a CPU-only machine)")
needs_gpu = pytest.mark.skipif(not CUDA, reason="a GPU target: needs a CUDA device (H100)")


def compare(benchmark, timed, case: Case, peer: str, *, repeats: int = 3):
    """Ours (checked first) and the peer side by side; ours also through pytest-benchmark.
    -> (ours, peer) Measurements."""
    x = make_inputs(case)
    fn = IMPLS["performer_triton"].build(case, x)
    verify(IMPLS["performer_triton"], case, x, fn)
    timed()
    ours, theirs = side_by_side([IMPLS["performer_triton"], IMPLS[peer]], case, repeats=repeats)
    if theirs.skipped:
        pytest.skip(f"{peer}: {theirs.skipped}")
    benchmark.group = f"target: {case.label}"
    benchmark.extra_info.update(
        peer=peer, peer_version=theirs.version, ours_ms=ours.seconds * 1e3, peer_ms=theirs.seconds * 1e3,
        speedup=theirs.seconds / ours.seconds,
        ours_peak_mib=ours.peak_bytes / 2**20, peer_peak_mib=theirs.peak_bytes / 2**20,
        memory_ratio=theirs.peak_bytes / max(ours.peak_bytes, 1),
    )
    benchmark.pedantic(step(case, x, fn), rounds=repeats, warmup_rounds=1, iterations=1)
    return ours, theirs


@needs_cpu
def test_cpu_causal_vs_performer_pytorch(benchmark, timed):
    ours, theirs = compare(benchmark, timed, Case(n=4096, causal=True, backward=True, m=266), "performer-pytorch")
    assert theirs.seconds / ours.seconds >= 5, benchmark.extra_info
    assert theirs.peak_bytes / ours.peak_bytes >= 20, benchmark.extra_info


@needs_cpu
def test_cpu_noncausal_vs_performer_pytorch(benchmark, timed):
    ours, theirs = compare(benchmark, timed, Case(n=4096, causal=False, backward=True, m=266), "performer-pytorch", repeats=5)
    assert theirs.seconds / ours.seconds >= 1.5, benchmark.extra_info


SGEMM = 2048


@needs_cpu
@pytest.mark.parametrize("n", [4096, 16384])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_cpu_efficiency_of_the_pytorch_path(benchmark, timed, causal, n):
    """Minimal FLOPs of fwd+bwd (hardware.favor_flops_and_bytes) per second of ours, over the
    FLOP rate of a 2048^3 fp32 matmul timed in alternation with it (medians of 5 each)."""
    case = Case(n=n, causal=causal, backward=True, m=266)
    x = make_inputs(case)
    fn = IMPLS["performer_triton"].build(case, x)
    verify(IMPLS["performer_triton"], case, x, fn)
    timed()
    run = step(case, x, fn)
    a = torch.randn(SGEMM, SGEMM)
    run()
    a @ a
    ours, gemm = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        run()
        t1 = time.perf_counter()
        a @ a
        ours.append(t1 - t0)
        gemm.append(time.perf_counter() - t1)
    flops = favor_flops_and_bytes(case)[0]
    seconds, rate = statistics.median(ours), 2 * SGEMM**3 / statistics.median(gemm)
    efficiency = flops / seconds / rate
    benchmark.group = f"target: {case.label}"
    benchmark.extra_info.update(ours_ms=seconds * 1e3, gflops=flops / seconds / 1e9, sgemm_gflops=rate / 1e9,
                                efficiency=efficiency, threads=torch.get_num_threads())
    benchmark.pedantic(run, rounds=2, warmup_rounds=0, iterations=1)
    assert efficiency >= (0.5 if causal else 0.6), benchmark.extra_info


@needs_cpu
def test_cpu_causal_16k_vs_sdpa(benchmark, timed):
    ours, theirs = compare(benchmark, timed, Case(n=16384, causal=True, backward=True, m=266), "torch-sdpa", repeats=2)
    assert ours.seconds < theirs.seconds, benchmark.extra_info


GPU = dict(b=2, h=8, d=64, m=256, dtype=torch.bfloat16, device="cuda")


@needs_gpu
def test_gpu_causal_vs_performer_pytorch(benchmark, timed):
    ours, theirs = compare(benchmark, timed, Case(n=8192, causal=True, backward=True, **GPU), "performer-pytorch")
    assert theirs.seconds / ours.seconds >= 10, benchmark.extra_info


@needs_gpu
def test_gpu_causal_vs_fla(benchmark, timed):
    ours, theirs = compare(benchmark, timed, Case(n=8192, causal=True, backward=True, **GPU), "fla-chunk", repeats=10)
    assert ours.seconds < theirs.seconds, benchmark.extra_info


@needs_gpu
@pytest.mark.parametrize("n", [4096, 8192, 16384, 32768, 65536])
def test_gpu_causal_vs_flash_attention(benchmark, timed, n):
    ours, theirs = compare(benchmark, timed, Case(n=n, causal=True, backward=True, **GPU), "torch-sdpa", repeats=10)
    assert ours.seconds < theirs.seconds, benchmark.extra_info


@needs_gpu
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_gpu_noncausal_roofline(benchmark, timed, backward):
    case = Case(n=8192, causal=False, backward=backward, **GPU)
    x = make_inputs(case)
    fn = IMPLS["performer_triton"].build(case, x)
    verify(IMPLS["performer_triton"], case, x, fn)
    timed()
    import triton.testing

    seconds = triton.testing.do_bench(step(case, x, fn), return_mode="median") / 1e3
    roof = h100_roofline_seconds(case)
    benchmark.group = f"target: {case.label}"
    benchmark.extra_info.update(ours_ms=seconds * 1e3, roofline_ms=roof * 1e3, ratio=seconds / roof)
    benchmark.pedantic(step(case, x, fn), rounds=10, warmup_rounds=2, iterations=1)
    device = torch.cuda.get_device_name()
    if "H100" not in device:  # (the roofline is H100 SXM's HBM and tensor-core rate)
        pytest.skip(f"the 1.5x-roofline target is an H100 figure; on {device} the time is recorded only")
    assert seconds <= 1.5 * roof, benchmark.extra_info


# ----------------------------------------------------------------------------- GPU times and sweep
# Recorded for bench/gpu_check.sh, not asserted (the targets above are the assertions): our own
# times at the target shape, next to the compile report's estimates in its summary, and the causal
# fwd+bwd of each peer side by side at every n of --sizes (default on CUDA: 1k..64k).


def _unsynced(case: Case, x, fn):
    """step() without its synchronize (it synchronizes for device "cuda" only):
    triton.testing.do_bench times with CUDA events and queues calls back to back, so host launch
    time shows only where it exceeds the GPU's."""
    return step(dataclasses.replace(case, device="unsynchronized"), x, fn)


@needs_gpu
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gpu_times_at_target_shape(benchmark, timed, causal, backward):
    import triton.testing

    case = Case(n=8192, causal=causal, backward=backward, **GPU)
    x = make_inputs(case)
    fn = IMPLS["performer_triton"].build(case, x)
    verify(IMPLS["performer_triton"], case, x, fn)
    timed()
    median, p20, p80 = triton.testing.do_bench(_unsynced(case, x, fn), quantiles=[0.5, 0.2, 0.8])
    benchmark.group = f"target shape: {case.label}"
    benchmark.extra_info.update(call=f"{'causal' if causal else 'noncausal'}_{'fwd+bwd' if backward else 'fwd'}",
                                ours_us=median * 1e3, ours_us_p20=p20 * 1e3, ours_us_p80=p80 * 1e3,
                                roofline_us=h100_roofline_seconds(case) * 1e6)
    benchmark.pedantic(step(case, x, fn), rounds=10, warmup_rounds=2, iterations=1)


SWEEP_PEERS = ["torch-sdpa", "fla-chunk", "performer-pytorch"]


@needs_gpu
@pytest.mark.parametrize("peer", SWEEP_PEERS)
def test_gpu_sweep(benchmark, timed, seq_len, peer):
    compare(benchmark, timed, Case(n=seq_len, causal=True, backward=True, **GPU), peer, repeats=5)
    benchmark.extra_info.update(n=seq_len)
