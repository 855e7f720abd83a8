"""Cached generation: recurrent-state math against the float64 reference, incremental forward
against full recomputation, and generate(use_cache=True) sampling the same tokens as 1.1.4's
recompute path."""
import contextlib
import copy
import re
import warnings

import pytest
import torch
from local_attention import LocalAttention

from models import enc_dec_kwargs
import performer_triton.validation
from performer_triton import reference
from performer_triton.autoregressive_wrapper import AutoregressiveWrapper, top_p
from performer_triton.decoding import DecodingCache, LocalWindowState, favor_state
from performer_triton.fast_attention import FastAttention
from performer_triton.performer_pytorch import PerformerLM
from performer_triton.performer_enc_dec import PerformerEncDec

NUM_TOKENS = 64


def qkv(b=2, h=3, n=37, d=16, e=24, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(b, h, n, dim, generator=g, dtype=torch.float64) for dim in (d, d, e))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def decode(state, q, k, v, keep=None, prompt=0, calls=1):
    """Feed the first `prompt` keys at once, then one position at a time -> outputs after the
    prompt; the positions after the prompt in one step call, or with calls=None one call each (a
    fused step takes single positions only)."""
    if prompt:
        state.extend(k[:, :, :prompt], v[:, :, :prompt], None if keep is None else keep[:, :prompt])
    starts = [prompt] if calls == 1 else range(prompt, q.shape[2])
    ends = [q.shape[2]] if calls == 1 else range(prompt + 1, q.shape[2] + 1)
    return torch.cat([state.step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None if keep is None else keep[:, a:b])
                      for a, b in zip(starts, ends)], dim=2)


# recurrent-state math


@pytest.mark.parametrize("d, m, scale", [(16, 44, 1.0), (48, 70, 3.0), (64, 266, 1.0)])
def test_softmax_state_equals_prefix_reference(d, m, scale):
    """Key norms times 3 make diag large: the state stays relative to the running reference."""
    torch.manual_seed(0)
    fa = FastAttention(d, m, causal=True, key_stabilizer="prefix").double()
    q, k, v = qkv(d=d, scale=scale)
    expected = reference.favor_attention(q, k, v, fa.projection_matrix, causal=True, key_stabilizer="prefix")
    out = decode(favor_state(fa, k, v), q, k, v, prompt=5)
    assert rel(out, expected[:, :, 5:]) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_decoding_keeps_an_fp32_state(dtype):
    """The decoder's state is fp32 for 16-bit inputs (as favor_attention's states): a 16-bit
    state rounds every update, and after 400 tokens its bf16 outputs were 2.2x further from
    float64 than the full forward's. Now about as close (the inputs' rounding dominates), and
    the state chains with the functional API's."""
    torch.manual_seed(0)
    fa = FastAttention(16, 44, causal=True, key_stabilizer="prefix")
    q, k, v = qkv(b=1, h=2, n=400)
    expected = reference.favor_attention(q, k, v, fa.projection_matrix.double(), causal=True, key_stabilizer="prefix")
    low = [t.to(dtype) for t in (q, k, v)]
    state = favor_state(fa, *low[1:])
    assert all(t.dtype == torch.float32 for t in state.state)
    out = decode(state, *low, prompt=1)
    full = fa(*low)
    assert out.dtype == dtype
    assert rel(out.double(), expected[:, :, 1:]) <= 1.3 * rel(full[:, :, 1:].double(), expected[:, :, 1:])


@pytest.mark.parametrize("kwargs", [dict(key_stabilizer="prefix"), dict(generalized_attention=True,
                                    kernel_fn=torch.nn.Softplus())], ids=["softmax", "softplus"])
def test_decoding_under_autocast_casts_the_rows_as_favor_attention(kwargs):
    """Under a bf16 autocast the decoder takes fp32 rows as favor_attention does: cast to bf16,
    then its products in fp32 (they ran in bf16: 1.8x the full path's error) and bf16 outputs."""
    torch.manual_seed(0)
    fa = FastAttention(16, 44, causal=True, **kwargs)
    q, k, v = (t.float() for t in qkv(b=1, h=2, n=40))
    outs = []
    for rows, context in (([t.bfloat16() for t in (q, k, v)], contextlib.nullcontext()),
                          ((q, k, v), torch.autocast("cpu", dtype=torch.bfloat16))):
        with context:
            outs.append(decode(favor_state(fa, *rows[1:]), *rows, prompt=5))
    assert outs[1].dtype == torch.bfloat16 and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("kwargs, feature_map", [(dict(key_stabilizer="prefix"), "softmax"),
                                                 (dict(no_projection=True), "none")])
def test_state_drops_masked_keys_entirely(kwargs, feature_map):
    """Dropped keys hold NaN and values whose exp overflows float64 (no_projection's exp shift
    once came from them: wrong outputs)."""
    torch.manual_seed(0)
    fa = FastAttention(16, 30, causal=True, **kwargs).double()
    q, k, v = qkv(b=1)
    dropped = [2, 9, 20]
    keep = torch.ones(1, 37, dtype=torch.bool)
    keep[0, dropped] = False
    k[:, :, dropped] = torch.tensor([1000.0, float("nan"), 800.0], dtype=k.dtype)[:, None]
    kept = keep[0].nonzero()[:, 0]
    projection = None if feature_map == "none" else fa.projection_matrix
    expected = reference.favor_attention(q[:, :, kept], k[:, :, kept], v[:, :, kept], projection, causal=True,
                                         feature_map=feature_map, key_stabilizer="prefix")  # (softmax's only)
    out = decode(favor_state(fa, k, v), q, k, v, keep=keep, prompt=4)[:, :, kept[kept >= 4] - 4]
    assert rel(out, expected[:, :, kept >= 4]) <= 1e-12


