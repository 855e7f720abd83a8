"""bench/gpu_check.sh and bench/gpu_summary.py without a GPU: the summary of fabricated stage
outputs (junit XML, pytest-benchmark JSON, compile report JSON, sanitizer logs), and the script on
a machine without CUDA, where every GPU stage records its skip and the summary is still written."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = ROOT / "bench" / "gpu_summary.py"


def _summary_module():
    """bench/gpu_summary.py as a module (it needs neither torch nor a GPU)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_summary_under_test", SUMMARY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
SCRIPT = ROOT / "bench" / "gpu_check.sh"
GPU_STAGES = ("install", "install_peers", "compile_report", "profile", "cuda_tests", "variants", "kernel_tests",
              "sanitize_warm", "sanitize_memcheck", "sanitize_racecheck", "targets", "generation")


def junit(cases: list[tuple[str, str, str]]) -> str:
    """A pytest-style junit file: (name, outcome, message) with outcome passed/failure/error/skipped."""
    body = []
    for name, outcome, message in cases:
        inner = "" if outcome == "passed" else f'<{outcome} message="{message}">{message}</{outcome}>'
        body.append(f'<testcase classname="tests.mod" name="{name}" time="0.1">{inner}</testcase>')
    return ('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="%d">%s'
            "</testsuite></testsuites>" % (len(cases), "".join(body)))


def bench(name: str, group: str, params: dict | None, **extra_info) -> dict:
    """One entry of pytest-benchmark's JSON (the fields the summary reads, and a few it ignores)."""
    return {"group": group, "name": name, "fullname": f"bench/test_targets.py::{name}", "params": params,
            "param": None, "extra_info": extra_info, "options": {"timer": "perf_counter"},
            "stats": {"min": 0.001, "max": 0.002, "mean": 0.0015, "median": 0.0015, "rounds": 3}}


LABEL = "bfloat16 b=2 h=8 n=8192 d=64 m=256"


