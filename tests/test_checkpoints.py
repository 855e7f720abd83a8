"""performer-pytorch 1.1.4 checkpoints load into performer_triton's modules (strict, same keys) and
give the same outputs and gradients; replace_fast_attention converts a live 1.1.4 model."""
import contextlib
import io
import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # 1.1.4 imports distutils
    import performer_pytorch as original
    from performer_pytorch.performer_enc_dec import PerformerEncDec as OriginalEncDec

from models import enc_dec_kwargs
from performer_triton.convert import replace_fast_attention
from performer_triton.fast_attention import FastAttention
from performer_triton.performer_pytorch import PerformerLM
from performer_triton.performer_enc_dec import PerformerEncDec

NUM_TOKENS = 50
BASE = dict(num_tokens=NUM_TOKENS, max_seq_len=64, dim=32, depth=2, heads=4, dim_head=8, nb_features=20)

VARIANTS = {
    "causal": dict(causal=True),
    "noncausal": dict(),
    "local_noncausal": dict(local_attn_heads=1, local_window_size=16),
    "local_causal_per_layer": dict(causal=True, local_attn_heads=(1, 2), local_window_size=16),
    "reversible": dict(causal=True, reversible=True),
    "shift_causal": dict(causal=True, shift_tokens=True),
    "shift_noncausal_local": dict(shift_tokens=True, local_attn_heads=2, local_window_size=8),
    "rezero": dict(use_rezero=True),
    "scalenorm": dict(use_scalenorm=True, causal=True),
    "glu_chunks": dict(ff_glu=True, ff_chunks=2, ff_mult=2),
    "axial": dict(rotary_position_emb=False, axial_position_emb=True, axial_position_shape=(8, 8)),
    "absolute": dict(rotary_position_emb=False),
    "tied": dict(tie_embed=True, causal=True),
    "biases": dict(qkv_bias=True, attn_out_bias=True, heads=2, dim_head=16),
    "generalized": dict(generalized_attention=True, causal=True),
    "no_projection": dict(no_projection=True),
    "no_projection_causal": dict(no_projection=True, causal=True),
    "reversible_shift_local": dict(reversible=True, shift_tokens=True, causal=True, local_attn_heads=1, local_window_size=8),
}


def build_original(cls, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):  # 1.1.4 prints a CUDA fallback notice per causal layer
        return cls(**kwargs)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def loaded_pair(cfg, cls=PerformerLM, original_cls=original.PerformerLM):
    torch.manual_seed(0)
    theirs = build_original(original_cls, **cfg)
    ours = cls(**cfg)
    state = theirs.state_dict()
    assert list(ours.state_dict()) == list(state)
    ours.load_state_dict(state, strict=True)
    return theirs.eval(), ours.eval()


def inputs(n=37, masked=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, NUM_TOKENS, (2, n), generator=g)
    if not masked:
        return x, {}
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, 29:] = False
    mask[0, 3] = False
    return x, {"mask": mask}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_state_dict_loads_strict_and_logits_match(name):
    theirs, ours = loaded_pair({**BASE, **VARIANTS[name]})
    x, kw = inputs(masked=name in ("noncausal", "causal", "local_causal_per_layer", "shift_noncausal_local"))
    with torch.no_grad():
        expected = theirs.double()(x, **kw)
        assert rel(ours.double()(x, **kw), expected) <= 1e-10
        assert rel(ours.float()(x, **kw), theirs.float()(x, **kw)) <= 1e-5


def test_duplicated_updater_keys_share_storage():
    _, ours = loaded_pair({**BASE, "causal": True})
    state = ours.state_dict()
    net_keys = [k for k in state if k.startswith("performer.net.")]
    for key in net_keys:
        twin = key.replace("performer.net.", "performer.proj_updater.instance.")
        assert state[twin].data_ptr() == state[key].data_ptr()
    assert "performer.proj_updater.calls_since_last_redraw" in state
    assert "performer.net.layers.0.0.fn.fast_attention.projection_matrix" in state


def test_layout_keys_of_reversible_shift_rezero_axial():
    keys = set(loaded_pair({**BASE, **VARIANTS["reversible_shift_local"]})[1].state_dict())
    assert "performer.net.blocks.1.f.net.fn.fn.to_q.weight" in keys  # PreLayerNorm -> PreShiftTokens -> attention
    assert "performer.net.blocks.0.f.net.fn.fn.local_attn.rel_pos.inv_freq" in keys
    keys = set(loaded_pair({**BASE, "use_rezero": True, **VARIANTS["axial"]})[1].state_dict())
    assert {"performer.net.layers.0.0.g", "pos_emb.weights.0", "pos_emb.weights.1"} <= keys