@pytest.mark.parametrize(
    "kwargs, feature_map",
    [
        (dict(generalized_attention=True), "relu"),
        (dict(generalized_attention=True, kernel_fn=torch.nn.Softplus()), torch.nn.Softplus()),
        (dict(no_projection=True), "none"),
    ],
)
def test_feature_state_equals_causal_reference(kwargs, feature_map):
    torch.manual_seed(0)
    fa = FastAttention(16, 44, causal=True, **kwargs).double()
    q, k, v = qkv()
    projection = None if feature_map == "none" else fa.projection_matrix
    expected = reference.favor_attention(q, k, v, projection, causal=True, feature_map=feature_map)
    assert rel(decode(favor_state(fa, k, v), q, k, v, prompt=3), expected[:, :, 3:]) <= 1e-12


@pytest.mark.parametrize("window, prompt", [(8, 1), (8, 13), (5, 16)])
def test_local_window_state_equals_local_attention(window, prompt):
    local = LocalAttention(window_size=window, causal=True, autopad=True, look_forward=0, rel_pos_emb_config=(16, 2))
    local = local.double().eval()
    q, k, v = qkv(h=2, e=16)
    keep = torch.ones(2, 37, dtype=torch.bool)
    keep[1, [0, 6, 7, 30]] = False
    expected = local(q, k, v, input_mask=keep)
    state = LocalWindowState(local)
    out = decode(state, q, k, v, keep=keep, prompt=prompt)
    assert rel(out, expected[:, :, prompt:]) <= 1e-12
    assert state.keys.shape[2] <= 2 * window  # only what the window can still see


# models


def lm(**kwargs):
    torch.manual_seed(0)
    cfg = dict(num_tokens=NUM_TOKENS, max_seq_len=96, dim=32, depth=3, heads=4, dim_head=8, nb_features=24, causal=True)
    return PerformerLM(**{**cfg, **kwargs}).double().eval()


PREFIX = dict(key_stabilizer="prefix")
MODELS = {
    "prefix_rotary": PREFIX,
    "prefix_local_rotary": dict(PREFIX, local_attn_heads=(1, 2, 0), local_window_size=8),
    "reversible_shift_all_local": dict(PREFIX, local_attn_heads=(1, 4, 2), local_window_size=8, shift_tokens=True, reversible=True),
    "axial_scalenorm": dict(PREFIX, rotary_position_emb=False, axial_position_emb=True, axial_position_shape=(8, 12), use_scalenorm=True),
    "absolute_rezero_glu": dict(PREFIX, rotary_position_emb=False, use_rezero=True, ff_glu=True, ff_chunks=2),
    "generalized_global": dict(generalized_attention=True),
    "no_projection_global": dict(no_projection=True),
    "one_layer_global": dict(depth=1, local_attn_heads=1, local_window_size=4),
}


