"""learningmatter-mit/NeuralForceField (nff/nn/modules/spooky_fast.py ``NonLocalInteraction``,
nff/nn/models/spooky_fast.py ``SpookyNet``, nff/utils/scatter.py ``compute_grad``;
https://github.com/learningmatter-mit/NeuralForceField).

A force field: ``FastAttention(dim_heads=feat_dim, nb_features=feat_dim, causal=False)`` is
called once per molecule on (1, 1, n_atoms, feat_dim) q, k, v (the three outputs of a batched
residual MLP over ``repeat_inp(x, 3)``), each output written by slice into a zeros tensor; the
forces are ``torch.autograd.grad(energy, xyz, create_graph=True)`` and the loss on energy and
forces is backpropagated: a second-order backward through FastAttention, with molecules of
different sizes (different n per call).

Kept: the embedding, the interaction blocks (residual MLPs, the non-local block as written, a
local interaction), the readout, compute_grad and the energy + force loss. Changed: the local
interaction is a radial-basis message over all pairs of a molecule (the program's uses its
spherical-harmonics basis); the learnable swish is x sigmoid(beta x). Shrunk: 16 features,
2 interactions, molecules of 5, 3 and 7 atoms, Adam for 3 steps, float64.
"""
import torch
from torch import nn
from torch.autograd import grad

from common import default_dtype, same_results

FEAT = 16


def compute_grad(inputs, output):
    (gradspred,) = grad(output, inputs, grad_outputs=output.data.new(output.shape).fill_(1),
                        create_graph=True, retain_graph=True)
    return gradspred


def repeat_inp(x, num_out):
    return x.repeat(num_out, *([1] * len(x.shape)))


class Swish(nn.Module):
    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


class BatchedLinear(nn.Module):
    def __init__(self, f, num_out):
        super().__init__()
        self.w = nn.Parameter(torch.randn(num_out, f, f) / f**0.5)
        self.b = nn.Parameter(torch.zeros(num_out, 1, f))
        self.act = Swish()

    def forward(self, x):
        return torch.bmm(self.act(x), self.w) + self.b


class BatchedResidualMLP(nn.Module):
    def __init__(self, f, num_out):
        super().__init__()
        self.block = nn.Sequential(BatchedLinear(f, num_out), BatchedLinear(f, num_out), Swish(),
                                   BatchedLinear(f, num_out))

    def forward(self, x):
        return x + self.block(x)


