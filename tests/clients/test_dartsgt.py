"""DARTS-GT (a GraphGPS derivative, package ``dartsgt``): performer-pytorch's CrossAttention as
the global attention of a graph transformer layer, queries from the nodes and keys/values from a
second representation of the same nodes.

Kept: ``CrossAttention(dim=dim_h, heads=num_heads, dropout=attn_dropout)`` called as
``self.self_attn(q_dense, context=kv_combined_dense, mask=mask)[mask]`` on zero-padded dense
batches. With a context, 1.1.4 ignores ``mask`` (its context_mask stays None), so the padded
context rows take part as zeros: the same numbers are required here, not a fix. The key/value
branch (an expert model, dropout, BatchNorm1d, normalised by its global mean and std, plus
0.1 x the input), the query projection MLP, dropout, residual, BatchNorm1d, feed-forward block,
BatchNorm1d, mean pooling and a classification head; Adam; eval.
Changed: the torch_geometric GNN expert is one Linear; to_dense_batch is common.py's.
Shrunk: dim_h 16, 4 heads, 2 layers, 3 graphs of 2-6 nodes, 3 steps, float64.
The biases feeding a BatchNorm have a zero gradient up to rounding, which Adam turns into
steps of size lr: their gradients are not compared, and over three steps the other parameters
pick up ~1e-10 of that noise, so what the program computes (logits, losses, gradients, eval
logits) is compared to 1e-8 instead of the usual 1e-10.
"""
import torch
import torch.nn.functional as F
from torch import nn

from common import same_results, to_dense_batch

DIM_H, HEADS, CLASSES, NODE_FEATURES = 16, 4, 3, 5


class Layer(nn.Module):
    def __init__(self, lib, dim_h, num_heads, dropout=0.1, attn_dropout=0.2):
        super().__init__()
        self.self_attn = lib.module.CrossAttention(dim=dim_h, heads=num_heads, dropout=attn_dropout)
        self.kv_model = nn.Linear(dim_h, dim_h)
        self.dropout_kv = nn.Dropout(dropout)
        self.norm1_kv = nn.BatchNorm1d(dim_h)
        self.q_projection = nn.Sequential(nn.Linear(dim_h, dim_h), nn.ReLU(), nn.Linear(dim_h, dim_h))
        self.dropout_attn = nn.Dropout(dropout)
        self.norm1_attn = nn.BatchNorm1d(dim_h)
        self.ff_linear1 = nn.Linear(dim_h, dim_h * 2)
        self.ff_linear2 = nn.Linear(dim_h * 2, dim_h)
        self.ff_dropout1 = nn.Dropout(dropout)
        self.ff_dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.BatchNorm1d(dim_h)

    def forward(self, h, batch):
        h_in1 = h.clone()
        h_kv = self.norm1_kv(self.dropout_kv(self.kv_model(h_in1)))
        kv_combined = (h_kv - h_kv.mean()) / (h_kv.std() + 1e-8) + 0.1 * h_in1
        q_dense, mask = to_dense_batch(h_in1, batch)
        kv_combined_dense, _ = to_dense_batch(kv_combined, batch)
        q_dense = self.q_projection(q_dense)
        h_attn = self.self_attn(q_dense, context=kv_combined_dense, mask=mask)[mask]
        h = self.norm1_attn(self.dropout_attn(h_attn) + h_in1)
        h = h + self.ff_dropout2(self.ff_linear2(self.ff_dropout1(F.relu(self.ff_linear1(h)))))
        return self.norm2(h)


class Model(nn.Module):
    def __init__(self, lib):
        super().__init__()
        self.encoder = nn.Linear(NODE_FEATURES, DIM_H)
        self.layers = nn.ModuleList([Layer(lib, DIM_H, HEADS) for _ in range(2)])
        self.head = nn.Linear(DIM_H, CLASSES)

    def forward(self, x, batch):
        h = self.encoder(x)
        for layer in self.layers:
            h = layer(h, batch)
        pooled = torch.zeros(int(batch.max()) + 1, DIM_H, dtype=h.dtype).index_add_(0, batch, h)
        return self.head(pooled / torch.bincount(batch)[:, None])


def before_batchnorm(name: str) -> bool:
    return name.endswith("kv_model.bias")


def program(lib, rec):
    torch.manual_seed(8)
    model = Model(lib).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        model.train()
        sizes = torch.randint(2, 7, (3,))
        batch = torch.repeat_interleave(torch.arange(3), sizes)
        x = torch.randn(int(sizes.sum()), NODE_FEATURES, dtype=torch.float64)
        y = torch.randint(0, CLASSES, (3,))
        logits = model(x, batch)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        rec.log("logits", logits)
        rec.log("loss", loss)
        rec.log("grads", {n: p.grad for n, p in model.named_parameters() if not before_batchnorm(n)})
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        rec.log("eval logits", model(x, batch))


def test_dartsgt_cross_attention_layer_trains_as_performer_pytorch():
    same_results(program, rel=1e-8)