@pytest.mark.parametrize("name", [n for n in MODELS if n != "one_layer_global"])
def test_incremental_forward_equals_full_forward(name):
    model = lm(**MODELS[name])
    x = torch.randint(0, NUM_TOKENS, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        cache = DecodingCache()
        parts = [model(x[:, :7], cache=cache), model(x[:, 7:10], cache=cache)]  # prompt, then 3 at once
        parts += [model(x[:, i : i + 1], cache=cache) for i in range(10, 45)]
    assert cache.length == 45
    assert rel(torch.cat(parts, dim=1), full) <= 1e-10


@pytest.mark.parametrize("name", ["prefix_rotary", "reversible_shift_all_local"])
def test_pieces_through_a_cache_train_as_the_full_sequence(name):
    """Teacher forcing through a cache under autograd: the parameter gradients of pieces equal the
    full forward's, and the cache goes on as before the backward (a reversible backward that
    recomputed its layers would step the cache a second time)."""
    model = lm(**MODELS[name])
    x = torch.randint(0, NUM_TOKENS, (2, 12), generator=torch.Generator().manual_seed(1))
    model(x).square().sum().backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    cache = DecodingCache()
    torch.cat([model(x[:, :5], cache=cache), model(x[:, 5:], cache=cache)], 1).square().sum().backward()
    for p, g in zip(model.parameters(), full):
        assert rel(p.grad, g) <= 1e-10
    nxt = torch.tensor([[3], [4]])
    with torch.no_grad():
        assert rel(model(nxt, cache=cache), model(torch.cat([x, nxt], 1))[:, -1:]) <= 1e-10


def sample_both(wrapper, prompt, steps, **kwargs):
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(5)
        runs.append(wrapper.generate(prompt, steps, use_cache=use_cache, **kwargs))
    return runs


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_generation_samples_the_recompute_paths_tokens(name):
    wrapper = AutoregressiveWrapper(lm(**MODELS[name]))
    assert wrapper.cache_unsupported_reason() is None
    prompt = torch.randint(0, NUM_TOKENS, (2, 6), generator=torch.Generator().manual_seed(2))
    cached, recomputed = sample_both(wrapper, prompt, 40)
    assert cached.shape == (2, 40) and torch.equal(cached, recomputed)


def test_cached_generation_with_a_padded_prompt_and_eos():
    wrapper = AutoregressiveWrapper(lm(**MODELS["prefix_local_rotary"]))
    prompt = torch.randint(1, NUM_TOKENS, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :4] = False  # left padding: 1.1.4 zeroes the padded values, local heads skip the keys
    cached, recomputed = sample_both(wrapper, prompt, 30, mask=mask, eos_token=7, temperature=0.7)
    assert torch.equal(cached, recomputed)


def test_generation_past_max_seq_len_falls_back_to_the_sliding_window():
    wrapper = AutoregressiveWrapper(lm(**MODELS["prefix_local_rotary"], max_seq_len=24))
    prompt = torch.randint(0, NUM_TOKENS, (1, 5), generator=torch.Generator().manual_seed(4))
    cached, recomputed = sample_both(wrapper, prompt[0], 35)
    assert cached.shape == (35,) and torch.equal(cached, recomputed)


def test_encoder_decoder_generation_with_cache():
    torch.manual_seed(0)
    model = PerformerEncDec(
        **enc_dec_kwargs(NUM_TOKENS, max_seq_len=32, dec_depth=2, key_stabilizer="prefix", dec_local_attn_heads=1,
                         dec_local_window_size=8)
        | dict(dec_max_seq_len=48)
    ).double()
    src = torch.randint(0, NUM_TOKENS, (2, 23), generator=torch.Generator().manual_seed(5))
    enc_mask = torch.ones(2, 23, dtype=torch.bool)
    enc_mask[0, 17:] = False
    start = torch.ones(2, 1, dtype=torch.long)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(6)
        runs.append(model.generate(src, start, 30, enc_mask=enc_mask, use_cache=use_cache))
    assert torch.equal(*runs)


def test_global_stabilizer_with_several_layers_recomputes():
    wrapper = AutoregressiveWrapper(lm())
    reason = wrapper.cache_unsupported_reason()
    assert "key_stabilizer='global'" in reason and "prefix" in reason
    prompt = torch.randint(0, NUM_TOKENS, (2, 4), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="cache"):  # (a cache of ours, given to the model: refused)
        wrapper.net(prompt, cache=DecodingCache())
    torch.manual_seed(8)
    default = wrapper.generate(prompt, 10)
    torch.manual_seed(8)
    assert torch.equal(default, wrapper.generate(prompt, 10, use_cache=False))
    # use_cache=True (a keyword 1.1.4 took and ignored): recomputes, as 1.1.4, with a one-time
    # warning saying why
    performer_triton.validation._WARNED.clear()
    with pytest.warns(UserWarning, match="'use_cache' is ignored \\('yes' is not a bool"):
        wrapper.generate(prompt, 2, use_cache="yes")  # (its own warning: it silenced the next one, review R34)
    torch.manual_seed(8)
    with pytest.warns(UserWarning, match="'use_cache=True' is ignored \\(cached generation would not be exact here: .*global"):
        assert torch.equal(default, wrapper.generate(prompt, 10, use_cache=True))
    noncausal = AutoregressiveWrapper(lm(causal=False))
    assert "not causal" in noncausal.cache_unsupported_reason()


def test_cache_memory_stays_bounded():
    model = lm(**MODELS["reversible_shift_all_local"], max_seq_len=200)
    cache = DecodingCache()
    x = torch.randint(0, NUM_TOKENS, (1, 200), generator=torch.Generator().manual_seed(9))
    sizes = []
    with torch.no_grad():
        model(x[:, :4], cache=cache)
        for i in range(4, 200):
            model(x[:, i : i + 1], cache=cache)
            sizes.append(sum(t.numel() for t in cache.tensors()))
    window_cycle = 8
    assert max(sizes[100:]) == max(sizes[20 : 20 + 4 * window_cycle])  # periodic in the window, flat in length


def test_cache_overflow_names_both_lengths():
    model = lm(**PREFIX, max_seq_len=12)
    cache = DecodingCache()
    model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"cached length 10 \+ new length 3 = 13 exceeds max_seq_len 12"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_generate_restores_training_mode_after_an_error_and_validates_its_arguments():
    model = PerformerLM(num_tokens=NUM_TOKENS, max_seq_len=16, dim=16, depth=1, heads=2, dim_head=8, causal=True)
    wrapper = AutoregressiveWrapper(model).train()
    prompt = torch.randint(0, NUM_TOKENS, (1, 3))
    with pytest.raises(ValueError, match="token ids outside"):
        wrapper.generate(torch.full((1, 3), NUM_TOKENS), 4)
    with pytest.raises(RuntimeError, match="boom"):
        wrapper.generate(prompt, 4, filter_logits_fn=lambda logits, thres: (_ for _ in ()).throw(RuntimeError("boom")))
    assert model.training
    with pytest.raises(ValueError):
        wrapper.generate(prompt, seq_len=2, temperature=-1.0)
    assert model.training


def test_generate_greedy_and_small_vocabularies():
    """temperature=0 is greedy; top_k keeps at least one token (1.1.4's k = 0 crashed)."""
    torch.manual_seed(0)
    model = PerformerLM(num_tokens=8, max_seq_len=16, dim=16, depth=1, heads=2, dim_head=8, causal=True,
                        key_stabilizer="prefix")
    wrapper = AutoregressiveWrapper(model)
    prompt = torch.randint(0, 8, (2, 3))
    greedy = wrapper.generate(prompt, 5, temperature=0.0)
    out = prompt
    for _ in range(5):  # the argmax continuation, recomputed step by step
        out = torch.cat((out, model.eval()(out)[:, -1].argmax(-1, keepdim=True)), dim=-1)
    assert torch.equal(greedy, out[:, 3:])
    for thres in (0.9, 1.0):
        assert wrapper.generate(prompt, 4, filter_thres=thres).shape == (2, 4)


def test_generate_names_bad_sampling_arguments():
    """Where 1.1.4 crashed deep inside torch (multinomial, topk, range), a ValueError / TypeError
    naming the argument."""
    model = PerformerLM(num_tokens=NUM_TOKENS, max_seq_len=16, dim=16, depth=1, heads=2, dim_head=8, causal=True)
    wrapper = AutoregressiveWrapper(model)
    prompt = torch.randint(0, NUM_TOKENS, (2, 3))
    cases = [
        (dict(seq_len=2.5), TypeError, "seq_len must be an int, got float 2.5"),
        (dict(temperature=float("nan")), ValueError, "temperature must be a number .*got nan"),
        (dict(temperature="hot"), TypeError, "temperature must be a number, got str"),
        # the filter leaves -inf logits, which a negative or infinite temperature turns into +inf / NaN
        (dict(temperature=-1.0), ValueError, "temperature=-1.0: .*filter_thres=0"),
        (dict(temperature=float("inf")), ValueError, "temperature=inf"),
        # top_k keeps int((1 - thres) * vocab) logits: more than the vocabulary, or a negative count
        (dict(filter_thres=-1.0), ValueError, "filter_thres .* of the 64 logits, got thres -1.0"),
        (dict(filter_thres=1.5), ValueError, "filter_thres .*got thres 1.5"),
        (dict(filter_thres=float("nan")), ValueError, "filter_thres .*got thres nan"),
        (dict(filter_thres="x"), TypeError, "filter_thres must be a number, got str 'x'"),
        (dict(filter_thres=None), TypeError, "filter_thres must be a number, got NoneType None"),
        (dict(filter_thres=None, filter_logits_fn=top_p), TypeError, "filter_thres must be a number"),
        (dict(repetition_penalty="a"), TypeError, "repetition_penalty must be a number, got str 'a'"),
    ]
    for kwargs, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            wrapper.generate(prompt, **{"seq_len": 2, **kwargs})
    with pytest.raises(TypeError, match="start_tokens must be a torch.Tensor of token ids, got list"):
        wrapper.generate([1, 2, 3], 2)
    # keywords 1.1.4 took and ignored: ignored with a one-time warning each (use_cache's values that
    # are not bools, a cache of generate's own or not a DecodingCache), the same tokens
    performer_triton.validation._WARNED.clear()
    torch.manual_seed(5)
    expected = wrapper.generate(prompt, 3)
    for kwargs, pattern in ((dict(use_cache="no"), "'use_cache' is ignored \\('no' is not a bool"),
                            (dict(use_cache=1), None),  # (one warning per argument)
                            (dict(cache=DecodingCache(), use_cache=False), "'cache' is ignored \\(generate keeps"),
                            (dict(cache={}), None)):
        torch.manual_seed(5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert torch.equal(wrapper.generate(prompt, 3, **kwargs), expected), kwargs
        if pattern is not None:
            assert any(re.search(pattern, str(w.message)) for w in caught), (kwargs, [str(w.message) for w in caught])
    with pytest.warns(UserWarning, match="PerformerLM.forward: argument 'cache' is ignored \\(a dict, not a "
                                         "performer_triton DecodingCache"):
        assert torch.equal(model(prompt, cache={}), model(prompt))
    # a threshold a little below 0 still asks for the whole vocabulary (1.1.4 samples from it)
    assert wrapper.generate(prompt, 2, filter_thres=-0.01).shape == (2, 2)


def test_generate_takes_a_1d_mask_with_a_1d_prompt():
    """1.1.4 raised IndexError; the mask is batched like the prompt: the 2-D call's tokens."""
    wrapper = AutoregressiveWrapper(lm(**MODELS["prefix_local_rotary"]))
    prompt = torch.randint(1, NUM_TOKENS, (6,), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([False, False, True, True, True, True])
    for use_cache in (True, False):
        torch.manual_seed(5)
        batched = wrapper.generate(prompt[None], 8, mask=mask[None], use_cache=use_cache)
        torch.manual_seed(5)
        single = wrapper.generate(prompt, 8, mask=mask, use_cache=use_cache)
        assert single.shape == (8,) and torch.equal(single, batched[0])


def test_cache_reused_with_another_batch_size_names_both():
    model = lm(**PREFIX)
    cache = DecodingCache()
    model(torch.zeros(2, 5, dtype=torch.long), cache=cache)
    for b in (3, 1):
        with pytest.raises(ValueError, match=f"DecodingCache holds batch 2, the call has batch {b}"):
            model(torch.zeros(b, 1, dtype=torch.long), cache=cache)
    assert cache.length == 5  # the refused calls changed nothing: the batch it holds continues
    assert model(torch.zeros(2, 1, dtype=torch.long), cache=cache).shape == (2, 1, NUM_TOKENS)
    # a layer used on its own checks too
    from performer_triton.performer_pytorch import SelfAttention

    attn, cache = SelfAttention(16, causal=True, heads=2, dim_head=8), DecodingCache()
    attn(torch.zeros(2, 3, 16), cache=cache)
    with pytest.raises(ValueError, match="holds batch 2, the call has batch 4"):
        attn(torch.zeros(4, 1, 16), cache=cache)


@pytest.mark.parametrize("kwargs", [PREFIX, dict(PREFIX, local_attn_heads=1, local_window_size=4),
                                    dict(PREFIX, shift_tokens=True)], ids=["favor", "local", "shift"])
def test_cache_of_a_model_cast_since_names_both_dtypes(kwargs):
    """A cache filled by a float64 model, then fed by the model cast to float32 (or back): a
    ValueError naming the state and both dtypes (the local window's read failed deep in torch, the
    token shifts blamed x, float32 states silently mixed precisions); the cache as it was after."""
    model = lm(**kwargs)
    x = torch.randint(0, NUM_TOKENS, (2, 6), generator=torch.Generator().manual_seed(3))
    for first, then in ((torch.float64, torch.float32), (torch.float32, torch.float64)):
        model.to(first)
        cache = DecodingCache()
        model(x[:, :5], cache=cache)
        model.to(then)
        with pytest.raises(ValueError, match=f"cache: the (layer's FAVOR state|token shift's history) was filled "
                                             f"from {first} rows, this call's are {then}"):
            model(x[:, 5:], cache=cache)
        model.to(first)
        assert cache.length == 5 and rel(model(x[:, 5:], cache=cache), model(x)[:, 5:]) <= 1e-5


def test_cache_under_autocast_with_layers_fed_another_dtype():
    """Under torch.autocast the layers' rows may have another dtype than the model's input (ScaleNorm's
    fp32 gain gives fp32 rows for bf16 activations; CUDA autocast's layer_norm likewise): the cache
    takes them, prefill and steps, as the uncached model does (review R48: a cache-wide dtype refused
    the first call)."""
    from performer_triton import Performer

    torch.manual_seed(0)
    model = Performer(dim=32, depth=2, heads=4, dim_head=8, causal=True, key_stabilizer="prefix",
                      use_scalenorm=True, local_attn_heads=1, shift_tokens=True).eval()
    x = torch.randn(2, 7, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(x)
        cache = DecodingCache()
        steps = torch.cat([model(x[:, :5], cache=cache), model(x[:, 5:6], cache=cache), model(x[:, 6:], cache=cache)], 1)
    assert rel(steps.double(), full.double()) <= 2e-2


def test_a_failed_cached_call_leaves_the_cache_as_it_was():
    """A cached call that raises in a later layer (a cross-attention without or with a wrong
    context), or in a layer's local heads after its FAVOR heads took the position (a padded
    position no kept key of its window precedes), leaves every layer's state, the length and the
    batch as they were: the call retried right gives the full model's outputs."""
    model = lm(**dict(PREFIX, cross_attend=True, depth=2))
    gen = torch.Generator().manual_seed(4)
    x, context = torch.randint(0, NUM_TOKENS, (2, 8), generator=gen), torch.randn(2, 6, 32, generator=gen).double()
    full = model(x, context=context)
    cache = DecodingCache()
    with pytest.raises(ValueError):  # the prefill: layer 0's self-attention ran, its cross-attention refused
        model(x[:, :7], cache=cache)
    assert cache.length == 0 and cache.batch is None and not cache._states
    model(x[:, :7], cache=cache, context=context)
    for bad in (dict(context=torch.randn(3, 6, 32).double()), dict()):
        with pytest.raises(ValueError):
            model(x[:, 7:], cache=cache, **bad)
        assert cache.length == 7
    assert rel(model(x[:, 7:], cache=cache, context=context), full[:, 7:]) <= 1e-12

    # 1.1.4's local heads (global stabilizer, depth 1): the padded position refused after the
    # prefill, then fed as a kept one
    model = lm(depth=1, local_attn_heads=2, local_window_size=2)
    x = torch.randint(0, NUM_TOKENS, (1, 7), generator=gen)
    cache = DecodingCache()
    model(x[:, :4], cache=cache)
    padded = torch.zeros(1, 1, dtype=torch.bool)
    model(x[:, 4:5], cache=cache, mask=padded)
    model(x[:, 5:6], cache=cache, mask=padded)
    with pytest.raises(ValueError, match="no kept key"):
        model(x[:, 6:7], cache=cache, mask=padded)
    assert cache.length == 6
    out = model(x[:, 6:7], cache=cache, mask=torch.ones(1, 1, dtype=torch.bool))
    full = model(x, mask=torch.tensor([[True] * 4 + [False, False, True]]))
    assert rel(out, full[:, 6:]) <= 1e-12

    # a layer used on its own: a refused first call records no batch
    from performer_triton.performer_pytorch import SelfAttention

    attn, cache = SelfAttention(16, causal=True, heads=2, dim_head=8, key_stabilizer="prefix"), DecodingCache()
    with pytest.raises(ValueError):
        attn(torch.zeros(2, 3, 16), mask=torch.ones(2, 4, dtype=torch.bool), cache=cache)
    assert cache.batch is None and cache.length == 0
    attn(torch.zeros(4, 3, 16), cache=cache)  # another batch: the cache is still empty
    # a failure after the layers (the logits: the largest allocation of a prefill) leaves it too
    model = lm(**PREFIX)
    x = torch.randint(0, NUM_TOKENS, (2, 8), generator=gen)
    cache = DecodingCache()
    handle = model.to_out.register_forward_hook(lambda *args: (_ for _ in ()).throw(MemoryError("out of memory")))
    with pytest.raises(MemoryError):
        model(x[:, :7], cache=cache)
    handle.remove()
    assert cache.length == 0 and not cache._states
    model(x[:, :7], cache=cache)
    assert rel(model(x[:, 7:], cache=cache), model(x)[:, 7:]) <= 1e-12


def test_models_take_empty_inputs():
    model = PerformerLM(num_tokens=NUM_TOKENS, max_seq_len=16, dim=16, depth=1, heads=2, dim_head=8, causal=True,
                        local_attn_heads=1)
    assert model(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, NUM_TOKENS)
    assert model(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5, NUM_TOKENS)


def test_no_projection_state_stays_exact_for_keys_that_overflow_exp():
    """no_projection keys are divided by exp(shift) per call to stay finite; the state rescales
    its running sums as the shift grows (as the softmax reference does), so decoding stays exact."""
    torch.manual_seed(0)
    fa = FastAttention(16, 44, causal=True, no_projection=True).double()
    q, k, v = qkv()
    k[:, :, 20, 3] = 800.0  # exp(800) overflows float64
    k[:, :, 30, 1] = 900.0
    out = decode(favor_state(fa, k, v), q, k, v, prompt=3)
    full = fa(q, k, v)  # one call: one shift for the whole sequence
    assert torch.isfinite(out).all()
    assert rel(out[:, :, 17:], full[:, :, 20:]) <= 1e-6
    # fp32 rows: the state in float64, as favor_attention's causal no_projection computes (keys
    # past exp's fp32 range with values of ~10 gave inf in an fp32 state where the full path is finite)
    q, k, v = qkv(b=1, h=1, n=6)
    q, k, v = q.float(), (k + 100.0).float(), (4 * v).float()
    state = favor_state(fa.float(), k, v)
    out, full = decode(state, q, k, v, prompt=2, calls=None), fa(q, k, v)
    assert state.hz.dtype == torch.float64 and out.dtype == torch.float32 and torch.isfinite(full).all()
    assert rel(out, full[:, :, 2:]) <= 1e-5


# the fused decode step (kernels/decode.py), in Triton's interpreter on CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kwargs", [dict(key_stabilizer="prefix"), dict(generalized_attention=True)],
                         ids=["softmax", "relu"])
def test_fused_decode_step_equals_the_pytorch_step(kwargs, dtype):
    """One launch per position (features of q and k, state update, output) against FavorState's
    PyTorch update: outputs and the state it leaves, with a prompt prefilled, a dropped key holding
    NaN and inf, head dims not powers of two and m not a multiple of the m tile; NaN-filled outputs."""
    torch.manual_seed(0)
    fused, plain = (FastAttention(24, 50, causal=True, backend=backend, **kwargs) for backend in ("triton", "torch"))
    plain.load_state_dict(fused.state_dict())
    q, k, v = (t.to(dtype) for t in qkv(b=2, h=3, n=12, d=24, e=20, scale=2.0))
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, 6] = False
    q[1, :, 6], k[1, :, 6], v[1, :, 6] = float("nan"), float("nan"), float("inf")  # selected away: reach nothing
    states = [favor_state(fa, k, v) for fa in (fused, plain)]
    assert states[0].fused and not states[1].fused
    outs = [decode(state, q, k, v, keep, prompt=4, calls=None) for state in states]  # (single positions: fused)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert outs[0].dtype == dtype and torch.isfinite(outs[0]).all()
    assert rel(outs[0].double(), outs[1].double()) <= tol
    for name in ("hz", "v_sum", "ref", "stab"):
        a, b = (getattr(s, name).double() for s in states)
        finite = torch.isfinite(b)
        assert torch.equal(a[~finite], b[~finite]), name  # relu: M stays -inf
        scale = max(b.nan_to_num(0.0, 0.0, 0.0).abs().max().item(), 1.0)  # relu: R = 0
        assert (a - b).nan_to_num(0.0).abs().max() <= tol * scale, name
    # the step writes new tensors: the ones it read stay as they were (what a cache restores when
    # a later layer of the call raises)
    held = [getattr(states[0], name) for name in ("hz", "v_sum", "ref", "stab")]
    copies = [t.clone() for t in held]
    states[0].step(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:])
    assert all(torch.equal(a, b) for a, b in zip(held, copies))
    assert not any(getattr(states[0], name) is t for name, t in zip(("hz", "v_sum", "ref", "stab"), held))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_auto_decodes_cpu_tensors_on_the_pytorch_step(monkeypatch, dtype):
    """backend="auto" asks nothing about CPU tensors (as functional._use_triton: no interpreter,
    no bf16 probe) and steps on the PyTorch path; "triton" takes the fused step."""
    from performer_triton import functional

    k = torch.randn(1, 2, 3, 16, dtype=dtype)
    for kw in (dict(key_stabilizer="prefix"), dict(generalized_attention=True)):
        with monkeypatch.context() as patch:
            patch.setattr(functional, "triton_unsupported", lambda *a, **kw_: pytest.fail("'auto' asked about CPU"))
            assert not favor_state(FastAttention(16, 20, causal=True, **kw), k, k).fused
        if dtype != torch.bfloat16:  # (the interpreter's bf16 dot: the probe decides)
            assert favor_state(FastAttention(16, 20, causal=True, backend="triton", **kw), k, k).fused


def test_fused_decode_in_a_model_equals_the_pytorch_decoder():
    """A PerformerLM with backend="triton" decodes position by position with the fused step
    (one launch per layer) and gives the logits of the PyTorch decoder.  One layer: its prompt
    runs the fused chunk kernels, whose TF32 dots (emulated) would move a second layer's keys."""
    models = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        models.append(PerformerLM(num_tokens=NUM_TOKENS, max_seq_len=32, dim=32, depth=1, heads=2, dim_head=16,
                                  nb_features=20, causal=True, key_stabilizer="prefix", backend=backend).eval())
    x = torch.randint(0, NUM_TOKENS, (2, 9), generator=torch.Generator().manual_seed(1))
    logits = []
    with torch.no_grad():
        for model in models:
            cache = DecodingCache()
            logits.append(torch.cat([model(x[:, :5], cache=cache)] + [model(x[:, i : i + 1], cache=cache)
                                                                      for i in range(5, 9)], dim=1))
            favor, _ = next(iter(cache._states.values()))
            assert favor.fused == (model is models[0])
    assert rel(logits[0][:, 5:], logits[1][:, 5:]) <= 1e-5  # the steps
    assert rel(logits[0][:, :5], logits[1][:, :5]) <= 2e-3  # the prompt: TF32


def test_a_copied_cache_branches_a_generation():
    """copy.deepcopy(cache) or copy.copy (beam search) gives an independent cache for the same layers; copying
    model and cache together, or pickling them together, continues on the copies; a cache used
    with layers it holds no state for (another model, or one pickled alone) is a ValueError, not
    a silent fresh start."""
    import copy
    import pickle

    torch.set_grad_enabled(False)
    try:
        for kwargs in (PREFIX, dict(PREFIX, local_attn_heads=1, local_window_size=4, shift_tokens=True),
                       dict(causal=True, generalized_attention=True, kernel_fn=torch.nn.Softplus())):
            model = lm(**kwargs).eval()
            x = torch.randint(0, NUM_TOKENS, (2, 8), generator=torch.Generator().manual_seed(1))
            full = model(x)

            def prefill():
                cache = DecodingCache()
                model(x[:, :6], cache=cache)
                return cache

            for branching in (copy.deepcopy, copy.copy):  # (a shallow copy would share the states)
                cache = prefill()
                branch = branching(cache)
                for c in (branch, cache):  # each continues on its own
                    assert rel(model(x[:, 6:7], cache=c), full[:, 6:7]) <= 1e-5
            for twin, c in (copy.deepcopy((model, prefill())), pickle.loads(pickle.dumps((model, prefill())))):
                assert rel(twin(x[:, 6:7], cache=c), full[:, 6:7]) <= 1e-5
            for c, other in ((prefill(), copy.deepcopy(model)), (pickle.loads(pickle.dumps(prefill())), model)):
                with pytest.raises(ValueError, match="holds no state for this layer"):
                    other(x[:, 6:7], cache=c)
    finally:
        torch.set_grad_enabled(True)
    # filled with autograd on (eval() keeps it on): torch deep-copies graph leaves only, the branch
    # holds the states' values detached
    # (the token shifts' history, a bare tensor in the cache, too)
    model = lm(**dict(PREFIX, local_attn_heads=1, local_window_size=4, shift_tokens=True)).eval()
    x = torch.randint(0, NUM_TOKENS, (2, 8), generator=torch.Generator().manual_seed(2))
    cache = DecodingCache()
    model(x[:, :6], cache=cache)
    branch = copy.deepcopy(cache)
    with torch.no_grad():
        full = model(x)
        assert rel(model(x[:, 6:7], cache=branch), full[:, 6:7]) <= 1e-5


def test_local_query_without_a_visible_kept_key():
    """A causal local query whose visible window holds only padded keys: 1.1.4's uniform average
    over its whole window (later positions included) by default, which a cached step cannot see,
    so the cache refuses such a step; with key_stabilizer="prefix" or exact_mask it is 0 on both
    paths: step-by-step decoding of a left-padded sequence equals recomputing the sequence so far,
    and a kept output never depends on a later token (the padded row reaches it through the next
    layer's normaliser)."""
    from performer_triton.decoding import seen_keys

    mask = torch.rand(3, 23, generator=torch.Generator().manual_seed(0)) < 0.3
    for window in (1, 2, 3, 5, 30):
        brute = torch.stack([torch.stack([mask[r, max(0, (i // window - 1) * window): i + 1].any()
                                          for i in range(23)]) for r in range(3)])
        assert torch.equal(seen_keys(mask, window), brute)
        assert seen_keys(mask[:, :0], window).shape == (3, 0)  # an empty block (context parallelism)

    base = dict(num_tokens=64, max_seq_len=16, dim=16, depth=2, heads=2, dim_head=8, causal=True, nb_features=12,
                local_attn_heads=(2, 0), local_window_size=3)  # local, then global heads (cacheable)
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, :3] = False
    keep[1, :1] = False
    keep[1, 8:] = False  # right padding: padded queries of exact_mask's global heads give 0, cached too
    for opt_in in (dict(key_stabilizer="prefix"), dict(exact_mask=True)):
        torch.manual_seed(0)
        model = PerformerLM(**base, **opt_in).eval()
        with torch.no_grad():
            full = model(x, mask=keep)
            cache = DecodingCache()
            steps = torch.cat([model(x[:, i:i + 1], cache=cache, mask=keep[:, i:i + 1]) for i in range(10)], 1)
            # what each step can know (the global stabilizer's max moves as keys arrive): the last
            # position of the sequence so far
            so_far = torch.stack([model(x[:, :i + 1], mask=keep[:, :i + 1])[:, -1] for i in range(10)], 1)
            later = x.clone()
            later[:, 3] = (later[:, 3] + 7) % 64
            changed = model(later, mask=keep)
        assert torch.allclose(steps, so_far, rtol=1e-5, atol=1e-5)
        if "key_stabilizer" in opt_in:  # (the global stabilizer leaks anyway: a max over every key)
            assert torch.equal(changed[:, :3], full[:, :3])  # positions before the changed token
    torch.manual_seed(0)
    model = PerformerLM(**base).eval()
    cache = DecodingCache()
    with torch.no_grad():
        model(x[:, :1], cache=cache, mask=keep[:, :1])
        with pytest.raises(ValueError, match="padded position whose local window holds no kept key"):
            model(x[:, 1:2], cache=cache, mask=keep[:, 1:2])
        prefill = model(x, cache=DecodingCache(), mask=keep)  # in the prefill call: 1.1.4's numbers
        assert torch.equal(prefill, model(x, mask=keep))


def test_cache_sees_a_redraw_of_a_model_built_under_inference_mode():
    """Inference tensors have no version counter: the cache compares the projection's values."""
    cfg = dict(num_tokens=64, max_seq_len=20, dim=16, depth=1, heads=2, dim_head=8, causal=True, nb_features=12,
               feature_redraw_interval=1)
    x = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.manual_seed(0)
        model = PerformerLM(**cfg).eval()
        cache = DecodingCache()
        model(x[:, :4], cache=cache)
        assert model(x[:, 4:5], cache=copy.deepcopy(cache)).shape == (1, 1, 64)  # not redrawn yet
        early = copy.deepcopy(cache)  # a branch made before the redraw watches the same buffer
        model.train()
        model(x)
        model(x)  # redraws
        model.eval()
        with pytest.raises(ValueError, match="projection matrix was redrawn"):
            model(x[:, 4:5], cache=cache)
        with pytest.raises(ValueError, match="projection matrix was redrawn"):  # a copy stays stale
            model(x[:, 4:5], cache=copy.deepcopy(cache))
        with pytest.raises(ValueError, match="projection matrix was redrawn"):
            model(x[:, 4:5], cache=early)
    # a fp32 model (whose state holds the layer's own buffer as its projection), redrawn in place
    # or reloaded after a branch was copied: the branch refuses too
    for change in ("redraw", "load"):
        torch.manual_seed(0)
        model = PerformerLM(**cfg).eval()
        cache = DecodingCache()
        with torch.no_grad():
            model(x[:, :4], cache=cache)
            early = copy.deepcopy(cache)
            if change == "redraw":
                model.train()
                model(x)
                model(x)
                model.eval()
            else:
                model.load_state_dict({k: t + 1 if k.endswith("projection_matrix") else t
                                       for k, t in model.state_dict().items()})
            with pytest.raises(ValueError, match="projection matrix was redrawn"):
                model(x[:, 4:5], cache=early)


def test_generate_recomputes_for_subclass_forwards_and_hooks_as_1_1_4():
    """The cache feeds one new token per call where 1.1.4 feeds the window: a PerformerLM subclass
    with its own forward (which may take no cache=, or read the whole window), a forward put on
    the instance, and forward hooks see 1.1.4's calls, with a warning that says so, unless
    use_cache=True asks for the cache."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import performer_pytorch as original
    import performer_triton

    kw = dict(num_tokens=30, max_seq_len=24, dim=32, depth=1, heads=4, dim_head=8, causal=True)
    prompt = torch.randint(1, 30, (2, 5), generator=torch.Generator().manual_seed(3))
    for make in ("no cache keyword", "whole window", "instance forward", "hook"):
        runs = []
        for lib in (original, performer_triton):
            class NoCacheLM(lib.PerformerLM):
                def forward(self, x, mask=None, context_mask=None):  # what 1.1.4's generate passes
                    return super().forward(x, mask=mask)

            class WindowLM(lib.PerformerLM):
                def forward(self, x, **kwargs):  # each logit averages the window's
                    logits = super().forward(x, **kwargs)
                    return logits.cumsum(1) / torch.arange(1, x.shape[1] + 1)[:, None]

            torch.manual_seed(0)
            cls = {"no cache keyword": NoCacheLM, "whole window": WindowLM}.get(make, lib.PerformerLM)
            wrapper = lib.AutoregressiveWrapper(cls(**kw))
            lengths = []
            if make == "hook":
                wrapper.net.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
            if make == "instance forward":
                plain = wrapper.net.forward
                wrapper.net.forward = lambda x, **kwargs: (lengths.append(x.shape[1]), plain(x, **kwargs))[1]
            torch.manual_seed(1)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                runs.append((wrapper.generate(prompt, 6), lengths))
        assert torch.equal(runs[1][0], runs[0][0]), make
        assert runs[1][1] == runs[0][1], make
        assert not caught, (make, [str(w.message) for w in caught])  # (1.1.4 warns of nothing either)
    assert runs[0][1] == [5, 6, 7, 8, 9, 10]
    lengths.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapper.generate(prompt, 3, use_cache=True)  # the caller's choice, without a word
    assert lengths == [5, 1, 1]


def test_the_cache_is_importable_from_the_package():
    """README: `performer_triton.DecodingCache()` for your own decoding loop (not in `import *`,
    which binds what 1.1.4's does)."""
    import performer_triton

    assert performer_triton.DecodingCache is DecodingCache
    assert "DecodingCache" not in performer_triton.__all__


@pytest.mark.parametrize("kw", [dict(key_stabilizer="prefix"), dict(generalized_attention=True),
                                dict(no_projection=True)], ids=["softmax", "relu", "none"])
def test_a_decoder_state_takes_empty_chunks(kw):
    """extend with no keys (an empty prompt; with a (b, 0) keep too) adds nothing, and a step of
    no positions gives the empty output (review R38: a max over the empty time axis raised
    IndexError; favor_attention takes zero keys)."""
    fa = FastAttention(16, 16, causal=True, **kw).double()
    g = torch.Generator().manual_seed(2)
    k, v, q = (torch.randn(1, 2, 3, dim, generator=g, dtype=torch.float64) for dim in (16, 8, 16))
    state = favor_state(fa, k[:, :, :0], v[:, :, :0])
    state.extend(k[:, :, :0], v[:, :, :0])
    state.extend(k[:, :, :0], v[:, :, :0], torch.ones(1, 0, dtype=torch.bool))
    empty = state.step(q[:, :, :0], k[:, :, :0], v[:, :, :0])
    assert empty.shape == (1, 2, 0, 8) and empty.dtype == torch.float64
    steps = torch.cat([state.step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1]) for i in range(3)], dim=2)
    assert torch.allclose(steps, fa(q, k, v), rtol=1e-12, atol=1e-12)
