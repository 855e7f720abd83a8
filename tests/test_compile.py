"""torch.compile as users run it: the default backend, fullgraph, whole models trained from the
first call (in a fresh process), graph breaks, recompiles across lengths."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from conftest import DEVICE

from performer_triton import FastAttention, PerformerEncDec, PerformerLM

MODES = [(False, "global"), (True, "global"), (True, "prefix")]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("causal,key_stabilizer", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_attention_compiles_fullgraph_on_the_default_path(dtype, causal, key_stabilizer):
    """backend="auto" (the default) with fullgraph=True: the backend decision must not break the
    graph. inductor compiles the fp32 cases; the 16-bit ones trace through aot_autograd alike
    (inductor adds only codegen, minutes on this CPU)."""
    fa = FastAttention(16, 20, causal=causal, key_stabilizer=key_stabilizer).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    backend = "inductor" if dtype == torch.float32 else "aot_eager"
    compiled = torch.compile(fa, fullgraph=True, backend=backend)
    out = compiled(q, k, v)
    expected = fa(q, k, v)
    assert torch.equal(out, expected)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.float().square().sum(), (q, k, v))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(grads, expected_grads))


def test_the_kernels_decision_traces_without_a_break():
    """What "auto" asks on CUDA (and "triton" everywhere), traced with fullgraph=True: the TF32
    switch, the interpreter's bf16 probe, the dtype and head-dim reasons (on a CPU the test above
    traces only auto's early return for CPU tensors)."""
    from performer_triton import functional

    def decide(q, v):
        return torch.where(torch.tensor(functional._tf32_allowed()), q, v) if functional._use_triton(
            "triton", q, v, True) else q

    q = torch.randn(1, 2, 8, 16)
    torch.compile(decide, fullgraph=True, backend="eager")(q, q)
    for dtype in (torch.float16, torch.bfloat16):
        torch.compile(decide, fullgraph=True, backend="eager")(q.to(dtype), q.to(dtype))


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_compiles_fullgraph_with_backward(causal):
    """performer_pytorch's linear_attention (any rank, features scaled into range first) under
    inductor with fullgraph: eager's numbers, forward and backward, at any feature magnitude."""
    from performer_triton.performer_pytorch import causal_linear_attention, linear_attention

    fn = causal_linear_attention if causal else linear_attention
    compiled = torch.compile(fn, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e-30):
        qf, kf = ((torch.rand(2, 3, 37, 13, generator=g) * scale).requires_grad_() for _ in range(2))
        v = torch.randn(2, 3, 37, 5, generator=g).requires_grad_()
        out, expected = compiled(qf, kf, v), fn(qf, kf, v)
        assert torch.isfinite(out).all() and torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(out.square().sum(), (qf, kf, v))
        expected_grads = torch.autograd.grad(expected.square().sum(), (qf, kf, v))
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())
                   for a, b in zip(grads, expected_grads))


def test_whole_models_compile_and_train_from_the_first_call():
    """A fresh process per run: compiled PerformerLM variants (one with exact masks, left padding
    and a hole, and the prefix stabilizer) and PerformerEncDec give eager's loss and gradients on
    their very first (training) call. Once an aot_autograd crash
    (fakes with other strides than the real op) hit 8 of 10 fresh processes."""
    script = Path(__file__).with_name("compile_models.py")
    env = {**os.environ, "PYTHONPATH": str(script.parent)}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()]
    assert len(rows) == 5, result.stdout
    for name, loss_err, grad_err, same_params in rows:
        assert float(loss_err) <= 1e-5 and float(grad_err) <= 1e-5 and same_params == "True", name


def _lm(**kwargs):
    torch.manual_seed(0)
    return PerformerLM(num_tokens=64, max_seq_len=1024, dim=32, depth=1, heads=2, dim_head=16, causal=True,
                       key_stabilizer="prefix", **kwargs)


