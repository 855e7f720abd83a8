"""Side-by-side attention benchmarks: the implementations, their correctness checks, time and peak
memory.  Used by `performer-triton bench` and by the pytest-benchmark suites in bench/.

Every implementation computes attention for q, k, v (b, h, n, d) and is checked at the timed shape
before it is timed: the FAVOR+ implementations against our float64 PyTorch path with the same
projection matrix (1.1.4's global stabilizer), exact attention against float64 softmax attention
on the first queries.  A peer that cannot run says why (`Impl.unavailable`); callers show the
reason instead of dropping the row.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from performer_triton import favor_attention, gaussian_orthogonal_random_matrix
from performer_triton.feature_maps import resolve

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
EXACT_ROWS = 256  # queries of exact attention checked against float64
SOFTMAX_FEATURES = resolve("softmax")  # FAVOR+ features in PyTorch, for peers that take features


@dataclass(frozen=True)
class Case:
    """One benchmark point.  backward: time forward + backward (of out.backward(grad))."""

    n: int
    causal: bool
    backward: bool
    b: int = 1
    h: int = 8
    d: int = 64
    m: int = 266
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    @property
    def label(self) -> str:
        mode = "causal" if self.causal else "non-causal"
        passes = "fwd+bwd" if self.backward else "fwd"
        dtype = str(self.dtype).replace("torch.", "")
        return f"{mode} {passes} {dtype} b={self.b} h={self.h} n={self.n} d={self.d} m={self.m}"


@dataclass
class Inputs:
    q: Tensor
    k: Tensor
    v: Tensor
    projection: Tensor  # (m, d) float32 on the device
    grad: Tensor


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """Seeded q, k, v (b, h, n, d) in case.dtype (requiring grad for backward cases), projection, grad."""
    gen = torch.Generator().manual_seed(seed)
    shape = (case.b, case.h, case.n, case.d)
    q, k, v, grad = (torch.randn(shape, generator=gen).to(case.device, case.dtype) for _ in range(4))
    projection = gaussian_orthogonal_random_matrix(case.m, case.d, generator=gen)
    q, k, v = (t.requires_grad_(case.backward) for t in (q, k, v))
    return Inputs(q, k, v, projection.to(case.device), grad)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


@dataclass
class Impl:
    """An attention implementation.  build(case, inputs) -> a callable returning the output;
    unavailable(case) -> why it cannot run that case, or None."""

    name: str
    build: Callable[[Case, Inputs], Callable[[], Tensor]]
    unavailable: Callable[[Case], str | None]
    exact: bool = False  # exact softmax attention (checked differently from FAVOR+)
    version: Callable[[], str] = field(default=lambda: "")


# ----------------------------------------------------------------------------- ours


def _ours(case: Case, x: Inputs) -> Callable[[], Tensor]:
    return lambda: favor_attention(x.q, x.k, x.v, x.projection, causal=case.causal)


def _ours_unavailable(case: Case) -> str | None:
    return None


# ----------------------------------------------------------------------------- performer-pytorch 1.1.4

# its causal fallback keeps (b, h, n, m, e) outer products for backward: cap what we ask of it
PERFORMER_PYTORCH_MAX_BYTES = 3 * 2**30  # measured (profiled) at n = 8192 it ran a 24 GiB machine out of memory


def _import_performer_pytorch():
    with contextlib.redirect_stdout(io.StringIO()):  # it prints when fast-transformers is missing
        from performer_pytorch import performer_pytorch

    return performer_pytorch


def _has_fast_transformers() -> bool:
    try:
        from fast_transformers.causal_product import causal_dot_product  # noqa: F401
    except Exception:  # not installed, or its compiled extension does not load
        return False
    return True


def _performer_pytorch(case: Case, x: Inputs) -> Callable[[], Tensor]:
    pp = _import_performer_pytorch()
    with contextlib.redirect_stdout(io.StringIO()):
        module = pp.FastAttention(case.d, case.m, causal=case.causal).to(case.device)
    module.projection_matrix.copy_(x.projection)

    def run() -> Tensor:
        with contextlib.redirect_stdout(io.StringIO()):
            return module(x.q, x.k, x.v)

    return run


def _performer_pytorch_unavailable(case: Case) -> str | None:
    try:
        _import_performer_pytorch()
    except ImportError as exc:
        return f"performer-pytorch is not installed ({exc})"
    if case.causal and not (case.device == "cuda" and _has_fast_transformers()):
        saved = case.b * case.h * case.n * case.m * case.d * case.dtype.itemsize
        if saved > PERFORMER_PYTORCH_MAX_BYTES:
            return (f"its causal fallback would keep {saved / 2**30:.1f} GiB of outer products "
                    f"(> {PERFORMER_PYTORCH_MAX_BYTES / 2**30:.0f} GiB cap)")
    return None


def _performer_pytorch_version() -> str:
    extra = " + fast-transformers " + _version("pytorch-fast-transformers") if _has_fast_transformers() else ""
    return _version("performer-pytorch") + extra


# ----------------------------------------------------------------------------- exact attention


def _sdpa(case: Case, x: Inputs) -> Callable[[], Tensor]:
    return lambda: F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=case.causal)


# ----------------------------------------------------------------------------- flash-linear-attention


def _fla(case: Case, x: Inputs) -> Callable[[], Tensor]:
    from fla.ops.linear_attn import chunk_linear_attn

    def run() -> Tensor:
        # FAVOR+ features in PyTorch (written to memory), then fla's chunked causal kernel
        qf, kf = SOFTMAX_FEATURES.features(x.q, x.k, x.projection.to(x.q.dtype), causal=True)
        out, _ = chunk_linear_attn(
            qf.transpose(1, 2), kf.transpose(1, 2), x.v.transpose(1, 2), scale=1.0, normalize=True
        )
        return out.transpose(1, 2)

    return run


def _fla_unavailable(case: Case) -> str | None:
    if case.device != "cuda":
        return "flash-linear-attention runs on CUDA only"
    if not case.causal:
        return "flash-linear-attention has no non-causal linear attention"
    try:
        import fla.ops.linear_attn  # noqa: F401
    except ImportError as exc:
        return f"flash-linear-attention is not installed ({exc})"
    except Exception as exc:  # e.g. fla 0.5.2 under triton 3.9: an autotune key fails at import
        return f"flash-linear-attention does not import here ({type(exc).__name__}: {exc})"
    return None


IMPLS = {
    "performer_triton": Impl("performer_triton", _ours, _ours_unavailable, version=lambda: _version("performer-triton")),
    "performer-pytorch": Impl(
        "performer-pytorch", _performer_pytorch, _performer_pytorch_unavailable, version=_performer_pytorch_version
    ),
    "torch-sdpa": Impl("torch-sdpa", _sdpa, lambda case: None, exact=True, version=lambda: torch.__version__),
    "fla-chunk": Impl("fla-chunk", _fla, _fla_unavailable, version=lambda: _version("flash-linear-attention")),
}


# ----------------------------------------------------------------------------- correctness


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _favor_truth(case: Case, x: Inputs) -> tuple[Tensor, tuple[Tensor, ...]]:
    """float64 FAVOR+ output and (dq, dk, dv) through the PyTorch path (checked against the
    reference by the test suite), at the full benchmark shape."""
    leaves = [t.detach().double().requires_grad_(case.backward) for t in (x.q, x.k, x.v)]
    out = favor_attention(*leaves, x.projection.double(), causal=case.causal, backend="torch")
    if not case.backward:
        return out.detach(), ()
    return out.detach(), torch.autograd.grad(out, leaves, x.grad.double())


def _exact_truth(case: Case, x: Inputs) -> tuple[Tensor, Tensor]:
    """float64 softmax attention and dq for the first EXACT_ROWS queries (each depends only on its
    own query and gradient rows and on the keys it sees)."""
    rows = min(case.n, EXACT_ROWS)
    q = x.q[:, :, :rows].detach().double().requires_grad_()
    keys = rows if case.causal else case.n
    k, v = x.k[:, :, :keys].detach().double(), x.v[:, :, :keys].detach().double()
    scores = q @ k.mT / math.sqrt(case.d)
    if case.causal:
        scores = scores.masked_fill(torch.ones(rows, keys, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    (dq,) = torch.autograd.grad(out, q, x.grad[:, :, :rows].double())
    return out.detach(), dq


def verify(impl: Impl, case: Case, x: Inputs, fn: Callable[[], Tensor]) -> float:
    """Run fn once (and its backward) and compare with float64; raises AssertionError beyond
    TOLERANCE[dtype].  Returns the largest relative error seen."""
    for t in (x.q, x.k, x.v):
        t.grad = None
    out = fn()
    if case.backward:
        out.backward(x.grad)
    tol = TOLERANCE[case.dtype]
    if impl.exact:
        ref_out, ref_dq = _exact_truth(case, x)
        rows = ref_out.shape[2]
        errs = {"out": _rel(out[:, :, :rows], ref_out)}
        if case.backward:
            errs["dq"] = float("inf") if x.q.grad is None else _rel(x.q.grad[:, :, :rows], ref_dq)
    else:
        ref_out, ref_grads = _favor_truth(case, x)
        errs = {"out": _rel(out, ref_out)}
        for name, leaf, ref in zip(("dq", "dk", "dv"), (x.q, x.k, x.v), ref_grads):
            errs[name] = float("inf") if leaf.grad is None else _rel(leaf.grad, ref)  # no gradient: wrong
    for t in (x.q, x.k, x.v):
        t.grad = None
    worst = max(errs.values())
    if not worst <= tol:  # also catches NaN
        raise AssertionError(f"{impl.name} {case.label}: relative errors {errs} exceed {tol:g}")
    return worst


# ----------------------------------------------------------------------------- time and memory


def step(case: Case, x: Inputs, fn: Callable[[], Tensor]) -> Callable[[], None]:
    """One timed unit: forward, plus backward for backward cases, synchronized on CUDA."""

    def run() -> None:
        out = fn()
        if case.backward:
            out.backward(x.grad)
            for t in (x.q, x.k, x.v):
                t.grad = None
        if case.device == "cuda":
            torch.cuda.synchronize()

    return run


def peak_memory(run: Callable[[], None], device: str) -> int:
    """Peak bytes allocated by `run` above what was allocated before it.

    CUDA: the caching allocator's peak.  CPU: the allocation timeline of torch's profiler (every
    allocation and free of CPU tensors, including those inside operators), replayed in order.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    live = peak = 0
    for _, action, _, nbytes in sorted(MemoryProfileTimeline(prof._memory_profile()).timeline, key=lambda r: r[0]):
        if action == Action.CREATE:
            live += nbytes
        elif action == Action.DESTROY:
            live -= nbytes
        peak = max(peak, live)
    return peak


