"""The ahead-of-time compile report (bench/compile_report.py) as a lint: every kernel, feature map,
dtype and mode at head dim 128 (the widest tiles) and 16, compiled for sm_90a
and sm_80 in a separate process (TRITON_INTERPRET unset: the interpreter replaces the compiler).
It fails on a compile error, a spill, shared memory over the arch's limit, or a tensor-core dot
without HGMMA (sm_90) / HMMA (sm_80).  The full sweep (every head dim, m = 256 and 266) is
`python bench/compile_report.py`; its figures are in kernels/NOTES.md."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform != "linux", reason="triton (and its bundled ptxas) is Linux-only")
def test_compile_report_quick_sweep_is_clean(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compile_report.py"), "--quick", "-j", str(os.cpu_count() or 1)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    tail = "\n".join(done.stdout.splitlines()[-40:]) + done.stderr[-3000:]
    assert done.returncode == 0, tail
    assert "compiles" in done.stdout and " ok" in done.stdout, tail
