"""Test configuration.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The interpreter
must be selected before triton is first imported, so this happens at the top of conftest,
before any test module imports performer_triton.
"""
import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

try:
    import triton  # noqa: E402
    import triton.language as tl  # noqa: E402
    from triton.runtime import interpreter as _interp  # noqa: E402
except ImportError:  # pragma: no cover - triton is Linux-only
    triton = None


def _patch_interpreter_bf16_dot():
    """The interpreter multiplies raw bf16 bit patterns in tl.dot (triton-lang/triton#11584).
    Widen bf16 operands exactly to fp32 (bits << 16) before the numpy matmul."""
    original = _interp.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16 or handle.dtype == tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return _interp.TensorHandle(data, tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    _interp.InterpreterBuilder.create_dot = create_dot


if triton is not None and not ON_GPU:
    _patch_interpreter_bf16_dot()

def pytest_configure(config):
    # Triton's interpreter computes masked-out lanes (padded rows, 1 / 0 that tl.where discards)
    # with numpy, which warns; these are not failures of the kernels
    for message in ("divide by zero encountered", "invalid value encountered", "overflow encountered"):
        config.addinivalue_line("filterwarnings", f"ignore:{message}:RuntimeWarning:triton.runtime.interpreter")
    # performer-pytorch 1.1.4 (the comparison peer) imports distutils
    config.addinivalue_line("filterwarnings", "ignore:distutils Version classes are deprecated:DeprecationWarning")


DEVICE = "cuda" if ON_GPU else "cpu"
HAS_TRITON = triton is not None


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """Every float allocation meant to be overwritten (torch.empty / empty_like / empty_strided,
    Tensor.new_empty / new_empty_strided) starts as NaN, so an output element a kernel or the
    PyTorch path forgets to write fails the comparison instead of passing by luck."""

    def fill(t):
        if t.is_floating_point() and t.device.type != "meta":
            with torch.no_grad():  # also for requires_grad=True allocations (inductor makes some)
                t.fill_(float("nan"))
        return t

    def poisoned(real):
        return lambda *a, **k: fill(real(*a, **k))

    for owner, name in (
        (torch, "empty"),
        (torch, "empty_like"),
        (torch, "empty_strided"),
        (torch.Tensor, "new_empty"),
        (torch.Tensor, "new_empty_strided"),
    ):
        monkeypatch.setattr(owner, name, poisoned(getattr(owner, name)))
    yield

