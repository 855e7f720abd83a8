"""Public programs that do not run against performer-pytorch 1.1.4 (written for an older API or
simply wrong): performer_triton must fail the same way (an exception of 1.1.4's class, or a
subclass of it), not run on with other numbers, and must not consume the global RNG differently
before failing.

- R-J96/vision-transformer-experiments ``models.py`` (``performer_tiny_patch25_500``) and
  lucianistrati/SemEval2022-Multimedia-Automatic-Misogyny-Identification
  ``src/train_performer.py``: ``Performer(dim=512, depth=1, heads=8, causal=True)``, the old
  README call without ``dim_head`` (required by 1.1.4's Performer): TypeError.
- xieshuqin/DenseTokenSupervision ``models/new_performer.py``:
  ``partial(gaussian_orthogonal_random_matrix, nb_rows, nb_columns, scaling=0,
  qr_uniform_q=False)()`` (an argument of older releases): TypeError.
- a Siamese sentence encoder (``PerformerForSiamese``, found by the code search without its
  repository) passing an older release's positional order, ``Performer(dim, depth, heads,
  local_attn_heads, local_window_size, causal, ff_mult, nb_features, reversible, ff_chunks,
  generalized_attention, kernel_fn, qr_uniform_q, use_scalenorm, use_rezero, ff_glu, ff_dropout,
  attn_dropout, cross_attend)``: 256 lands in ``local_attn_heads``: AssertionError in 1.1.4
  (ours: InputError, an AssertionError).
- an xformers ``register_attention("performer")`` wrapper (found without its repository) calling
  ``FastAttention(q, k, v, mask)`` with a fourth positional argument: TypeError.
- a protein-embedding regressor ``PerformerConcentrationModel`` (found without its repository):
  ``Performer(dim, depth, heads, causal=False, dropout=0.1)``: TypeError.
Shrunk: dims 512 -> 16.
"""
from functools import partial

import pytest
import torch
from torch import nn

import common


def _vit_experiments(lib):
    return lib.module.Performer(dim=16, depth=1, heads=8, causal=True)


def _dense_token_new_performer(lib):
    create = partial(lib.performer_pytorch.gaussian_orthogonal_random_matrix, nb_rows=8, nb_columns=4, scaling=0,
                     qr_uniform_q=False)
    return create()


def _siamese(lib):
    return lib.module.Performer(16, 2, 4, 0, 256, False, 4, None, False, 10, False, nn.ReLU(), False, False, False,
                                False, 0.1, 0.1, False)


def _xformers_wrapper(lib):
    attn_fn = lib.module.FastAttention(dim_heads=4, nb_features=8, causal=False, kernel_fn=nn.ReLU())
    q = torch.randn(2, 2, 5, 4)
    mask = (~torch.zeros(2, 5).eq(1)).to(q)
    return attn_fn(q / 4 ** 0.5, q / 4 ** 0.5, q, mask)


def _concentration(lib):
    return lib.module.Performer(dim=16, depth=2, heads=4, causal=False, dropout=0.1)


PROGRAMS = dict(vit_experiments=_vit_experiments, dense_token_new_performer=_dense_token_new_performer,
                siamese=_siamese, xformers_wrapper=_xformers_wrapper, concentration=_concentration)


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_fails_like_performer_pytorch(name):
    caught = {}
    for lib in (common.ORIGINAL, common.OURS):
        torch.manual_seed(0)
        with pytest.raises(Exception) as info:
            PROGRAMS[name](lib)
        caught[lib.name] = (info.value, torch.get_rng_state())
    theirs, ours = caught["performer_pytorch"], caught["performer_triton"]
    assert isinstance(ours[0], type(theirs[0])), (type(ours[0]), type(theirs[0]))
    assert torch.equal(ours[1], theirs[1]), "the global generator diverged before the failure"
