"""rampasek/GraphGPS, graphgps/layer/gps_layer.py: the GPS graph transformer layer with
performer-pytorch's SelfAttention as the global attention (``global_model_type='Performer'``).

Kept: ``SelfAttention(dim=dim_h, heads=num_heads, dropout=attn_dropout, causal=False)`` (dim_head
left at its default), the batch of graphs padded with ``to_dense_batch`` and attended with
``self.self_attn(h_dense, mask=mask)[mask]`` (1.1.4's mask zeroes padded values only; the
result must be the same), dropout, residual, BatchNorm1d after attention and after the
feed-forward block, graph mean pooling and a classification head, Adam, eval.
Changed: the local message passing model is ``'None'`` (a GraphGPS option) since torch_geometric
is not a test dependency; ``to_dense_batch`` and mean pooling are written out in PyTorch.
A standalone SelfAttention has no ProjectionUpdater, so 1.1.4 never redraws it: the projections
must stay fixed in both libraries.
Shrunk: dim_h 64 -> 16, 4 heads, 2 layers, 3 graphs of 2-7 nodes per batch, 4 steps, float64.
"""
import torch
import torch.nn.functional as F
from torch import nn

from common import changed, same_results, to_dense_batch

DIM_H = 16
NUM_HEADS = 4
NUM_CLASSES = 3
NODE_FEATURES = 5


class GPSLayer(nn.Module):
    """GraphGPS's GPSLayer with local_gnn_type='None', global_model_type='Performer',
    batch_norm=True, layer_norm=False."""

    def __init__(self, lib, dim_h, num_heads, dropout=0.0, attn_dropout=0.0):
        super().__init__()
        self.self_attn = lib.module.SelfAttention(dim=dim_h, heads=num_heads, dropout=attn_dropout, causal=False)
        self.norm1_attn = nn.BatchNorm1d(dim_h)
        self.dropout_attn = nn.Dropout(dropout)
        self.ff_linear1 = nn.Linear(dim_h, dim_h * 2)
        self.ff_linear2 = nn.Linear(dim_h * 2, dim_h)
        self.norm2 = nn.BatchNorm1d(dim_h)
        self.ff_dropout1 = nn.Dropout(dropout)
        self.ff_dropout2 = nn.Dropout(dropout)

    def forward(self, h, batch):
        h_in1 = h
        h_dense, mask = to_dense_batch(h, batch)
        h_attn = self.self_attn(h_dense, mask=mask)[mask]
        h_attn = self.dropout_attn(h_attn)
        h_attn = self.norm1_attn(h_in1 + h_attn)
        h = sum([h_attn])
        h = h + self.ff_dropout2(self.ff_linear2(self.ff_dropout1(F.relu(self.ff_linear1(h)))))
        return self.norm2(h)


class GPSModel(nn.Module):
    def __init__(self, lib):
        super().__init__()
        self.encoder = nn.Linear(NODE_FEATURES, DIM_H)
        self.layers = nn.ModuleList(
            [GPSLayer(lib, DIM_H, NUM_HEADS, dropout=0.1, attn_dropout=0.2) for _ in range(2)]
        )
        self.head = nn.Linear(DIM_H, NUM_CLASSES)

    def forward(self, x, batch):
        h = self.encoder(x)
        for layer in self.layers:
            h = layer(h, batch)
        pooled = torch.zeros(int(batch.max()) + 1, DIM_H, dtype=h.dtype).index_add_(0, batch, h)
        return self.head(pooled / torch.bincount(batch)[:, None])


def random_graph_batch():
    sizes = torch.randint(2, 8, (3,))
    batch = torch.repeat_interleave(torch.arange(3), sizes)
    x = torch.randn(int(sizes.sum()), NODE_FEATURES, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (3,))
    return x, batch, y


def program(lib, rec):
    torch.manual_seed(0)
    model = GPSModel(lib).double()
    torch.manual_seed(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rec.projections("projections", model)
    for _ in range(4):
        model.train()
        x, batch, y = random_graph_batch()
        logits = model(x, batch)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        rec.log("loss", loss)
        rec.optimizer_step(optimizer, model)  # optimizer.step(); optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        x, batch, y = random_graph_batch()
        rec.log("eval logits", model(x, batch))
    rec.params("final parameters", model)


def test_graphgps_performer_layer_trains_as_performer_pytorch():
    theirs, _ = same_results(program)
    assert not changed(theirs.rec.entries["projections"]), "1.1.4 never redraws a standalone SelfAttention"
