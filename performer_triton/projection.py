"""Gaussian orthogonal random projection matrices, drawn exactly as performer-pytorch 1.1.4 does."""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Union

import torch
from torch import Tensor

from .validation import check_generator, check_int

Device = Union[torch.device, str, int, None]  # what torch.device() takes, or None (the default device)


def _randn(shape: tuple[int, ...], device: Device, generator: torch.Generator | None) -> Tensor:
    check_generator(generator)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, device=gen_device, generator=generator).to(device)


def orthogonal_matrix_chunk(cols: int, device: Device = None, *, generator: torch.Generator | None = None) -> Tensor:
    """Q^T of the QR decomposition of a (cols, cols) Gaussian block (QR on CPU, as 1.1.4)."""
    block = _randn((cols, cols), device, generator)
    if block.is_meta:  # built under torch.device("meta"): shapes only, values come with load_state_dict
        return block
    q, _ = torch.linalg.qr(block.cpu(), mode="reduced")
    return q.to(device).t()


def gaussian_orthogonal_random_matrix(
    nb_rows: int,
    nb_columns: int,
    scaling: int = 0,
    device: Device = None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(nb_rows, nb_columns) projection: stacked orthogonal blocks with rows rescaled by the norms
    of Gaussian vectors (scaling=0) or by sqrt(nb_columns) (scaling=1).

    Same RNG order as 1.1.4 (one randn(d, d) per block, then randn(m, d)), so the same seed gives
    the same matrix. ``generator`` draws from a private stream instead of the global one.
    """
    return stacked_blocks(nb_rows, nb_columns, scaling, device, partial(orthogonal_matrix_chunk, generator=generator),
                          generator)


def stacked_blocks(nb_rows: int, nb_columns: int, scaling: int, device: Device, chunk: Callable[[int, object], Tensor],
                   generator: torch.Generator | None = None) -> Tensor:
    """gaussian_orthogonal_random_matrix with its (cols, cols) orthogonal blocks from chunk(cols,
    device) (1.1.4's module-level orthogonal_matrix_chunk, which a program may patch)."""
    nb_rows = check_int("nb_rows", nb_rows, 1, ValueError)
    nb_columns = check_int("nb_columns", nb_columns, 1, ValueError)
    nb_full_blocks = nb_rows // nb_columns
    blocks = [chunk(nb_columns, device) for _ in range(nb_full_blocks)]
    remaining = nb_rows - nb_full_blocks * nb_columns
    if remaining > 0:
        blocks.append(chunk(nb_columns, device)[:remaining])
    final = torch.cat(blocks)
    if scaling not in (0, 1):  # (after the blocks' draws, as 1.1.4: the global RNG moves the same)
        raise ValueError(f"Invalid scaling {scaling!r} (FastAttention's ortho_scaling): expected 0 (Gaussian norms) or "
                         f"1 (sqrt(nb_columns))")
    if scaling == 0:
        multiplier = _randn((nb_rows, nb_columns), device, generator).norm(dim=1)
    else:
        multiplier = math.sqrt(float(nb_columns)) * torch.ones((nb_rows,), device=device)
    return torch.diag(multiplier) @ final
