"""kernels.feature_map.launch: the compiled kernel of an earlier launch reused for arguments that
specialise alike, checked against Triton's own launch in a separate process (compiled kernels:
TRITON_INTERPRET unset) on bench/host_driver.py's driver (tests/launch_cache_check.py); here, in
the interpreter, that every launch passes its non-constexpr parameters positionally."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from performer_triton.kernels import feature_map  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform != "linux", reason="triton (and its bundled ptxas) is Linux-only")
def test_launch_cache_runs_what_triton_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "launch_cache_check.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "launch cache checks passed" in done.stdout


@triton.jit
def _copy_kernel(x, y, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(y + o, tl.load(x + o, mask=o < n), mask=o < n)


def test_launch_takes_non_constexprs_positionally_only():
    x, y = torch.arange(5.0), torch.full((5,), float("nan"))
    feature_map.launch(_copy_kernel, (1,), x, y, 5, BLOCK=8)
    assert torch.equal(x, y)
    with pytest.raises(TypeError, match=r"\['n'\] are not constexprs"):
        feature_map.launch(_copy_kernel, (1,), x, y, n=5, BLOCK=8)
