"""llm-random (IDEAS NCBR research code), ``research/conditional/moe_layers/kernelized.py``:
``FCKernelized``, a feed-forward layer computed as Performer attention whose keys are the rows of
the first weight matrix and whose values are the rows of the second. It imports 1.1.4's
module-level functions (``from performer_pytorch.performer_pytorch import
gaussian_orthogonal_random_matrix, generalized_kernel, softmax_kernel``) and builds its own
FastAttention: ``partial(gaussian_orthogonal_random_matrix, nb_rows, nb_columns, scaling)``
registered as a buffer, redrawn every ``redraw_projections_interval`` forwards with
``projection_matrix.copy_(create_projection(device=device))`` under ``torch.no_grad``, and
``softmax_kernel(x, is_query=..., projection_matrix=..., device=...)`` or
``generalized_kernel(x, normalize_data=..., kernel_fn=..., projection_matrix=..., device=...)``
applied to (1, 1, n, dmodel) tensors: the queries are the whole batch's tokens in one row, the keys
``weight.reshape(1, 1, dff, dmodel)`` (a view of a parameter) and the values
``weight.T.reshape(1, 1, dff, dmodel)`` (a copy of a transposed parameter), so the feature
gradients flow into the weights.

Kept: FCKernelized's forward, redraw counter, custom ``linear_attention`` (with and without
``average_attn``), both kernel families (softmax; relu / gelu generalized with and without
``normalize_data``), ``ortho_scaling`` 0 and 1 (``use_bias=True`` is left out: the program adds the dff-sized pre-activation bias to the dmodel-sized input, a shape error with either library).
Changed: lizrd's ``misc.Linear`` / ``LoggingLayer`` / ``measure_time`` are plain ``nn.Linear`` /
``nn.Module`` / no-ops; the layer sits in a tiny residual language model (embedding, two
FCKernelized blocks with LayerNorm, output head) trained with Adam and cross entropy, with a
``torch.no_grad`` evaluation between steps (it counts towards the redraw, as in the program).
Shrunk: dmodel 16, dff 24, kernel_r 20 (more features than dmodel: two orthogonal blocks),
redraw interval 3, batch 2 x 6 tokens, 4 steps.
"""
from functools import partial

import pytest
import torch
from torch import nn

from common import assert_same, same_results, tokens


def resolve_activation_name(name):
    return {"relu": nn.ReLU(), "gelu": nn.GELU(), "tanh": nn.Tanh()}[name]


def make_fc_kernelized(lib):
    pp = lib.performer_pytorch
    gaussian_orthogonal_random_matrix = pp.gaussian_orthogonal_random_matrix
    generalized_kernel = pp.generalized_kernel
    softmax_kernel = pp.softmax_kernel

    def create_kernel_base(kernel_type, normalization):
        if kernel_type == "softmax":
            return lambda x, is_query=False, **a: softmax_kernel(x, is_query=is_query, **a)
        return lambda x, is_query=False, **a: generalized_kernel(
            x, normalize_data=normalization, kernel_fn=resolve_activation_name(kernel_type), **a)

    class FCKernelized(nn.Module):
        def __init__(self, dmodel, dff, kernel_r, kernel_type="relu", redraw_projections_interval=10,
                     no_kernel_norm=False, no_average_attn=False, use_bias=False, ortho_scaling=0):
            super().__init__()
            self.dmodel, self.nb_features, self.dff, self.use_bias = dmodel, kernel_r, dff, use_bias
            self.redraw_projections_interval = redraw_projections_interval
            self.current_projection_count = 0
            self.logging_ff_pre_relu = nn.Linear(dmodel, dff, bias=use_bias)
            self.logging_ff_post_relu = nn.Linear(dff, dmodel, bias=use_bias)
            self.average_attn = not no_average_attn
            self.K = lambda: self.logging_ff_pre_relu.weight.reshape(1, 1, dff, dmodel)
            self.V = lambda: self.logging_ff_post_relu.weight.T.reshape(1, 1, dff, dmodel)
            self.add_bias1 = ((lambda x: x + self.logging_ff_pre_relu.bias)
                              if self.use_bias and self.logging_ff_pre_relu.bias is not None else lambda x: x)
            self.add_bias2 = ((lambda x: x + self.logging_ff_post_relu.bias)
                              if self.use_bias and self.logging_ff_post_relu.bias is not None else lambda x: x)
            self.create_projection = partial(gaussian_orthogonal_random_matrix, nb_rows=self.nb_features,
                                             nb_columns=dmodel, scaling=ortho_scaling)
            self.register_buffer("projection_matrix", self.create_projection())
            create_kernel = create_kernel_base(kernel_type, not no_kernel_norm)
            self.create_kernel = lambda x, **y: create_kernel(
                x, device=x.device, projection_matrix=self.projection_matrix, **y)
            self.fast_attention = self.fast_attention_custom

        def check_redraw_projections(self, device):
            if self.current_projection_count >= self.redraw_projections_interval:
                self.current_projection_count = 0
                self.redraw_projection_matrix(device)
            self.current_projection_count += 1

        @torch.no_grad()
        def redraw_projection_matrix(self, device):
            projections = self.create_projection(device=device)
            self.projection_matrix.copy_(projections)
            del projections

        def forward(self, x):
            self.check_redraw_projections(x.device)
            bs = x.shape[0]
            Q = self.add_bias1(x).reshape(1, 1, -1, self.dmodel)
            Y = self.fast_attention(Q, self.K(), self.V())
            return self.add_bias2(Y).reshape(bs, -1, self.dmodel)

        def fast_attention_custom(self, q, k, v):
            q = self.create_kernel(q, is_query=True)
            k = self.create_kernel(k)
            return self.linear_attention(q, k, v)

        def linear_attention(self, q, k, v):
            if self.average_attn:
                sum = k.sum(dim=-2)
                D_inv = 1.0 / torch.einsum("...nd,...d->...n", q, sum.type_as(q))
            context = torch.einsum("...nd,...ne->...de", k, v)
            if self.average_attn:
                return torch.einsum("...de,...nd,...n->...ne", context, q, D_inv)
            return torch.einsum("...de,...nd->...ne", context, q)

    return FCKernelized


