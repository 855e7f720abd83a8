"""Context parallelism: bytes each rank hands to collectives per attention layer (forward and
backward) against the sequence length, and the time split between compute and communication.

    python bench/context_parallel.py                      # 2 gloo ranks on CPU
    python bench/context_parallel.py --world 4 --lengths 2048 8192 32768

Each rank holds length / world positions of a (1, heads, length, dim_head) sequence and runs
context_parallel_attention forward and backward `--repeats` times.  Every collective the library
calls (all_gather, all_reduce, broadcast, batch_isend_irecv) is wrapped to add up the bytes of
the tensors this rank hands it and the wall time spent in it; compute is the rest of the step.
Bytes are the payload a rank contributes (an all-gather's input, an all-reduce's tensor), not the
backend's wire traffic, which depends on its algorithm.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CASES = {
    "causal, prefix stabilizer": dict(causal=True, key_stabilizer="prefix"),
    "causal, global stabilizer": dict(causal=True),
    "non-causal": dict(causal=False),
}


class _Meter:
    def __init__(self) -> None:
        self.bytes = 0
        self.seconds = 0.0

    def wrap(self, fn, payload):
        def wrapped(*args, **kwargs):
            self.bytes += payload(*args, **kwargs)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if isinstance(out, list):  # batch_isend_irecv: the transfer ends at wait()
                for work in out:
                    work.wait()
                out = []
            self.seconds += time.perf_counter() - t0
            return out

        return wrapped


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _install(meter: _Meter) -> None:
    dist.all_gather = meter.wrap(dist.all_gather, lambda parts, t, **kw: _nbytes(t))
    dist.all_reduce = meter.wrap(dist.all_reduce, lambda t, **kw: _nbytes(t))
    dist.broadcast = meter.wrap(dist.broadcast, lambda t, **kw: _nbytes(t))
    dist.batch_isend_irecv = meter.wrap(
        dist.batch_isend_irecv, lambda ops: sum(_nbytes(op.tensor) for op in ops if op.op is dist.isend))


def _worker(rank: int, world: int, init_file: str, args, results) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from performer_triton import gaussian_orthogonal_random_matrix
    from performer_triton.distributed import context_parallel_attention

    meter = _Meter()
    _install(meter)
    P = gaussian_orthogonal_random_matrix(args.features, args.dim_head, generator=torch.Generator().manual_seed(0))
    try:
        for length in args.lengths:
            n = length // world
            g = torch.Generator().manual_seed(rank)
            q, k, v = (torch.randn(1, args.heads, n, args.dim_head, generator=g).requires_grad_() for _ in range(3))
            for name, kw in CASES.items():
                context_parallel_attention(q, k, v, P, **kw).sum().backward()  # warm-up
                meter.bytes, meter.seconds = 0, 0.0
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(args.repeats):
                    context_parallel_attention(q, k, v, P, **kw).sum().backward()
                total = time.perf_counter() - t0
                results[(rank, length, name)] = (meter.bytes / args.repeats, meter.seconds / args.repeats,
                                                 total / args.repeats)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(_worker, args=(args.world, os.path.join(tmp, "init"), args, results), nprocs=args.world, join=True)
        results = dict(results)
    print(f"{args.world} gloo ranks on CPU, heads {args.heads}, dim_head {args.dim_head}, features {args.features}, "
          f"fp32, forward + backward per layer (rank 0; max over ranks for time)\n")
    print("| attention | length | per rank | bytes / rank / layer | step ms | communication ms | compute ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in CASES:
        for length in args.lengths:
            rows = [results[(r, length, name)] for r in range(args.world)]
            sent = rows[0][0]
            step = max(r[2] for r in rows)
            comm = max(r[1] for r in rows)
            print(f"| {name} | {length} | {length // args.world} | {sent:,.0f} | {step * 1e3:.1f} | "
                  f"{comm * 1e3:.1f} | {(step - comm) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
