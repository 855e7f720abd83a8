"""Side-by-side runner for the client programs in tests/clients.

Each test_<project>.py reproduces one public program that uses performer-pytorch: the same
model arguments (shrunk), the same call sequence (build, forward, loss, backward, optimizer,
redraws, generation), random data instead of the dataset. The program is written once as a
function ``program(lib, rec)``: ``lib`` is either library (``lib.module`` is the top-level
package, ``performer_pytorch`` or ``performer_triton``; ``lib.performer_pytorch``,
``lib.autoregressive_wrapper``, ``lib.performer_enc_dec``, ``lib.reversible`` its 1.1.4
submodules) and ``rec`` records what the program computes (losses, gradients, parameters,
sampled tokens, projection matrices). ``same_results(program)`` runs it against
performer-pytorch 1.1.4 and against performer_triton, in float64 with the seeds the program
sets, and asserts that every record agrees (floats <= 1e-10 relative, integers exactly) and that
the global random generator is in the same state afterwards (same dropout masks, same data).
"""
from __future__ import annotations

import contextlib
import io
import random
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # 1.1.4 imports distutils, torch.cuda.amp
    import performer_pytorch as _original
    import performer_pytorch.autoregressive_wrapper as _original_ar
    import performer_pytorch.performer_enc_dec as _original_ed
    import performer_pytorch.performer_pytorch as _original_pp
    import performer_pytorch.reversible as _original_rev

import performer_triton as _ours
import performer_triton.autoregressive_wrapper as _ours_ar
import performer_triton.performer_enc_dec as _ours_ed
import performer_triton.performer_pytorch as _ours_pp
import performer_triton.reversible as _ours_rev
from performer_triton import validation as _validation

REL = 1e-10  # the compatibility rule's float64 tolerance


@dataclass(frozen=True)
class Library:
    """One implementation of the performer-pytorch 1.1.4 API, as a program imports it."""

    name: str
    module: ModuleType
    performer_pytorch: ModuleType
    autoregressive_wrapper: ModuleType
    performer_enc_dec: ModuleType
    reversible: ModuleType

    def __repr__(self) -> str:
        return self.name


ORIGINAL = Library("performer_pytorch", _original, _original_pp, _original_ar, _original_ed, _original_rev)
OURS = Library("performer_triton", _ours, _ours_pp, _ours_ar, _ours_ed, _ours_rev)


class Recorder:
    """What a program computed, in order: name -> list of values (tensors are detached copies)."""

    def __init__(self) -> None:
        self.entries: dict[str, list[Any]] = {}

    def log(self, name: str, value: Any) -> None:
        self.entries.setdefault(name, []).append(_snapshot(value))

    def grads(self, name: str, model: nn.Module) -> None:
        """Every parameter's gradient, by parameter name (None where it has none)."""
        self.log(name, {n: p.grad for n, p in model.named_parameters()})

    def params(self, name: str, model: nn.Module) -> None:
        self.log(name, dict(model.named_parameters()))

    def projections(self, name: str, model: nn.Module) -> None:
        """Every FastAttention projection matrix, in module order."""
        self.log(name, projection_matrices(model))

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        """The program's optimizer.step(); optimizer.zero_grad(), with the gradients recorded
        before and the projections after ("grads", "projections")."""
        self.grads("grads", model)
        optimizer.step()
        optimizer.zero_grad()
        self.projections("projections", model)


def projection_matrices(model: nn.Module) -> list[torch.Tensor]:
    return [m.projection_matrix for m in model.modules() if hasattr(m, "projection_matrix")]


def _snapshot(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_snapshot(v) for v in value]
    return value


@dataclass
class Run:
    lib: Library
    rec: Recorder
    rng_state: torch.Tensor  # torch's global generator after the program
    python_random_state: object
    warnings: list[str]  # UserWarnings the library emitted (performer_triton's ignored-argument notes)
    all_warnings: set[str]  # every warning, as "Category: message"
    stdout: str
    result: Any  # what the program returned


def run(program: Callable[[Library, Recorder], Any], lib: Library) -> Run:
    """Run ``program`` against ``lib``: stdout captured (1.1.4 prints a CUDA notice per causal
    layer), warnings recorded, performer_triton's one-time warnings reset first. One intra-op
    thread: these programs are tiny, and on a shared machine thread contention makes them ~20x
    slower (both libraries run under the same setting)."""
    rec = Recorder()
    out = io.StringIO()
    if lib is OURS:
        getattr(_validation, "_WARNED", set()).clear()  # one-time warnings: count them per program
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
            warnings.simplefilter("always")
            result = program(lib, rec)
    finally:
        torch.set_num_threads(threads)
    emitted = [str(w.message) for w in caught if w.category is UserWarning and "is ignored" in str(w.message)]
    every = {f"{w.category.__name__}: {w.message}" for w in caught}
    return Run(lib, rec, torch.get_rng_state(), random.getstate(), emitted, every, out.getvalue(), result)


