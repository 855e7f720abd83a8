"""Host time of one fused call, without a GPU: Python, autograd and argument building of a causal
and a non-causal fwd+bwd with every Triton launch intercepted (nothing runs on a device), through
the public entry point (eager: ops._Eager) against the torch.library custom op it bypasses,
side by side in one run.  The first H200 run (bench/RESULTS.md) was host-bound: 2.3 ms of host
time per causal fwd+bwd against 1.55 ms of kernels.  A real launch adds Triton's own cost to both
sides; test_host_time_of_launches measures it on a driver that compiles for sm_90a and launches
nothing (bench/host_driver.py): the launches as the launchers make them (kernels.feature_map.launch)
against Triton's launch on every call and against no launch at all.

    pytest bench/test_host_overhead.py
"""
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":  # (tests/conftest.py sets it: run bench/ on its own)
    pytest.skip("TRITON_INTERPRET=1: the launches this suite intercepts would run in Triton's interpreter "
                "(host times of nothing real, for minutes); run it without TRITON_INTERPRET", allow_module_level=True)

from performer_triton import ops  # noqa: E402
from performer_triton.kernels import SOFTMAX, feature_map  # noqa: E402

ROUNDS, CALLS = 7, 50


def _host_us(fn) -> float:
    """Median over ROUNDS of the mean host microseconds of CALLS calls."""
    for _ in range(10):
        fn()
    rounds = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(CALLS):
            fn()
        rounds.append((time.perf_counter() - t0) / CALLS * 1e6)
    return statistics.median(rounds)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_host_time_eager_vs_custom_op(benchmark, monkeypatch, timed, causal):
    monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", lambda self, *args, **kwargs: None)
    gen = torch.Generator().manual_seed(0)
    # the target shape's head dims; a short sequence: host time does not depend on n
    q, k, v = (torch.randn(2, 8, 64, 64, generator=gen, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    P, grad = torch.randn(256, 64, generator=gen, dtype=torch.bfloat16), torch.randn(2, 8, 64, 64, generator=gen)

    def call(fn):
        def run():
            out = fn(q, k, v, P, causal, SOFTMAX, False, True)[0]
            out.backward(grad.to(out.dtype))
            q.grad = k.grad = v.grad = None
        return run

    eager, op = call(ops.favor), call(ops.favor_fwd)
    timed()  # (nothing to check first: every launch is intercepted, no kernel runs)
    pairs = [(_host_us(eager), _host_us(op)) for _ in range(3)]  # interleaved: shared-machine drift hits both
    eager_us = statistics.median(p[0] for p in pairs)
    op_us = statistics.median(p[1] for p in pairs)
    benchmark.extra_info.update(eager_us=eager_us, custom_op_us=op_us, speedup=op_us / eager_us)
    benchmark.pedantic(eager, rounds=20, iterations=CALLS)
    print(f"\nhost us per {'causal' if causal else 'non-causal'} fwd+bwd: eager {eager_us:.0f}, "
          f"custom op {op_us:.0f} ({op_us / eager_us:.2f}x)")


class _NeverCached(dict):
    """feature_map's launch cache that never hits: every launch through JITFunction.run."""

    def get(self, key, default=None):
        return None

    def __setitem__(self, key, value):
        pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="bench/host_driver.py compiles as device 0: no real GPU")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_host_time_of_launches(benchmark, monkeypatch, timed, causal):
    sys.path.insert(0, str(Path(__file__).parent))
    from host_driver import use_host_driver

    host = use_host_driver()
    monkeypatch.setattr(feature_map, "_LAUNCHED", {})  # this test's compiles stay in this test
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 64, 64, generator=gen, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    P, grad = torch.randn(256, 64, generator=gen, dtype=torch.bfloat16), torch.randn(2, 8, 64, 64, generator=gen)

    def run():
        out = ops.favor(q, k, v, P, causal, SOFTMAX, False, True)[0]
        out.backward(grad.to(out.dtype))
        q.grad = k.grad = v.grad = None

    timed()  # (nothing to check: the host driver's launches run no kernel)
    run()  # compiles (sm_90a)
    launches = host.launches
    run()
    launches = host.launches - launches
    cache, real_run = feature_map._LAUNCHED, triton.runtime.jit.JITFunction.run

    def timed(mode: str) -> float:
        monkeypatch.setattr(feature_map, "_LAUNCHED", cache if mode == "ours" else _NeverCached())
        if mode == "none":
            monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", lambda self, *args, **kwargs: None)
        try:
            return _host_us(run)
        finally:
            monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", real_run)

    rounds = [{mode: timed(mode) for mode in ("ours", "triton", "none")} for _ in range(3)]
    us = {mode: statistics.median(r[mode] for r in rounds) for mode in rounds[0]}
    benchmark.extra_info.update(launches=launches, **{f"{mode}_us": t for mode, t in us.items()})
    monkeypatch.setattr(feature_map, "_LAUNCHED", cache)
    benchmark.pedantic(run, rounds=20, iterations=CALLS)
    print(f"\nhost us per {'causal' if causal else 'non-causal'} fwd+bwd, {launches} launches: "
          f"ours {us['ours']:.0f}, Triton's launch each call {us['triton']:.0f}, no launch {us['none']:.0f} "
          f"(per launch: ours {(us['ours'] - us['none']) / launches:.1f}, "
          f"Triton {(us['triton'] - us['none']) / launches:.1f})")