VOCAB, DMODEL, DFF, R = 11, 16, 24, 20


def program(lib, rec, dtype=torch.float64, **layer_kwargs):
    FCKernelized = make_fc_kernelized(lib)
    torch.manual_seed(0)
    emb = nn.Embedding(VOCAB, DMODEL)
    blocks = nn.ModuleList([nn.ModuleDict(dict(norm=nn.LayerNorm(DMODEL),
                                                ff=FCKernelized(DMODEL, DFF, R, redraw_projections_interval=3,
                                                                **layer_kwargs)))
                            for _ in range(2)])
    head = nn.Linear(DMODEL, VOCAB)
    model = nn.ModuleDict(dict(emb=emb, blocks=blocks, head=head)).to(dtype)

    def forward(x):
        h = model["emb"](x)
        for blk in model["blocks"]:
            h = h + blk["ff"](blk["norm"](h))
        return model["head"](h)

    rec.log("initial projections", [b["ff"].projection_matrix for b in blocks])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(4):
        x = tokens((2, 6), VOCAB, step)
        logits = forward(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        rec.log("loss", loss)
        rec.grads("grads", model)
        opt.step()
        opt.zero_grad()
        rec.log("projections", [b["ff"].projection_matrix for b in blocks])
        with torch.no_grad():
            rec.log("eval logits", forward(tokens((1, 5), VOCAB, 100 + step)))
    rec.log("state_dict keys", list(model.state_dict()))


CONFIGS = {
    "relu": dict(kernel_type="relu"),
    "softmax": dict(kernel_type="softmax"),
    "softmax-ortho1": dict(kernel_type="softmax", ortho_scaling=1),
    "gelu-nonorm-noavg": dict(kernel_type="gelu", no_kernel_norm=True, no_average_attn=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fc_kernelized_trains_as_with_performer_pytorch(name):
    theirs, _ = same_results(partial(program, **CONFIGS[name]))
    first = theirs.rec.entries["initial projections"][0][0]
    assert first.shape == (R, DMODEL)
    # redraw every 3 forwards (train + eval each step): the matrices changed
    assert not torch.equal(theirs.rec.entries["projections"][-1][0], first)


def test_fc_kernelized_float32_within_1e_5():
    same_results(partial(program, dtype=torch.float32, kernel_type="softmax"), rel=1e-5)


def test_module_level_kernels_on_parameter_views_match():
    """The kernels alone on a (1, 1, dff, d) view of a weight and a non-contiguous q, with the
    gradients they send back."""
    import common
    outs = []
    for lib in (common.ORIGINAL, common.OURS):
        torch.manual_seed(1)
        w = torch.randn(DFF, DMODEL, dtype=torch.float64, requires_grad=True)
        q = torch.randn(2, DMODEL, 7, dtype=torch.float64).transpose(1, 2).reshape(1, 1, -1, DMODEL)
        P = lib.performer_pytorch.gaussian_orthogonal_random_matrix(R, DMODEL, scaling=0).double()
        res = []
        for f in (partial(lib.performer_pytorch.softmax_kernel, is_query=False),
                  partial(lib.performer_pytorch.softmax_kernel, is_query=True),
                  partial(lib.performer_pytorch.generalized_kernel, kernel_fn=nn.ReLU()),
                  partial(lib.performer_pytorch.generalized_kernel, kernel_fn=nn.Tanh(), normalize_data=False)):
            kf = f(w.reshape(1, 1, DFF, DMODEL), projection_matrix=P, device=w.device)
            qf = f(q, projection_matrix=P, device=q.device) if "is_query" not in getattr(f, "keywords", {}) else \
                lib.performer_pytorch.softmax_kernel(q, projection_matrix=P, is_query=True)
            g, = torch.autograd.grad(kf.sum() + (qf.sum(-1) ** 2).sum(), w)
            res += [kf.detach(), qf.detach(), g]
        outs.append((P, res, torch.get_rng_state()))
    assert_same(outs[1][0], outs[0][0], "projection")
    assert_same(outs[1][1], outs[0][1], "features and grads")
    assert torch.equal(outs[1][2], outs[0][2])
