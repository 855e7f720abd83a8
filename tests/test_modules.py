"""The 1.1.4 module API (names, signatures, defaults) and the documented fixes: exact masks,
prefix stabilizer plumbing, redraw checks, tie_token_embed, repetition penalty, bad input."""
import contextlib
import copy
import inspect
import io
import warnings

import pytest
import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # 1.1.4 imports distutils
    import performer_pytorch as original
    import performer_pytorch.autoregressive_wrapper as original_ar
    import performer_pytorch.performer_enc_dec as original_ed
    import performer_pytorch.performer_pytorch as original_pp
    import performer_pytorch.reversible as original_rev

import performer_triton
import performer_triton.autoregressive_wrapper as ours_ar
import performer_triton.performer_pytorch as ours_pp
import performer_triton.performer_enc_dec as ours_ed
import performer_triton.reversible as ours_rev
from models import enc_dec_kwargs
from performer_triton.autoregressive_wrapper import AutoregressiveWrapper, repetition_penalty_fn
from performer_triton.fast_attention import FastAttention
from performer_triton.performer_pytorch import Attention, CrossAttention, Performer, PerformerLM, ProjectionUpdater
from performer_triton.performer_enc_dec import PerformerEncDec

NUM_TOKENS = 40
SMALL = dict(num_tokens=NUM_TOKENS, max_seq_len=48, dim=32, depth=2, heads=4, dim_head=8, nb_features=20)

MODULE_PAIRS = [(original_pp, ours_pp), (original_ar, ours_ar), (original_ed, ours_ed), (original_rev, ours_rev)]
# 1.1.4 helpers not mirrored: unused (null_context) or internal to its kwarg grouping
NOT_MIRRORED = {"null_context", "group_dict_by_key", "string_begins_with", "group_by_key_prefix"}


def defined_in(module):
    return {
        name
        for name, obj in vars(module).items()
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == module.__name__
    }


@pytest.mark.parametrize("theirs, ours", MODULE_PAIRS, ids=lambda m: m.__name__)
def test_every_1_1_4_class_and_function_exists(theirs, ours):
    missing = defined_in(theirs) - NOT_MIRRORED - set(vars(ours))
    assert not missing


def callables(theirs, ours):
    for name in sorted(defined_in(theirs) - NOT_MIRRORED):
        a, b = getattr(theirs, name), getattr(ours, name)
        if inspect.isclass(a):
            yield f"{name}.__init__", a.__init__, b.__init__
            for method in ("forward", "generate"):
                if method in vars(a):
                    yield f"{name}.{method}", getattr(a, method), getattr(b, method)
        else:
            yield name, a, b


SIGNATURES = [case for pair in MODULE_PAIRS for case in callables(*pair)]


@pytest.mark.parametrize("name, theirs, ours", SIGNATURES, ids=[case[0] for case in SIGNATURES])
def test_signature_keeps_1_1_4_order_and_defaults(name, theirs, ours):
    """Every 1.1.4 parameter, in order, with its kind and default; additions are keyword-only or
    a trailing *args (1.1.4's catch-all **kwargs may be dropped: unknown keywords now raise)."""
    theirs_params = [p for p in inspect.signature(theirs).parameters.values() if p.kind != p.VAR_KEYWORD]
    ours_params = list(inspect.signature(ours).parameters.values())
    assert [p.name for p in ours_params[: len(theirs_params)]] == [p.name for p in theirs_params]
    for a, b in zip(theirs_params, ours_params):
        assert a.kind == b.kind, a.name
        if isinstance(a.default, nn.Module):
            assert type(a.default) is type(b.default), a.name
        elif inspect.isfunction(a.default):
            assert a.default.__name__ == b.default.__name__, a.name
        else:  # 1.1.4's mutable defaults {} included (ours never mutate or keep them)
            assert a.default == b.default and type(a.default) is type(b.default), a.name
    # (a trailing *args takes nothing a 1.1.4 call passes: it had no more positional parameters)
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in ours_params[len(theirs_params) :])


def lm(**kwargs):
    torch.manual_seed(0)
    return PerformerLM(**{**SMALL, **kwargs}).double().eval()


def tokens(b=2, n=37, seed=1):
    return torch.randint(0, NUM_TOKENS, (b, n), generator=torch.Generator().manual_seed(seed))


# exact masks


EXACT_CASES = {
    "noncausal": dict(),
    "noncausal_local_shift": dict(local_attn_heads=1, local_window_size=8, shift_tokens=True),
    "causal_global": dict(causal=True),
    "causal_prefix_local_shift": dict(causal=True, key_stabilizer="prefix", local_attn_heads=(0, 2), local_window_size=8, shift_tokens=True),
    "no_projection": dict(no_projection=True),
}


