"""Data-parallel redraws: replicas under DistributedDataParallel (gloo, CPU, two processes with
different global RNG seeds): with redraw_seed they keep identical projection matrices and
parameters across redraws; by default they redraw as 1.1.4 and DDP's broadcast reunites them."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from performer_triton.fast_attention import FastAttention
from performer_triton.performer_pytorch import PerformerLM

STEPS, INTERVAL = 6, 2  # redraws after steps 3 and 6 (period interval + 1)


def _worker(rank: int, world: int, init_file: str, broadcast_buffers: bool, redraw_seed, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # with broadcast_buffers DDP copies rank 0's buffers (projections, redraw seed) at start;
        # without it the replicas must start alike, from the same seed
        torch.manual_seed(100 + rank if broadcast_buffers else 0)
        model = PerformerLM(num_tokens=32, max_seq_len=16, dim=32, depth=2, heads=2, dim_head=16, causal=True,
                            nb_features=20, feature_redraw_interval=INTERVAL, key_stabilizer="prefix",
                            redraw_seed=redraw_seed)
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast_buffers)
        torch.manual_seed(100 + rank)  # from here on each replica's global RNG differs, as in real jobs
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        tokens = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(5))  # same batch everywhere
        losses, projections = [], []
        for _ in range(STEPS):
            logits = ddp(tokens)
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            projections.append(torch.cat([m.projection_matrix.flatten() for m in model.modules() if isinstance(m, FastAttention)]))
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        results[rank] = (losses, torch.stack(projections), params)
    finally:
        dist.destroy_process_group()


def _run(broadcast_buffers: bool, redraw_seed):
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, broadcast_buffers, redraw_seed, results), nprocs=2, join=True)
        return results[0], results[1]


@pytest.mark.parametrize("broadcast_buffers", [True, False], ids=["broadcast", "no-broadcast"])
def test_ddp_replicas_redraw_identical_projections_with_redraw_seed(broadcast_buffers):
    """Opt-in redraw_seed: the loss of every step (same batch on both ranks) is equal across
    ranks only if both used the same projections in that step's forward, the redrawing steps
    included, with or without DDP's buffer broadcast."""
    (loss0, proj0, params0), (loss1, proj1, params1) = _run(broadcast_buffers, 7)
    assert loss0 == loss1
    assert torch.equal(proj0, proj1) and torch.equal(params0, params1)
    changed = [not torch.equal(proj0[i], proj0[i - 1]) for i in range(1, STEPS)]
    assert changed == [False, True, False, False, True]  # redrawn in the forward of steps 3 and 6


def test_ddp_default_redraws_are_per_rank_then_broadcast():
    """Default (1.1.4): each rank redraws from its own global RNG inside the redrawing step, so
    that step's projections differ; DDP's broadcast at the next forward makes them equal again."""
    (loss0, proj0, _), (loss1, proj1, _) = _run(True, None)
    redraw_steps = {2, 5}  # steps 3 and 6
    for i in range(STEPS):
        assert torch.equal(proj0[i], proj1[i]) == (i not in redraw_steps), i
        assert (loss0[i] == loss1[i]) == (i not in redraw_steps), i


def _fsdp_worker(rank: int, world: int, init_file: str, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial model on every rank, as FSDP2 expects
        model = PerformerLM(num_tokens=32, max_seq_len=16, dim=32, depth=2, heads=2, dim_head=16, causal=True,
                            nb_features=20, feature_redraw_interval=INTERVAL, redraw_seed=7)
        mesh = init_device_mesh("cpu", (world,))
        for attn_ff in model.performer.net.layers:
            for block in attn_ff:
                fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        torch.manual_seed(100 + rank)  # each rank's global RNG differs from here on
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        tokens = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(5 + rank))  # per-rank data
        losses, projections = [], []
        for _ in range(STEPS):
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            projections.append(torch.cat([m.projection_matrix.flatten() for m in model.modules()
                                          if isinstance(m, FastAttention)]))
        results[rank] = (losses, torch.stack(projections))
    finally:
        dist.destroy_process_group()


def test_fsdp2_trains_with_identical_projections():
    """FSDP2 (fully_shard per attention and feed-forward block and at the root, gloo on CPU, a different batch and global
    RNG per rank): training runs (the loss falls) and with redraw_seed every rank holds the same
    projection buffers at every step, through the redraws of steps 3 and 6."""
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(_fsdp_worker, args=(2, os.path.join(tmp, "init"), results), nprocs=2, join=True)
        (loss0, proj0), (loss1, proj1) = results[0], results[1]
    assert torch.equal(proj0, proj1)
    changed = [not torch.equal(proj0[i], proj0[i - 1]) for i in range(1, STEPS)]
    assert changed == [False, True, False, False, True]
    assert loss0[-1] < loss0[0] and loss1[-1] < loss1[0]
