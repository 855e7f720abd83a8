"""``get_performer()`` of a public script comparing GPT-2 with a Performer language model
(``from performer_pytorch import PerformerLM``; its defaults: 512 positions, 12 heads, 12 layers,
768 wide, local_window_size 50, local_attn_heads 6, feature_redraw 100,
generalized_attention True).

Kept: ``PerformerLM(num_tokens, max_seq_len, dim, depth, heads, causal=True,
feature_redraw_interval, generalized_attention, kernel_fn=torch.nn.ReLU(), reversible=True,
ff_chunks=10, use_scalenorm=False, use_rezero=False, ff_glu=False, emb_dropout=0.1,
ff_dropout=0.1, attn_dropout=0.1, local_attn_heads, local_window_size)``: reversible layers with
dropout (the generator replayed in the backward), feed-forward chunks, local heads whose window
does not divide the sequence, generalized (ReLU) or softmax features, redraws during training;
then ``model.performer.fix_projection_matrices_()`` and eval.
Shrunk: 64 positions, 4 heads (dim_head left at 64), 2 layers, 32 wide, 2 local heads with a
window of 10, a redraw every 2 calls, 37-token inputs, 5 Adam steps, a checkpoint round trip
through torch.save / torch.load, float64.
"""
import io

import pytest
import torch
import torch.nn.functional as F

from common import changed, same_results, tokens

VOCAB = 77


def get_performer(lib, n_positions=64, n_head=4, n_layer=2, vocab_size=VOCAB, n_embd=32, local_window_size=10,
                  local_attn_heads=2, feature_redraw=2, generalized_attention=True):
    return lib.module.PerformerLM(
        num_tokens=vocab_size, max_seq_len=n_positions, dim=n_embd, depth=n_layer, heads=n_head, causal=True,
        feature_redraw_interval=feature_redraw, generalized_attention=generalized_attention,
        kernel_fn=torch.nn.ReLU(), reversible=True, ff_chunks=10, use_scalenorm=False, use_rezero=False,
        ff_glu=False, emb_dropout=0.1, ff_dropout=0.1, attn_dropout=0.1, local_attn_heads=local_attn_heads,
        local_window_size=local_window_size,
    )


def program(lib, rec, generalized):
    torch.manual_seed(4)
    model = get_performer(lib, generalized_attention=generalized)
    checkpoint = io.BytesIO()
    torch.save(model.state_dict(), checkpoint)
    checkpoint.seek(0)
    model.load_state_dict(torch.load(checkpoint), strict=True)
    model = model.double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = tokens((2, 38), VOCAB, seed=3)
    model.train()
    for _ in range(5):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.transpose(1, 2), data[:, 1:])
        loss.backward()
        rec.log("logits", logits)
        rec.log("loss", loss)
        rec.optimizer_step(optimizer, model)
    model.performer.fix_projection_matrices_()
    model.eval()
    with torch.no_grad():
        rec.log("eval logits", model(data))
        rec.log("eval logits again", model(data))


@pytest.mark.parametrize("generalized", [True, False], ids=["relu", "softmax"])
def test_reversible_local_performer_lm_trains_as_performer_pytorch(generalized):
    theirs, ours = same_results(lambda lib, rec: program(lib, rec, generalized))
    assert changed(theirs.rec.entries["projections"]), "feature_redraw_interval=2 redraws during training"
    a, b = theirs.rec.entries["eval logits"][0], theirs.rec.entries["eval logits again"][0]
    assert torch.equal(a, b), "fixed projections: eval is deterministic"
    assert not ours.warnings