@pytest.mark.parametrize("name", list(EXACT_CASES))
def test_exact_mask_padded_batch_equals_unpadded_sequences(name):
    model = lm(exact_mask=True, **EXACT_CASES[name])
    x = tokens()
    lengths = (37, 23)
    mask = torch.arange(37)[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        padded = model(x, mask=mask)
        for row, n in enumerate(lengths):
            alone = model(x[row : row + 1, :n])
            assert (padded[row, :n] - alone[0]).abs().max() <= 1e-10 * alone.abs().max()


def test_default_mask_reproduces_1_1_4_padding_leak():
    """Without exact_mask, padded keys still count in the normaliser (1.1.4); the padded row differs."""
    model = lm()
    x = tokens()
    mask = torch.arange(37)[None, :] < torch.tensor([37, 23])[:, None]
    with torch.no_grad():
        padded, alone = model(x, mask=mask)[1, :23], model(x[1:, :23])[0]
    assert (padded - alone).abs().max() > 1e-4 * alone.abs().max()


def test_exact_mask_cross_attention_ignores_padded_context():
    torch.manual_seed(0)
    model = PerformerEncDec(**enc_dec_kwargs(NUM_TOKENS, exact_mask=True)).double()
    src, tgt = tokens(n=31), tokens(n=11, seed=3)
    enc_mask = torch.ones(2, 31, dtype=torch.bool)
    enc_mask[1, 19:] = False

    def decoder_logits(src, tgt, enc_mask=None):
        encodings = model.enc(src, mask=enc_mask, return_encodings=True)
        return model.dec.net(tgt, context=encodings, context_mask=enc_mask)

    with torch.no_grad():
        padded = decoder_logits(src, tgt, enc_mask)
        alone = torch.cat([decoder_logits(src[:1], tgt[:1]), decoder_logits(src[1:, :19], tgt[1:])])
    assert (padded - alone).abs().max() <= 1e-10 * alone.abs().max()


# key_stabilizer plumbing and leak-freedom


def test_key_stabilizer_reaches_every_causal_self_attention():
    model = PerformerEncDec(
        **enc_dec_kwargs(NUM_TOKENS, heads=2, dim_head=None, max_seq_len=16, dec_depth=2, key_stabilizer="prefix")
    )
    dec_fast = [m for m in model.dec.net.modules() if isinstance(m, FastAttention)]
    kinds = [(m.causal, m.key_stabilizer) for m in dec_fast]
    assert kinds == [(True, "prefix"), (False, "global")] * 2  # self, cross per layer
    assert all(m.key_stabilizer == "global" for m in model.enc.modules() if isinstance(m, FastAttention))
    assert Attention(32, causal=True, heads=2, key_stabilizer="prefix").fast_attention.key_stabilizer == "prefix"
    with pytest.raises(ValueError, match="causal"):
        PerformerLM(**SMALL, key_stabilizer="prefix")


@pytest.mark.parametrize("stabilizer, leaks", [("global", True), ("prefix", False)])
def test_prefix_stabilizer_keeps_earlier_outputs_independent_of_later_tokens(stabilizer, leaks):
    """performer-pytorch #82: with the global key max, a large last key changes earlier outputs."""
    torch.manual_seed(0)
    attn = Attention(32, causal=True, heads=4, dim_head=8, key_stabilizer=stabilizer).double()
    x = torch.randn(1, 37, 32, dtype=torch.float64)
    y = x.clone()
    y[:, -1] *= 3
    with torch.no_grad():
        change = (attn(x)[0, :-1] - attn(y)[0, :-1]).abs().max().item()
    assert (change > 1e-3) if leaks else (change <= 1e-12)


# redraws


def test_check_redraw_projections_and_updater_forward():
    model = lm(feature_redraw_interval=2).train()
    updater = model.performer.proj_updater
    fast = model.performer.net.layers[0][0].fn.fast_attention
    before = fast.projection_matrix.clone()
    model.check_redraw_projections()
    model.check_redraw_projections()
    assert int(updater.calls_since_last_redraw) == 2 and torch.equal(fast.projection_matrix, before)
    x = torch.zeros(3)
    assert updater(x) is x  # 1.1.4 raised TypeError ("raise NotImplemented")
    assert int(updater.calls_since_last_redraw) == 0 and not torch.equal(fast.projection_matrix, before)
    model.fix_projection_matrices_()
    after = fast.projection_matrix.clone()
    for _ in range(4):
        model.check_redraw_projections()
    assert torch.equal(fast.projection_matrix, after)


def test_default_redraws_consume_the_global_rng_as_performer_pytorch():
    """Same seed: the same matrices after each redraw, and the same random stream afterwards."""
    theirs_ours = []
    for cls in (original.PerformerLM, PerformerLM):
        torch.manual_seed(3)
        model = cls(**SMALL, feature_redraw_interval=1).train()
        snapshots = []
        for _ in range(4):
            model.performer.proj_updater.redraw_projections()
            snapshots.append([m.projection_matrix.clone() for m in model.modules() if hasattr(m, "projection_matrix")])
        theirs_ours.append((snapshots, torch.randn(5)))
    (theirs, theirs_next), (ours, ours_next) = theirs_ours
    for before, after in zip(theirs, ours):
        assert len(before) == len(after) == SMALL["depth"]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not torch.equal(theirs[0][0], theirs[1][0])  # a redraw happened in between
    assert torch.equal(theirs_next, ours_next)


def test_redraws_follow_the_seed_not_the_global_rng():
    models = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        models.append(PerformerLM(**SMALL, feature_redraw_interval=0, redraw_seed=7).train())
    rng = torch.get_rng_state()
    for model in models:
        model.check_redraw_projections()
        model.check_redraw_projections()
    assert torch.equal(torch.get_rng_state(), rng)
    fast = [[m.projection_matrix for m in model.modules() if isinstance(m, FastAttention)] for model in models]
    assert all(torch.equal(a, b) for a, b in zip(*fast))
    assert not torch.equal(fast[0][0], fast[0][1])  # layers still draw different matrices
    assert "performer.proj_updater.redraw_seed" not in models[0].state_dict()


def test_seeded_redraws_survive_a_meta_build_and_a_copy():
    """The seed and the redraw count are Python ints: a model built on the meta device (FSDP2's
    recipe: to_empty, then load_state_dict) redraws what an eagerly built one does (as buffers they
    were uninitialised memory there), and deepcopy / pickling carry the count."""
    torch.manual_seed(0)
    eager = PerformerLM(**SMALL, feature_redraw_interval=0, redraw_seed=1234).train()
    with torch.device("meta"):
        meta = PerformerLM(**SMALL, feature_redraw_interval=0, redraw_seed=1234).train()
    meta.to_empty(device="cpu").load_state_dict(eager.state_dict())
    eager.check_redraw_projections()
    copied = copy.deepcopy(eager)
    for model in (eager, meta, copied):
        model.check_redraw_projections()
    fast = [[m.projection_matrix for m in model.modules() if isinstance(m, FastAttention)]
            for model in (eager, meta, copied)]
    assert all(torch.equal(a, b) for a, b in zip(fast[0], fast[2]))  # the copy continued the count
    meta.check_redraw_projections()  # the meta build is one redraw behind: now level with eager
    assert all(torch.equal(a, b) for a, b in zip(fast[0], fast[1]))



def test_models_run_on_the_meta_device():
    """A model built on meta (shape inference, memory planning) runs on meta tokens in training and
    eval mode: checks that read values (the token range) and the redraw count skip meta tensors
    (Tensor.item() on meta raised)."""
    # (moved to meta: conftest's NaN-filling torch.empty bypasses a torch.device("meta") context)
    model = PerformerLM(**SMALL, causal=True).to("meta")
    wrapper = AutoregressiveWrapper(PerformerLM(**SMALL, causal=True)).to("meta")
    tokens = torch.zeros(2, 9, dtype=torch.long, device="meta")
    for mode in (True, False):
        model.train(mode)
        assert model(tokens).shape == (2, 9, NUM_TOKENS) and model(tokens).is_meta
    loss = wrapper(tokens)
    assert loss.is_meta and loss.shape == ()


# other fixes


def test_encoder_decoder_ties_embeddings_only_with_tie_token_embeds():
    """1.1.4 ignores the README's spelling tie_token_embed (a checkpoint of that configuration has
    untied embeddings): ignored again, with a warning naming the real parameter."""
    from performer_triton import validation

    validation._WARNED.clear()
    kwargs = enc_dec_kwargs(NUM_TOKENS, dim=16, heads=2, dim_head=None, max_seq_len=8)
    tied = PerformerEncDec(**kwargs, tie_token_embeds=True)
    assert tied.enc.token_emb is tied.dec.net.token_emb
    with pytest.warns(UserWarning, match="tie_token_embeds"):
        untied = PerformerEncDec(**kwargs, tie_token_embed=True)
    assert untied.enc.token_emb is not untied.dec.net.token_emb
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = original.PerformerEncDec(**kwargs, tie_token_embed=True)
    assert list(theirs.state_dict()) == list(untied.state_dict())


def test_encoder_decoder_ignores_unprefixed_arguments_as_performer_pytorch():
    from performer_triton import validation

    validation._WARNED.clear()
    kwargs = enc_dec_kwargs(NUM_TOKENS, dim=16, heads=2, dim_head=None, max_seq_len=8)
    with pytest.warns(UserWarning, match="'depth'"):
        PerformerEncDec(**kwargs, depth=2)
    with pytest.raises(TypeError, match="depth"):  # PerformerLM's own error, as in 1.1.4
        PerformerEncDec(dim=16, depth=2, enc_num_tokens=4, dec_num_tokens=4)


def test_repetition_penalty_fn_is_performer_pytorchs():
    logits = torch.randn(2, 6)
    for ctx in (torch.tensor([[1, 1, 4], [0, 2, 2]]), torch.tensor([5, 0])):
        expected = original_ar.repetition_penalty_fn(logits, ctx, theta=2.0)
        assert torch.equal(repetition_penalty_fn(logits, ctx, theta=2.0), expected)


def test_generate_with_repetition_penalty_at_batch_one_samples_performer_pytorchs_tokens():
    """1.1.4 passes out[-ctx:] (batch rows): at batch size 1 the whole history is penalised."""
    import performer_triton

    results = []
    for module in (original, performer_triton):
        torch.manual_seed(0)
        model = module.PerformerLM(**SMALL, causal=True).double()
        wrapper = module.AutoregressiveWrapper(model)
        torch.manual_seed(1)
        with contextlib.redirect_stdout(io.StringIO()):
            results.append(wrapper.generate(tokens(b=1, n=4)[0], 12, repetition_penalty=3.0, repetition_penalty_ctx=2))
    assert torch.equal(results[0], results[1])


def test_generate_with_repetition_penalty_in_a_batch_looks_at_each_rows_recent_tokens():
    wrapper = AutoregressiveWrapper(lm(causal=True, key_stabilizer="prefix"))
    out = wrapper.generate(tokens(b=3, n=4), 5, repetition_penalty=1.5, repetition_penalty_ctx=3)
    assert out.shape == (3, 5)
    from performer_triton.autoregressive_wrapper import _penalize_rows

    logits = torch.full((2, 6), 2.0)
    penalised = _penalize_rows(logits, torch.tensor([[1, 1, 4], [0, 2, 2]]), theta=2.0)
    assert penalised.tolist() == [[2, 1, 2, 2, 1, 2], [1, 2, 1, 2, 2, 2]]


def test_keywords_performer_pytorch_ignores_are_ignored_with_one_warning():
    """1.1.4's router drops keywords no layer takes; real programs rely on it
    (AutoregressiveWrapper(model)(x, return_loss=True) in lucidrains' enwik8 example)."""
    from performer_triton import validation

    validation._WARNED.clear()
    model = lm(cross_attend=False)
    x = tokens()
    expected = model(x)
    with pytest.warns(UserWarning, match="'foo'"):
        assert torch.equal(model(x, foo=1), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per name: the second call is silent
        assert torch.equal(model(x, foo=2), expected)
    with pytest.warns(UserWarning, match="'context'"):
        assert torch.equal(model(x, context=torch.zeros(2, 5, 32, dtype=torch.float64)), expected)
    with pytest.warns(UserWarning, match="'return_loss'"):
        AutoregressiveWrapper(model)(x, return_loss=True)
    with pytest.warns(UserWarning, match="'input_mask'"):
        ours_pp.SelfAttention(32, heads=4, dim_head=8)(torch.zeros(1, 3, 32), input_mask=torch.ones(1, 3).bool())


def test_pad_value_is_ignored_with_one_warning():
    """1.1.4's AutoregressiveWrapper keeps pad_value as an attribute and uses it nowhere."""
    from performer_triton import validation

    validation._WARNED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoregressiveWrapper(lm(cross_attend=False), pad_value=0)  # the default: nothing to say
    with pytest.warns(UserWarning, match="'pad_value' is ignored"):
        wrapper = AutoregressiveWrapper(lm(cross_attend=False), pad_value=3)
    assert wrapper.pad_value == 3


def test_layers_a_program_swaps_in_get_only_the_keywords_it_passes():
    """1.1.4 routes the keywords the caller gives (and pos_emb): a feed-forward replaced by an
    nn.Linear, or a pre-hook reading the attention's keywords, sees no extra cache=None."""
    outs, seen = [], []
    for lib in (original, performer_triton):
        torch.manual_seed(0)
        model = lib.PerformerLM(num_tokens=20, max_seq_len=16, dim=32, depth=1, heads=4, dim_head=8).eval()
        torch.manual_seed(1)
        model.performer.net.layers[0][1].fn.fn = nn.Linear(32, 32)
        keys = []
        model.performer.net.layers[0][0].fn.register_forward_pre_hook(
            lambda module, args, kwargs: keys.append(sorted(kwargs)), with_kwargs=True)
        outs.append(model(torch.arange(8)[None] % 20))
        seen.append(keys)
    assert (outs[1] - outs[0]).abs().max() <= 1e-5 * outs[0].abs().max()
    assert seen[1] == seen[0] == [["pos_emb"]]
    # generate's cache reaches the attention layers (and token shifts) only: the swapped layer
    # decodes from the cache (one causal layer: exact by default) with 1.1.4's tokens
    sampled = []
    for lib in (original, performer_triton):
        torch.manual_seed(0)
        model = lib.PerformerLM(num_tokens=20, max_seq_len=16, dim=32, depth=1, heads=4, dim_head=8, causal=True)
        torch.manual_seed(1)
        model.performer.net.layers[0][1].fn.fn = nn.Linear(32, 32)
        wrapper = lib.AutoregressiveWrapper(model)
        torch.manual_seed(2)
        sampled.append(wrapper.generate(torch.tensor([[1, 2, 3]]), 5))
    assert wrapper.cache_unsupported_reason() is None and not wrapper._observed()  # (the cache ran)
    assert torch.equal(sampled[1], sampled[0])


@pytest.mark.parametrize("chunks", [1.0, 2.0])
def test_integral_float_ff_chunks(chunks):
    """1.1.4 takes ff_chunks=1.0 (its chunks == 1 test passes) and crashes on 2.0 in Tensor.chunk:
    both are taken as the int."""
    outs = []
    for value in (chunks, int(chunks)):
        torch.manual_seed(0)
        model = PerformerLM(num_tokens=20, max_seq_len=16, dim=32, depth=1, heads=4, dim_head=8, ff_chunks=value)
        outs.append(model(torch.arange(8)[None]))
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(TypeError, match="chunks"):
        PerformerLM(num_tokens=20, max_seq_len=16, dim=32, depth=1, heads=4, dim_head=8, ff_chunks=1.5)


def test_cross_attention_and_self_attention_argument_checks():
    x = torch.zeros(1, 3, 32)
    with pytest.raises(ValueError, match="context has length 0 but x has 3 positions"):  # (1.1.4: IndexError)
        CrossAttention(32, heads=4, dim_head=8)(x, context=torch.zeros(1, 0, 32))
    with pytest.raises(ValueError, match="should receive context"):
        CrossAttention(32, heads=4, dim_head=8)(x)
    with pytest.raises(ValueError, match="local attention is not compatible"):
        Attention(32, heads=4, dim_head=8, local_heads=1)(x, context=x)
    # an odd head width with local heads: 1.1.4 builds the layer and fails in local-attention's
    # rotary embedding at the first call (a size mismatch); named here, the layer still builds
    for make in (lambda: Attention(16, heads=2, dim_head=37, local_heads=1, local_window_size=4, nb_features=3),
                 lambda: PerformerLM(num_tokens=10, max_seq_len=8, dim=16, depth=1, heads=2, dim_head=37,
                                     local_attn_heads=1, rotary_position_emb=False, local_window_size=4)):
        model = make()
        with pytest.raises(ValueError, match="local attention heads .* need an even dim_head.* got dim_head=37"):
            model(torch.zeros(1, 8, 16) if isinstance(model, Attention) else torch.zeros(1, 8, dtype=torch.long))


# bad input


def test_sequence_longer_than_max_seq_len_names_both_lengths():
    with pytest.raises(ValueError, match=r"sequence length 49 exceeds max_seq_len 48"):
        lm()(tokens(n=49))


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(dim=30, heads=4), ValueError, r"dim \(30\) must be divisible by heads \(4\)"),
        (dict(local_attn_heads=(1, 1, 1)), ValueError, "local_attn_heads.*3.*depth 2"),
        (dict(local_attn_heads=5), ValueError, r"local_attn_heads \(5\) must be <= heads \(4\)"),
        (dict(key_stabilizer="bogus", causal=True), ValueError, "key_stabilizer"),
        (dict(depth=-1), ValueError, "depth must be >= 0, got -1"),
        (dict(heads=2.0), TypeError, "heads"),
        (dict(ff_chunks=0), ValueError, "chunks"),
        # the rotary embedding of the heads (rotary_position_emb=True, the default) checks dim_head by its name
        (dict(dim_head=7), ValueError, "dim_head must be even .*got 7"),
        (dict(dim_head=0), ValueError, "dim_head must be >= 2, got 0"),
        (dict(dim=24, heads=3, dim_head=0), ValueError, "dim_head must be >= 2, got 0"),
        (dict(dim_head=0, rotary_position_emb=False), ValueError, "dim_head must be >= 1, got 0"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        PerformerLM(**{**SMALL, **kwargs})


@pytest.mark.parametrize(
    "make, error, pattern",
    [
        (lambda: (tokens().double(), {}), TypeError, "integer token ids"),
        (lambda: (tokens()[0], {}), ValueError, r"x must have shape \(batch, length\)"),
        (lambda: (tokens(), {"mask": torch.ones(2, 36, dtype=torch.bool)}), ValueError, r"mask must have shape \(batch, length\) = \(2, 37\)"),
        (lambda: (tokens(), {"mask": torch.ones(2, 37)}), TypeError, "mask must be a bool tensor"),
    ],
)
def test_bad_forward_arguments(make, error, pattern):
    x, kwargs = make()
    with pytest.raises(error, match=pattern):
        lm()(x, **kwargs)


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda: FastAttention(8, 12, generator=5), TypeError, "generator must be a torch.Generator or None, got int"),
        (lambda: FastAttention(8, 12).redraw_projection_matrix("cpu", generator=True), TypeError,
         "generator must be a torch.Generator or None, got bool"),
        (lambda: performer_triton.gaussian_orthogonal_random_matrix(12, 8, generator="cpu"), TypeError, "generator must be"),
        # 1.1.4's einsums raised RuntimeError here: still caught as one (ShapeError)
        (lambda: ours_pp.softmax_kernel(torch.randn(1, 2, 9, 8), projection_matrix=torch.randn(12, 7), is_query=True),
         RuntimeError, r"softmax_kernel: projection_matrix must have shape \(nb_features, 8\) .* got \(12, 7\)"),
        (lambda: ours_pp.softmax_kernel(torch.randn(8), projection_matrix=torch.randn(12, 8), is_query=True),
         ValueError, r"data must have at least 2 dimensions .* got shape \(8,\)"),
        (lambda: ours_pp.generalized_kernel(torch.randn(1, 2, 9, 8), projection_matrix=torch.randn(12)), RuntimeError,
         r"generalized_kernel: projection_matrix must have shape \(nb_features, 8\)"),
    ],
)
def test_bad_generator_and_feature_function_arguments_are_named(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


@pytest.mark.parametrize("d, pd", [(4, 1), (1, 4)])
def test_feature_functions_broadcast_a_head_dim_of_one_as_1_1_4(d, pd):
    """1.1.4's einsums broadcast a head dim of 1 against the projection's: still accepted, same numbers."""
    data, P = torch.randn(1, 2, 5, d, dtype=torch.float64), torch.randn(6, pd, dtype=torch.float64)
    for name, kw in (("softmax_kernel", dict(is_query=False)), ("generalized_kernel", {})):
        ours, theirs = (getattr(pp, name)(data, projection_matrix=P, **kw) for pp in (ours_pp, original_pp))
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=0), name