@pytest.mark.parametrize("name", ["reversible_shift_local", "local_noncausal", "scalenorm"])
def test_gradients_match(name):
    theirs, ours = loaded_pair({**BASE, **VARIANTS[name]})
    theirs.double().train()
    ours.double().train()
    x, _ = inputs(n=29)
    for model in (theirs, ours):
        model.fix_projection_matrices_()  # train mode must not redraw here
        model(x).pow(2).mean().backward()
    theirs_grads = dict(theirs.named_parameters())
    for key, param in ours.named_parameters():
        assert rel(param.grad, theirs_grads[key].grad) <= 1e-9, key


def test_encoder_decoder_checkpoint_and_loss():
    cfg = enc_dec_kwargs(NUM_TOKENS, dec_depth=2, tie_token_embeds=True, enc_nb_features=20, dec_nb_features=20)
    theirs, ours = loaded_pair(cfg, PerformerEncDec, OriginalEncDec)
    assert any(k.startswith("dec.net.performer.net.layers.1.0.fn.fast_attention") for k in ours.state_dict())
    g = torch.Generator().manual_seed(2)
    src, tgt = torch.randint(1, NUM_TOKENS, (2, 31), generator=g), torch.randint(1, NUM_TOKENS, (2, 17), generator=g)
    enc_mask = torch.ones(2, 31, dtype=torch.bool)
    enc_mask[0, 20:] = False
    with torch.no_grad():
        expected = theirs.double()(src, tgt, enc_mask=enc_mask)
        assert abs(ours.double()(src, tgt, enc_mask=enc_mask).item() - expected.item()) <= 1e-10 * expected.item()


def test_replace_fast_attention_keeps_outputs_keys_and_redraws():
    torch.manual_seed(0)
    model = build_original(original.PerformerLM, **BASE, causal=True, local_attn_heads=1, local_window_size=8)
    model = model.double().eval()
    x, kw = inputs(masked=True)
    with torch.no_grad():
        expected = model(x, **kw)
    keys = list(model.state_dict())
    projection = model.performer.net.layers[0][0].fn.fast_attention.projection_matrix
    rng = torch.get_rng_state()

    assert replace_fast_attention(model) is model
    assert torch.equal(torch.get_rng_state(), rng)  # conversion draws nothing from the global RNG
    fast = [m for m in model.modules() if isinstance(m, (FastAttention, original.FastAttention))]
    assert len(fast) == 2 and all(isinstance(m, FastAttention) for m in fast)
    assert fast[0].projection_matrix is projection
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert rel(model(x, **kw), expected) <= 1e-10

    # redraws continue on schedule: interval 1 -> the second training call redraws
    model.performer.proj_updater.feature_redraw_interval = 1
    model.train()
    before = projection.clone()
    with torch.no_grad():
        model(x)
        assert torch.equal(fast[0].projection_matrix, before)
        model(x)
    assert not torch.equal(fast[0].projection_matrix, before)


def test_replace_fast_attention_rejects_bad_arguments_up_front():
    for model in ("x", None):
        with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got (str|NoneType)"):
            replace_fast_attention(model)
    nothing_to_convert = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'bogus'"):
        replace_fast_attention(nothing_to_convert, backend="bogus")
    assert replace_fast_attention(nothing_to_convert, backend="torch") is nothing_to_convert


def test_meta_device_construction_then_to_empty_and_load_state_dict(monkeypatch):
    """Large models are built without memory on the meta device, then materialised and loaded."""
    monkeypatch.undo()  # the NaN fixture's wrapped torch.empty escapes torch.device("meta")'s mode
    # ... and so does the real one if torch.device's set of constructors was cached while the
    # fixture had it wrapped (dynamo builds that cache: this failed after a compile test ran)
    import torch.utils._device

    torch.utils._device._device_constructors.cache_clear()
    kwargs = dict(num_tokens=NUM_TOKENS, max_seq_len=16, dim=16, depth=2, heads=2, dim_head=8, causal=True,
                  local_attn_heads=1, local_window_size=4)
    torch.manual_seed(0)
    real = PerformerLM(**kwargs)
    with torch.device("meta"):
        lazy = PerformerLM(**kwargs)
    assert [key for key, t in lazy.state_dict().items() if not t.is_meta] == []
    lazy = lazy.to_empty(device="cpu")
    lazy.load_state_dict(real.state_dict(), strict=True)
    x = torch.randint(0, NUM_TOKENS, (2, 9))
    assert torch.equal(lazy.eval()(x), real.eval()(x))
