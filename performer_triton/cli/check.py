"""`performer-triton check`: every available attention path against the float64 reference.

The Triton kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter, which must be
selected (TRITON_INTERPRET=1) before triton is first imported.  On a machine without CUDA the
command therefore runs the Triton rows in a subprocess started with TRITON_INTERPRET=1 in its
environment, while this process checks the PyTorch path, and merges the subprocess's rows into
the table.  Every row that does not run says why.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass

import torch

from performer_triton import favor_attention, gaussian_orthogonal_random_matrix, reference
from performer_triton.feature_maps import FEATURE_MAP_NAMES
from performer_triton.functional import HAS_TRITON, triton_unsupported

from .arguments import positive_int

BUDGETS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# the kernels' fp32 dots are TF32, whose operands keep fp16's 10 mantissa bits: fp16's budget
# (2e-3 flagged relu gradients of correct kernels at tiny shapes, n = 2 d = m = 4: 4.6e-3, where
# perturbing the inputs by TF32's roundoff alone moves the float64 result by 3.7e-3)
TF32_BUDGET = BUDGETS[torch.float16]
# Conditioning floors of the budgets: at tiny shapes (d = 4, m = 3) relu gradients are so
# ill-conditioned that the fixed budgets flag correct kernels, so a path may be off by
# CONDITION_FACTOR times what perturbing the inputs by the unit roundoff it computes its features
# with (the PyTorch path: fp32 for 16-bit inputs; the kernels: their dot operands, TF32 for fp32)
# alone does to the float64 output, and separately to the gradient. The estimate is pessimistic
# for relu gradients (floors of 1e-2 at the default shape, where the kernels' error is 3e-4), so
# it applies only below CALIBRATED head dims or features, smaller than any the budgets were set on.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
TF32_UNIT_ROUNDOFF = 2.0**-11
CONDITION_FACTOR = 4.0
CALIBRATED = 8
MODES = [
    ("non-causal", dict(causal=False, key_stabilizer="global")),
    ("causal global", dict(causal=True, key_stabilizer="global")),
    ("causal prefix", dict(causal=True, key_stabilizer="prefix")),
]
FEATURES = list(FEATURE_MAP_NAMES)
DEVICE_ORDER = {"cpu": 0, "cuda": 1}
BACKEND_ORDER = {"torch": 0, "triton": 1}
INTERPRETER_NOTE = "Triton interpreter"
SUBPROCESS_TIMEOUT_S = 1200

# numpy warnings the interpreter raises on lanes that the kernels mask out (their results are
# discarded; the outputs are compared with the reference all the same)
INTERPRETER_WARNINGS = ("divide by zero encountered", "invalid value encountered", "overflow encountered")


def ignore_interpreter_warnings() -> None:
    for message in INTERPRETER_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=RuntimeWarning, module="triton.runtime.interpreter")


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class Row:
    device: str
    backend: str
    dtype: str
    mode: str
    feature: str
    out_err: float | None
    grad_err: float | None
    budget: float
    note: str = ""  # "skipped: <why>", "FAIL: <what went wrong>", or how it ran
    out_floor: float = 0.0  # the conditioning floors of the budget (_one)
    grad_floor: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.out_err is not None and self.out_err <= max(self.budget, self.out_floor)
                and self.grad_err <= max(self.budget, self.grad_floor))

    @property
    def ill_conditioned(self) -> bool:
        """Within budget only by a conditioning floor: this shape cannot tell a correct path
        from one off by as much."""
        return self.ok and max(self.out_err, self.grad_err) > self.budget

    def conditioning(self) -> str:
        """What the floor that admitted the row measured."""
        which, floor = (("output", self.out_floor) if self.out_err > self.budget else ("gradient", self.grad_floor))
        return f"input roundoff alone moves the float64 {which} by {floor / CONDITION_FACTOR:.0e}"

    @property
    def skipped(self) -> bool:
        return self.note.startswith("skipped: ")

    @property
    def failed(self) -> bool:
        return not self.ok and not self.skipped


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _reference(q, k, v, P, grad, feature, mode_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 output and the gradient of q, k, v together (flattened)."""
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference.favor_attention(*ref_in, P, feature_map=feature, **mode_kwargs)
    ref.backward(grad)
    return ref.detach(), torch.cat([t.grad.flatten() for t in ref_in])