def test_performer_matches_1_1_4_construction_rng_order():
    """Built after the same seed, the modules draw the same initial weights and projections as 1.1.4."""
    torch.manual_seed(3)
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = original.PerformerLM(**SMALL, causal=True, local_attn_heads=1, local_window_size=8)
    torch.manual_seed(3)
    ours = PerformerLM(**SMALL, causal=True, local_attn_heads=1, local_window_size=8)
    for (key, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), key


def test_projection_updater_counts_only_in_training():
    updater = ProjectionUpdater(nn.Linear(2, 2), 3)
    updater.eval()
    updater.redraw_projections()
    assert int(updater.calls_since_last_redraw) == 0
    updater.train()
    updater.redraw_projections()
    assert int(updater.calls_since_last_redraw) == 1
    # the Performer's own updater is what its forward consults: interval 1 redraws on the 2nd call
    model = Performer(16, 1, 2, 8, feature_redraw_interval=1).train()
    projection = next(m for m in model.modules() if isinstance(m, FastAttention)).projection_matrix
    before = projection.clone()
    model(torch.randn(1, 4, 16))
    assert int(model.proj_updater.calls_since_last_redraw) == 1 and torch.equal(projection, before)
    model(torch.randn(1, 4, 16))
    assert int(model.proj_updater.calls_since_last_redraw) == 0 and not torch.equal(projection, before)


def test_top_level_exports_match_performer_pytorch():
    """`from performer_pytorch import X` becomes `from performer_triton import X` for every export."""
    import performer_pytorch

    import performer_triton

    exported = [name for name in dir(performer_pytorch) if not name.startswith("_") and isinstance(getattr(performer_pytorch, name), type)]
    assert exported, "performer_pytorch exports no classes?"
    for name in exported:
        assert isinstance(getattr(performer_triton, name, None), type), name
    assert callable(performer_triton.replace_fast_attention)
    theirs, ours = {}, {}  # 1.1.4 has no __all__: its star import binds its submodules too
    exec("from performer_pytorch import *", theirs)
    exec("from performer_triton import *", ours)
    assert sorted(theirs) == sorted(ours)  # no more either: it would rebind a program's own names