@pytest.fixture
def stage_outputs(tmp_path):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "env.json").write_text(json.dumps({
        "date": "2026-12-02T04:00:00+00:00", "cuda_available": True, "device": "NVIDIA H200",
        "driver": "580.159.04", "torch": "2.11.0+cu130", "torch_cuda": "13.0", "triton": "3.6.0"}))
    (out / "stages.tsv").write_text("env\tok\t0\t3\t\nkernel_tests\tfailed\t1\t80\texit 1\n"
                                    "sanitize_memcheck\tok\t0\t20\t\nsanitize_racecheck\tfailed\t3\t25\texit 3\n")
    (out / "kernel_tests.xml").write_text(junit([
        ("test_softmax[float32-n37]", "passed", ""), ("test_softmax[bfloat16-n1]", "passed", ""),
        ("test_relu[float32-n130]", "failure", "AssertionError: {'dq': 0.035}"),
        ("test_given[fp16]", "skipped", "not on this device")]))
    (out / "logs" / "sanitize_memcheck.log").write_text(
        "non-causal global softmax bfloat16: out=1e-3\nsanitize_case: ok, 6 cases\n"
        "========= ERROR SUMMARY: 0 errors\n")
    (out / "logs" / "sanitize_racecheck.log").write_text(
        "sanitize_case: ok, 6 cases\n========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n")
    benchmarks = [
        bench("test_gpu_causal_vs_fla", f"target: causal fwd+bwd {LABEL}", None, peer="fla-chunk",
              ours_ms=0.5, peer_ms=1.0, speedup=2.0),
        bench("test_gpu_causal_vs_flash_attention[4096]", "target: causal fwd+bwd bfloat16 b=2 h=8 n=4096 d=64 m=256",
              {"n": 4096}, peer="torch-sdpa", ours_ms=0.4, peer_ms=0.3, speedup=0.75),
        bench("test_gpu_noncausal_roofline[fwd]", f"target: non-causal fwd {LABEL}", {"backward": False},
              ours_ms=0.06, roofline_ms=0.02, ratio=3.0),
        bench("test_gpu_times_at_target_shape[causal-fwd]", f"target shape: causal fwd {LABEL}",
              {"causal": True, "backward": False}, call="causal_fwd", ours_us=200.0),
        bench("test_gpu_times_at_target_shape[causal-fwd+bwd]", f"target shape: causal fwd+bwd {LABEL}",
              {"causal": True, "backward": True}, call="causal_fwd+bwd", ours_us=800.0),
        bench("test_gpu_sweep[n1024-torch-sdpa]", "target: causal fwd+bwd bfloat16 b=2 h=8 n=1024 d=64 m=256",
              {"seq_len": 1024, "peer": "torch-sdpa"}, peer="torch-sdpa", ours_ms=0.2, peer_ms=0.1, speedup=0.5, n=1024),
        bench("test_gpu_sweep[n65536-torch-sdpa]", "target: causal fwd+bwd bfloat16 b=2 h=8 n=65536 d=64 m=256",
              {"seq_len": 65536, "peer": "torch-sdpa"}, peer="torch-sdpa", ours_ms=8.0, peer_ms=64.0, speedup=8.0,
              n=65536),
    ]
    (out / "targets.json").write_text(json.dumps({"machine_info": {}, "commit_info": {}, "benchmarks": benchmarks,
                                                  "datetime": "2026-12-02T04:00:00", "version": "5.3.1"}))
    (out / "targets.xml").write_text(junit([
        ("test_gpu_causal_vs_fla", "passed", ""),
        ("test_gpu_causal_vs_flash_attention[4096]", "failure", "AssertionError: slower than SDPA"),
        ("test_gpu_noncausal_roofline[fwd]", "failure", "AssertionError: 3x roofline"),
        ("test_gpu_causal_vs_performer_pytorch", "skipped", "performer-pytorch: not installed"),
        ("test_gpu_sweep[n1024-torch-sdpa]", "passed", ""),
        ("test_gpu_sweep[n65536-torch-sdpa]", "passed", ""),
        ("test_gpu_sweep[n65536-performer-pytorch]", "skipped", "performer-pytorch: 32.0 GiB over the cap"),
    ]))
    (out / "generation.json").write_text(json.dumps({"benchmarks": [
        {"name": "test_time_per_token_is_flat_with_the_cache", "extra_info": {
            "cached_ms_128": 0.5, "cached_ms_4096": 0.55, "recompute_ms_128": 2.0, "recompute_ms_4096": 40.0,
            "cached_growth": 1.1}},
        {"name": "test_prefill_throughput_by_chunk_length", "extra_info": {
            "tokens_per_s_chunk256": 1.0e6, "tokens_per_s_chunk8192": 2.0e6}},
        {"name": "test_fused_pack_against_one_call_per_sequence[causal-prefix]", "param": "causal-prefix",
         "extra_info": {"fused_ms": 2.0, "per_sequence_ms": 9.0, "speedup": 4.5, "tokens": 30000}}]}))
    (out / "compile_report.json").write_text(json.dumps({
        "target": {"b": 2, "h": 8, "n": 8192, "d": 64, "e": 64, "m": 256, "dtype": "bf16"},
        "kernels": [{"name": "causal._state_kernel", "arch": "sm_90a", "dtype": "bf16", "regs": 128,
                     "spill_bytes": 0, "smem_bytes": 40000, "num_warps": 4, "num_stages": 2, "ctas_per_sm": 2,
                     "duplication": 2.0, "pipelined": False, "mma": {"HGMMA": 8, "HMMA": 0}}],
        "calls": [{"name": "causal_fwd", "launches": 5, "triton_launches": 4, "intermediate_bytes": 1,
                   "exp_count": 1, "estimate_us": 250.0, "roofline_us": 20.0},
                  {"name": "causal_bwd", "launches": 6, "triton_launches": 5, "intermediate_bytes": 1,
                   "exp_count": 1, "estimate_us": 550.0, "roofline_us": 40.0}]}))
    (out / "profile.json").write_text(json.dumps({"runs": {
        "ours causal fwd": {"ms": 0.21, "device_us": 150.0, "kernels": {"_state_kernel": 100.0, "_output_kernel": 50.0}},
        "ours causal fwd+bwd": {"ms": 0.9, "device_us": 450.0, "kernels": {"_bwd_qk_kernel": 450.0}},
        "sdpa causal fwd": {"ms": 0.3, "device_us": 290.0, "kernels": {"flash": 290.0}}}}))
    (out / "variants.json").write_text(json.dumps({"variants": {
        "BM_out=64": {"causal fwd+bwd": {"kernels_us": 1400.0, "rel_err": 0.004, "kernels": {}},
                      "noncausal fwd+bwd": {"kernels_us": 800.0, "rel_err": 0.003, "kernels": {}}},
        "num_warps=8": {"causal fwd+bwd": {"error": "OutOfResources: shared memory"}}}}))
    return out