def same_results(program: Callable[[Library, Recorder], Any], *, rel: float = REL) -> tuple[Run, Run]:
    """Run ``program`` on performer-pytorch 1.1.4 and on performer_triton; assert the same records,
    the same global random state afterwards, and no warning of ours that 1.1.4 does not give
    (except the one-time notes on ignored arguments). Returns (theirs, ours)."""
    theirs = run(program, ORIGINAL)
    ours = run(program, OURS)
    assert list(ours.rec.entries) == list(theirs.rec.entries)
    for name, values in theirs.rec.entries.items():
        mine = ours.rec.entries[name]
        assert len(mine) == len(values), name
        for i, (a, b) in enumerate(zip(mine, values)):
            assert_same(a, b, f"{name}[{i}]", rel)
    assert torch.equal(ours.rng_state, theirs.rng_state), "the global torch generator diverged"
    assert ours.python_random_state == theirs.python_random_state, "Python's random module diverged"
    new = sorted(w for w in ours.all_warnings - theirs.all_warnings if "is ignored" not in w)
    assert not new, f"warnings 1.1.4 does not give: {new}"
    return theirs, ours


def assert_same(ours: Any, theirs: Any, where: str, rel: float = REL, floor: float = 0.0) -> None:
    """ours == theirs: floats to ``rel`` of the tensor's largest magnitude (at least ``floor``),
    everything else exactly. In a dict of tensors (gradients, parameters) the floor is 1e-4 of
    the dict's largest magnitude: a gradient that is itself a tiny cancellation residue (1e-13
    where the others are 1e-1, e.g. behind ReZero's 1e-3 gate) is compared to the gradient
    vector's scale, not to its own."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and list(ours) == list(theirs), f"{where}: keys differ"
        floats = [t for t in theirs.values() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
        if floats:
            floor = max(floor, 1e-4 * max(t.abs().max().item() for t in floats))
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{where}.{key}", rel, floor)
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), f"{where}: lengths differ"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]", rel, floor)
    elif isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{where}: {type(ours).__name__} is not a tensor"
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (
            f"{where}: {tuple(ours.shape)} {ours.dtype} vs 1.1.4's {tuple(theirs.shape)} {theirs.dtype}"
        )
        if theirs.is_floating_point():
            assert torch.isfinite(theirs).all(), f"{where}: 1.1.4's own value is not finite"
            err = (ours - theirs).abs().max().item() if theirs.numel() else 0.0
            scale = max(theirs.abs().max().item() if theirs.numel() else 0.0, floor, 1e-300)
            assert err <= rel * scale, f"{where}: max |diff| {err:.3e} vs scale {scale:.3e}"
        else:
            assert torch.equal(ours, theirs), f"{where}: {ours.tolist()} != 1.1.4's {theirs.tolist()}"
    elif isinstance(theirs, float):
        assert abs(ours - theirs) <= rel * max(abs(theirs), floor, 1e-300), f"{where}: {ours!r} != 1.1.4's {theirs!r}"
    else:
        assert ours == theirs, f"{where}: {ours!r} != 1.1.4's {theirs!r}"


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """torch.set_default_dtype(dtype) for the block: a program run in float64 that builds its
    modules, buffers and random draws in the default dtype."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def changed(values: list[list[torch.Tensor]]) -> bool:
    """Whether any recorded list of projection matrices differs from the first one recorded."""
    first = values[0]
    return any(any(not torch.equal(a, b) for a, b in zip(first, later)) for later in values[1:])


def tokens(shape, high: int, seed: int, low: int = 0) -> torch.Tensor:
    """Random token ids from a private generator (does not touch the global stream)."""
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))


def to_dense_batch(x, batch):
    """torch_geometric.utils.to_dense_batch, written out (torch_geometric is not a test dependency):
    (N, F) node features sorted by graph id -> (B, N_max, F) zero-padded, (B, N_max) mask."""
    counts = torch.bincount(batch)
    n_max = int(counts.max())
    position = torch.arange(x.shape[0]) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    dense = x.new_zeros(len(counts), n_max, x.shape[1])
    dense[batch, position] = x
    mask = torch.zeros(len(counts), n_max, dtype=torch.bool)
    mask[batch, position] = True
    return dense, mask