@pytest.mark.parametrize("submodule", ["performer_pytorch", "autoregressive_wrapper", "performer_enc_dec", "reversible"])
def test_every_performer_pytorch_module_path_and_name_exists(submodule):
    """`from performer_triton.<submodule> import X` (and `import *`) for every name 1.1.4's module
    has (LooseVersion, 1.1.4's import from distutils, which Python 3.12 removed, is our own)."""
    import importlib

    theirs = importlib.import_module(f"performer_pytorch.{submodule}")
    ours = importlib.import_module(f"performer_triton.{submodule}")
    names = {name for name in vars(theirs) if not name.startswith("_")}
    assert names and sorted(name for name in names if not hasattr(ours, name)) == []
    star: dict = {}
    exec(f"from performer_triton.{submodule} import *", star)
    # the same names, no more: `import torchvision.transforms as T` before a star import of
    # performer_pytorch.performer_pytorch must keep its T (ours had a TypeVar T, re, Tensor, ...)
    assert sorted(set(star) - {"__builtins__"}) == sorted(names)
    for name in names:  # what 1.1.4 defines itself is ours, not a re-export of 1.1.4's
        if getattr(getattr(theirs, name), "__module__", None) == theirs.__name__:
            assert getattr(getattr(ours, name), "__module__", "").startswith("performer_triton"), name


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_never_redraws_during_recomputation(use_reentrant, dropout):
    """torch.utils.checkpoint re-runs forward in backward; a redraw there would give gradients
    of other projections than the loss used.  With dropout, the recomputation of a forward that
    redrew draws its masks after the redraw's draws, as that forward did (checkpoint replays the
    RNG from the forward's start: other masks, wrong gradients on every redrawing call; review R21),
    also when later micro-batches ran before the backward (review R26)."""
    from torch.utils.checkpoint import checkpoint

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Performer(16, 1, 2, 8, feature_redraw_interval=1, ff_dropout=dropout, attn_dropout=dropout)
        model = model.double().train()
        x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
        steps = []
        for i in range(4):  # redraws on calls 2 and 4 (period interval + 1)
            torch.manual_seed(10 + i)
            out = checkpoint(model, x, use_reentrant=use_reentrant) if checkpointed else model(x)
            out.square().sum().backward()
            steps.append(x.grad.clone())
            x.grad = None
        # gradient accumulation: a redrawing micro-batch, two more, then one backward (a redraw in a
        # later micro-batch would rewrite in place the projection the earlier ones saved)
        model.proj_updater.feature_redraw_interval = 2
        model.proj_updater.calls_since_last_redraw.fill_(2)
        for i in range(3):
            outs = [checkpoint(model, x * (j + 1), use_reentrant=use_reentrant) if checkpointed else model(x * (j + 1))
                    for j in range(3)]
            sum(out.square().sum() for out in outs).backward()
            steps.append(x.grad.clone())
            x.grad = None
        grads.append((steps, int(model.proj_updater.calls_since_last_redraw), torch.get_rng_state()))
    for plain, recomputed in zip(grads[0][0], grads[1][0]):
        assert torch.allclose(plain, recomputed, rtol=1e-10, atol=0)
    assert grads[0][1] == grads[1][1] and torch.equal(grads[0][2], grads[1][2])


@pytest.mark.parametrize("local_attn_heads,reversible", [(0, False), (1, False), (1, True)])
def test_bf16_autocast_trains_a_default_performer_lm(local_attn_heads, reversible):
    """1.1.4's defaults (rotary on): rotary upcasts q, k to fp32 while v stays bf16 under autocast;
    the dtype check must see the autocast dtype."""
    torch.manual_seed(0)
    model = PerformerLM(num_tokens=NUM_TOKENS, max_seq_len=32, dim=32, depth=2, heads=4, dim_head=8, causal=True,
                        local_attn_heads=local_attn_heads, local_window_size=8, reversible=reversible)
    x = tokens(n=17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).transpose(1, 2).float(), x)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_float64_models_under_autocast_stay_float64_as_performer_pytorch(causal):
    """autocast casts no float64 tensor: a .double() model under torch.autocast computes in
    float64 as 1.1.4's does (its attention outputs feed the fp64 to_out), and FastAttention and
    the feature-level linear_attention keep float64 inputs."""
    outs = []
    for lib in (original, performer_triton):
        torch.manual_seed(0)
        model = lib.PerformerLM(num_tokens=NUM_TOKENS, max_seq_len=32, dim=16, depth=1, heads=2, dim_head=8,
                                causal=causal, local_attn_heads=1, local_window_size=4).double()
        x = tokens(n=13)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            attn = lib.FastAttention(8, 6, causal=causal).double()
            q, k, v = (torch.randn(2, 2, 13, 8, dtype=torch.float64) for _ in range(3))
            fast = attn(q, k, v)
            feats = lib.performer_pytorch.linear_attention(q.exp(), k.exp(), v)
        outs.append((logits, fast, feats))
    for ours, theirs in zip(outs[1], outs[0]):
        assert ours.dtype == theirs.dtype == torch.float64
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("eps", [1e-6, 1e-3, 0.5])
def test_causal_linear_attention_takes_any_eps_as_performer_pytorch(eps):
    torch.manual_seed(0)
    q, k = (torch.rand(2, 3, 37, 20, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, 37, 8, dtype=torch.float64)
    expected = original_pp.causal_linear_attention_noncuda(q, k, v, eps=eps)
    for ours in (ours_pp.causal_linear_attention(q, k, v, eps=eps), ours_pp.causal_linear_attention_noncuda(q, k, v, eps=eps)):
        assert ((ours - expected).norm() / expected.norm()).item() <= 1e-12


@pytest.mark.parametrize("shape", [(2, 9, 4), (1, 2, 2, 9, 4)], ids=["3d", "5d"])
def test_module_linear_attention_takes_any_rank_as_performer_pytorch(shape):
    """1.1.4's linear_attention is an einsum over '...nd': 3-D (single-head) and 5-D features work
    and give its numbers. The causal helpers equal the same rows as 4-D heads (1.1.4's
    causal_linear_attention_noncuda carries its prefix sums along dim 2, garbage unless 4-D)."""
    torch.manual_seed(0)
    q, k = (torch.rand(shape, dtype=torch.float64) for _ in range(2))
    v = torch.randn(shape, dtype=torch.float64)
    expected = original_pp.linear_attention(q, k, v)
    assert ((ours_pp.linear_attention(q, k, v) - expected).norm() / expected.norm()).item() <= 1e-12
    as_heads = [t.reshape(-1, 1, *t.shape[-2:]) for t in (q, k, v)]
    expected = original_pp.causal_linear_attention_noncuda(*as_heads).reshape(shape)
    for ours in (ours_pp.causal_linear_attention(q, k, v), ours_pp.causal_linear_attention_noncuda(q, k, v)):
        assert ours.shape == shape and ((ours - expected).norm() / expected.norm()).item() <= 1e-12
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        ours_pp.linear_attention(q.reshape(-1), k, v)


def test_masks_and_context_on_another_device_name_the_argument():
    """A mask or context on another device than x (meta stands in for a second device here) gets
    a ValueError naming it, before any arithmetic, as the functional API's key_padding_mask."""
    torch.manual_seed(0)
    x, other = torch.randn(2, 10, 16), torch.ones(2, 10, dtype=torch.bool, device="meta")
    attn, cross = ours_pp.SelfAttention(16, heads=2, dim_head=8), CrossAttention(16, heads=2, dim_head=8)
    model = PerformerLM(num_tokens=31, max_seq_len=16, dim=16, depth=1, heads=2, dim_head=8)
    with pytest.raises(ValueError, match="mask is on meta"):
        attn(x, mask=other)
    with pytest.raises(ValueError, match="mask is on meta"):
        model(torch.randint(0, 31, (2, 10)), mask=other)
    with pytest.raises(ValueError, match="context is on meta"):
        cross(x, context=torch.randn(2, 4, 16, device="meta"))
    with pytest.raises(ValueError, match="context_mask is on meta"):
        cross(x, context=torch.randn(2, 4, 16), context_mask=other[:, :4])


def test_autoregressive_loss_needs_a_batch_of_at_least_two_tokens():
    """1-D ids raised IndexError deep inside, one token gave a NaN loss of no targets (as 1.1.4):
    ValueErrors naming x and what it needs."""
    model = AutoregressiveWrapper(lm())
    with pytest.raises(ValueError, match=r"x must be token ids of shape \(batch, length\)"):
        model(tokens(n=8)[0])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model(tokens(n=1))
    assert torch.isfinite(model(tokens(n=2)))


def test_token_ids_of_every_integer_dtype_embed():
    """uint8 / int16 ids (compact datasets: enwik8 bytes) passed the integer check and then crashed
    in the embedding (as in 1.1.4): they give the int64 ids' logits."""
    model, x = lm(), tokens(n=8)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert torch.equal(model(x.to(dtype)), model(x))
    # and the training loss, whose cross_entropy takes int64 targets only
    wrapper = AutoregressiveWrapper(model)
    torch.manual_seed(0)
    enc_dec = PerformerEncDec(dim=16, enc_num_tokens=NUM_TOKENS, enc_depth=1, enc_heads=2, enc_max_seq_len=16,
                              dec_num_tokens=NUM_TOKENS, dec_depth=1, dec_heads=2, dec_max_seq_len=16)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert torch.equal(wrapper(x.to(dtype)), wrapper(x))
        assert torch.equal(enc_dec(x.to(dtype), x[:, :6].to(dtype)), enc_dec(x, x[:, :6]))


def test_enc_dec_takes_redraw_seed_for_both_halves():
    """redraw_seed, like the other keyword additions, needs no prefix: both halves redraw from
    private generators (the decoder from the next seed), the same matrices on every replica
    whatever the global RNG does."""
    projections = []
    for global_seed in (0, 1):
        torch.manual_seed(0)
        model = PerformerEncDec(dim=16, enc_num_tokens=NUM_TOKENS, enc_depth=1, enc_heads=2, enc_max_seq_len=16,
                                dec_num_tokens=NUM_TOKENS, dec_depth=1, dec_heads=2, dec_max_seq_len=16,
                                enc_feature_redraw_interval=1, dec_feature_redraw_interval=1, redraw_seed=3).train()
        torch.manual_seed(global_seed)
        x = tokens(n=8)
        for _ in range(3):
            model(x, x[:, :6])
        projections.append([m.projection_matrix.clone() for m in model.modules() if hasattr(m, "projection_matrix")])
    assert all(torch.equal(a, b) for a, b in zip(*projections))
    enc, dec = projections[0][0], projections[0][-1]
    assert enc.shape == dec.shape and not torch.equal(enc, dec)
    # (an unprefixed keyword 1.1.4 takes and ignores: a value that is not a seed is ignored, warned)
    performer_triton.validation._WARNED.clear()
    with pytest.warns(UserWarning, match="'redraw_seed' is ignored \\(1.5 is not one of its values"):
        PerformerEncDec(dim=16, enc_num_tokens=NUM_TOKENS, enc_depth=1, enc_heads=2, enc_max_seq_len=16,
                        dec_num_tokens=NUM_TOKENS, dec_depth=1, dec_heads=2, dec_max_seq_len=16, redraw_seed=1.5)
    with pytest.raises(TypeError, match="seed must be an int, got float 1.5"):  # (a half's own, as PerformerLM's)
        PerformerEncDec(dim=16, enc_num_tokens=NUM_TOKENS, enc_depth=1, enc_heads=2, enc_max_seq_len=16,
                        dec_num_tokens=NUM_TOKENS, dec_depth=1, dec_heads=2, dec_max_seq_len=16, enc_redraw_seed=1.5)


def test_reversible_layers_train_behind_an_input_without_grad():
    """Frozen features or embeddings before a reversible Performer: its output had no grad_fn and
    its own parameters no gradient (as in 1.1.4); they get the gradients they get when the input
    requires grad."""
    torch.manual_seed(0)
    model = Performer(dim=16, depth=2, heads=4, dim_head=8, reversible=True).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    grads = []
    for leaf in (x, x.clone().requires_grad_()):
        model.zero_grad()
        out = model(leaf)
        assert out.requires_grad
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(*grads))


