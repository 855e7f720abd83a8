import torch
from conftest import DEVICE
from performer_triton.kernels.feature_map import row_stats
from performer_triton import reference as R
from performer_triton.projection import gaussian_orthogonal_random_matrix

def test_row_stats():
    torch.manual_seed(0)
    for dtype in [torch.float32, torch.float16, torch.bfloat16]:
        x = torch.randn(2, 3, 37, 48, device=DEVICE).to(dtype)
        P = gaussian_orthogonal_random_matrix(100, 48).to(dtype)
        mx, sc = row_stats(x, P)
        dash = R._project(x.double(), P.double())
        ref = dash.amax(-1)
        print(dtype, ((mx - ref).norm() / ref.norm()).item(), ((sc - (ref - R._half_sq_norm(x.double())[...,0])).norm()/ref.norm()).item())
