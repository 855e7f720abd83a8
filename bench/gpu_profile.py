"""Where the GPU time goes: per-kernel device times of favor_attention at the target shape.

    python bench/gpu_profile.py [--n 8192] [--json FILE]

For each of causal / non-causal x fwd / fwd+bwd (bf16 b=2 h=8 d=e=64 m=256, default arguments):
the wall time per call (triton.testing.do_bench, L2 flushed), the summed device time of each
kernel per call (torch.profiler, 10 calls), the host time per call (30 calls queued without
synchronising), and the same for SDPA (flash) and, with --fla, fla's chunk linear attention on
PyTorch features.  Wall time well above the summed kernel time means the host (Python, dispatch,
launches) is the bottleneck.

--variants: instead, the same fwd+bwd calls of ours with one launch-configuration key overridden at a
time (VARIANTS: m tiles, warps, stages of the launchers' _config), each checked against the
default configuration's output and gradients, for the per-kernel times of each: the next GPU
session's tuning table in one run.  Bench-only: the launchers' _config is wrapped here, nothing
in the library reads an override.  Needs a CUDA device; gpu_check.sh runs it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
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


# one override of the launchers' _config per variant (keys a module's config lacks are ignored)
VARIANTS = [
    # first the structural questions (the stage has ~2 minutes; results are saved after each):
    # the non-causal split walks as one-step programs (one block per split: 16x the programs,
    # 134 MB of fp32 partials at the target shape): whether a feature step in a program of its own
    # costs what a walk's step costs, the question kernels/NOTES.md "Non-causal floor" leaves open
    {"split_blocks": 1, "max_splits": 1 << 20, "split_programs": 1 << 30},
    # 64-row causal chunks for bf16 heads up to 64 (their default is 128 since kernels/NOTES.md
    # "Thirteenth pass": twice the states and scan steps, 4 warps): what the 128-row chunks gain
    {"BT": 64, "num_warps_out": 4, "num_warps_bwd": 4},
    # the non-causal split walks at m tiles of 32 (their default is 64 for 16-bit heads up to 64):
    # twice the steps at 3-4 CTAs per SM instead of 2 (kernels/NOTES.md "Non-causal floor")
    {"BM": 32},
    # then tiles, warps and stages
    {"BM_out": 64}, {"num_warps": 8, "num_warps_out": 8}, {"BM": 64}, {"num_stages": 2}, {"BM_bwd": 32}, {"BM_out": 16},
    {"BM": 16}, {"BM_dstate": 16}, {"num_warps_bwd": 8}, {"num_stages": 4},
]


def _host_us(fn, calls: int = 30) -> float:
    """Host microseconds per call with the calls queued (no synchronisation between them)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


def _variants(calls: dict, grads_of, on_result=lambda results: None) -> dict:
    """{variant: {call: {"kernels_us", "kernels", "rel_err"} or {"error"}}} for VARIANTS; calls:
    {name: forward fn}, grads_of(fn) -> [out, dq, dk, dv] of one fwd+bwd (what is profiled)."""
    import performer_triton.kernels.causal as C
    import performer_triton.kernels.noncausal as NC

    originals = {C: C._config, NC: NC._config}
    reference = {name: grads_of(fn) for name, fn in calls.items()}
    results = {}
    for override in VARIANTS:
        label = " ".join(f"{k}={v}" for k, v in override.items())
        for module, original in originals.items():
            def patched(*args, _original=original, **kwargs):
                cfg = dict(_original(*args, **kwargs))
                cfg.update({k: v for k, v in override.items() if k in cfg})
                return cfg
            module._config = patched
        try:
            for name, fn in calls.items():
                try:
                    got = grads_of(fn)
                    err = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                              for a, b in zip(got, reference[name]))
                    kernels = _profile(lambda fn=fn: grads_of(fn))
                    results.setdefault(label, {})[name] = {"kernels_us": sum(kernels.values()), "kernels": kernels,
                                                           "rel_err": err}
                    print(f"{label:>16}  {name}: kernels {sum(kernels.values()):8.1f} us, rel err vs default "
                          f"{err:.1e}; " + ", ".join(f"{k[:24]} {us:.0f}" for k, us in list(kernels.items())[:5]))
                except Exception as exc:  # a variant that does not compile or fit
                    results.setdefault(label, {})[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                    print(f"{label:>16}  {name}: {type(exc).__name__}: {str(exc)[:200]}")
                sys.stdout.flush()
            on_result(results)
        finally:
            for module, original in originals.items():
                module._config = original
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--json", default=None)
    parser.add_argument("--fla", action="store_true",
                        help="also fla's chunk linear attention (its autotuning takes minutes)")
    parser.add_argument("--variants", action="store_true", help="instead: ours under each VARIANTS override")
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
            for t in (q, k, v):  # no gradient accumulation kernels in the profile
                t.grad = None
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
    for name, f in ({} if opts.variants else impls).items():  # --variants: only those
        for label, fn in ((f"{name} fwd", f), (f"{name} fwd+bwd", fwd_bwd(f))):
            try:
                with torch.no_grad() if label.endswith(" fwd") else torch.enable_grad():
                    ms = triton.testing.do_bench(fn, warmup=50, rep=200)
                    kernels = _profile(fn)
                    host = _host_us(fn)
            except Exception as exc:
                print(f"{label}: {type(exc).__name__}: {exc}")
                continue
            total = sum(kernels.values())
            report["runs"][label] = {"ms": ms, "device_us": total, "host_us": host, "kernels": kernels}
            print(f"\n{label}: {ms * 1e3:.1f} us per call, kernels {total:.1f} us, host {host:.1f} us")
            for kname, us in list(kernels.items())[:14]:
                print(f"  {us:9.1f} us  {kname}")
            sys.stdout.flush()
    if opts.json:  # written before the variants too: what a cut-off run measured stays
        with open(opts.json, "w") as fh:
            json.dump(report, fh, indent=1)
    if opts.variants:
        def grads_of(fn):
            for t in (q, k, v):
                t.grad = None
            out = fn()
            out.backward(grad)
            return [out.detach(), *(t.grad for t in (q, k, v))]

        def save(results):  # after every variant: a run cut off by its time limit keeps what it measured
            report["variants"] = results
            if opts.json:
                with open(opts.json, "w") as fh:
                    json.dump(report, fh, indent=1)

        _variants({"causal fwd+bwd": impls["ours causal"], "noncausal fwd+bwd": impls["ours noncausal"]},
                  grads_of, save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