def test_integer_arguments_of_any_integer_type_are_taken_as_1_1_4_takes_them():
    """numpy integers (what configs loaded with numpy give) and a 0-d integer tensor nb_features
    build the same models as Python ints, as in 1.1.4; bool and float stay errors that name the
    argument."""
    np = pytest.importorskip("numpy")
    builds = [
        lambda i: FastAttention(i(8), nb_features=i(6)),
        lambda i: ours_pp.SelfAttention(i(16), heads=i(2)),
        lambda i: PerformerLM(num_tokens=i(10), max_seq_len=i(8), dim=i(16), depth=i(1), heads=i(2)),
    ]
    for index, build in enumerate(builds):
        torch.manual_seed(0)
        expected = build(int).state_dict()
        for i in (np.int64, np.int32) + ((torch.tensor,) if index == 0 else ()):  # (1.1.4: nb_features only)
            torch.manual_seed(0)
            got = build(i).state_dict()
            assert got.keys() == expected.keys() and all(torch.equal(got[key], expected[key]) for key in got)
    with pytest.raises(TypeError, match="heads"):
        ours_pp.SelfAttention(16, heads=True)
    with pytest.raises(TypeError, match="nb_features"):  # (1.1.4's class: its randn raised TypeError)
        FastAttention(8, nb_features=6.0)


def test_module_inputs_are_validated_like_the_functional_api():
    with pytest.raises(ValueError, match="nb_features"):
        FastAttention(4, 0)
    with pytest.raises(ValueError, match="nb_features"):
        FastAttention(1)
    with pytest.raises(TypeError, match="floating-point"):
        ours_pp.SelfAttention(32, heads=4, dim_head=8)(torch.zeros(1, 3, 32, dtype=torch.long))
    with pytest.raises(TypeError, match="floating-point"):
        Performer(16, 1, 2, 8)(torch.zeros(1, 3, 16, dtype=torch.int32))
    with pytest.raises(AssertionError, match="max_seq_len"):  # 1.1.4 asserted: code catching it keeps working
        lm()(tokens(n=SMALL["max_seq_len"] + 1))
    with pytest.raises(AssertionError):
        Performer(16, 2, 2, 8, local_attn_heads=(1, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_with_local_heads_train(dtype):
    torch.manual_seed(0)
    model = PerformerLM(num_tokens=NUM_TOKENS, max_seq_len=32, dim=32, depth=2, heads=4, dim_head=8, causal=True,
                        local_attn_heads=1, local_window_size=8).to(dtype)
    logits = model(tokens(n=17))
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    logits.float().logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_reversible_model_backpropagates_in_eval_mode():
    """Without dropout eval and training mode compute the same function: the same gradients."""
    model = lm(causal=True, reversible=True, feature_redraw_interval=None)  # lm() returns an eval-mode model
    x = tokens(n=17)
    grads = []
    for training in (False, True):
        model.zero_grad()
        model.train(training)(x).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(*grads))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 0), (0, 5)], ids=["no-tokens", "no-batch"])
def test_empty_inputs_through_token_shifts_and_reversible_layers(causal, shape):
    """README: empty inputs give empty outputs. The token shift's F.pad could not crop a length-0
    sequence, and the reversible backward added a None gradient (attention's shortcut for empty
    inputs returns zeros not connected to its input); now the gradients are zeros."""
    x = torch.zeros(shape, dtype=torch.long)
    for kwargs in (dict(shift_tokens=True), dict(reversible=True),
                   dict(reversible=True, shift_tokens=True, local_attn_heads=1, local_window_size=8)):
        model = lm(causal=causal, **kwargs)
        out = model(x)
        assert out.shape == (*shape, NUM_TOKENS)
        out.sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and not any(g.any() for g in grads)
    h = torch.zeros(*shape, 16, dtype=torch.float64, requires_grad=True)
    Performer(16, 2, 2, 8, causal=causal, reversible=True).double()(h).sum().backward()
    assert h.grad.shape == h.shape and not h.grad.any()


def test_autoregressive_loss_of_an_empty_batch_backpropagates_through_reversible_layers():
    """As without reversible layers: a NaN loss (no targets) and zero gradients, for as many
    parameters (the embedding and the output layer among them; attention on an empty q is skipped,
    as 1.1.4's `if not empty(q)`, so its projections get none)."""
    reached = []
    for reversible in (False, True):
        model = lm(causal=True, reversible=reversible)
        loss = AutoregressiveWrapper(model)(torch.zeros(0, 5, dtype=torch.long))
        loss.backward()
        assert torch.isnan(loss)
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert {"token_emb.weight", "to_out.weight"} <= set(grads), sorted(grads)
        assert not any(g.any() for g in grads.values())
        reached.append(len(grads))
    assert reached[0] == reached[1], reached


def test_token_shift_equals_performer_pytorchs_and_shifts_everything_out_of_short_sequences():
    t = torch.randn(2, 3, 4)
    for n in range(4):
        for amount in (-2, -1, 1, 2):
            ours = ours_pp.shift(t[:, :n], amount)
            if abs(amount) <= n:
                assert torch.equal(ours, original_pp.shift(t[:, :n], amount))
            else:  # 1.1.4: F.pad's "narrow(): length must be non-negative"
                assert ours.shape == (2, n, 4) and not ours.any()


