"""lucidrains/performer-pytorch, README.md (last commit, 182da65): the usage examples, run as
written (shrunk) and then trained for a few steps.

- PerformerLM with every option the README sets: nb_features, feature_redraw_interval,
  generalized_attention=False with kernel_fn=torch.nn.ReLU(), reversible=True, ff_chunks=10,
  use_scalenorm/use_rezero False, ff_glu=True, emb/ff/attn dropout 0.1, local_attn_heads half
  the heads with a local_window_size, rotary_position_emb=True, shift_tokens=True;
  ``model(x, mask=mask)``; then "Advanced": ``model.fix_projection_matrices_()``, after which no
  redraw may happen.
- Plain Performer: the README omits the required ``dim_head``, a TypeError in 1.1.4 (checked to
  be one in both); run with dim_head given.
- PerformerEncDec with the README's ``tie_token_embed=True`` (ignored by 1.1.4, warned about by
  us), ``enc_dec(src, tgt, enc_mask=src_mask, dec_mask=tgt_mask)`` and ``enc_dec.generate(...,
  seq_len=GENERATE_LEN, eos_token=1)`` primed with ``torch.tensor([[0.]]).long()``.
- Standalone SelfAttention, CrossAttention (``attn(x, context=context)``) and FastAttention on
  random inputs, forward and backward.
Shrunk: vocab 20000 -> 64, lengths 2048/4096/1024/512 -> 20/12, dim 512 -> 16, depth 12 -> 2
(6 -> 1), heads 8 -> 4 (2 local, window 256 -> 8) or 2, nb_features 256 -> 16, redraw interval
1000 -> 2; training steps (Adam on random targets) added to the LM, float64, CPU for .cuda().
"""
import pytest
import torch
from torch import nn

from common import ORIGINAL, OURS, changed, same_results

NUM_TOKENS = 64
SEQ_LEN = 20


def lm_kwargs():
    return dict(
        num_tokens=NUM_TOKENS,
        max_seq_len=SEQ_LEN,
        dim=16,
        depth=2,
        heads=4,
        causal=False,
        nb_features=16,
        feature_redraw_interval=2,
        generalized_attention=False,
        kernel_fn=torch.nn.ReLU(),
        reversible=True,
        ff_chunks=10,
        use_scalenorm=False,
        use_rezero=False,
        ff_glu=True,
        emb_dropout=0.1,
        ff_dropout=0.1,
        attn_dropout=0.1,
        local_attn_heads=2,
        local_window_size=8,
        rotary_position_emb=True,
        shift_tokens=True,
    )


def language_model(lib, rec):
    torch.manual_seed(0)
    model = lib.module.PerformerLM(**lm_kwargs()).double()
    torch.manual_seed(1)
    x = torch.randint(0, NUM_TOKENS, (1, SEQ_LEN))
    mask = torch.ones_like(x).bool()
    rec.log("logits", model(x, mask=mask))  # (1, 2048, 20000) in the README

    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    rec.projections("projections", model)
    for step in range(6):
        if step == 3:
            model.fix_projection_matrices_()
            rec.projections("fixed projections", model)
        x = torch.randint(0, NUM_TOKENS, (2, SEQ_LEN))
        target = torch.randint(0, NUM_TOKENS, (2, SEQ_LEN))
        logits = model(x, mask=torch.ones_like(x).bool())
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), target)
        loss.backward()
        rec.log("loss", loss)
        rec.grads("grads", model)
        optim.step()
        optim.zero_grad()
        rec.projections("projections" if step < 3 else "fixed projections", model)
    model.eval()
    with torch.no_grad():
        rec.log("eval logits", model(x, mask=torch.ones_like(x).bool()))