def test_summary_of_fabricated_stage_outputs(stage_outputs):
    out = stage_outputs
    run = subprocess.run([sys.executable, str(SUMMARY), "summary", str(out)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    s = json.loads((out / "summary.json").read_text())
    md = (out / "summary.md").read_text()

    assert s["env"]["device"] == "NVIDIA H200" and "packages" in s["env"]
    assert [r["status"] for r in s["stages"]] == ["ok", "failed", "ok", "failed"]
    tests = s["kernel_tests"]
    assert (tests["tests"], tests["passed"], tests["failed"], tests["errors"], tests["skipped"]) == (4, 2, 1, 0, 1)
    assert tests["not_passed"][0]["name"].endswith("test_relu[float32-n130]")
    assert s["sanitizer"]["memcheck"]["verdict"] == "clean"
    assert s["sanitizer"]["memcheck"]["summary"] == "ERROR SUMMARY: 0 errors"
    assert s["sanitizer"]["racecheck"]["verdict"] == "2 errors"

    targets = {r["test"]: r for r in s["targets"]}
    assert targets["test_gpu_causal_vs_fla"]["ratio"] == 2.0 and targets["test_gpu_causal_vs_fla"]["outcome"] == "passed"
    flash = targets["test_gpu_causal_vs_flash_attention[4096]"]
    assert (flash["peer"], flash["outcome"], flash["required"]) == ("torch-sdpa", "failed", "faster")
    assert "1.33x slower" in md  # SDPA at n=4096: speedup 0.75
    assert targets["test_gpu_noncausal_roofline[fwd]"]["ratio"] == 3.0
    assert targets["test_gpu_causal_vs_performer_pytorch"]["outcome"] == "skipped"
    assert "| `test_gpu_causal_vs_fla` | causal fwd+bwd bfloat16 b=2 h=8 n=8192 d=64 m=256 | 0.5 | fla-chunk | 1 | 2.00x faster |" in md

    sweep = {r["n"]: r for r in s["sweep"]}
    assert sorted(sweep) == [1024, 65536]
    assert sweep[65536]["ours_ms"] == 8.0 and sweep[65536]["peers"]["torch-sdpa"]["speedup"] == 8.0
    assert sweep[65536]["peers"]["performer-pytorch"]["outcome"] == "skipped"
    assert "| 65536 | 8 | 64 (8x) | - | skipped: performer-pytorch: 32.0 GiB over the cap |" in md

    est = {r["call"]: r for r in s["estimates"]}
    assert est["causal fwd"]["measured_us"] == 200.0 and est["causal fwd"]["measured_over_estimate"] == 0.8
    assert est["causal fwd+bwd"]["estimate_us"] == 800.0 and est["causal fwd+bwd"]["measured_over_roofline"] == 800 / 60
    assert est["causal bwd"]["measured_us"] == 600.0
    assert est["noncausal fwd"]["measured_us"] == pytest.approx(60.0)  # from the roofline target's ours_ms
    assert est["noncausal fwd"]["estimate_us"] is None  # not in this report
    assert "| causal fwd | 250 | 20 | 200 | 150 | 0.8 | 0.6 | 10 |" in md
    assert est["causal bwd"]["kernels_us"] == 300.0  # fwd+bwd - fwd of the profile's kernel sums
    prof = {r["run"]: r for r in s["profile"]}
    assert prof["ours causal fwd"]["wall_us"] == 210.0 and prof["ours causal fwd"]["kernels"][0] == ["_state_kernel", 100.0]
    # compared with the newest committed profile (bench/gpu-DATE-profile.json), run by run
    name, previous = _summary_module().previous_profile()
    assert name == sorted(p.name for p in (ROOT / "bench").glob("gpu-*-profile.json"))[-1]
    assert s["previous_profile"] == name
    before = previous["runs"]["ours causal fwd"]
    assert prof["ours causal fwd"]["previous_kernels_us"] == before["device_us"]
    state_before = f"{before['kernels']['_state_kernel']:.0f}"
    assert (f"| ours causal fwd | 210 | 150 | {before['device_us']:,.0f} | _state_kernel 100 ({state_before}), "
            f"_output_kernel 50 ({before['kernels']['_output_kernel']:.0f}) |") in md
    for run, row in prof.items():  # a run the previous profile lacks has no previous figures
        assert ("previous_kernels_us" in row) == (run in previous["runs"]), run
    assert "| BM_out=64 | 1,400 (0.004) | 800 (0.003) |" in md
    assert "| num_warps=8 | OutOfResources: shared memory | - (-) |" in md
    assert s["compile_report"]["flags"] == ["causal._state_kernel (sm_90a, bf16): duplication 2.0; not pipelined"]
    assert s["generation"] == [dict(n=128, cached_ms=0.5, recompute_ms=2.0), dict(n=4096, cached_ms=0.55, recompute_ms=40.0)]
    assert s["packed"] == [dict(case="causal-prefix", fused_ms=2.0, per_sequence_ms=9.0, speedup=4.5)]
    assert "| causal-prefix | 2 | 9 | 4.5 |" in (out / "summary.md").read_text()
    assert "| 4096 | 0.55 | 40 |" in md
    assert s["prefill"] == [dict(chunk=256, tokens_per_s=1.0e6), dict(chunk=8192, tokens_per_s=2.0e6)]
    assert "| 8192 | 2,000,000 |" in md


def test_summary_with_nothing_but_stages(tmp_path):
    (tmp_path / "stages.tsv").write_text("targets\ttimeout\t124\t300\ttimed out after 300 s\n")
    run = subprocess.run([sys.executable, str(SUMMARY), "summary", str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    md = (tmp_path / "summary.md").read_text()
    assert "| targets | timeout | 300 | timed out after 300 s |" in md
    assert md.count("no results (see the stages)") == 5  # kernel tests, targets, sweep, generation, profile


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_script_without_cuda_records_skips(tmp_path):
    """CUDA hidden (CUDA_VISIBLE_DEVICES=""): every GPU stage is skipped, the summary is written,
    exit 0, in seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    out = tmp_path / "gpucheck"
    run = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    stages = {line.split("\t")[0]: line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()}
    assert stages["env"][1] == "ok"
    for name in GPU_STAGES:
        assert stages[name][1] == "skipped", stages[name]
        assert stages[name][4].startswith("skipped: no CUDA device"), stages[name]
    env_json = json.loads((out / "env.json").read_text())
    assert env_json["cuda_available"] is False and env_json["date"]
    s = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in s["stages"]] == ["env", *GPU_STAGES]
    assert (out / "summary.md").read_text().startswith("# GPU check: no CUDA device")
    assert "GPU check: no CUDA device" in run.stdout  # the summary is printed at the end


def test_script_usage():
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "OUTDIR" in run.stderr


def _grads_of(q, k, v):
    """grads_of for gpu_profile._variants: [out, dq, dk, dv] of one fwd+bwd of fn() on q, k, v."""
    def grads_of(fn):
        for t in (q, k, v):
            t.grad = None
        out = fn()
        out.backward(out.new_ones(out.shape))
        return [out.detach(), q.grad, k.grad, v.grad]

    return grads_of


def test_profile_variants_override_the_launch_configs(monkeypatch):
    """bench/gpu_profile.py's --variants (run on the GPU) on the interpreter: each override reaches
    the launchers' _config and is undone after, a variant that cannot launch is recorded (not
    raised), and each variant's outputs are compared with the default configuration's."""
    pytest.importorskip("triton")
    import importlib.util

    import torch

    import performer_triton.kernels.causal as C
    import performer_triton.kernels.noncausal as NC
    from performer_triton import favor_attention

    spec = importlib.util.spec_from_file_location("gpu_profile", ROOT / "bench" / "gpu_profile.py")
    gp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gp)
    seen = []

    def fake_profile(fn):
        fn()
        seen.append((C._config(16, 16, 32, torch.float32, packed=False, long_chunks=False)["num_warps"],
                     NC._config(16, 16, 32, torch.float32)["BM_out"]))
        return {"_output_kernel": 1.0}

    default_bm_out = NC._config(16, 16, 32, torch.float32)["BM_out"]
    monkeypatch.setattr(gp, "_profile", fake_profile)
    monkeypatch.setattr(gp, "VARIANTS", [{"num_warps": 8}, {"BM_out": 48}])  # 48: no power of two
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 20, 16, generator=gen).requires_grad_() for _ in range(3))
    P = torch.randn(32, 16, generator=gen)

    grads_of = _grads_of(q, k, v)

    calls = {"noncausal fwd+bwd": lambda: favor_attention(q, k, v, P, causal=False, backend="triton")}
    res = gp._variants(calls, grads_of)
    assert res["num_warps=8"]["noncausal fwd+bwd"]["rel_err"] < 1e-5  # warps change no numbers
    assert seen[0] == (8, default_bm_out)
    assert "error" in res["BM_out=48"]["noncausal fwd+bwd"]
    assert C._config(16, 16, 32, torch.float32, packed=False, long_chunks=False)["num_warps"] == 4  # undone
    assert NC._config(16, 16, 32, torch.float32)["BM_out"] == default_bm_out


def test_every_profile_variant_launches_and_keeps_the_numbers(monkeypatch):
    """Each of gpu_profile's VARIANTS (what the next GPU run times) launches on the interpreter in
    bf16, causal and non-causal, and gives the default configuration's outputs and gradients up
    to bf16 rounding: a variant that does not launch or computes something else would waste a
    lease's minutes."""
    pytest.importorskip("triton")
    import importlib.util

    import torch

    from performer_triton import favor_attention

    spec = importlib.util.spec_from_file_location("gpu_profile", ROOT / "bench" / "gpu_profile.py")
    gp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gp)
    monkeypatch.setattr(gp, "_profile", lambda fn: (fn(), {"kernel": 1.0})[1])
    gen = torch.Generator().manual_seed(0)
    # 150 rows: more than one 128-row chunk; m = 72: more than one m tile at every BM
    q, k, v = (torch.randn(1, 1, 150, 16, generator=gen).bfloat16().requires_grad_() for _ in range(3))
    P = torch.randn(72, 16, generator=gen)

    grads_of = _grads_of(q, k, v)

    calls = {f"{mode} fwd+bwd": lambda causal=causal: favor_attention(q, k, v, P, causal=causal, backend="triton")
             for mode, causal in (("causal", True), ("noncausal", False))}
    res = gp._variants(calls, grads_of)
    assert len(res) == len(gp.VARIANTS)
    for label, by_call in res.items():
        for call, r in by_call.items():
            assert "error" not in r, (label, call, r)
            assert r["rel_err"] < 2e-2, (label, call, r["rel_err"])