def test_attention_layers_warn_once_that_feature_redraw_interval_is_ignored():
    """1.1.4 ignores it (a Performer's ProjectionUpdater redraws); Performer builds its layers
    without it, so only a value the user gives a layer warns."""
    from performer_triton import validation

    validation._WARNED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours_pp.SelfAttention(32, heads=4)
        ours_pp.SelfAttention(32, heads=4, feature_redraw_interval=1000)
        Performer(32, 1, 4, 8, feature_redraw_interval=5, cross_attend=True)
        PerformerLM(**SMALL, feature_redraw_interval=None)
    for cls in (Attention, ours_pp.SelfAttention, CrossAttention):
        with pytest.warns(UserWarning, match=f"{cls.__name__}: argument 'feature_redraw_interval' is ignored"):
            cls(32, heads=4, feature_redraw_interval=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per class
        CrossAttention(32, heads=4, feature_redraw_interval=None)


def test_module_input_in_another_dtype_than_the_parameters_names_the_argument():
    """1.1.4 crashed in nn.Linear ("expected m1 and m2 to have the same dtype"), which names
    neither the argument nor the dtypes."""
    attn = ours_pp.SelfAttention(32, heads=4, dim_head=8)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the module's parameters are torch.float32"):
        attn(torch.zeros(1, 3, 32, dtype=torch.float64))
    cross = CrossAttention(32, heads=4, dim_head=8)
    with pytest.raises(TypeError, match=r"context has dtype torch.float64 but the module's parameters are "
                                        r"torch.float32"):
        cross(torch.zeros(1, 3, 32), context=torch.zeros(1, 5, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"context has dtype torch.float16"):
        Performer(32, 1, 4, 8, cross_attend=True)(torch.zeros(1, 3, 32), context=torch.zeros(1, 5, 32).half())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # nn.Linear casts under autocast, as in 1.1.4
        assert attn(torch.zeros(1, 3, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-1.0, filter_thres=0.0),  # top_k keeps every token: no -inf for the sign flip to turn into +inf
    dict(temperature=float("inf"), filter_thres=0.0),
    dict(filter_thres=-0.02),  # int(1.02 * vocab) is the vocabulary
    dict(filter_thres=-1.0, filter_logits_fn="top_p"),
    dict(filter_thres=1.5, filter_logits_fn="top_p"),
    dict(temperature=torch.tensor([[1.0], [0.5]])),  # one temperature per row
    dict(temperature=torch.tensor(0.7)),
], ids=lambda kwargs: "-".join(f"{k}={v if not isinstance(v, torch.Tensor) else tuple(v.shape)}"
                              for k, v in kwargs.items()))
def test_generate_samples_performer_pytorchs_tokens_for_unusual_sampling_arguments(kwargs):
    """The checks on temperature and filter_thres refuse only what 1.1.4 crashed on."""
    import performer_triton

    results = []
    for module, ar in ((original, original_ar), (performer_triton, ours_ar)):
        torch.manual_seed(0)
        wrapper = module.AutoregressiveWrapper(module.PerformerLM(**{**SMALL, "depth": 1}, causal=True).double())
        call = {k: getattr(ar, v) if v == "top_p" else v for k, v in kwargs.items()}
        torch.manual_seed(1)
        with contextlib.redirect_stdout(io.StringIO()):
            results.append((wrapper.generate(tokens(b=2, n=4), 6, **call), torch.get_rng_state()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def both(make):
    """make(module) built from the same seed for 1.1.4 (performer_pytorch.performer_pytorch's
    namespace) and ours, in float64 and eval mode."""
    import performer_triton

    built = []
    for module in ((original_pp, original), (ours_pp, performer_triton)):
        torch.manual_seed(0)
        with contextlib.redirect_stdout(io.StringIO()):  # 1.1.4 prints when it builds projections
            built.append(make(*module).double().eval())
    return built


def test_odd_sizes_1_1_4_takes_give_its_numbers():
    """An integral float local_window_size (1.1.4 passes it to LocalAttention, which works where no
    padding is needed and crashes in F.pad elsewhere) is taken as the int; generate's seq_len as
    1.1.4's range(seq_len): True samples one token, a negative length none."""
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    theirs, ours = both(lambda pp, _: pp.SelfAttention(16, heads=2, dim_head=8, local_heads=1, local_window_size=2.0))
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), rtol=1e-12, atol=1e-13)
        assert ours(x[:, :5]).shape == (2, 5, 16)  # 1.1.4: TypeError in F.pad (a float pad)
    with pytest.raises(TypeError, match="local_window_size must be an int, got float 2.5"):
        ours_pp.SelfAttention(16, heads=2, dim_head=8, local_heads=1, local_window_size=2.5)
    cfg = dict(num_tokens=20, max_seq_len=8, dim=16, depth=1, heads=2, dim_head=8, causal=True)
    theirs, ours = both(lambda pp, _: pp.PerformerLM(**cfg))
    start = torch.randint(0, 20, (2, 3))
    for seq_len in (True, False, -1, -5):
        results, states = [], []
        for wrapper in (original_ar.AutoregressiveWrapper(theirs), AutoregressiveWrapper(ours)):
            torch.manual_seed(1)
            results.append(wrapper.generate(start, seq_len))
            states.append(torch.get_rng_state())
        assert results[1].shape == results[0].shape == (2, max(0, int(seq_len)))
        assert torch.equal(results[1], results[0]) and torch.equal(states[1], states[0])
    assert AutoregressiveWrapper(ours).generate(start[0], -1).shape == (0,)
    assert AutoregressiveWrapper(ours).generate(start, -2**70).shape == (2, 0)
    results = []
    for wrapper in (original_ar.AutoregressiveWrapper(theirs), AutoregressiveWrapper(ours)):
        torch.manual_seed(1)  # a one-element tensor penalty (1.1.4 divides by it)
        results.append(wrapper.generate(start, 4, repetition_penalty=torch.tensor([1.5]), filter_thres=0.0))
    assert torch.equal(results[0], results[1])


def test_local_heads_with_a_fully_padded_window_give_1_1_4s_numbers():
    """A query whose whole local window is padded gets 1.1.4's uniform average of the padded
    values, which the next (global) layer counts with 1.1.4's masking: finite padded values are
    kept, only NaN / inf ones are zeroed (tests/test_masking.py)."""
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for causal in (True, False):
        mask = torch.ones(2, 6, dtype=torch.bool)
        mask[0, :5] = False  # causal: position 0 sees only itself; non-causal: windows 0 and 1 of row 0
        theirs, ours = both(lambda pp, _: pp.SelfAttention(16, causal=causal, heads=2, dim_head=8, local_heads=2,
                                                           local_window_size=4 if causal else 2))
        with torch.no_grad():
            assert torch.allclose(ours(x, mask=mask), theirs(x, mask=mask), rtol=1e-12, atol=1e-13)
    cfg = dict(num_tokens=7, max_seq_len=8, dim=8, depth=2, heads=2, dim_head=16, causal=True,
               local_attn_heads=(2, 0), local_window_size=4)
    theirs, ours = both(lambda _, top: top.PerformerLM(**cfg))
    ids, mask = tokens(b=1, n=8) % 7, torch.ones(1, 8, dtype=torch.bool)
    mask[0, 0] = False
    with torch.no_grad():
        assert torch.allclose(ours(ids, mask=mask), theirs(ids, mask=mask), rtol=1e-12, atol=1e-13)


def test_masks_and_context_that_broadcast_over_the_batch_are_taken_as_1_1_4_takes_them():
    """A (1, n) mask, (1, s) context_mask or batch-1 context for a batch of 2 (1.1.4's masked_fill
    and einsums broadcast them), also through token shifts and generate; other shapes raise."""
    kw = dict(num_tokens=20, max_seq_len=16, dim=16, depth=1, heads=2, dim_head=8)
    x, mask = tokens(n=8) % 20, torch.ones(1, 8, dtype=torch.bool)
    mask[:, -2:] = False
    context = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cases = [
        (kw, dict(mask=mask)),
        (dict(kw, causal=True, shift_tokens=True, local_attn_heads=1, local_window_size=4), dict(mask=mask)),
        (dict(kw, cross_attend=True), dict(context=context[:1])),
        (dict(kw, cross_attend=True), dict(context=context, context_mask=mask[:, :5])),
    ]
    for cfg, call in cases:
        theirs, ours = both(lambda _, top: top.PerformerLM(**cfg))
        with torch.no_grad():
            assert torch.allclose(ours(x, **call), theirs(x, **call), rtol=1e-12, atol=1e-13)
    wrappers = both(lambda _, top: top.AutoregressiveWrapper(top.PerformerLM(**kw, causal=True)))
    results = []
    for wrapper in wrappers:
        torch.manual_seed(1)
        results.append((wrapper.generate(x[:, :3], 4, mask=mask[:, :3]), torch.get_rng_state()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    model = wrappers[1].net
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, length\) = \(2, 8\) .*got \(3, 8\)"):
        model(x, mask=torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, length\) = \(2, 3\) .*got \(1, 2\)"):
        wrappers[1].generate(x[:, :3], 1, mask=mask[:, :2])
    cross = both(lambda _, top: top.PerformerLM(**kw, cross_attend=True))[1]
    with pytest.raises(ValueError, match=r"context has batch 3, x has 2"):
        cross(x, context=torch.randn(3, 5, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"context_mask must have shape \(batch, length\) = \(2, 5\)"):
        cross(x, context=context, context_mask=torch.ones(1, 4, dtype=torch.bool))


def test_loose_version_float_max_seq_len_and_short_reversible_routes_as_1_1_4():
    """1.1.4's module-level LooseVersion compares alike; max_seq_len=16.0 builds 1.1.4's model;
    ReversibleSequence pairs a route of another length with the layers as far as both go (1.1.4's
    zip), with a warning; SequentialSequence still refuses it (1.1.4 asserted)."""
    for a, b in [("2.13.0+cpu", "1.8.0"), ("1.10", "1.9"), ("2.0.0a0", "2.0.0"), ("1.8", "1.8.0"), ("1.8.0", "1.8.0")]:
        for op in ("__lt__", "__le__", "__eq__", "__ge__", "__gt__"):
            expected = getattr(original_pp.LooseVersion(a), op)(original_pp.LooseVersion(b))
            assert getattr(ours_pp.LooseVersion(a), op)(ours_pp.LooseVersion(b)) == expected, (a, op, b)
        assert (ours_pp.LooseVersion(a) >= b) == (original_pp.LooseVersion(a) >= b)
        assert ours_pp.LooseVersion(a).version == original_pp.LooseVersion(a).version
    assert ours_pp.TORCH_GE_1_8_0 is True

    cfg = dict(num_tokens=20, max_seq_len=16.0, dim=16, depth=1, heads=2, dim_head=8)
    for extra in (dict(), dict(rotary_position_emb=False, axial_position_emb=True)):
        theirs, ours = both(lambda _, top: top.PerformerLM(**cfg, **extra))
        assert ours.max_seq_len == 16
        assert all(torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), ours.state_dict().values()))
        with torch.no_grad():
            assert torch.allclose(ours(tokens(n=16) % 20), theirs(tokens(n=16) % 20), rtol=1e-12, atol=1e-13)
    with pytest.raises(TypeError, match="max_seq_len must be an int, got float 16.5"):
        PerformerLM(**{**cfg, "max_seq_len": 16.5})
    with pytest.raises(TypeError, match="max_seq_len must be an int, got float 10.5"):
        ours_pp.FixedPositionalEmbedding(8, 10.5)  # 1.1.4: 11 positions
    assert torch.equal(ours_pp.FixedPositionalEmbedding(8, 10.0).emb, original_pp.FixedPositionalEmbedding(8, 10.0).emb)

    class Add(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x, a=0.0):
            return self.linear(x) + a

    x = torch.randn(2, 3, 4)
    for routes in (((True, False),), ((True, False), (False, True), (True, True))):
        outs = []
        for rev in (original_rev, ours_rev):
            torch.manual_seed(0)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                seq = rev.ReversibleSequence([(Add(), Add()) for _ in range(2)], args_route={"a": routes})
            outs.append(seq(x, a=1.0))
        assert torch.equal(outs[0], outs[1])
        assert any(f"route for 'a' has {len(routes)} entries, the sequence has 2 layers" in str(w.message)
                   for w in caught)
    with pytest.raises(AssertionError, match="route for 'a' has 1 entries, the sequence has 2 layers"):  # 1.1.4's
        ours_rev.SequentialSequence(nn.ModuleList([nn.ModuleList([Add(), Add()]) for _ in range(2)]),
                                    args_route={"a": ((True, False),)})


def test_enc_dec_generate_encodes_in_eval_and_restores_the_mode():
    """PerformerEncDec.generate encodes in eval as its decoder decodes (1.1.4 encoded a training
    model with its dropout on), restores the mode, and counts the call towards the encoder's next
    redraw as 1.1.4's training-mode encoding did: without dropout (the default), generating from a
    training model gives 1.1.4's tokens, redraws and global random stream, call after call."""
    kw = dict(dim=16, enc_num_tokens=20, enc_depth=1, enc_heads=2, enc_max_seq_len=8, enc_feature_redraw_interval=2,
              dec_num_tokens=20, dec_depth=1, dec_heads=2, dec_max_seq_len=8)
    gen = torch.Generator().manual_seed(1)
    seq_in, start = torch.randint(0, 20, (2, 6), generator=gen), torch.randint(0, 20, (2, 1), generator=gen)
    models = []
    for module in (original_ed, ours_ed):
        torch.manual_seed(0)
        models.append(module.PerformerEncDec(**kw).double())
    before = [m.projection_matrix.clone() for m in models[1].enc.modules() if hasattr(m, "projection_matrix")]
    runs = []
    for model in models:
        torch.manual_seed(3)
        tokens = [model.generate(seq_in, start, 5) for _ in range(5)]  # redraws at the 3rd and the 6th call
        runs.append((tokens, model.enc.performer.proj_updater.calls_since_last_redraw.item(),
                     [m.projection_matrix for m in model.enc.modules() if hasattr(m, "projection_matrix")],
                     torch.get_rng_state()))
    (theirs, count0, proj0, rng0), (ours, count1, proj1, rng1) = runs
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours)) and count0 == count1
    assert all(torch.equal(a, b) for a, b in zip(proj0, proj1)) and torch.equal(rng0, rng1)
    assert not any(torch.equal(a, b) for a, b in zip(before, proj1))  # the calls redrew

    # with dropout, the encoding is the eval one (1.1.4's had dropout on); eval counts nothing
    model = ours_ed.PerformerEncDec(**{**kw, "enc_emb_dropout": 0.3})
    counter = model.enc.performer.proj_updater.calls_since_last_redraw
    torch.manual_seed(3)
    tokens = model.generate(seq_in, start, 5)
    assert counter.item() == 1 and model.training and model.enc.training and model.dec.training
    model.eval()
    torch.manual_seed(3)
    assert torch.equal(tokens, model.generate(seq_in, start, 5))
    assert counter.item() == 1

    # each encoder module's mode as it was (1.1.4 left them alone): a frozen layer stays in eval
    # (but for 1.1.4's one default kernel_fn module, shared with the decoder, which its generate
    # sets back to training)
    modes = []
    for module in (original_ed, ours_ed):
        model = module.PerformerEncDec(**{**kw, "enc_ff_dropout": 0.5})
        model.train()
        model.enc.performer.eval()
        model.generate(seq_in, start, 2)
        modes.append({name: m.training for name, m in model.named_modules()})
        assert not model.enc.performer.training and model.enc.training and model.enc.token_emb.training
        assert [n for n, m in model.enc.performer.named_modules() if m.training] == [
            "net.layers.0.0.fn.fast_attention.kernel_fn"]
    assert modes[0] == modes[1]


