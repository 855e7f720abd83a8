"""Context parallelism (issue 14): a sequence split over 2 and 4 gloo ranks on CPU, each rank one
contiguous block (unequal, awkward lengths), gives the single-process outputs and gradients."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from performer_triton import favor_attention, gaussian_orthogonal_random_matrix

CASES = {  # name: favor_attention's keywords
    "causal-softmax": dict(causal=True, feature_map="softmax", key_stabilizer="prefix"),
    "causal-relu": dict(causal=True, feature_map="relu"),
    "noncausal-softmax": dict(causal=False, feature_map="softmax"),
    "noncausal-relu": dict(causal=False, feature_map="relu"),
}
BLOCKS = {2: [30, 41], 4: [1, 20, 19, 31]}  # n = 71


def _inputs(n: int):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, x, generator=g, dtype=torch.float64) for x in (12, 12, 7))
    grad = torch.randn(2, 3, n, 7, generator=g, dtype=torch.float64)
    P = gaussian_orthogonal_random_matrix(20, 12, generator=torch.Generator().manual_seed(1)).double()
    return q, k, v, grad, P


def _worker(rank: int, world: int, init_file: str, results) -> None:
    from performer_triton.distributed import context_parallel_attention

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bounds = [0, *torch.tensor(BLOCKS[world]).cumsum(0).tolist()]
        a, b = bounds[rank], bounds[rank + 1]
        q, k, v, grad, P = (t[:, :, a:b] if t.dim() == 4 else t for t in _inputs(bounds[-1]))
        for name, kw in CASES.items():
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = context_parallel_attention(*leaves, P, **kw)
            (out * grad).sum().backward()
            results[(rank, name)] = (out.detach(), *(t.grad for t in leaves))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_equals_one_process(world):
    """Outputs and gradients of q, k, v of every rank's block equal one favor_attention over the
    whole sequence (float64): causal (softmax with the prefix stabilizer, relu) and non-causal
    (softmax with the global key max, relu)."""
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), results), nprocs=world, join=True)
        results = dict(results)
    bounds = [0, *torch.tensor(BLOCKS[world]).cumsum(0).tolist()]
    q, k, v, grad, P = _inputs(bounds[-1])
    for name, kw in CASES.items():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = favor_attention(*leaves, P, **kw)
        (out * grad).sum().backward()
        whole = (out.detach(), *(t.grad for t in leaves))
        for rank in range(world):
            a, b = bounds[rank], bounds[rank + 1]
            for got, want in zip(results[(rank, name)], whole):
                assert torch.allclose(got, want[:, :, a:b], rtol=1e-9, atol=1e-12), (name, rank)


def test_context_parallel_needs_a_process_group():
    from performer_triton.distributed import context_parallel_attention

    q, k, v, _, P = _inputs(5)
    with pytest.raises(ValueError, match="initialized torch.distributed process group"):
        context_parallel_attention(q, k, v, P, causal=True)
