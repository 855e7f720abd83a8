"""pytest-benchmark suite: `pytest bench/` (absolute times, targets, generation) and
`pytest bench/test_regression.py --benchmark-json FILE` (ratios to a reference timed in the same
run, compared with `performer-triton bench --compare BASE NEW`; see that module).  Absolute medians
of two identical runs on a shared machine differ by tens of percent: compare ratios, not them.

Every benchmark checks the correctness of what it times (performer_triton.cli.benchmark.verify)
before timing it.  Peers that cannot run here are skipped with the reason shown (-rs).
"""
import argparse

import pytest
import torch

from performer_triton.cli.arguments import positive_ints

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = {"cpu": (1024, 2048, 4096, 8192, 16384), "cuda": (1024, 2048, 4096, 8192, 16384, 32768, 65536)}


def pytest_addoption(parser):
    parser.addoption("--sizes", default=None, help="comma-separated sequence lengths (default: by device)")


def _sizes(option: str | None) -> tuple[int, ...]:
    """--sizes as the command line's bench takes it: positive integers, else a usage error."""
    if not option:
        return SIZES[DEVICE]
    try:
        return tuple(positive_ints("sequence lengths", "1024,2048")(option))
    except argparse.ArgumentTypeError as error:
        raise pytest.UsageError(f"--sizes: {error}") from None


SEQ_LENS = pytest.StashKey[tuple]()


def pytest_generate_tests(metafunc):
    if "seq_len" in metafunc.fixturenames:
        sizes = metafunc.config.stash[SEQ_LENS]
        metafunc.parametrize("seq_len", sizes, ids=[f"n{n}" for n in sizes])


def pytest_configure(config):
    config.stash[SEQ_LENS] = _sizes(config.getoption("--sizes"))  # (a bad value stops the run before collecting)
    config.addinivalue_line("markers", "gpu: a target that needs a CUDA device")
    if not config.option.reportchars:
        config.option.reportchars = "s"  # show every skip reason
    if DEVICE == "cuda":
        _size_performer_pytorch_cap()


def _size_performer_pytorch_cap():
    """performer-pytorch 1.1.4's causal path without fast-transformers keeps (b, h, n, m, e) outer
    products for backward; benchmark.PERFORMER_PYTORCH_MAX_BYTES (3 GiB) was sized for the 24 GiB
    CPU machine and would skip it from n = 8192 on at the GPU shape (b=2 h=8 m=256 e=64 bf16:
    4 GiB).  On a GPU let it have an eighth of the free memory: an H200 then runs it up to
    n = 32768 (16 GiB saved), skipping it (with the reason) only at 65536."""
    from performer_triton.cli import benchmark

    free, _ = torch.cuda.mem_get_info()
    benchmark.PERFORMER_PYTORCH_MAX_BYTES = max(benchmark.PERFORMER_PYTORCH_MAX_BYTES, free // 8)


@pytest.fixture
def device():
    return DEVICE


def timing_off(config) -> str | None:
    """Why this run must not time, or None: --benchmark-disable (a correctness-only run) or a
    pytest-xdist worker (workers share the cores, and pytest-benchmark saves nothing from them)."""
    if config.getoption("benchmark_disable", default=False):
        return "--benchmark-disable: correctness checked, nothing timed or asserted about time"
    if hasattr(config, "workerinput"):
        return ("pytest-xdist (-n) worker: workers share the cores and pytest-benchmark saves nothing from them; "
                "run bench/ without -n (correctness checked)")
    return None


@pytest.fixture
def timed(request):
    """timed() after a benchmark's correctness check: skips the rest of the test (its timing and
    what it asserts about time) where timing_off gives a reason, with that reason."""
    def check() -> None:
        reason = timing_off(request.config)
        if reason is not None:
            pytest.skip(reason)

    return check


def pytest_benchmark_update_machine_info(config, machine_info):
    from performer_triton.cli.benchmark import device_name

    machine_info["device"] = device_name(DEVICE)
    machine_info["torch"] = torch.__version__


def pytest_terminal_summary(terminalreporter, config):
    """The side-by-side ratios and peak memory that the benchmarks stored in extra_info."""
    session = getattr(config, "_benchmarksession", None)
    rows = [b for b in getattr(session, "benchmarks", []) if b.extra_info]
    if not rows:
        return
    terminalreporter.section("side by side (extra_info)")
    for bench in rows:
        info = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in bench.extra_info.items()
                         if not isinstance(v, (list, dict)))  # raw per-repeat times stay in the JSON
        terminalreporter.write_line(f"{bench.name} [{bench.group}]: {info}")