def _breaks(model, x) -> list[str]:
    """The source line of each graph break (all must be torch.compiler.disable()d calls)."""
    explained = torch._dynamo.explain(model)(x)
    reasons = {str(b.reason).splitlines()[0] for b in explained.break_reasons}
    assert reasons <= {"Skip inlining `torch.compiler.disable()`d function"}, reasons
    return sorted({b.user_stack[-1].line.strip() for b in explained.break_reasons})


def test_graph_breaks_of_performer_lm():
    """Eval: none. Training: only the redraw check, which reads a counter and may rewrite the
    projections in place. Local heads run eagerly (inductor miscompiles their backward): one
    break per layer that has them (README, "torch.compile")."""
    x = torch.randint(0, 64, (2, 64))
    model = _lm()
    assert _breaks(model.eval(), x) == []
    assert _breaks(model.train(), x) == ["self._redraw_projections()"]
    local = _lm(local_attn_heads=1, local_window_size=16)
    assert _breaks(local.eval(), x) == ["out = self._local_attention(lq, lk, lv, local_mask, context_parallel)"]
    fixed = _lm(feature_redraw_interval=None)  # no redraw can happen: the count is an in-graph add
    assert _breaks(fixed.train(), x) == []


def test_graph_breaks_do_not_recompile_every_step():
    """Training steps of identical batches reuse their graphs: local heads (an eager call), the
    masked exact prefix path (a host read) and the redraw check break the graph, and what waits on
    the stack across a break must not be a fresh object each call (a bound list.append was: one
    recompile per step until dynamo gave up on the frame)."""
    from torch._dynamo.utils import counters

    for extra in (dict(local_attn_heads=1, local_window_size=16),
                  dict(exact_mask=True)):  # (_lm: key_stabilizer="prefix")
        torch._dynamo.reset()
        model = _lm(**extra).train()
        compiled = torch.compile(model, backend="aot_eager")
        x = torch.randint(0, 64, (2, 41), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(2, 41, dtype=torch.bool)
        mask[0, :5] = False
        graphs = []
        for _ in range(4):
            compiled(x, mask=mask).square().mean().backward()
            graphs.append(counters["stats"]["unique_graphs"])
        assert graphs[1:] == [graphs[1]] * 3, (extra, graphs)


def test_fullgraph_training_without_redraws():
    """feature_redraw_interval=None: fullgraph training compiles, and the call counter (1.1.4's
    state_dict value) still counts every training call, as in eager."""
    model = _lm(feature_redraw_interval=None).train()
    eager = _lm(feature_redraw_interval=None).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        compiled(x).square().mean().backward()
        eager(x).square().mean().backward()
    assert int(model.performer.proj_updater.calls_since_last_redraw) == 3
    assert int(eager.performer.proj_updater.calls_since_last_redraw) == 3


def test_fullgraph_takes_arguments_performer_pytorch_ignores():
    """lucidrains' enwik8 example calls AutoregressiveWrapper(model)(x, return_loss=True): the
    keyword reaches no layer, and its one-time warning is given while torch.compile traces the
    call (fullgraph=True cannot trace warnings.warn), also when no eager call gave it first."""
    import warnings

    from performer_triton import validation
    from performer_triton.autoregressive_wrapper import AutoregressiveWrapper

    validation._WARNED.clear()
    model = AutoregressiveWrapper(_lm(feature_redraw_interval=None).train())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randint(0, 64, (2, 41), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [compiled(x, return_loss=True) for _ in range(2)]
    ignored = [str(w.message) for w in caught if "is ignored" in str(w.message)]
    assert len(ignored) == 1 and "'return_loss'" in ignored[0], ignored
    losses[0].backward()
    assert torch.allclose(losses[1], model(x, return_loss=True))


@pytest.mark.parametrize("strict", [False, True])
def test_export_takes_arguments_performer_pytorch_ignores(strict):
    """torch.export (non-strict, the default, traces without dynamo): the one-time warning too."""
    import warnings

    from performer_triton import Performer, validation

    validation._WARNED.clear()
    torch.manual_seed(0)
    model = Performer(dim=16, depth=1, heads=2, dim_head=8, causal=True, feature_redraw_interval=None).eval()
    x = torch.randn(1, 7, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exported = torch.export.export(model, (x,), {"return_loss": True}, strict=strict)
    assert [str(w.message) for w in caught if "is ignored" in str(w.message)] == [
        "Performer.forward: argument 'return_loss' is ignored (performer-pytorch 1.1.4 ignores it too)"]
    assert torch.allclose(exported.module()(x, return_loss=True), model(x))


def test_export_with_a_dynamic_length_and_its_limits():
    """README "torch.compile": a causal model exports with a dynamic length from 65 on (eager's
    outputs at every length); below 65 the saved states' chunk count of 1 is a constraint
    violation; strict export refuses local heads (non-strict takes them)."""
    model = _lm(feature_redraw_interval=None).eval()
    n = torch.export.Dim("n", min=65, max=256)
    x = torch.randint(0, 64, (1, 100), generator=torch.Generator().manual_seed(0))
    exported = torch.export.export(model, (x,), dynamic_shapes=({1: n},)).module()
    for length in (65, 128, 200):
        tokens = torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(length))
        assert torch.allclose(exported(tokens), model(tokens), atol=1e-5)
    with pytest.raises(Exception, match="onstraint"):
        torch.export.export(model, (x,), dynamic_shapes=({1: torch.export.Dim("n", min=2, max=256)},))
    local = _lm(local_attn_heads=1, local_window_size=16, feature_redraw_interval=None).eval()
    torch.export.export(local, (x[:, :64],))
    with pytest.raises(Exception):
        torch.export.export(local, (x[:, :64],), strict=True)
    # the prefix stabilizer with a mask compacts each sequence (data-dependent shapes): said by name
    # (non-strict export failed in a mask read, blamed on torch.func's vmap)
    masked = _lm(exact_mask=True, feature_redraw_interval=None).eval()
    mask = torch.ones(2, 33, dtype=torch.bool)
    mask[1, :4] = False
    tokens = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(1))
    for strict in (False, True):
        with pytest.raises(Exception, match="key_stabilizer='prefix' with a key_padding_mask .* not under "
                                            "torch.export"):
            torch.export.export(masked, (tokens,), {"mask": mask}, strict=strict)
    torch.export.export(masked, (tokens,), strict=True)  # (without the mask it exports)


def test_cached_generation_of_a_compiled_model_does_not_recompile_per_token():
    """AutoregressiveWrapper(torch.compile(model)).generate decodes from a cache (a global and a
    local head: both kinds of state): the prefill and the first steps compile, later tokens reuse
    those graphs (a bound outs.append waiting across the state step's graph break, and the local
    window's positions traced into guards, made dynamo recompile at every token until its limit)."""
    from performer_triton.autoregressive_wrapper import AutoregressiveWrapper

    model = _lm(local_attn_heads=1, local_window_size=4).eval()
    counter = CompileCounter()
    wrapper = AutoregressiveWrapper(torch.compile(model, backend=counter))
    prompt = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    frames = []
    for seq_len in (6, 13):
        torch.manual_seed(1)
        out = wrapper.generate(prompt, seq_len, use_cache=True)
        frames.append(counter.frame_count)
        torch.manual_seed(1)
        assert torch.equal(out, AutoregressiveWrapper(model).generate(prompt, seq_len, use_cache=False))
    assert frames[1] == frames[0], frames


@pytest.mark.parametrize("extra", [{}, {"no_projection": True}])
def test_one_compile_serves_every_length(extra):
    """dynamic=True: lengths 64 .. 1024 reuse one graph (no recompile per length; causal
    no_projection's key shift once fixed the length through math.log)."""
    torch._dynamo.reset()
    counter = CompileCounter()
    model = _lm(**extra).eval()
    compiled = torch.compile(model, backend=counter, dynamic=True)
    frames = []
    for n in (64, 100, 257, 1024):
        x = torch.randint(0, 64, (2, n))
        assert torch.allclose(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        frames.append(counter.frame_count)
    assert frames == [frames[0]] * 4


def test_a_compiled_training_step_of_a_reversible_model_across_lengths():
    """torch.compile of a whole step (forward, loss and backward in the compiled function) of a
    reversible encoder-decoder, at a second length (the automatic dynamic-shape recompile): the
    blocks' backward ran autograd.backward with retain_graph=True (1.1.4's), for the layers and
    for the encoder's output the cross-attention reads, on compiled graphs whose buffers the
    dynamic compile donates: RuntimeError (review R21; a reversible PerformerLM alike, and
    compiling the model instead of the step did not help the encoder-decoder).  Same loss and
    gradients as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = PerformerEncDec(dim=32, enc_num_tokens=50, enc_depth=1, enc_heads=2, enc_max_seq_len=64,
                            enc_reversible=True, dec_num_tokens=50, dec_depth=2, dec_heads=2, dec_max_seq_len=64,
                            dec_reversible=True)

    def train_step(src, tgt):
        loss = model(src, tgt)
        loss.backward()
        return loss

    compiled = torch.compile(train_step)
    for n in (17, 23):
        gen = torch.Generator().manual_seed(n)
        src, tgt = torch.randint(0, 50, (2, n), generator=gen), torch.randint(0, 50, (2, n + 1), generator=gen)
        model.zero_grad()
        loss = compiled(src, tgt)
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        assert torch.allclose(loss, train_step(src, tgt), rtol=1e-5)
        eager = [p.grad for p in model.parameters() if p.grad is not None]
        assert len(grads) == len(eager) > 0 and all(torch.allclose(g, e, rtol=1e-4, atol=1e-6)
                                                    for g, e in zip(grads, eager))


@pytest.mark.parametrize("padding", ["left", "hole"])
def test_masked_prefix_self_attention_compiles_with_backward(padding):
    """exact_mask + key_stabilizer="prefix" compacts each batch row on the host (a graph break):
    views of the graph's intermediates live across it once came back from aot_autograd with
    garbage shapes (torch 2.13: a RuntimeError, once a segfault)."""
    from performer_triton.performer_pytorch import SelfAttention

    torch.manual_seed(0)
    layer = SelfAttention(16, causal=True, heads=2, dim_head=8, nb_features=6, exact_mask=True,
                          key_stabilizer="prefix")
    x = torch.randn(2, 12, 16, requires_grad=True)
    keep = torch.ones(2, 12, dtype=torch.bool)
    if padding == "left":
        keep[0, :3] = False
    else:
        keep[0, 2:4] = False
    results = []
    for run in (layer, torch.compile(layer)):
        out = run(x, mask=keep)
        results.append((out, torch.autograd.grad(out.square().sum(), x)[0]))
    (eager, eager_grad), (out, grad) = results
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6) and torch.allclose(grad, eager_grad, rtol=1e-5, atol=1e-6)


def test_the_release_joins_the_compile_cache_key():
    """Cached graphs of an older release must not be replayed with this one's ops
    (pytorch/pytorch#144344): importing the package tags torch.compile's cache key, once."""
    import performer_triton
    from performer_triton import ops

    tag = f"performer_triton-{performer_triton.__version__}"
    assert tag in torch.compiler.config.cache_key_tag.split("+")
    before = torch.compiler.config.cache_key_tag
    ops._tag_compile_caches()
    assert torch.compiler.config.cache_key_tag == before


def test_a_mask_first_given_after_the_length_became_dynamic_compiles_fullgraph():
    """Lengths 10 and 17 without a mask make dynamo mark the length dynamic; a mask given then (as
    padded batches start mid-training) was refused under fullgraph: `13 in (1, s)` is False
    for a symbolic s (review R4).  aot_eager: the check is in tracing, not codegen."""
    from performer_triton import SelfAttention

    torch.manual_seed(0)
    attention = SelfAttention(32, heads=2, dim_head=16)
    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    for n, masked in ((10, False), (17, False), (13, True)):
        x = torch.randn(2, n, 32)
        mask = torch.arange(n)[None] < torch.tensor([[n], [5]]) if masked else None
        assert torch.allclose(compiled(x, mask=mask), attention(x, mask=mask), rtol=1e-5, atol=1e-6)
