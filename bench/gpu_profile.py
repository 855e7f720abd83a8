"""Where the GPU time goes: per-kernel device times of favor_attention at the target shape.

    python bench/gpu_profile.py [--n 8192] [--json FILE]

For each of causal / non-causal x fwd / fwd+bwd (bf16 b=2 h=8 d=e=64 m=256, default arguments):
the wall time per call (triton.testing.do_bench, L2 flushed), the summed device time of each
kernel per call (torch.profiler, 10 calls), and the same for SDPA (flash) and, with --fla, fla's
chunk linear attention on PyTorch features.  Wall time well above the summed kernel time means the
host (Python, dispatch, launches) is the bottleneck.  Needs a CUDA device; gpu_check.sh runs it.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F


def _profile(fn, calls: int = 10) -> dict[str, float]:
    """{kernel name: device microseconds per call}, summed over launches of the same name."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times[ev.name[:60]] += ev.device_time / calls  # device_time: microseconds
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--json", default=None)
    parser.add_argument("--fla", action="store_true", help="also fla's chunk linear attention (its autotuning takes minutes)")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    import triton.testing

    from performer_triton.functional import favor_attention

    torch.manual_seed(0)
    b, h, n, d, m = 2, 8, opts.n, 64, 256
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    proj = torch.randn(m, d, device=dev)
    grad = torch.randn(b, h, n, d, device=dev, dtype=dt)

    def fwd_bwd(f):
        def run():
            out = f()
            out.backward(grad)
        return run

    impls = {
        "ours causal": lambda: favor_attention(q, k, v, proj, causal=True),
        "ours noncausal": lambda: favor_attention(q, k, v, proj, causal=False),
        "sdpa causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    try:
        if not opts.fla:
            raise ImportError("not asked for (--fla)")
        from fla.ops.linear_attn import chunk_linear_attn

        from performer_triton.cli.benchmark import SOFTMAX_FEATURES

        def fla():
            qf, kf = SOFTMAX_FEATURES.features(q, k, proj.to(dt), causal=True)
            out, _ = chunk_linear_attn(qf.transpose(1, 2), kf.transpose(1, 2), v.transpose(1, 2),
                                       scale=1.0, normalize=True)
            return out.transpose(1, 2)
        impls["fla causal"] = fla
    except Exception as exc:  # not installed or not importable here
        print(f"fla unavailable: {type(exc).__name__}: {exc}")
    report = {"shape": dict(b=b, h=h, n=n, d=d, m=m, dtype="bf16"), "device": torch.cuda.get_device_name(),
              "runs": {}}
    for name, f in impls.items():
        for label, fn in ((f"{name} fwd", f), (f"{name} fwd+bwd", fwd_bwd(f))):
            try:
                with torch.no_grad() if label.endswith(" fwd") else torch.enable_grad():
                    ms = triton.testing.do_bench(fn, warmup=50, rep=200)
                    kernels = _profile(fn)
            except Exception as exc:
                print(f"{label}: {type(exc).__name__}: {exc}")
                continue
            total = sum(kernels.values())
            report["runs"][label] = {"ms": ms, "device_us": total, "kernels": kernels}
            print(f"\n{label}: {ms * 1e3:.1f} us per call, kernels {total:.1f} us")
            for kname, us in list(kernels.items())[:14]:
                print(f"  {us:9.1f} us  {kname}")
            sys.stdout.flush()
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
