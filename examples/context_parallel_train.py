"""Train a small causal PerformerLM with context parallelism: every sequence is split over the
ranks, each rank holding one contiguous block, and no rank ever holds a whole sequence.

    torchrun --nproc_per_node 2 examples/context_parallel_train.py            # CPU, gloo
    torchrun --nproc_per_node 4 examples/context_parallel_train.py --steps 200

On GPUs (one per rank) it uses NCCL. The task: sequences whose second half repeats the first,
whose loss can fall below the uniform level (ln of the vocabulary) only by attending back across
the ranks' blocks; a model this small stays near that level for the first few hundred steps
(as in one process): the example shows the mechanics, whose losses and gradients equal one
process's (tests/test_context_parallel.py).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from performer_triton import PerformerLM
from performer_triton.autoregressive_wrapper import AutoregressiveWrapper


def batch(step: int, size: int, seq_len: int, num_tokens: int) -> torch.Tensor:
    """The same (size, seq_len + 1) batch on every rank: a random half, then the half again."""
    g = torch.Generator().manual_seed(step)
    half = torch.randint(1, num_tokens, (size, (seq_len + 1) // 2 + 1), generator=g)
    return torch.cat([half, half], dim=1)[:, : seq_len + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=1024, help="whole sequence, split over the ranks")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--window", type=int, default=64, help="local attention window of the windowed heads")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial model on every rank
    model = AutoregressiveWrapper(PerformerLM(
        num_tokens=64, max_seq_len=args.seq_len, dim=64, depth=2, heads=4, dim_head=16, causal=True,
        local_attn_heads=1, local_window_size=args.window, key_stabilizer="prefix", redraw_seed=0,
    )).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    # rank r holds positions [r n, (r + 1) n) of the inputs, n a multiple of the window (the
    # windowed heads' blocks line up with the whole sequence's windows); the last rank also holds
    # the final target
    n = args.seq_len // world // args.window * args.window
    if n == 0:
        raise SystemExit(f"--seq-len {args.seq_len} is too short for {world} ranks of whole {args.window}-windows")
    bounds = [r * n for r in range(world)] + [args.seq_len + 1]
    for step in range(args.steps):
        tokens = batch(step, args.batch, args.seq_len, 64)[:, bounds[rank] : bounds[rank + 1]].to(device)
        loss = model(tokens, context_parallel_group=dist.group.WORLD)  # this rank's share of the mean
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():  # the shares' gradients add up to the whole sequence's
            if p.grad is not None:
                dist.all_reduce(p.grad)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {total.item():.4f}  ({world} ranks x {n} positions)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
