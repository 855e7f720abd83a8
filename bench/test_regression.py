"""Regression suite: our time as a ratio to a fixed reference workload timed in the same run.

Absolute times on a shared machine move by tens of percent between identical runs (two identical
runs of bench/test_attention.py moved medians by -34% to +5%), so `--benchmark-compare-fail` on
them flags noise.  Each case here times ours and the reference (non-causal FAVOR+ written as plain
torch ops, chunked when causal: performer_triton.cli.benchmark.REFERENCES["linear"]) in interleaved
pairs, on CPU on one thread and by CPU time (as `performer-triton bench --regression` does), and
stores the median per-pair ratio in extra_info.  Compare two saved runs with

    pytest bench/test_regression.py --benchmark-json base.json      # before the change
    pytest bench/test_regression.py --benchmark-json new.json       # after it
    performer-triton bench --compare base.json new.json             # exit 1 if a ratio grew > 10%

`--sizes 2048,4096` picks the lengths (default: REGRESSION_SIZES, by device).
"""
import pytest
import torch

from performer_triton.cli.bench import REGRESSION_THREADS
from performer_triton.cli.benchmark import DEFAULT_PAIRS, IMPLS, Case, make_inputs, measure_ratio, step, verify

REGRESSION_SIZES = {"cpu": (1024,), "cuda": (4096, 16384)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def one_thread_on_cpu():
    threads = torch.get_num_threads()
    if DEVICE == "cpu":
        torch.set_num_threads(REGRESSION_THREADS)
    yield
    torch.set_num_threads(threads)


def pytest_generate_tests(metafunc):
    if "n" in metafunc.fixturenames:
        option = metafunc.config.getoption("--sizes")
        sizes = [int(x) for x in option.split(",")] if option else REGRESSION_SIZES[DEVICE]
        metafunc.parametrize("n", sizes, ids=[f"n{n}" for n in sizes])


# fwd+bwd only, as `performer-triton bench --regression`: the forward alone (~17 ms at n = 1024 on
# CPU) moved its ratio by up to 16% between runs of unchanged code (review R14), past the 10% gate
@pytest.mark.parametrize("backward", [True], ids=["fwd+bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_ratio_to_reference(benchmark, device, timed, causal, backward, n):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    case = Case(n=n, causal=causal, backward=backward, m=256, dtype=dtype, device=device)
    x = make_inputs(case)
    verify(IMPLS["performer_triton"], case, x, IMPLS["performer_triton"].build(case, x))
    timed()  # (--benchmark-disable, xdist: the check above only)
    ratio = measure_ratio(case, pairs=DEFAULT_PAIRS)
    benchmark.group = "regression: ours / reference (compare with performer-triton bench --compare)"
    benchmark.extra_info.update(ratio.as_dict())
    benchmark.pedantic(step(case, x, IMPLS["performer_triton"].build(case, x)), rounds=3, iterations=1)