def _one(device, backend, dtype, mode_kwargs, feature, n, d, m) -> tuple[float, float, float, float]:
    """-> relative errors of the output and of the whole gradient, and the conditioning floors of
    the budget for each (0 from CALIBRATED on): CONDITION_FACTOR times how far relative
    perturbations of the inputs by the unit roundoff the path computes its features with alone
    move the float64 result."""
    g = torch.Generator().manual_seed(0)
    # inputs rounded to dtype first: the reference sees exactly what the path sees, so the error is
    # the computation's, not the input rounding's (which flips ReLU masks in 16 bits)
    q, k, v, grad = (torch.randn(2, 2, n, d, generator=g).to(dtype).double() for _ in range(4))
    P = gaussian_orthogonal_random_matrix(m, d, generator=g).to(dtype).double()
    ref, ref_grad = _reference(q, k, v, P, grad, feature, mode_kwargs)
    out_floor = grad_floor = 0.0
    if min(d, m) < CALIBRATED:
        if backend == "torch":  # (16-bit inputs compute in fp32)
            unit = UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
        else:
            unit = TF32_UNIT_ROUNDOFF if dtype == torch.float32 else UNIT_ROUNDOFF[dtype]
        nudged = [t * (1 + unit * (2 * torch.rand(t.shape, generator=g, dtype=t.dtype) - 1)) for t in (q, k, v, P)]
        moved_out, moved_grad = _reference(*nudged, grad, feature, mode_kwargs)
        out_floor, grad_floor = (CONDITION_FACTOR * _rel(moved_out, ref), CONDITION_FACTOR * _rel(moved_grad, ref_grad))
    ours_in = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    out = favor_attention(*ours_in, P.to(device), feature_map=feature, backend=backend, **mode_kwargs)
    out.backward(grad.to(device=device, dtype=dtype))
    # one relative error over the whole gradient (q, k, v together): a part that is zero in exact
    # arithmetic (dq, dk of a single key) is roundoff on both sides, not a scale to divide by
    ours_grad = torch.cat([t.grad.double().cpu().flatten() for t in ours_in])
    return _rel(out, ref), _rel(ours_grad, ref_grad), out_floor, grad_floor


def _dtypes(backend: str) -> list[torch.dtype]:
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    return dtypes[1:] if backend == "triton" else dtypes


def run_checks(n: int = 37, d: int = 16, m: int = 44, *, paths=None) -> list[Row]:
    """Run every path available in this process; returns one Row per (device, backend, dtype,
    mode, feature map).  paths: the (device, backend) pairs to check (default: all)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device, backend in itertools.product(devices, ["torch", "triton"]):
        if paths is not None and (device, backend) not in paths:
            continue
        for dtype, (mode, kwargs), feature in itertools.product(_dtypes(backend), MODES, FEATURES):
            # the kernels' fp32 dots are TF32 on a GPU (kernels/feature_map.PRECISION)
            # the kernels' fp32 dots are TF32 (their operands rounded to TF32 by the kernels
            # themselves, so in the interpreter too)
            budget = TF32_BUDGET if (backend, dtype) == ("triton", torch.float32) else BUDGETS[dtype]
            row = Row(device, backend, str(dtype).replace("torch.", ""), mode, feature, None, None, budget)
            probe = torch.empty(1, 1, 1, d, device=device, dtype=dtype)
            reason = triton_unsupported(probe, probe, fused=True) if backend == "triton" else None
            if reason is not None:
                row.note = f"skipped: {reason}"
            else:
                if backend == "triton" and device == "cpu":
                    row.note = INTERPRETER_NOTE
                try:
                    row.out_err, row.grad_err, row.out_floor, row.grad_floor = _one(
                        device, backend, dtype, kwargs, feature, n, d, m)
                except Exception as exc:  # a path that raises is a failure, shown in its row
                    row.note = f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            rows.append(row)
    return rows


def _placeholder_rows(note: str) -> list[Row]:
    """The CPU Triton rows, each with note, where the interpreter subprocess gave none."""
    return [
        Row("cpu", "triton", str(dtype).replace("torch.", ""), mode, feature, None, None, BUDGETS[dtype], note)
        for dtype, (mode, _), feature in itertools.product(_dtypes("triton"), MODES, FEATURES)
    ]


def start_interpreter_subprocess(n: int, d: int, m: int) -> subprocess.Popen:
    """`performer-triton check` on the CPU Triton path only, in a fresh interpreter whose
    environment has TRITON_INTERPRET=1 (set before it imports triton); prints its rows as JSON."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    argv = [sys.executable, "-m", "performer_triton.cli", "check", "--interpreter-worker",
            "--n", str(n), "--d", str(d), "--m", str(m)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_interpreter_subprocess(proc: subprocess.Popen) -> list[Row]:
    """The subprocess's rows; if it died, one FAIL row per path saying how."""
    try:
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return _placeholder_rows(f"FAIL: the interpreter subprocess ran over {SUBPROCESS_TIMEOUT_S} s")
    if proc.returncode == 0:
        try:
            return [Row(**row) for row in json.loads(out)]
        except (ValueError, TypeError) as exc:
            return _placeholder_rows(f"FAIL: unreadable output of the interpreter subprocess ({exc})")
    tail = [line for line in err.strip().splitlines() if line.strip()][-1:] or ["no message"]
    return _placeholder_rows(f"FAIL: the interpreter subprocess exited with {proc.returncode}: {tail[0]}")


