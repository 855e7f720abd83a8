"""Where the PyTorch path's time goes (issue 15): causal and non-causal fwd+bwd on the CPU,
grouped by operation kind from torch.profiler's self CPU times.

    python bench/profile_cpu.py                 # b=1 h=8 n=4096 d=64 m=266 fp32 (issue 15's shape)
    python bench/profile_cpu.py --n 16384 --threads 2

Groups: matmuls (mm, bmm, baddbmm, addmm, matmul), exponentials (exp), other elementwise,
reductions and scans (amax, sum, cumsum, cummax, ...), copies and casts (cat, clone, copy_, to,
contiguous, flip), allocation (empty, zeros, full, ...) and the rest; "outside ops" is wall time
minus the ops' self time (Python, dispatch, autograd bookkeeping).  Minimal FLOPs as the
benchmarks count them (bench/test_attention.py): forward 2 m (2 d + 2 e) per row and head, the
backward twice that.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from performer_triton import favor_attention, gaussian_orthogonal_random_matrix

GROUPS = {
    "matmuls": ("mm", "bmm", "baddbmm", "addmm", "matmul", "addbmm", "linear"),
    "exponentials": ("exp", "exp_"),
    "reductions and scans": ("amax", "max", "sum", "cumsum", "cummax", "mean", "norm", "logsumexp"),
    "copies and casts": ("cat", "clone", "copy_", "to", "_to_copy", "contiguous", "flip", "stack", "index", "slice"),
    "allocation": ("empty", "empty_like", "zeros", "zeros_like", "full", "new_zeros", "new_full", "new_empty",
                   "ones", "ones_like", "empty_strided", "fill_", "zero_"),
}


def group_of(name: str) -> str:
    op = name.split("::")[-1]
    for group, ops in GROUPS.items():
        if op in ops:
            return group
    if op in ("mul", "mul_", "add", "add_", "sub", "sub_", "div", "div_", "where", "masked_fill", "masked_fill_",
              "addcmul", "addcmul_", "square", "clamp_min", "clamp_min_", "maximum", "reciprocal", "neg", "eq",
              "ne", "gt", "lt", "ge", "le", "rsub", "pow", "triu", "triu_", "sqrt"):
        return "other elementwise"
    return "other"


def profile(causal: bool, b: int, h: int, n: int, d: int, m: int, repeats: int) -> tuple[dict, float, float]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).requires_grad_() for _ in range(3))
    P = gaussian_orthogonal_random_matrix(m, d, generator=gen)
    kw = dict(causal=causal, key_stabilizer="prefix" if causal else "global", backend="torch")

    def step():
        out = favor_attention(q, k, v, P, **kw)
        out.sum().backward()

    step()  # warm-up
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    wall = (time.perf_counter() - t0) / repeats
    groups: dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            groups[group_of(event.key)] += event.self_cpu_time_total / 1e6 / repeats
    flops = 3 * b * h * n * 2 * m * (2 * d + 2 * d)
    return dict(groups), wall, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--nb-features", type=int, default=266)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    a = torch.randn(2048, 2048)
    a @ a
    t0 = time.perf_counter()
    for _ in range(3):
        a @ a
    gemm = 3 * 2 * 2048**3 / (time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 2048^3 sgemm: {gemm / 1e9:.0f} GFLOP/s")
    print(f"b=1 h={args.heads} n={args.n} d=e={args.dim_head} m={args.nb_features} fp32, fwd+bwd, median of "
          f"{args.repeats}\n")
    print("| group | causal ms | causal % | non-causal ms | non-causal % |")
    print("|---|---|---|---|---|")
    results = {}
    for causal in (True, False):
        results[causal] = profile(causal, 1, args.heads, args.n, args.dim_head, args.nb_features, args.repeats)
    names = list(GROUPS) + ["other elementwise", "other"]
    for name in names + ["outside ops"]:
        cells = []
        for causal in (True, False):
            groups, wall, _ = results[causal]
            ms = (wall - sum(groups.values())) if name == "outside ops" else groups.get(name, 0.0)
            cells.append(f"{ms * 1e3:.1f} | {100 * ms / wall:.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    for causal in (True, False):
        _, wall, flops = results[causal]
        print(f"\n{'causal' if causal else 'non-causal'}: {wall * 1e3:.0f} ms, {flops / wall / 1e9:.1f} GFLOP/s = "
              f"{100 * flops / wall / gemm:.0f}% of the sgemm rate")


if __name__ == "__main__":
    main()
