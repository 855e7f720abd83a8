"""Context parallelism (issue 14): a sequence split over 2 and 4 gloo ranks on CPU, each rank one
contiguous block (unequal, awkward lengths), gives the single-process outputs and gradients."""
import contextlib
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from performer_triton import PerformerLM, favor_attention, gaussian_orthogonal_random_matrix

CASES = {  # name: favor_attention's keywords
    "causal-softmax": dict(causal=True, feature_map="softmax", key_stabilizer="prefix"),
    "causal-softmax-global": dict(causal=True, feature_map="softmax"),  # 1.1.4's stabilizer
    "causal-relu": dict(causal=True, feature_map="relu"),
    "causal-softplus": dict(causal=True, feature_map=torch.nn.functional.softplus),  # features in PyTorch
    "noncausal-softmax": dict(causal=False, feature_map="softmax"),
    "noncausal-relu": dict(causal=False, feature_map="relu"),
    "noncausal-softplus": dict(causal=False, feature_map=torch.nn.functional.softplus),
}
BLOCKS = {2: [30, 41], 4: [1, 0, 39, 31]}  # n = 71; a rank with an empty block still takes part


def rel(a, b):
    if b.numel() == 0:  # an empty block
        return 0.0 if a.shape == b.shape else float("inf")
    return ((a - b).norm() / b.norm()).item()


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
    whole sequence (float64): causal (softmax with the prefix and the global stabilizer, relu, a
    kernel_fn) and non-causal (softmax with the global key max, relu, a kernel_fn)."""
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


# Models: one training step of the whole sequence, and of its blocks over the ranks

# every block before the last non-empty one a multiple of 8 (the windows); 4 ranks: the last rank's
# block is empty, and the decoder's input block of the one before holds one token less; 3 ranks:
# the whole sequence on the middle one (empty blocks at both ends, which pass on no rows)
MODEL_BLOCKS = {2: [24, 29], 3: [0, 53, 0], 4: [8, 16, 25, 0]}
SMALL = dict(num_tokens=20, max_seq_len=64, dim=16, depth=2, heads=2, dim_head=8, nb_features=12)
MODELS = {  # name: PerformerLM keywords (or PerformerEncDec's, "encdec")
    # 1.1.4's defaults: causal global stabilizer, rotary positions; a windowed head, token shifts
    "lm-causal-rotary-local-shift": dict(causal=True, local_attn_heads=1, local_window_size=8, shift_tokens=True),
    # non-causal relu features, absolute positions, a windowed head looking both ways, padded keys
    "lm-noncausal-absolute-local-mask": dict(causal=False, local_attn_heads=1, local_window_size=8,
                                             generalized_attention=True, rotary_position_emb=False,
                                             shift_tokens=True),
    # leak-free causal softmax, axial positions, reversible layers
    "lm-causal-axial-prefix-reversible": dict(causal=True, key_stabilizer="prefix", rotary_position_emb=False,
                                              axial_position_emb=True, axial_position_shape=(8, 8), reversible=True),
    # the bare Performer on embeddings (no positions), windowed heads
    "performer": dict(dim=16, depth=1, heads=2, dim_head=8, nb_features=12, causal=True, local_attn_heads=1,
                      local_window_size=8),
    "encdec": dict(enc_num_tokens=20, enc_depth=1, enc_heads=2, enc_max_seq_len=64, enc_local_attn_heads=1,
                   enc_local_window_size=8, dec_num_tokens=20, dec_depth=2, dec_heads=2, dec_max_seq_len=64,
                   dec_local_attn_heads=(1, 0), dec_local_window_size=8),
}


def _model(name: str):
    from performer_triton import Performer, PerformerEncDec, PerformerLM

    torch.manual_seed(0)
    kw = MODELS[name]
    if name == "performer":
        return Performer(**kw).double()
    if name == "encdec":
        return PerformerEncDec(dim=16, enc_dim_head=8, dec_dim_head=8, enc_nb_features=12, dec_nb_features=12,
                               **kw).double()
    return PerformerLM(**SMALL, **kw).double()


def _batch(n: int):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 20, (2, n), generator=g)
    other = torch.randint(0, 20, (2, n), generator=g)
    weights = torch.randn(2, n, 20, generator=g, dtype=torch.float64)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, n - 9:] = False  # right padding
    mask[0, 3] = False
    return tokens, other, weights, mask


def _step(model, name: str, tokens, other, weights, mask, group=None):
    """One SGD step; -> (loss, gradients, parameters after the step), this rank's share of the loss."""
    kw = {} if group is None else dict(context_parallel_group=group)
    if name == "encdec":
        loss = model(tokens, other, enc_mask=mask, **kw)
    elif name == "performer":
        embeddings = torch.randn(20, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        loss = (model(embeddings[tokens], **kw) * weights[..., :16]).sum()
    else:
        loss = (model(tokens, mask=mask if "mask" in name else None, **kw) * weights).sum()
    loss.backward()
    for p in model.parameters():  # (the encoder's logits layer is not used)
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
    if group is not None:  # the ranks' gradients add up to the whole sequence's
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group)
        loss = loss.detach().clone()
        dist.all_reduce(loss, group=group)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return loss.detach(), grads, torch.cat([p.detach().flatten() for p in model.parameters()])