def test_enc_dec_generate_refused_counts_no_redraw():
    """A generate call whose encoder input is refused (a token id past the tied embedding, a
    sequence past enc_max_seq_len) leaves the encoder's redraw counter, projections and the global
    random stream as 1.1.4 leaves them (its embedding / length check raised before its
    Performer.forward counted); a valid call after it counts as the first."""
    kw = dict(dim=16, enc_num_tokens=20, enc_depth=1, enc_heads=2, enc_max_seq_len=8, enc_feature_redraw_interval=1,
              dec_num_tokens=18, dec_depth=1, dec_heads=2, dec_max_seq_len=8, tie_token_embeds=True)
    start = torch.zeros(2, 1, dtype=torch.long)
    runs = []
    for module in (original_ed, ours_ed):
        torch.manual_seed(0)
        model = module.PerformerEncDec(**kw).double()
        counter = model.enc.performer.proj_updater.calls_since_last_redraw
        before = [m.projection_matrix.clone() for m in model.enc.modules() if hasattr(m, "projection_matrix")]
        torch.manual_seed(5)
        for bad in (torch.full((2, 6), 19), torch.zeros(2, 9, dtype=torch.long)):
            with pytest.raises((IndexError, AssertionError)):
                model.generate(bad, start, 2)
            assert counter.item() == 0
        assert all(torch.equal(a, m.projection_matrix) for a, m in
                   zip(before, [m for m in model.enc.modules() if hasattr(m, "projection_matrix")]))
        rng = torch.get_rng_state()
        model.generate(torch.zeros(2, 6, dtype=torch.long), start, 2)
        runs.append((rng, counter.item()))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1] == 1


def test_depth_zero_and_1_1_4_exception_types():
    """depth=0 builds 1.1.4's embedding-only model (its logits); errors where 1.1.4's torch calls
    raised RuntimeError / IndexError are still caught as those (and are TypeError / ValueError)."""
    models = []
    for top in (original_pp, ours_pp):
        torch.manual_seed(0)
        models.append(top.PerformerLM(**{**SMALL, "depth": 0}, causal=True).double())
    x = tokens(n=7) % SMALL["num_tokens"]
    assert torch.equal(models[0](x), models[1](x))
    ours = models[1]
    layer = ours_pp.SelfAttention(16, heads=2, dim_head=8)
    for call in (lambda: layer(torch.randn(1, 4, 16, dtype=torch.float64)), lambda: layer(torch.ones(1, 4, 16).long()),
                 lambda: ours(x.double()), lambda: layer(torch.randn(1, 4, 16), mask=torch.ones(1, 4).long())):
        with pytest.raises(RuntimeError):
            call()
        with pytest.raises(TypeError):
            call()
    for error in (IndexError, ValueError):
        with pytest.raises(error, match="token ids outside"):
            ours(x + SMALL["num_tokens"])



