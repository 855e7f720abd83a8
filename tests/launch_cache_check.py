"""Checks of kernels.feature_map.launch on compiled kernels, run by tests/test_launch_cache.py in
a process without TRITON_INTERPRET, on bench/host_driver.py's driver (sm_90a compiles, launches
that do nothing but record what they were given)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

from host_driver import use_host_driver  # noqa: E402

host = use_host_driver()

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from performer_triton.kernels import feature_map  # noqa: E402


@triton.jit
def _probe_kernel(x, y, a, b, c, f, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
    o = tl.arange(0, BLOCK)
    b_x = tl.load(x + o * a, mask=o < b)  # (BLOCK,)
    if FLAG:
        b_x = b_x * f
    tl.store(y + o * c, b_x, mask=o < b)


def tensors() -> list[torch.Tensor]:
    """Every dtype at every element offset of a fresh allocation: 16-byte aligned and not."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int32, torch.int64,
              torch.bool)
    return [torch.zeros(64, dtype=dtype)[offset:] for dtype in dtypes for offset in range(9)]


INTS = [0, 1, -1, 2, 3, 15, 16, 17, 32, 48, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**32, -(2**31),
        -(2**31) - 16, 2**63 - 16, 2**63, 2**64 - 16]
FLOATS = [0.0, 1.0, 0.5, -3.0, float("inf"), float("nan")]


def check_keys_are_finer_than_triton() -> None:
    """Two arguments with one _arg_key get one Triton specialisation (what JITFunction.run
    compiles for), one position at a time over tensors, ints and floats."""
    binder = _probe_kernel.device_caches[host.get_current_device()][4]
    base = [torch.zeros(64), torch.zeros(64), 1, 64, 1, 2.0]
    for position, samples in ((0, tensors()), (1, tensors()), (2, INTS), (3, INTS), (4, INTS), (5, FLOATS)):
        seen: dict = {}
        for sample in samples:
            args = list(base)
            args[position] = sample
            spec = binder(*args, BLOCK=16, debug=False)[1][position]
            seen.setdefault(feature_map._arg_key(sample), set()).add(str(spec))
        split = {key: specs for key, specs in seen.items() if len(specs) > 1}
        assert not split, f"argument {position}: one key, several Triton specialisations: {split}"
        assert len(seen) > 1 or position == 5, f"argument {position}: every sample got one key"


def recorded() -> tuple:
    """host.last with tensors as (address, dtype) (comparable)."""
    return tuple((t.data_ptr(), t.dtype) if isinstance(t, torch.Tensor) else t for t in host.last)


def check_launches_match_triton() -> None:
    """launch, on a miss and on each hit, runs the binary JITFunction.run runs, with the same
    grid and arguments (the constexprs at their places, defaults included)."""
    x = torch.zeros(64)
    cases = [((1,), (x, x, 1, 16, 1, 2.0), dict(BLOCK=16)),
             ((2, 3), (x, x[1:], 1, 16, 1, 2.0), dict(BLOCK=16)),
             ((1,), (x[1:], x, 16, 17, 1, 0.5), dict(BLOCK=32, FLAG=True)),
             ((4, 1, 2), (x.half(), x.half(), 3, 48, 2**31, 1.0), dict(BLOCK=16, num_warps=2)),
             ((1,), (x, x, 1, 16, 1, 2.0), dict(BLOCK=16, FLAG=False)),
             ((1,), (x.double(), x.double(), 2, 5, 1, 2.0), dict(BLOCK=16, num_stages=1))]
    feature_map._LAUNCHED.clear()
    for i, (grid, args, options) in enumerate(cases * 2):  # the second round hits
        if i == len(cases):
            compiled = len(feature_map._LAUNCHED)
        launch_count = host.launches
        feature_map.launch(_probe_kernel, grid, *args, **options)
        ours = recorded()
        _probe_kernel[grid](*args, **options)
        assert host.launches == launch_count + 2
        assert ours == recorded(), (grid, options, ours, recorded())
    assert len(feature_map._LAUNCHED) == compiled  # the second round compiled nothing new


def check_pre_run_hooks_run_on_every_launch() -> None:
    """A kernel with pre-run hooks (Triton runs them in JITFunction.run) launches through Triton."""
    calls = []
    _probe_kernel.add_pre_run_hook(lambda *args, **kwargs: calls.append(1))
    try:
        x = torch.zeros(64)
        for _ in range(3):
            feature_map.launch(_probe_kernel, (1,), x, x, 1, 16, 1, 2.0, BLOCK=16)
    finally:
        _probe_kernel.pre_run_hooks.clear()
    assert len(calls) == 3, calls


def check_keywords_refused() -> None:
    try:
        feature_map.launch(_probe_kernel, (1,), torch.zeros(4), torch.zeros(4), 1, 4, 1, f=1.0, BLOCK=16)
    except TypeError as error:
        assert "['f']" in str(error), error
    else:
        raise AssertionError("a non-constexpr parameter passed by keyword was launched")


if __name__ == "__main__":
    check_keys_are_finer_than_triton()
    check_launches_match_triton()
    check_pre_run_hooks_run_on_every_launch()
    check_keywords_refused()
    print("launch cache checks passed")
