"""Test configuration.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The interpreter
must be selected before triton is first imported, so this happens at the top of conftest,
before any test module imports performer_triton.
"""
import hashlib
import os
import pathlib
import tempfile

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"


def _inductor_cache() -> str:
    """An inductor cache of this source tree's own: inductor keys cached graphs by their code, not
    by the custom ops' implementations (pytorch/pytorch#144344), so a cache filled by an earlier
    checkout replayed a backward that received the ops' old saved states (found when the PyTorch
    path began saving the non-causal context).  Runs of one tree share it (warm compiles)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    digest = hashlib.sha1()
    for path in sorted([*root.glob("performer_triton/**/*.py"), *root.glob("kernels/*.py")]):
        digest.update(path.read_bytes())
    return os.path.join(tempfile.gettempdir(), f"performer_triton-inductor-{digest.hexdigest()[:16]}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache())

import numpy as np  # noqa: E402
import pytest  # noqa: E402

try:
    import triton  # noqa: E402
    import triton.language as tl  # noqa: E402
    from triton.runtime import interpreter as _interp  # noqa: E402
except ImportError:  # pragma: no cover - triton is Linux-only
    triton = None


def _tf32(data: np.ndarray) -> np.ndarray:
    """fp32 values as a Hopper tensor core reads them for a "tf32" tl.dot: Triton passes the fp32
    bits unrounded (no cvt.rna in the PTX), the MMA keeps 10 mantissa bits, so the low 13 are
    dropped (truncation toward zero)."""
    return (data.astype(np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def _patch_interpreter_dot():
    """Make the interpreter's tl.dot multiply as the GPU does:
    - bf16 operands: it multiplies raw bf16 bit patterns (triton-lang/triton#11584); widen them
      exactly to fp32 (bits << 16) before the numpy matmul;
    - fp32 operands with input_precision "tf32" (kernels/feature_map.PRECISION): it multiplies in
      full fp32, the GPU in TF32; emulate TF32 (_tf32), so the fp32 budgets of the kernel tests
      are the GPU's (TF32_EMULATION = False turns this off to see the fp32-exact error)."""
    original = _interp.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16 or handle.dtype == tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return _interp.TensorHandle(data, tl.float32)
        return handle

    def tf32(handle, input_precision):
        if TF32_EMULATION and "TF32" in str(input_precision).upper() and "X3" not in str(input_precision).upper() \
                and (handle.dtype.scalar == tl.float32 or handle.dtype == tl.float32):
            return _interp.TensorHandle(_tf32(handle.data), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (tf32(widen(x), input_precision) for x in (a, b))
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    _interp.InterpreterBuilder.create_dot = create_dot


TF32_EMULATION = os.environ.get("PERFORMER_TRITON_EXACT_FP32_DOTS") != "1"
if triton is not None and not ON_GPU:
    _patch_interpreter_dot()

def pytest_configure(config):
    # Triton's interpreter computes masked-out lanes (padded rows, 1 / 0 that tl.where discards)
    # with numpy, which warns; these are not failures of the kernels
    # (and the scans of tl.cumsum, which it runs through numpy's accumulate, over inf / NaN values)
    for message in ("divide by zero encountered", "invalid value encountered", "overflow encountered"):
        for module in ("triton.runtime.interpreter", r"numpy\..*fromnumeric"):  # numpy._core (2.x), numpy.core
            config.addinivalue_line("filterwarnings", f"ignore:{message}:RuntimeWarning:{module}")
    # performer-pytorch 1.1.4 (the comparison peer) imports distutils
    config.addinivalue_line("filterwarnings", "ignore:distutils Version classes are deprecated:DeprecationWarning")
    # torch's own jit module warns about itself while torch.compile traces (tests/test_compile.py)
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


DEVICE = "cuda" if ON_GPU else "cpu"
HAS_TRITON = triton is not None


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def seeded_global_rng():
    """Every test starts from the same global random state, whichever tests ran before it in its
    worker (pytest-xdist deals them out differently each run): a draw such as
    torch.randn_like(out) for an upstream gradient is then the same in every run.  (Found as a
    non-causal fp32 dk error of 2.9e-3 against the 3e-3 budget for one upstream gradient, over
    it for another: TF32 operands, NOTES "Precision policy".)"""
    torch.manual_seed(0)


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