def check_all(n: int = 37, d: int = 16, m: int = 44, *, announce=print) -> list[Row]:
    """run_checks, plus the CPU Triton rows from an interpreter subprocess when this process cannot
    run them itself (no CUDA, triton installed, TRITON_INTERPRET not set here).  With CUDA the
    kernels run on the GPU and the CPU Triton rows say how to run them in the interpreter."""
    delegate = HAS_TRITON and not interpreter_active() and not torch.cuda.is_available()
    proc = None
    if delegate:
        announce("Triton kernels on CPU: running them in Triton's interpreter in a subprocess "
                 "(TRITON_INTERPRET=1 in its environment); under a minute on 2 cores")
        proc = start_interpreter_subprocess(n, d, m)
    try:
        with warnings.catch_warnings():
            ignore_interpreter_warnings()
            rows = run_checks(n, d, m, paths=None if not delegate else _all_paths() - {("cpu", "triton")})
    except BaseException:
        if proc is not None:
            proc.kill()
        raise
    if proc is not None:
        rows += finish_interpreter_subprocess(proc)
    return sorted(rows, key=lambda r: (DEVICE_ORDER[r.device], BACKEND_ORDER[r.backend]))  # stable


def _all_paths() -> set[tuple[str, str]]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return set(itertools.product(devices, ["torch", "triton"]))


def format_table(rows: list[Row]) -> str:
    head = f"{'device':6} {'backend':7} {'dtype':8} {'mode':13} {'features':8} {'out err':>9} {'grad err':>9} {'budget':>7}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.out_err is None:
            lines.append(f"{r.device:6} {r.backend:7} {r.dtype:8} {r.mode:13} {r.feature:8} {'':>9} {'':>9} {'':>7}  {r.note}")
        else:
            verdict = "FAIL" if not r.ok else (
                f"ok, ill-conditioned here ({r.conditioning()})" if r.ill_conditioned else "ok")
            note = f" ({r.note})" if r.note else ""
            lines.append(
                f"{r.device:6} {r.backend:7} {r.dtype:8} {r.mode:13} {r.feature:8} "
                f"{r.out_err:9.1e} {r.grad_err:9.1e} {r.budget:7.0e}  {verdict}{note}"
            )
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    ran = [r for r in rows if r.out_err is not None]
    over = [r for r in ran if not r.ok]
    errors = [r for r in rows if r.out_err is None and r.failed]
    skipped = [r for r in rows if r.skipped]
    text = f"{len(ran)} paths checked, {len(over)} over budget"
    shaky = [r for r in ran if r.ill_conditioned]
    if shaky:
        text += f", {len(shaky)} judged only up to their conditioning (a larger --n, --d, --m tells more)"
    if errors:
        text += f", {len(errors)} failed to run"
    return text + f", {len(skipped)} skipped (reasons above)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=positive_int, default=37, help="sequence length (default 37)")
    parser.add_argument("--d", type=positive_int, default=16, help="head dim (default 16)")
    parser.add_argument("--m", type=positive_int, default=44, help="number of random features (default 44)")
    # internal: the subprocess that runs the CPU Triton rows under TRITON_INTERPRET=1
    parser.add_argument("--interpreter-worker", action="store_true", help=argparse.SUPPRESS)


def main(args) -> int:
    if args.interpreter_worker:
        if not interpreter_active():
            raise SystemExit("--interpreter-worker needs TRITON_INTERPRET=1 in the environment")
        ignore_interpreter_warnings()
        rows = run_checks(n=args.n, d=args.d, m=args.m, paths={("cpu", "triton")})
        print(json.dumps([dataclasses.asdict(r) for r in rows]))
        return 0
    import performer_triton

    cuda = torch.cuda.is_available()
    if HAS_TRITON:
        import triton

        triton_text = f"triton {triton.__version__}" + (", interpreter on (TRITON_INTERPRET=1)" if interpreter_active() else "")
    else:
        triton_text = "triton not installed"
    print(f"performer-triton {performer_triton.__version__} check: torch {torch.__version__}, {triton_text}, "
          f"CUDA available: {cuda}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""), flush=True)
    rows = check_all(n=args.n, d=args.d, m=args.m, announce=lambda s: print(s, flush=True))
    print(format_table(rows))
    print(summary(rows))
    return 1 if any(r.failed for r in rows) else 0