def _model_worker(rank: int, world: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bounds = [0, *torch.tensor(MODEL_BLOCKS[world]).cumsum(0).tolist()]
        a, b = bounds[rank], bounds[rank + 1]
        tokens, other, weights, mask = (t[:, a:b] for t in _batch(bounds[-1]))
        for name in MODELS:
            model = _model(name)
            if rank:  # ranks whose random streams drew other projections: forward uses rank 0's
                torch.manual_seed(rank)
                for m in model.modules():
                    if hasattr(m, "redraw_projection_matrix"):
                        m.redraw_projection_matrix()
            results[(rank, name)] = _step(model, name, tokens, other, weights, mask, group=dist.group.WORLD)
        results[(rank, "usage")] = _usage(tokens, mask if rank else None, group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _usage(tokens, mask, group=None):
    """How programs call a model: a mask on some ranks only (None = all kept), two forwards
    before one backward (the projections broadcast must not bump their version), bf16 autocast.
    -> (logits, autocast logits)."""
    torch.manual_seed(0)
    model = PerformerLM(**SMALL, causal=True, local_attn_heads=1, local_window_size=8, shift_tokens=True).double()
    kw = {} if group is None else dict(context_parallel_group=group)
    logits = model(tokens, mask=mask, **kw)
    (logits.sum() + model(tokens, **kw).sum()).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.float()(tokens, **kw)
    return logits.detach(), low.detach().float()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_models_train_the_same_over_ranks(world):
    """A training step of PerformerLM (causal with 1.1.4's defaults, windowed heads and token
    shifts; non-causal relu with absolute positions and a padding mask; leak-free causal with
    axial positions, reversible), a bare Performer and PerformerEncDec, each sequence split over
    the ranks: the
    summed loss, the all-reduced gradients and the parameters after the step equal one process's
    over the whole sequence (float64)."""
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(_model_worker, args=(world, os.path.join(tmp, "init"), results), nprocs=world, join=True)
        results = dict(results)
    batch = _batch(sum(MODEL_BLOCKS[world]))
    tokens, mask = batch[0], batch[3].clone()
    mask[:, : MODEL_BLOCKS[world][0]] = True  # rank 0 passed no mask
    logits, low = _usage(tokens, mask)
    bounds = [0, *torch.tensor(MODEL_BLOCKS[world]).cumsum(0).tolist()]
    for rank in range(world):
        got, got_low = results[(rank, "usage")]
        sl = slice(bounds[rank], bounds[rank + 1])
        assert torch.allclose(got, logits[:, sl], rtol=1e-9, atol=1e-11), rank
        assert rel(got_low, low[:, sl].float()) < 2e-2, rank  # bf16
    for name in MODELS:
        whole = _step(_model(name), name, *batch)
        for rank in range(world):
            for what, got, want in zip(("loss", "grads", "params"), results[(rank, name)], whole):
                assert torch.allclose(got, want, rtol=1e-9, atol=1e-11), (name, rank, what, (got - want).abs().max())


def test_model_context_parallel_refusals(monkeypatch):
    """What the models cannot split is refused with a clear error, on every rank alike (the
    block lengths are known to all): windowed heads whose blocks do not line up with the
    windows, neighbouring rows a block cannot pass on, cached decoding."""
    from performer_triton import PerformerLM
    from performer_triton.distributed import ContextParallel
    from performer_triton.performer_pytorch import SelfAttention

    attn = SelfAttention(16, causal=True, heads=2, dim_head=8, local_heads=2, local_window_size=8)
    cp = ContextParallel(None, 0, (12, 8))  # 12 is not a multiple of the window
    with pytest.raises(ValueError, match=r"multiple of local_window_size=8.*\[12, 8\]"):
        attn(torch.randn(1, 12, 16), context_parallel=cp)
    from performer_triton.distributed import with_neighbours

    with pytest.raises(ValueError, match=r"block lengths \[3, 0, 4\]"):  # the middle block cannot pass row 2 on
        with_neighbours(torch.randn(1, 1, 3, 2), ContextParallel(None, 2, (3, 0, 4)), before=1)
    lm = PerformerLM(**SMALL, causal=True)
    from performer_triton.decoding import DecodingCache

    import performer_triton.performer_pytorch as ours_pp

    with pytest.raises(ValueError, match="not with context parallelism"):  # (a layer given both)
        SelfAttention(16, causal=True, heads=2, dim_head=8)(torch.randn(1, 4, 16), cache=DecodingCache(),
                                                            context_parallel=cp)
    # a value that is no ProcessGroup is ignored as 1.1.4 ignores the keyword (warned): a stand-in
    # group taken as one here reaches the model's own refusal
    from performer_triton import validation

    validation._WARNED.clear()
    with pytest.warns(UserWarning, match="'context_parallel_group' is ignored"):
        lm(torch.zeros(1, 4, dtype=torch.long), context_parallel_group=object())
    monkeypatch.setattr(ours_pp, "group_arg", lambda where, group: group)
    with pytest.raises(ValueError, match="not with context parallelism"):
        lm(torch.zeros(1, 4, dtype=torch.long), cache=DecodingCache(), context_parallel_group=object())


def test_example_trains_with_torchrun():
    """examples/context_parallel_train.py as its docstring launches it (torchrun, 2 CPU ranks)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "context_parallel_train.py"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         "--steps", "3", "--seq-len", "64", "--window", "16"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(line.split()[3]) for line in run.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses), run.stdout  # steps 0 and 2


def test_one_rank_keeps_no_feature_tensors(tmp_path):
    """A group of one rank (in this process) gives favor_attention's values and gradients, and
    autograd keeps no (n, m) feature tensor: keys as a chunked state, queries reading the
    context in chunks (non-causal), the fused prefix path from a state (causal); the biggest
    saved tensor is an input, out, or the (n, m_chunk) of nothing."""
    from performer_triton.distributed import context_parallel_attention

    n, m = 300, 40
    q, k, v, grad, _ = _inputs(n)
    P = gaussian_orthogonal_random_matrix(m, 12, generator=torch.Generator().manual_seed(1)).double()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        for name, kw in CASES.items():
            sizes = []

            def pack(t):
                sizes.append(t.numel())
                return t

            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = context_parallel_attention(*leaves, P, **kw)
            (out * grad).sum().backward()
            whole = [t.clone().requires_grad_() for t in (q, k, v)]
            want = favor_attention(*whole, P, **kw)
            (want * grad).sum().backward()
            assert torch.allclose(out, want, rtol=1e-9, atol=1e-12), name
            for a, b in zip(leaves, whole):
                assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-12), name
            if "softplus" not in name:  # (a kernel_fn's features are computed in PyTorch)
                assert max(sizes) < 2 * 3 * n * m, (name, max(sizes))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "autocast"])
def test_one_rank_16_bit_kernel_fn_equals_favor_attention(tmp_path, autocast):
    """bf16 rows, or fp32 rows under a bf16 autocast: a kernel_fn's features are made in fp32 (as
    favor_attention makes them) and attended as made in both modes; under autocast the causal
    attention of those features was cast back to bf16 (7.8e-3 off)."""
    from performer_triton.distributed import context_parallel_attention

    q, k, v, _, _ = _inputs(33)
    P = gaussian_orthogonal_random_matrix(20, 12, generator=torch.Generator().manual_seed(1))
    rows = [t.float() if autocast else t.bfloat16() for t in (q, k, v)]
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        for causal in (False, True):
            kw = dict(causal=causal, feature_map=torch.nn.Softplus())
            with context:
                out = context_parallel_attention(*rows, P, **kw)
                want = favor_attention(*rows, P, **kw)
            assert out.dtype == want.dtype == torch.bfloat16
            assert torch.equal(out, want), causal
    finally:
        dist.destroy_process_group()


def _cross_worker(rank: int, init_file: str, results) -> None:
    from performer_triton.distributed import ContextParallel
    from performer_triton.performer_pytorch import CrossAttention

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        layer = CrossAttention(16, heads=2, dim_head=8, nb_features=12).double()
        g = torch.Generator().manual_seed(1)
        x, context = (torch.randn(1, n, 16, generator=g, dtype=torch.float64) for n in (10, 4))
        block = x[:, 5 * rank : 5 * rank + 5]
        out = layer(block, context=context if rank == 0 else context[:, :0],
                    context_parallel=ContextParallel.gather(block.shape[1]))
        results[rank] = out.detach()
    finally:
        dist.destroy_process_group()


def test_cross_attention_on_a_rank_without_context_rows():
    """Context parallelism splits the context too: a rank may hold queries but no context rows
    (context blocks [4, 0]); its queries read the context summed over the ranks, as one process's."""
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(_cross_worker, args=(os.path.join(tmp, "init"), results), nprocs=2, join=True)
        results = dict(results)
    from performer_triton.performer_pytorch import CrossAttention

    torch.manual_seed(0)
    layer = CrossAttention(16, heads=2, dim_head=8, nb_features=12).double()
    g = torch.Generator().manual_seed(1)
    x, context = (torch.randn(1, n, 16, generator=g, dtype=torch.float64) for n in (10, 4))
    whole = layer(x, context=context).detach()
    for rank in range(2):
        assert torch.allclose(results[rank], whole[:, 5 * rank : 5 * rank + 5], rtol=1e-9, atol=1e-12), rank


def _mismatch_worker(rank: int, init_file: str, results) -> None:
    from performer_triton.distributed import context_parallel_attention

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for case in ("heads", "dtype", "features"):
            h = 3 if case == "heads" and rank == 1 else 2
            dtype = torch.float32 if case == "dtype" and rank == 1 else torch.float64
            m = 24 if case == "features" and rank == 1 else 20
            q, k, v = (torch.randn(1, h, 5, 12, dtype=dtype) for _ in range(3))
            P = gaussian_orthogonal_random_matrix(m, 12).to(dtype)
            try:
                context_parallel_attention(q, k, v, P, causal=True, key_stabilizer="prefix")
                results[(rank, case)] = "returned"
            except ValueError as error:
                results[(rank, case)] = str(error)
        q, k, v = (torch.randn(1, 2, 5, 12, dtype=torch.float64) for _ in range(3))
        P = gaussian_orthogonal_random_matrix(20, 12).double()
        calls = {  # a mode that differs, a misspelt option: refused on every rank, before any exchange
            "stabilizer": dict(causal=True, key_stabilizer=("global", "prefix")[rank]),
            "spelling": dict(causal=True, key_stabilizer="Global"),
            "backend": dict(backend="tritn"),
        }
        for case, kwargs in calls.items():
            try:
                context_parallel_attention(q, k, v, P, **kwargs)
                results[(rank, case)] = "returned"
            except ValueError as error:
                results[(rank, case)] = str(error)
        # models: a batch that differs (the token shift's exchange came first), a model dtype that
        # differs (the projections' broadcast came first)
        for case in ("model batch", "model dtype"):
            model = PerformerLM(**SMALL, causal=True, key_stabilizer="prefix", shift_tokens=True)
            model = model.double() if case == "model dtype" and rank == 0 else model.float()
            tokens = torch.randint(0, 20, (2 if case == "model batch" and rank == 0 else 1, 6))
            try:
                model(tokens, context_parallel_group=dist.group.WORLD)
                results[(rank, case)] = "returned"
            except ValueError as error:
                results[(rank, case)] = str(error)
        # a bare Performer fed hidden states of another dtype on one rank (a mixed-dtype error
        # there, a reset connection on the other, and a hang at the next collective)
        from performer_triton import Performer

        model = Performer(dim=16, depth=1, heads=2, dim_head=8, causal=True, shift_tokens=True).double()
        try:
            model(torch.randn(1, 6, 16, dtype=(torch.float64, torch.float32)[rank]),
                  context_parallel_group=dist.group.WORLD)
            results[(rank, "input dtype")] = "returned"
        except ValueError as error:
            results[(rank, "input dtype")] = str(error)
        # review R24: what one rank refuses on its own is raised on every rank (the others waited in
        # the next collective until the group's timeout, or lost the peer); token ids of another
        # integer dtype (the targets' exchange sent them as they are); different kernel_fns (no
        # error: other numbers); a model built differently on one rank (a token shift waited)
        from performer_triton.autoregressive_wrapper import AutoregressiveWrapper
        from performer_triton.decoding import DecodingCache

        cases = {
            "own refusal": lambda: context_parallel_attention(q, k, v, P, causal=True, key_stabilizer="prefix",
                                                              feature_map=("softmax", "none")[rank]),
            "kernel_fn": lambda: context_parallel_attention(q, k, v, P, causal=True, feature_map=(
                torch.nn.Tanh(), torch.nn.Softplus())[rank]),
            "token range": lambda: PerformerLM(**SMALL, causal=True)(
                torch.tensor([[1, 2, 3]]) * (1 + 10 * rank), context_parallel_group=dist.group.WORLD),
            "token dtype": lambda: AutoregressiveWrapper(PerformerLM(**SMALL, causal=True))(
                torch.tensor([[1, 2, 3, 4]], dtype=(torch.int64, torch.int32)[rank]),
                context_parallel_group=dist.group.WORLD),
            "structure": lambda: PerformerLM(**SMALL, causal=True, shift_tokens=bool(rank))(
                torch.tensor([[1, 2, 3]]), context_parallel_group=dist.group.WORLD),
            # review R26: checked only by the layers, after the first exchanges
            "context": lambda: PerformerLM(**SMALL, cross_attend=True)(
                torch.tensor([[1, 2, 3]]), context=torch.randn(1, 4, (16, 12)[rank]),
                context_parallel_group=dist.group.WORLD),
            "wrapper mask": lambda: AutoregressiveWrapper(PerformerLM(**SMALL, causal=True))(
                torch.tensor([[1, 2, 3, 4]]), mask=(torch.ones(1, 4, dtype=torch.bool), torch.ones(4, dtype=torch.bool))[rank],
                context_parallel_group=dist.group.WORLD),
            # review R47: what the layers checked after the exchanges began (the other rank waited
            # in a collective until the group's timeout)
            "no context": lambda: PerformerLM(**SMALL, cross_attend=True)(
                torch.tensor([[1, 2, 3]]), context_parallel_group=dist.group.WORLD,
                **({"context": torch.randn(1, 4, 16)} if rank == 0 else {})),
            "context dtype": lambda: PerformerLM(**SMALL, cross_attend=True)(
                torch.tensor([[1, 2, 3]]), context=torch.randn(1, 4, 16, dtype=(torch.float32, torch.float64)[rank]),
                context_parallel_group=dist.group.WORLD),
            "performer cache": lambda: Performer(dim=16, depth=1, heads=2, dim_head=8, causal=True)(
                torch.randn(1, 6, 16), context_parallel_group=dist.group.WORLD,
                **({"cache": DecodingCache()} if rank == 1 else {})),
            "pos_emb": lambda: Performer(dim=16, depth=1, heads=2, dim_head=8, causal=True)(
                torch.randn(1, 6, 16), pos_emb=torch.randn(1, 6 + rank, 8), context_parallel_group=dist.group.WORLD),
        }
        for case, call in cases.items():
            try:
                call()
                results[(rank, case)] = "returned"
            except (ValueError, TypeError) as error:
                results[(rank, case)] = str(error)
        # a call one rank refuses counts towards no rank's next redraw (rank 0 had counted it, and
        # redrawn, before the exchange that raised on every rank: the ranks redrew apart from then on)
        torch.manual_seed(0)
        model = Performer(dim=16, depth=1, heads=2, dim_head=8, causal=True, feature_redraw_interval=1).train()
        model(torch.randn(1, 6, 16), context_parallel_group=dist.group.WORLD)
        try:
            model(torch.randn(1, 6, 16 + rank), context_parallel_group=dist.group.WORLD)
        except ValueError:
            pass
        results[(rank, "redraw")] = (model.proj_updater.calls_since_last_redraw.item(),
                                     [m.projection_matrix.clone() for m in model.modules() if hasattr(m, "projection_matrix")])
    finally:
        dist.destroy_process_group()


def test_ranks_whose_calls_differ_get_a_clear_error():
    """Ranks passing different head counts, dtypes or projections: every rank raises a ValueError
    naming what differs (gloo aborted a rank on the mismatched buffers, the others lost the peer)."""
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(_mismatch_worker, args=(os.path.join(tmp, "init"), results), nprocs=2, join=True)
        results = dict(results)
    expected = {"heads": "heads [2, 3]", "dtype": "dtype ['float64', 'float32']", "features": "projection rows [20, 24]",
                "stabilizer": "prefix key stabilizer [0, 1]", "model batch": "batch [2, 1]",
                "model dtype": "dtype ['float64', 'float32']", "input dtype": "input dtype ['float64', 'float32']"}
    for case, text in expected.items():
        for rank in range(2):
            assert "the ranks' calls differ in " + text in results[(rank, case)], (case, rank, results[(rank, case)])
    assert "feature_map 'none'" in results[(1, "own refusal")]
    assert "rank(s) [1] of the group refused their call" in results[(0, "own refusal")]
    assert "outside [0, 20)" in results[(1, "token range")]
    assert "PerformerLM.forward: rank(s) [1] of the group refused their call" in results[(0, "token range")]
    assert results[(0, "redraw")][0] == results[(1, "redraw")][0] == 1
    assert all(torch.equal(a, b) for a, b in zip(results[(0, "redraw")][1], results[(1, "redraw")][1]))
    for case, own in (("context", "context must have shape"), ("wrapper mask", "mask must be a (batch, length)"),
                      ("no context", "cross attention should receive context"),
                      ("context dtype", "context has dtype torch.float64"),
                      ("performer cache", "cached decoding runs on one process"),
                      ("pos_emb", "pos_emb must hold this rank's 6 positions")):
        assert own in results[(1, case)], (case, results[(1, case)])
        assert "rank(s) [1] of the group refused their call" in results[(0, case)], (case, results[(0, case)])
    for rank in range(2):
        assert "the ranks' calls differ in kernel_fn values" in results[(rank, "kernel_fn")]
        assert "differ in input dtype ['int64', 'int32']" in results[(rank, "token dtype")]
        assert "differ in model structure" in results[(rank, "structure")]
        assert results[(rank, "model batch")].startswith("PerformerLM.forward: the ranks' calls")
        assert "key_stabilizer must be one of ('global', 'prefix'), got 'Global'" in results[(rank, "spelling")]
        assert "backend must be one of" in results[(rank, "backend")]