class Residual(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.block = nn.Sequential(Swish(), nn.Linear(f, f), Swish(), nn.Linear(f, f))

    def forward(self, x):
        return x + self.block(x)


class ResidualMLP(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.block = nn.Sequential(Residual(f), Swish(), nn.Linear(f, f))

    def forward(self, x):
        return self.block(x)


class LocalInteraction(nn.Module):
    def __init__(self, f, k=8, r_cut=5.0):
        super().__init__()
        self.register_buffer("mu", torch.linspace(0, r_cut, k))
        self.G = nn.Linear(k, f, bias=False)
        self.res_j = ResidualMLP(f)
        self.res_l = ResidualMLP(f)

    def forward(self, xyz, x_tilde, nbrs):
        r_ij = xyz[nbrs[:, 1]] - xyz[nbrs[:, 0]]
        d = ((r_ij**2 + 1e-15).sum(-1)) ** 0.5
        rbf = torch.exp(-((d[:, None] - self.mu) ** 2))
        msg = self.res_j(x_tilde[nbrs[:, 1]]) * self.G(rbf)
        return self.res_l(torch.zeros_like(x_tilde).index_add(0, nbrs[:, 0], msg))


def build(lib):
    class NonLocalInteraction(nn.Module):  # spooky_fast.py, as written
        def __init__(self, feat_dim):
            super().__init__()
            self.attn = lib.module.FastAttention(dim_heads=feat_dim, nb_features=feat_dim, causal=False)
            self.feat_dim = feat_dim
            self.resmlp = BatchedResidualMLP(feat_dim, num_out=3)

        def forward(self, x_tilde, num_atoms):
            Q, K, V = self.resmlp(repeat_inp(x_tilde, 3))
            q_split, k_split, v_split = (torch.split(t, num_atoms.tolist()) for t in (Q, K, V))
            out = torch.zeros(x_tilde.shape[0], self.feat_dim, device=x_tilde.device)
            for i, num in enumerate(num_atoms):
                q = q_split[i].reshape(1, 1, -1, self.feat_dim)
                k = k_split[i].reshape(1, 1, -1, self.feat_dim)
                v = v_split[i].reshape(1, 1, -1, self.feat_dim)
                att = self.attn(q, k, v).reshape(-1, self.feat_dim)
                counter = sum(num_atoms[:i])
                out[counter: counter + num] = att
            return out

    class InteractionBlock(nn.Module):
        def __init__(self, f):
            super().__init__()
            self.residual_1, self.residual_2, self.resmlp = Residual(f), Residual(f), ResidualMLP(f)
            self.local = LocalInteraction(f)
            self.non_local = NonLocalInteraction(f)

        def forward(self, x, xyz, nbrs, num_atoms):
            x_tilde = self.residual_1(x)
            local = self.local(xyz=xyz, x_tilde=x_tilde, nbrs=nbrs)
            non_local = self.non_local(x_tilde=x_tilde, num_atoms=num_atoms)
            x_t = self.residual_2(x_tilde + local + non_local)
            return x_t, self.resmlp(x_t)

    class SpookyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(10, FEAT, padding_idx=0)
            self.interactions = nn.ModuleList([InteractionBlock(FEAT) for _ in range(2)])
            self.readout = nn.Linear(FEAT, 1)

        def forward(self, batch):
            nxyz = batch["nxyz"]
            z, xyz = nxyz[:, 0].long(), nxyz[:, 1:]
            xyz.requires_grad = True
            num_atoms = batch["num_atoms"]
            x = self.embedding(z)
            f = torch.zeros_like(x)
            for interaction in self.interactions:
                x, y_t = interaction(x=x, xyz=xyz, nbrs=batch["nbr_list"], num_atoms=num_atoms)
                f = f + y_t
            atom_e = self.readout(f).squeeze(-1)
            energy = torch.stack([e.sum() for e in torch.split(atom_e, num_atoms.tolist())])
            return {"energy": energy, "energy_grad": compute_grad(inputs=xyz, output=energy)}

    return SpookyNet()


def batch_of_molecules():
    num_atoms = torch.tensor([5, 3, 7])
    n = int(num_atoms.sum())
    z = torch.randint(1, 10, (n, 1)).double()
    xyz = torch.randn(n, 3) * 1.5
    nbrs, start = [], 0
    for size in num_atoms.tolist():
        nbrs += [(start + i, start + j) for i in range(size) for j in range(size) if i != j]
        start += size
    return {"nxyz": torch.cat([z, xyz], 1), "num_atoms": num_atoms, "nbr_list": torch.tensor(nbrs),
            "energy": torch.randn(3), "energy_grad": torch.randn(n, 3)}


def program(lib, rec):
    with default_dtype(torch.float64):
        torch.manual_seed(0)
        model = build(lib)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        batch = batch_of_molecules()
        for _ in range(3):
            out = model({k: v.clone() for k, v in batch.items()})
            loss = ((out["energy"] - batch["energy"]) ** 2).mean() + ((out["energy_grad"] - batch["energy_grad"]) ** 2).mean()
            loss.backward()
            rec.log("energy", out["energy"])
            rec.log("forces", out["energy_grad"])
            rec.log("loss", loss)
            rec.optimizer_step(opt, model)
        rec.log("state", model.state_dict())


def test_force_field_trains_through_second_order_gradients_as_performer_pytorch():
    theirs, _ = same_results(program)
    grads = theirs.rec.entries["grads"][0]
    # the attention inputs' MLP is trained (the force term through the second-order backward of the attention)
    assert all(grads[name] is not None and grads[name].abs().max() > 0
               for name in grads if name.startswith("interactions.0.non_local.resmlp"))
