"""The `performer-triton` command (check, bench, demo) and the benchmark module's correctness gate."""
import csv
import json
from collections import Counter

import pytest
import torch
from conftest import DEVICE, HAS_TRITON

from performer_triton import cli
from performer_triton.cli import benchmark
from performer_triton.cli.check import FEATURES, MODES, format_table, run_checks


def test_check_runs_every_available_path_within_budget():
    rows = run_checks(n=5, d=8, m=12)
    table = format_table(rows)
    per_path = len(MODES) * len(FEATURES)  # rows of one (device, backend, dtype)
    ran = Counter((r.device, r.backend, r.dtype) for r in rows if r.out_err is not None)
    devices = ["cpu"] + (["cuda"] if DEVICE == "cuda" else [])
    expected = {}
    for device in devices:  # the PyTorch path runs everywhere, in every dtype
        expected |= {(device, "torch", dtype): per_path for dtype in ("float64", "float32", "float16", "bfloat16")}
    if HAS_TRITON and DEVICE == "cuda":
        expected |= {("cuda", "triton", dtype): per_path for dtype in ("float32", "float16", "bfloat16")}
    elif HAS_TRITON:  # conftest set TRITON_INTERPRET=1: the interpreter ran the kernels on CPU tensors
        expected |= {("cpu", "triton", dtype): per_path for dtype in ("float32", "float16")}
        bf16 = [r for r in rows if (r.device, r.backend, r.dtype) == ("cpu", "triton", "bfloat16")]
        assert len(bf16) == per_path and all("interpreter computes bf16" in r.note for r in bf16), table
    assert dict(ran) == expected, table
    assert len(rows) == len(devices) * (4 + 3) * per_path, table  # torch's 4 dtypes, triton's 3: run or skipped
    skipped = [r for r in rows if r.out_err is None]
    assert all(r.note.startswith("skipped: ") and r.note[len("skipped: "):].strip() for r in skipped), table
    assert all(r.ok for r in rows if r.out_err is not None), table  # everything that ran is within budget


def test_bench_writes_table_csv_json_and_plot(tmp_path, capsys):
    argv = ["bench", "--sizes", "64,128", "--mode", "causal", "--passes", "fwd+bwd", "--repeats", "1",
            "--batch", "1", "--heads", "2", "--dim-head", "16", "--nb-features", "20", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for impl in ("performer_triton", "performer-pytorch", "torch-sdpa"):
        assert impl in printed
    assert "skipped: flash-linear-attention runs on CUDA only" in printed  # reason shown, not dropped
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    ours = [r for r in rows if r["impl"] == "performer_triton"]
    assert [int(r["n"]) for r in ours] == [64, 128] and all(float(r["ms"]) > 0 for r in ours)
    assert all(float(r["peak_mib"]) > 0 and float(r["max_rel_err"]) < 1e-4 for r in ours)
    assert json.load(open(tmp_path / "bench.json"))["meta"]["device"]
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_benchmark_verify_rejects_a_wrong_implementation():
    case = benchmark.Case(n=40, causal=True, backward=True, h=2, d=16, m=20)
    x = benchmark.make_inputs(case)
    wrong = benchmark.Impl("wrong", lambda c, x: (lambda: x.v * 1.01), lambda c: None)
    with pytest.raises(AssertionError, match="relative errors"):
        benchmark.verify(wrong, case, x, wrong.build(case, x))
    ours = benchmark.IMPLS["performer_triton"]
    assert benchmark.verify(ours, case, x, ours.build(case, x)) < 1e-5


def test_peak_memory_sees_temporaries():
    big = 8 * 2**20

    def run():
        a = torch.ones(big // 4)
        b = a * 2  # both live: 2 * big
        del a
        return b.sum()

    assert 2 * big <= benchmark.peak_memory(run, "cpu") < 3 * big


def test_demo_trains_and_samples(capsys):
    argv = ["demo", "--steps", "40", "--seq-len", "64", "--batch-size", "8", "--generate", "16", "--lr", "3e-3"]
    assert cli.main(argv) == 0  # 0 means the loss fell
    printed = capsys.readouterr().out
    assert "loss: start" in printed and "cached decoding" in printed