@dataclass
class Measurement:
    impl: str
    version: str
    case: Case
    seconds: float | None = None
    peak_bytes: int | None = None
    error: float | None = None
    skipped: str = ""

    def row(self) -> dict:
        c = self.case
        return dict(
            impl=self.impl, version=self.version, device=c.device, dtype=str(c.dtype).replace("torch.", ""),
            causal=c.causal, backward=c.backward, b=c.b, h=c.h, n=c.n, d=c.d, m=c.m,
            ms=None if self.seconds is None else round(self.seconds * 1e3, 3),
            peak_mib=None if self.peak_bytes is None else round(self.peak_bytes / 2**20, 1),
            max_rel_err=self.error, skipped=self.skipped,
        )


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def side_by_side(impls: list[Impl], case: Case, *, repeats: int = 3, memory: bool = True) -> list[Measurement]:
    """Check every implementation on the same inputs, then time them interleaved (a, b, a, b, ...)
    so that drift of a shared machine hits all alike; median per implementation."""
    results, runs = [], []
    for impl in impls:
        result = Measurement(impl.name, impl.version(), case)
        reason = impl.unavailable(case)
        if reason is not None:
            result.skipped = reason
        else:
            x = make_inputs(case)
            fn = impl.build(case, x)
            result.error = verify(impl, case, x, fn)
            runs.append((result, step(case, x, fn)))
        results.append(result)
    times: dict[int, list[float]] = {id(r): [] for r, _ in runs}
    for _ in range(repeats):
        for result, run in runs:
            t0 = time.perf_counter()
            run()
            times[id(result)].append(time.perf_counter() - t0)
    for result, run in runs:
        result.seconds = statistics.median(times[id(result)])
        if memory:
            result.peak_bytes = peak_memory(run, case.device)
    return results