@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("generalized", [False, True], ids=["softmax", "relu"])
def test_a_trainable_projection_gets_1_1_4s_gradients(causal, generalized):
    """A program that makes the projections trainable (nn.Parameter in place of the buffer):
    1.1.4's einsums send them gradients, and so do ours (the PyTorch path as plain operations);
    a float64 training step of a PerformerLM gives 1.1.4's loss and every parameter's gradient,
    the projections' included (n = 70: a causal block and a tail)."""
    results = []
    tokens = torch.randint(0, NUM_TOKENS, (2, 70), generator=torch.Generator().manual_seed(1))
    for cls in (original.PerformerLM, PerformerLM):
        torch.manual_seed(0)
        model = cls(**dict(SMALL, max_seq_len=70), causal=causal, generalized_attention=generalized).double()
        for module in model.modules():
            if isinstance(module, (original_pp.FastAttention, ours_pp.FastAttention)):
                module.projection_matrix = nn.Parameter(module.projection_matrix.clone())
        loss = nn.functional.cross_entropy(model(tokens).transpose(1, 2), tokens)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        assert sum("projection_matrix" in name for name in grads) == SMALL["depth"]
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-12, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert torch.allclose(grads_b[name], grad, rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("patch, causal, generalized", [
    ("softmax_kernel", False, False), ("softmax_kernel", True, False), ("generalized_kernel", True, True),
    ("linear_attention", False, True), ("orthogonal_matrix_chunk", False, False),
    ("orthogonal_matrix_chunk", True, True), ("causal_linear_attention_noncuda", True, False),
])
def test_replaced_module_functions_are_called_as_1_1_4_calls_them(patch, causal, generalized):
    """A program that replaces one of performer_pytorch's module-level functions before building
    its model (a QR with another sign convention, features squared, a scaled attention) gets
    1.1.4's projection, output and gradients: 1.1.4 looks them up when it calls them."""
    def replacement(module):
        before = getattr(module, patch)
        if patch == "orthogonal_matrix_chunk":
            def chunk(cols, device=None):
                q, _ = torch.linalg.qr(torch.randn((cols, cols), device=device), mode="complete")
                return -q.t()
            return chunk
        if patch in ("softmax_kernel", "generalized_kernel"):
            return lambda data, **kwargs: before(data, **kwargs).square()
        return lambda q, k, v: 2 * before(q, k, v)

    results = []
    for module in (original_pp, ours_pp):
        before = getattr(module, patch)
        setattr(module, patch, replacement(module))
        try:
            torch.manual_seed(0)
            attention = module.FastAttention(16, nb_features=24, causal=causal,
                                             generalized_attention=generalized).double()
            x = [torch.randn(2, 2, 70, 16, dtype=torch.float64).requires_grad_() for _ in range(3)]
            out = attention(*x)
            out.square().sum().backward()
            results.append((attention.projection_matrix, out.detach(), *(t.grad for t in x)))
        finally:
            setattr(module, patch, before)
    for theirs, ours in zip(*results):
        assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.manual_seed(0)  # and the library's own functions are back
    plain = ours_pp.FastAttention(16, nb_features=24, causal=causal, generalized_attention=generalized).double()
    assert not torch.allclose(plain(*[t.detach() for t in x]), results[1][1])


def test_a_replaced_get_module_device_is_called_at_each_redraw():
    """1.1.4's redraw asks get_module_device for the device to draw on (a program may replace it,
    e.g. for offloaded weights): ours calls the module's function at the same calls, with the
    same results."""
    results = []
    for module in (original_pp, ours_pp):
        before, seen = module.get_module_device, []
        module.get_module_device = lambda m, before=before, seen=seen: (seen.append(type(m).__name__), before(m))[1]
        try:
            torch.manual_seed(0)
            model = module.PerformerLM(**SMALL, feature_redraw_interval=1).double()
            x = torch.randint(0, NUM_TOKENS, (1, 8), generator=torch.Generator().manual_seed(1))
            outs = [model(x) for _ in range(4)]
        finally:
            module.get_module_device = before
        results.append((seen, outs, torch.get_rng_state()))
    (seen_a, outs_a, rng_a), (seen_b, outs_b, rng_b) = results
    assert seen_a == seen_b and len(seen_a) == 2  # the 2nd and 4th calls redraw
    assert all(torch.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(outs_a, outs_b)) and torch.equal(rng_a, rng_b)


def test_seeded_redraws_with_a_replaced_orthogonal_matrix_chunk():
    """redraw_seed (opt-in) with orthogonal_matrix_chunk replaced mid-training (review R5: the
    first redraw raised): the replacement is called, its draws follow the seed (the same matrices
    in two runs) and leave the global RNG's stream untouched."""
    def chunk(cols, device=None):
        q, _ = torch.linalg.qr(torch.randn((cols, cols), device=device), mode="complete")
        return -q.t()

    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Performer(dim=16, depth=1, heads=2, dim_head=8, causal=True, feature_redraw_interval=1,
                          redraw_seed=3).train()
        x = torch.randn(1, 5, 16)
        model(x)
        before = ours_pp.orthogonal_matrix_chunk
        ours_pp.orthogonal_matrix_chunk = chunk
        try:
            torch.manual_seed(1)
            for _ in range(3):
                model(x)
            after = torch.randn(3)
        finally:
            ours_pp.orthogonal_matrix_chunk = before
        torch.manual_seed(1)
        assert torch.equal(after, torch.randn(3))  # the global stream as if nothing had drawn
        runs.append([m.projection_matrix.clone() for m in model.modules() if hasattr(m, "projection_matrix")])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_seeded_redraws_of_an_override_with_the_original_signature():
    """A FastAttention subclass overriding redraw_projection_matrix(self, device) as 1.1.4 defines
    it, with the opt-in redraw_seed: its redraws run (a generator keyword raised TypeError), follow
    the seed (the same matrices in two runs, different per layer) and leave the global stream."""
    calls = []

    class Logged(ours_pp.FastAttention):
        def redraw_projection_matrix(self, device):
            calls.append(device)
            projections = self.create_projection(device=device)
            self.projection_matrix.copy_(projections)

    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        model = Performer(dim=16, depth=2, heads=2, dim_head=8, causal=True, feature_redraw_interval=1,
                          redraw_seed=3).train()
        for layer in model.net.layers:
            old = layer[0].fn.fast_attention
            layer[0].fn.fast_attention = Logged(8, nb_features=old.nb_features, causal=True)
        x = torch.randn(1, 5, 16)
        rng = torch.get_rng_state()
        for _ in range(4):
            model(x)
        assert torch.equal(torch.get_rng_state(), rng)
        runs.append([m.projection_matrix.clone() for m in model.modules() if isinstance(m, Logged)])
    assert len(calls) == 2 * 2 * 2  # two runs, two layers, two redraws (interval 1: at calls 2 and 4)
    assert all(torch.equal(a, b) for a, b in zip(*runs)) and not torch.equal(*runs[0])


@pytest.mark.parametrize("causal", [False, True])
def test_a_trace_runs_at_other_lengths(causal):
    """torch.jit.trace of a Performer at one length, called at others: equal to eager (1.1.4's
    causal chunking is fixed into its trace, which then fails at another length)."""
    torch.manual_seed(0)
    model = Performer(dim=16, depth=1, heads=2, dim_head=8, nb_features=8, causal=causal).double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (torch.randn(2, 12, 16, dtype=torch.float64),), check_trace=False)
    for n in (1, 12, 200):
        x = torch.randn(2, n, 16, dtype=torch.float64)
        assert torch.allclose(traced(x), model(x), rtol=1e-12, atol=1e-12)


def test_our_keywords_with_values_that_are_not_ours_are_ignored_as_1_1_4_ignores_them():
    """Keywords 1.1.4 took and ignored (forwards' **kwargs, PerformerEncDec's unprefixed ones) that
    name options of ours: a value that is not one of theirs is ignored with a one-time warning and
    the call gives 1.1.4's numbers (review R39: they raised, or changed the result)."""
    from performer_triton import validation

    validation._WARNED.clear()
    kw = dict(dim=16, enc_num_tokens=20, enc_depth=1, enc_heads=2, enc_max_seq_len=8, dec_num_tokens=20, dec_depth=1,
              dec_heads=2, dec_max_seq_len=8)
    g = torch.Generator().manual_seed(0)
    seq_in, seq_out = torch.randint(0, 20, (2, 6), generator=g), torch.randint(0, 20, (2, 5), generator=g)
    enc_mask = torch.ones(2, 6, dtype=torch.bool)
    enc_mask[1, 4:] = False
    for extra in (dict(key_stabilizer=3), dict(backend=1), dict(redraw_seed="s"), dict(exact_mask="y")):
        losses = []
        for module in (original_ed, ours_ed):
            torch.manual_seed(0)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = module.PerformerEncDec(**kw, **extra).double()
            torch.manual_seed(1)
            losses.append(model(seq_in, seq_out, enc_mask=enc_mask))
        assert torch.equal(*losses), extra
        name = next(iter(extra))
        assert any(f"PerformerEncDec: argument '{name}' is ignored" in str(w.message) for w in caught), extra

    torch.manual_seed(0)
    lm = ours_pp.PerformerLM(num_tokens=20, max_seq_len=16, dim=16, depth=1, heads=2, causal=True, shift_tokens=True)
    x = torch.randint(0, 20, (2, 6), generator=g)
    expected = lm(x)
    for extra, name in ((dict(context_parallel_group="g"), "context_parallel_group"),
                        (dict(context_parallel=1), "context_parallel")):
        with pytest.warns(UserWarning, match=f"PerformerLM.forward: argument '{name}' is ignored"):
            assert torch.equal(lm(x, **extra), expected)
    attention = ours_pp.SelfAttention(dim=16, heads=2)
    h = torch.randn(1, 5, 16, generator=g)
    with pytest.warns(UserWarning, match="SelfAttention.forward: argument 'context_parallel' is ignored"):
        assert torch.equal(attention(h, context_parallel=1), attention(h))