def plain_performer(lib, rec):
    torch.manual_seed(0)
    model = lib.module.Performer(dim=16, depth=1, heads=4, dim_head=8, causal=True).double()
    torch.manual_seed(1)
    x = torch.randn(1, SEQ_LEN, 16, dtype=torch.float64, requires_grad=True)
    out = model(x)  # (1, 2048, 512) in the README
    out.square().sum().backward()
    rec.log("out", out)
    rec.log("input grad", x.grad)
    rec.grads("grads", model)


def encoder_decoder(lib, rec):
    src_seq_len = tgt_seq_len = 12
    generate_len = 8
    torch.manual_seed(0)
    enc_dec = lib.module.PerformerEncDec(
        dim=16,
        tie_token_embed=True,
        enc_num_tokens=NUM_TOKENS,
        enc_depth=1,
        enc_heads=2,
        enc_max_seq_len=src_seq_len,
        dec_num_tokens=NUM_TOKENS,
        dec_depth=1,
        dec_heads=2,
        dec_max_seq_len=tgt_seq_len,
    ).double()
    torch.manual_seed(1)
    src = torch.randint(0, NUM_TOKENS, (1, src_seq_len))
    tgt = torch.randint(0, NUM_TOKENS, (1, tgt_seq_len))
    src_mask = torch.ones_like(src).bool()
    tgt_mask = torch.ones_like(src).bool()

    enc_dec.train()
    loss = enc_dec(src, tgt, enc_mask=src_mask, dec_mask=tgt_mask)
    loss.backward()
    rec.log("loss", loss)
    rec.grads("grads", enc_dec)

    generate_in = torch.randint(0, NUM_TOKENS, (1, src_seq_len)).long()
    generate_out_prime = torch.tensor([[0.0]]).long()
    samples = enc_dec.generate(generate_in, generate_out_prime, seq_len=generate_len, eos_token=1)
    rec.log("samples", samples)
    rec.log("training after generate", enc_dec.training)


def standalone_attention(lib, rec):
    torch.manual_seed(0)
    attn = lib.module.SelfAttention(dim=16, heads=2, causal=False).double()
    x = torch.randn(1, SEQ_LEN, 16, dtype=torch.float64)
    out = attn(x)
    out.sum().backward()
    rec.log("self attention", out)
    rec.grads("self attention grads", attn)

    attn = lib.module.CrossAttention(dim=16, heads=2).double()
    x = torch.randn(1, SEQ_LEN, 16, dtype=torch.float64)
    context = torch.randn(1, 12, 16, dtype=torch.float64)
    out = attn(x, context=context)
    out.sum().backward()
    rec.log("cross attention", out)
    rec.grads("cross attention grads", attn)

    q, k, v = (torch.randn(1, 2, SEQ_LEN, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    attn_fn = lib.module.FastAttention(dim_heads=8, nb_features=16, causal=False)
    out = attn_fn(q, k, v)
    out.square().sum().backward()
    rec.log("fast attention", out)
    rec.log("fast attention grads", [q.grad, k.grad, v.grad])


def test_readme_language_model_trains_as_performer_pytorch_until_projections_are_fixed():
    theirs, _ = same_results(language_model)
    assert changed(theirs.rec.entries["projections"]), "the run must cross a projection redraw"
    assert not changed(theirs.rec.entries["fixed projections"]), "fix_projection_matrices_ stops redraws"


def test_readme_plain_performer_as_performer_pytorch():
    same_results(plain_performer)


def test_readme_encoder_decoder_trains_and_generates_as_performer_pytorch():
    theirs, ours = same_results(encoder_decoder)
    assert theirs.rec.entries["training after generate"] == [True]
    assert sum("'tie_token_embed'" in w for w in ours.warnings) == 1, ours.warnings


def test_readme_standalone_attention_as_performer_pytorch():
    same_results(standalone_attention)


@pytest.mark.parametrize("lib", [ORIGINAL, OURS], ids=str)
def test_readme_plain_performer_without_dim_head_is_a_type_error_in_both(lib):
    with pytest.raises(TypeError, match="dim_head"):
        lib.module.Performer(dim=16, depth=1, heads=8, causal=True)
