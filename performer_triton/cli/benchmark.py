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
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from performer_triton import favor_attention, gaussian_orthogonal_random_matrix
from performer_triton.feature_maps import resolve

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# peers compute the features and sums in the input dtype (performer-pytorch; fla on PyTorch
# features): on an H200 (2026-12-04, causal bf16 n=8192) their errors were 2.5-6.7%, so they get
# a wider budget that still catches a wrong result (NaN, a missing gradient, another formula)
PEER_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-1, torch.bfloat16: 1e-1}
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
    tolerance: dict = field(default_factory=lambda: PEER_TOLERANCE)  # relative error budget by dtype
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
    "performer_triton": Impl("performer_triton", _ours, _ours_unavailable, version=lambda: _version("performer-triton"),
                             tolerance=TOLERANCE),
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
    impl.tolerance[dtype].  Returns the largest relative error seen."""
    for t in (x.q, x.k, x.v):
        t.grad = None
    out = fn()
    if case.backward:
        out.backward(x.grad)
    tol = impl.tolerance[case.dtype]
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


# what torch's profiler (kineto) writes to the stderr file descriptor from C++ on every start and stop
PROFILER_NOISE = re.compile(r"^(USDT|STAGE|INFO|WARNING):\S+ \S+ \d+:\d+ \S+\.cpp:\d+\]|^\s*(Log file|Trace start time): ")


@contextlib.contextmanager
def quiet_profiler():
    """Hide the profiler's own lines on stderr ("... SyncActivityProfilerHandler.cpp:52]
    profiler_start"): C++ writes them to file descriptor 2, which Python's sys.stderr cannot
    filter.  Whatever else reaches descriptor 2 meanwhile is written back afterwards."""
    fd = 2
    try:
        saved = os.dup(fd)
    except OSError:  # no descriptor 2: nothing to hide
        yield
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), fd)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True)
                    if not PROFILER_NOISE.match(line.decode(errors="replace"))]
            if kept:
                os.write(fd, b"".join(kept))


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

    with quiet_profiler():
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
    seconds: float | None = None  # median of `times`
    peak_bytes: int | None = None
    error: float | None = None
    skipped: str = ""
    times: list[float] = field(default_factory=list)  # seconds of every timed repetition

    @property
    def min_seconds(self) -> float | None:
        return min(self.times) if self.times else self.seconds

    @property
    def max_seconds(self) -> float | None:
        return max(self.times) if self.times else self.seconds

    def row(self) -> dict:
        c = self.case

        def ms(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds * 1e3, 3)

        return dict(
            impl=self.impl, version=self.version, device=c.device, dtype=str(c.dtype).replace("torch.", ""),
            causal=c.causal, backward=c.backward, b=c.b, h=c.h, n=c.n, d=c.d, m=c.m,
            ms=ms(self.seconds), ms_min=ms(self.min_seconds), ms_max=ms(self.max_seconds), repeats=len(self.times),
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
        result.times = times[id(result)]
        result.seconds = statistics.median(result.times)
        if memory:
            result.peak_bytes = peak_memory(run, case.device)
    return results



# ----------------------------------------------------------------------------- regression ratios
#
# Absolute times on a shared machine move by tens of percent between two runs of the same code
# (two identical runs of the pytest-benchmark suite moved medians by -34% to +5%), so a regression
# check cannot compare them.  It compares instead the ratio of our time to a fixed reference
# workload timed in the same run, in interleaved pairs (ours, reference, reference, ours, ...):
# whatever slows the machine slows both, and the ratio moves only when our code does.


REFERENCE_CHUNK = 128


def _linear_reference(case: Case, x: Inputs) -> Callable[[], Tensor]:
    """The fixed reference workload: FAVOR+-like linear attention written as plain torch ops on the
    case's inputs, differentiable: exp features from two GEMMs, then non-causal (k'^T v, q' @ context)
    or causal in chunks of REFERENCE_CHUNK rows (masked intra-chunk matmuls plus a running state),
    the op mix of our PyTorch path.  Only a clock, never checked: it changes only with torch, so
    machine load, and nothing else, affects ours and it alike."""
    projection = x.projection.to(x.q.dtype) * case.d**-0.25

    def features(t: Tensor) -> Tensor:
        logits = t @ projection.mT
        return torch.exp(logits - logits.amax(dim=-1, keepdim=True))

    def run() -> Tensor:
        qf, kf, v = features(x.q), features(x.k), x.v
        if not case.causal:
            norm = qf @ kf.sum(dim=-2, keepdim=True).mT
            return (qf @ (kf.mT @ v)) / (norm + 1e-6)
        state = qf.new_zeros(*qf.shape[:2], qf.shape[-1], v.shape[-1])
        key_sum = qf.new_zeros(*qf.shape[:2], 1, qf.shape[-1])
        keep = torch.ones(REFERENCE_CHUNK, REFERENCE_CHUNK, dtype=torch.bool, device=qf.device).tril()
        outs = []
        for t0 in range(0, case.n, REFERENCE_CHUNK):
            qc, kc, vc = (t[..., t0 : t0 + REFERENCE_CHUNK, :] for t in (qf, kf, v))
            c = qc.shape[-2]
            scores = (qc @ kc.mT).masked_fill(~keep[:c, :c], 0.0)
            num = qc @ state + scores @ vc
            den = (qc * key_sum).sum(dim=-1, keepdim=True) + scores.sum(dim=-1, keepdim=True)
            outs.append(num / (den + 1e-6))
            state = state + kc.mT @ vc
            key_sum = key_sum + kc.sum(dim=-2, keepdim=True)
        return torch.cat(outs, dim=-2)

    return run


REFERENCES = {
    "linear": Impl("linear", _linear_reference, lambda case: None, version=lambda: torch.__version__),
    "torch-sdpa": IMPLS["torch-sdpa"],
}
DEFAULT_REFERENCE = "linear"
DEFAULT_PAIRS = 40
DEFAULT_ROUNDS = 4
MAX_SLOWDOWN = 0.10  # fail when ours / reference grew by more than this fraction


@dataclass
class Ratio:
    """ours / reference for one case: the median over interleaved pairs and its quartiles."""

    case: str
    reference: str
    ratio: float
    q1: float
    q3: float
    ours_ms: float
    reference_ms: float
    pairs: int
    ours_times_ms: list[float] = field(default_factory=list)
    reference_times_ms: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(case=self.case, reference=self.reference, ratio=self.ratio, ratio_q1=self.q1,
                    ratio_q3=self.q3, ours_ms=self.ours_ms, reference_ms=self.reference_ms, pairs=self.pairs,
                    ours_times_ms=self.ours_times_ms, reference_times_ms=self.reference_times_ms)


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def measure_ratio(case: Case, *, ours: Impl | None = None, reference: str | Impl = DEFAULT_REFERENCE,
                  pairs: int = DEFAULT_PAIRS, rounds: int = DEFAULT_ROUNDS, warmup: int = 1,
                  slowdown: float = 0.0) -> Ratio:
    """Time ours and the reference in `pairs` interleaved pairs, alternating which goes first;
    the median of the per-pair ratios (adjacent in time, so under the same load).  The pairs are
    spread over `rounds` sets of fresh inputs (where tensors land in memory moves a time by a few
    percent).  On CPU the times are CPU time (cpu_clock), on CUDA wall time after synchronizing.
    Ours is checked against float64 first (verify).  slowdown > 0 makes ours that much slower on
    purpose, to check the check: after each run of ours the CPU spins for that fraction of the
    run's time."""
    ours = ours or IMPLS["performer_triton"]
    ref = REFERENCES[reference] if isinstance(reference, str) else reference
    clock = cpu_clock() if case.device == "cpu" else time.perf_counter

    def timed(run: Callable[[], None]) -> float:
        t0 = clock()
        run()
        return clock() - t0

    t_ours, t_ref = [], []
    rounds = max(1, min(rounds, pairs))
    for r in range(rounds):
        x = make_inputs(case, seed=r)
        fn = ours.build(case, x)
        if r == 0:
            verify(ours, case, x, fn)
        run_ours, run_ref = step(case, x, fn), step(case, x, ref.build(case, x))
        if slowdown > 0:
            run_ours = _slowed(run_ours, slowdown, clock)
        for _ in range(warmup):
            run_ours(), run_ref()
        for i in range(pairs * r // rounds, pairs * (r + 1) // rounds):
            if i % 2 == 0:
                t_ours.append(timed(run_ours))
                t_ref.append(timed(run_ref))
            else:
                t_ref.append(timed(run_ref))
                t_ours.append(timed(run_ours))
        del x, fn, run_ours, run_ref
    ratios = [a / b for a, b in zip(t_ours, t_ref)]
    q1, median, q3 = _quartiles(ratios)
    return Ratio(case.label, ref.name, median, q1, q3, statistics.median(t_ours) * 1e3,
                 statistics.median(t_ref) * 1e3, pairs, [round(t * 1e3, 3) for t in t_ours],
                 [round(t * 1e3, 3) for t in t_ref])


def cpu_clock() -> Callable[[], float]:
    """The CPU time of this thread when torch computes on it alone (one intra-op thread), else of
    the process: time spent descheduled while other processes hold the cores does not count, the
    largest part of the noise on a shared machine."""
    return time.thread_time if torch.get_num_threads() == 1 else time.process_time


def _slowed(run: Callable[[], None], fraction: float, clock: Callable[[], float]) -> Callable[[], None]:
    def slow() -> None:
        t0 = clock()
        run()
        end = clock() + fraction * (clock() - t0)
        while clock() < end:  # busy, like the work it stands for
            pass

    return slow


REGRESSION_KIND = "performer-triton regression ratios"


def save_ratios(ratios: list[Ratio], meta: dict, path) -> None:
    from pathlib import Path

    Path(path).write_text(json.dumps(dict(kind=REGRESSION_KIND, meta=meta, results=[r.as_dict() for r in ratios]),
                                     indent=1))


def ratio_key(record: dict) -> str:
    """What a ratio is of: the case, and the reference when named (ratios to different references
    are never compared)."""
    reference = record.get("reference")
    return f"{record['case']} / {reference}" if reference else record["case"]


def ratios_of(results: list[Ratio]) -> dict[str, float]:
    return {ratio_key(r.as_dict()): r.ratio for r in results}


def load_ratios(path) -> dict[str, float]:
    """{case / reference: ratio} from a file of save_ratios, or from pytest-benchmark's JSON
    (--benchmark-json, --benchmark-autosave) of bench/test_regression.py, whose extra_info holds
    case, reference and ratio."""
    from pathlib import Path

    data = json.loads(Path(path).read_text())
    if data.get("kind") == REGRESSION_KIND:
        return {ratio_key(r): float(r["ratio"]) for r in data["results"]}
    if "benchmarks" in data:
        out = {ratio_key(b["extra_info"]): float(b["extra_info"]["ratio"])
               for b in data["benchmarks"] if "ratio" in b.get("extra_info", {}) and "case" in b["extra_info"]}
        if out:
            return out
        raise ValueError(f"{path}: a pytest-benchmark file without regression ratios "
                         "(extra_info case and ratio: run bench/test_regression.py)")
    raise ValueError(f"{path}: neither a `performer-triton bench --regression` file nor pytest-benchmark JSON")


@dataclass
class Comparison:
    case: str
    base: float | None
    new: float | None
    max_slowdown: float

    @property
    def change(self) -> float | None:
        return None if self.base is None or self.new is None else self.new / self.base - 1

    @property
    def regressed(self) -> bool:
        return self.change is not None and self.change > self.max_slowdown

    @property
    def missing(self) -> bool:
        """A baseline case the new run lacks: a gate that would compare less than it did before."""
        return self.base is not None and self.new is None

    def line(self) -> str:
        if self.missing:
            return f"{self.case}: MISSING from the new run (in the baseline)"
        if self.change is None:
            return f"{self.case}: not in the baseline, not compared"
        verdict = f"SLOWER by {self.change:+.1%} (> {self.max_slowdown:.0%})" if self.regressed else "ok"
        return f"{self.case}: ours/reference {self.base:.3f} -> {self.new:.3f} ({self.change:+.1%})  {verdict}"


def compare_ratios(base: dict[str, float], new: dict[str, float], max_slowdown: float = MAX_SLOWDOWN) -> list[Comparison]:
    """One Comparison per case in either; .regressed where the ratio grew by more than max_slowdown."""
    cases = list(base) + [c for c in new if c not in base]
    return [Comparison(c, base.get(c), new.get(c), max_slowdown) for c in cases]
