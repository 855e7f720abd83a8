"""The environment record and the summary of bench/gpu_check.sh.

    python bench/gpu_summary.py env OUTDIR       # OUTDIR/env.json; prints cuda_available=0|1
    python bench/gpu_summary.py summary OUTDIR   # OUTDIR/summary.md and OUTDIR/summary.json

`summary` reads what the stages left in OUTDIR, each optional (a stage that was skipped, failed or
ran out of time leaves less, and the summary says so):

    env.json              device, driver, CUDA, torch, triton, date (written by `env`)
    stages.tsv            name, status, exit code, seconds, detail: one line per stage
    cuda_tests.xml        junit XML of the CUDA-only tests (autocast training), run first
    kernel_tests.xml      junit XML of the kernel tests on CUDA
    logs/sanitize_*.log   compute-sanitizer's output (memcheck, racecheck)
    targets.json          pytest-benchmark JSON of bench/test_targets.py (targets, times, sweep)
    targets.xml           junit XML of the same run (outcomes and skip reasons)
    generation.json       pytest-benchmark JSON of bench/test_generation.py (ms per token by
                          context length: the cached decode step against recomputing)
    profile.json          `bench/gpu_profile.py --json`: wall and per-kernel device times per
                          call at the target shape
    variants.json         `bench/gpu_profile.py --variants --json`: the same under one launch-
                          configuration override at a time
    compile_report.json   `bench/compile_report.py --target --json`: {"kernels": [...],
                          "calls": [{"name", "estimate_us", "roofline_us", ...}]}

It needs neither torch nor a GPU (only `env` imports torch).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# the benchmark shape of the compile report's --target calls (and of the GPU targets)
TARGET_SHAPE = "bf16 b=2 h=8 n=8192 d=e=64 m=256"
CALLS = ("causal_fwd", "causal_bwd", "noncausal_fwd", "noncausal_bwd")
PACKAGES = ("performer-triton", "torch", "triton", "numpy", "einops", "pytest", "pytest-benchmark",
            "hypothesis", "pytest-xdist", "performer-pytorch", "local-attention", "flash-linear-attention",
            "fla-core", "transformers")
PEERS = ("torch-sdpa", "fla-chunk", "performer-pytorch")
REQUIRED = {  # what each GPU target asserts (bench/test_targets.py)
    "test_gpu_causal_vs_performer_pytorch": ">= 10x faster",
    "test_gpu_causal_vs_fla": "faster",
    "test_gpu_causal_vs_flash_attention": "faster",
    "test_gpu_noncausal_roofline": "<= 1.5x roofline",
}


# ----------------------------------------------------------------------------- env


def _run(cmd: list[str], timeout: float = 20) -> str | None:
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def collect_env() -> dict:
    env: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "cuda_available": False,
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = bool(torch.cuda.is_available())
        if env["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                       sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                       device_count=torch.cuda.device_count())
    except Exception as exc:  # no torch, or a broken CUDA setup: recorded, never fatal
        env["torch_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton_error"] = f"{type(exc).__name__}: {exc}"
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                "--format=csv,noheader"])
    if smi:
        env["nvidia_smi"] = smi.splitlines()[0]
        env["driver"] = smi.splitlines()[0].split(",")[1].strip()
    cuda_line = _run(["nvidia-smi"])
    if cuda_line and (m := re.search(r"CUDA Version:\s*([\d.]+)", cuda_line)):
        env["driver_cuda"] = m.group(1)
    nvcc = _run(["nvcc", "--version"]) or _run(["/usr/local/cuda/bin/nvcc", "--version"])
    if nvcc and (m := re.search(r"release ([\d.]+)", nvcc)):
        env["nvcc"] = m.group(1)
    commit = _run(["git", "-C", str(Path(__file__).resolve().parent.parent), "rev-parse", "HEAD"])
    if commit:
        env["commit"] = commit
    return env


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# ----------------------------------------------------------------------------- readers


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_stages(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 5:
            continue
        name, status, rc, seconds, detail = parts[:5]
        rows.append(dict(name=name, status=status, rc=int(rc) if rc.lstrip("-").isdigit() else None,
                         seconds=int(seconds) if seconds.isdigit() else None, detail=detail))
    return rows


def read_junit(path: Path) -> dict | None:
    """Counts and the not-passed cases of a junit XML file (pytest's, xdist's merged too)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = dict(tests=0, passed=0, failed=0, errors=0, skipped=0)
    cases = {}
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        full = f"{case.get('classname', '')}::{name}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or child.text or "").strip()
                break
        counts["tests"] += 1
        counts[outcome] += 1
        cases[name] = dict(name=full, outcome=outcome, message=_first_line(message))
    return dict(counts, cases=cases)


def _merge_junit(*results: dict | None) -> dict | None:
    """read_junit results of several runs as one (None where none ran)."""
    present = [r for r in results if r is not None]
    if not present:
        return None
    merged = {key: sum(r[key] for r in present) for key in ("tests", "passed", "failed", "errors", "skipped")}
    return dict(merged, cases={k: v for r in present for k, v in r["cases"].items()})


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_sanitizer(path: Path) -> dict | None:
    """compute-sanitizer's verdict from its log: errors (memcheck) or hazards (racecheck), and
    whether the checked program finished (sanitize_case.py's last line)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    out = dict(finished="sanitize_case: ok" in text, errors=None, summary="")
    if m := re.search(r"ERROR SUMMARY: (\d+) errors?", text):
        out["errors"], out["summary"] = int(m.group(1)), m.group(0)
    if m := re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text):
        out["errors"], out["summary"] = int(m.group(2)), m.group(0)
        out["warnings"] = int(m.group(3))
    for marker in ("Device not supported", "skipped:"):
        if marker in text and out["errors"] is None:
            out["summary"] = _first_line(text[text.index(marker):])
    if out["errors"] == 0 and out["finished"]:
        out["verdict"] = "clean"
    elif out["errors"]:
        out["verdict"] = f"{out['errors']} errors"
    elif out["errors"] == 0:
        out["verdict"] = "no errors, but the case did not finish"
    else:
        out["verdict"] = "no verdict" + (f" ({out['summary']})" if out["summary"] else "")
    return out


def benchmarks(data: dict | None) -> list[dict]:
    return list((data or {}).get("benchmarks", []))


def _test_name(bench: dict) -> str:
    return bench.get("name", "").split("[")[0]


# ----------------------------------------------------------------------------- tables


def target_rows(bench_json: dict | None, junit: dict | None) -> list[dict]:
    """One row per GPU target of bench/test_targets.py: ours, peer, ratio, required, outcome."""
    by_name = {b["name"]: b for b in benchmarks(bench_json)}
    names = [n for n in (junit or {}).get("cases", {}) if n.split("[")[0] in REQUIRED]
    names += [n for n in by_name if n.split("[")[0] in REQUIRED and n not in names]
    rows = []
    for name in names:
        info = by_name.get(name, {}).get("extra_info", {})
        case = (junit or {}).get("cases", {}).get(name, {})
        row = dict(test=name, case=by_name.get(name, {}).get("group", "").removeprefix("target: "),
                   required=REQUIRED[name.split("[")[0]], outcome=case.get("outcome", "passed" if info else "?"),
                   message=case.get("message", ""))
        if "roofline_ms" in info:
            row.update(peer="roofline", ours_ms=info.get("ours_ms"), peer_ms=info.get("roofline_ms"),
                       ratio=info.get("ratio"), ratio_text=_times(info.get("ratio"), "x roofline"))
        else:
            row.update(peer=info.get("peer") or _peer_of(name), ours_ms=info.get("ours_ms"),
                       peer_ms=info.get("peer_ms"), ratio=info.get("speedup"),
                       ratio_text=_speedup(info.get("speedup")))
        rows.append(row)
    return rows


def _peer_of(test: str) -> str:
    for key, peer in (("performer_pytorch", "performer-pytorch"), ("fla", "fla-chunk"), ("flash", "torch-sdpa")):
        if key in test:
            return peer
    return ""


def _speedup(value) -> str:
    if not value:
        return ""
    return f"{value:.2f}x faster" if value >= 1 else f"{1 / value:.2f}x slower"


def _times(value, what: str) -> str:
    return "" if value is None else f"{value:.2f}{what}"


def sweep_rows(bench_json: dict | None, junit: dict | None) -> list[dict]:
    """Causal fwd+bwd per n: ours and each peer (ms), the speedup, or why the peer did not run."""
    table: dict[int, dict] = {}
    for bench in benchmarks(bench_json):
        if _test_name(bench) != "test_gpu_sweep":
            continue
        info, params = bench.get("extra_info", {}), bench.get("params") or {}
        n = int(params.get("seq_len") or info.get("n") or 0)
        peer = params.get("peer") or info.get("peer")
        row = table.setdefault(n, dict(n=n, peers={}))
        row.setdefault("ours_ms", info.get("ours_ms"))
        row["peers"][peer] = dict(ms=info.get("peer_ms"), speedup=info.get("speedup"), outcome="passed")
    for name, case in (junit or {}).get("cases", {}).items():
        if not name.startswith("test_gpu_sweep[") or case["outcome"] == "passed":
            continue
        m = re.search(r"n(\d+)", name)
        peer = next((p for p in PEERS if p in name), None)
        if not m or not peer:
            continue
        row = table.setdefault(int(m.group(1)), dict(n=int(m.group(1)), peers={}))
        row["peers"].setdefault(peer, dict(ms=None, speedup=None))
        row["peers"][peer].update(outcome=case["outcome"], message=case["message"])
    return [table[n] for n in sorted(table)]


def measured_times(bench_json: dict | None) -> dict[str, float]:
    """Our measured times (us) at the target shape: {causal_fwd, causal_fwd+bwd, noncausal_fwd,
    noncausal_fwd+bwd}, from test_gpu_times_at_target_shape, else from the targets and sweep."""
    out: dict[str, float] = {}
    for bench in benchmarks(bench_json):
        info, name = bench.get("extra_info", {}), _test_name(bench)
        if name == "test_gpu_times_at_target_shape" and info.get("call") and info.get("ours_us"):
            out[info["call"]] = float(info["ours_us"])
    for bench in benchmarks(bench_json):  # fallbacks at n = 8192
        info, name, label = bench.get("extra_info", {}), _test_name(bench), bench.get("group", "")
        if "n=8192" not in label or info.get("ours_ms") is None:
            continue
        mode = "noncausal" if "non-causal" in label else "causal"
        passes = "fwd+bwd" if "fwd+bwd" in label else "fwd"
        out.setdefault(f"{mode}_{passes}", float(info["ours_ms"]) * 1e3)
    return out


def profile_rows(profile: dict | None, previous: dict | None = None) -> list[dict]:
    """bench/gpu_profile.py's runs: {run, wall_us, kernels_us, kernels: [(name, us), ...]}, and
    from a previous profile (the newest one committed, previous_profile) the same run's
    previous_kernels_us and previous (kernel name -> us), where it has the run."""
    rows = []
    before = (previous or {}).get("runs") or {}
    for run, r in ((profile or {}).get("runs") or {}).items():
        row = dict(run=run, wall_us=r["ms"] * 1e3, kernels_us=r["device_us"], kernels=list(r["kernels"].items()))
        if run in before:
            row |= dict(previous_kernels_us=before[run]["device_us"], previous=before[run]["kernels"])
        rows.append(row)
    return rows


def previous_profile(bench: Path = Path(__file__).resolve().parent) -> tuple[str | None, dict | None]:
    """(file name, contents) of the newest committed profile (bench/gpu-DATE-profile.json), the
    measurements this run's are compared with; (None, None) without one."""
    files = sorted(bench.glob("gpu-*-profile.json"))
    return (files[-1].name, read_json(files[-1])) if files else (None, None)


def variant_rows(variants: dict | None) -> list[dict]:
    """bench/gpu_profile.py --variants: {variant, causal, noncausal} with each call's summed kernel
    us, relative error against the default configuration, or its error."""
    rows = []
    for label, calls in ((variants or {}).get("variants") or {}).items():
        row = dict(variant=label)
        for mode in ("causal", "noncausal"):
            r = calls.get(f"{mode} fwd+bwd") or {}
            row[mode] = r.get("error") or (r.get("kernels_us"), r.get("rel_err"))
        rows.append(row)
    return rows


def ours_by_call(profile: dict | None, key: str) -> dict[str, float]:
    """One value of our profile runs per call ("ours causal fwd" -> causal_fwd): key "kernels_us"
    (summed kernel times) or "wall_us"."""
    return {"_".join(r["run"].split()[1:]): r[key] for r in profile_rows(profile) if r["run"].startswith("ours ")}


def estimate_rows(report: dict | None, measured: dict[str, float], kernels: dict[str, float]) -> list[dict]:
    """The compile report's estimate and roofline per call next to the measured time (wall) and
    the summed kernel time (profile): fwd, fwd+bwd (estimate fwd + bwd) and bwd alone (measured
    fwd+bwd - fwd) for both modes."""
    calls = {c.get("name"): c for c in (report or {}).get("calls", [])}
    rows = []
    for mode in ("causal", "noncausal"):
        fwd, bwd = calls.get(f"{mode}_fwd", {}), calls.get(f"{mode}_bwd", {})
        m_fwd, m_both = measured.get(f"{mode}_fwd"), measured.get(f"{mode}_fwd+bwd")
        k_fwd, k_both = kernels.get(f"{mode}_fwd"), kernels.get(f"{mode}_fwd+bwd")
        for label, est, roof, meas, kern in (
            ("fwd", fwd.get("estimate_us"), fwd.get("roofline_us"), m_fwd, k_fwd),
            ("bwd", bwd.get("estimate_us"), bwd.get("roofline_us"), _sub(m_both, m_fwd), _sub(k_both, k_fwd)),
            ("fwd+bwd", _add(fwd.get("estimate_us"), bwd.get("estimate_us")),
             _add(fwd.get("roofline_us"), bwd.get("roofline_us")), m_both, k_both),
        ):
            rows.append(dict(call=f"{mode} {label}", estimate_us=est, roofline_us=roof, measured_us=meas,
                             kernels_us=kern, measured_over_estimate=_ratio(meas, est),
                             kernels_over_estimate=_ratio(kern, est), measured_over_roofline=_ratio(meas, roof)))
    return rows


def _sub(a, b):
    return None if a is None or b is None else a - b


def _add(a, b):
    return None if a is None or b is None else a + b


def _ratio(a, b):
    return None if a is None or not b else a / b


def compile_flags(report: dict | None) -> list[str]:
    """Kernels the report flags: its own `problems` where it lists them, else spills, duplication
    > 1 and unpipelined loops read from the fields."""
    flags = []
    for k in (report or {}).get("kernels", []):
        what = list(k.get("problems") or [])
        if "problems" not in k:
            if k.get("spill_bytes"):
                what.append(f"{k['spill_bytes']} B spilled")
            if (k.get("duplication") or 1) > 1:
                what.append(f"duplication {k['duplication']}")
            if k.get("pipelined") is False:
                what.append("not pipelined")
        if what:
            flag = f"{k.get('name')} ({k.get('arch')}, {k.get('dtype')}): " + "; ".join(what)
            flags.append(flag if len(flag) <= 240 else flag[:237] + "...")
    return flags


# ----------------------------------------------------------------------------- summary


def generation_rows(bench_json: dict | None) -> list[dict]:
    """Per context length: ms per token of the cached decode step and of recomputing the prefix
    (bench/test_generation.py's extra_info cached_ms_N, recompute_ms_N)."""
    rows: dict[int, dict] = {}
    for bench in (bench_json or {}).get("benchmarks", []):
        for key, value in (bench.get("extra_info") or {}).items():
            found = re.fullmatch(r"(cached|recompute)_ms_(\d+)", key)
            if found:
                rows.setdefault(int(found.group(2)), dict(n=int(found.group(2))))[f"{found.group(1)}_ms"] = value
    return [rows[n] for n in sorted(rows)]


def prefill_rows(bench_json: dict | None) -> list[dict]:
    """Per chunk length: tokens per second of chunked prefill (bench/test_generation.py's
    extra_info tokens_per_s_chunkN)."""
    rows = []
    for bench in (bench_json or {}).get("benchmarks", []):
        for key, value in (bench.get("extra_info") or {}).items():
            found = re.fullmatch(r"tokens_per_s_chunk(\d+)", key)
            if found:
                rows.append(dict(chunk=int(found.group(1)), tokens_per_s=value))
    return sorted(rows, key=lambda r: r["chunk"])


def packed_rows(bench_json: dict | None) -> list[dict]:
    """Per mode: fwd+bwd ms of the fused pack and of one call per sequence (bench/test_packed.py's
    extra_info fused_ms, per_sequence_ms, speedup)."""
    rows = []
    for bench in (bench_json or {}).get("benchmarks", []):
        info = bench.get("extra_info") or {}
        if "fused_ms" in info:
            rows.append(dict(case=bench.get("param") or bench.get("name", ""), fused_ms=info["fused_ms"],
                             per_sequence_ms=info.get("per_sequence_ms"), speedup=info.get("speedup")))
    return rows


def summarize(out: Path) -> dict:
    env = read_json(out / "env.json") or {}
    env["packages"] = package_versions()
    stages = read_stages(out / "stages.tsv")
    tests = _merge_junit(read_junit(out / "cuda_tests.xml"), read_junit(out / "kernel_tests.xml"))
    targets_junit = read_junit(out / "targets.xml")
    bench_json = read_json(out / "targets.json")
    report = read_json(out / "compile_report.json")
    sanitizer = {tool: read_sanitizer(out / "logs" / f"sanitize_{tool}.log") for tool in ("memcheck", "racecheck")}
    for tool, stage in ((t, next((s for s in stages if s["name"] == f"sanitize_{t}"), None)) for t in sanitizer):
        if stage and stage["status"] == "skipped":
            sanitizer[tool] = dict(verdict=stage["detail"])
    profile = read_json(out / "profile.json")
    measured = measured_times(bench_json)
    for call, wall_us in ours_by_call(profile, "wall_us").items():
        measured.setdefault(call, wall_us)  # when the targets did not time it
    return dict(
        env=env, stages=stages,
        kernel_tests=None if tests is None else {k: v for k, v in tests.items() if k != "cases"}
        | dict(not_passed=[c for c in tests["cases"].values() if c["outcome"] in ("failed", "errors")]),
        sanitizer=sanitizer,
        targets=target_rows(bench_json, targets_junit),
        target_tests=None if targets_junit is None else {k: v for k, v in targets_junit.items() if k != "cases"},
        sweep=sweep_rows(bench_json, targets_junit),
        generation=generation_rows(read_json(out / "generation.json")),
        prefill=prefill_rows(read_json(out / "generation.json")),
        packed=packed_rows(read_json(out / "generation.json")),
        target_shape=TARGET_SHAPE,
        measured_us=measured,
        profile=profile_rows(profile, previous_profile()[1]),
        previous_profile=previous_profile()[0],
        variants=variant_rows(read_json(out / "variants.json")),
        estimates=estimate_rows(report, measured, ours_by_call(profile, "kernels_us")) if report or measured else [],
        compile_report=None if report is None else dict(
            kernels=len(report.get("kernels", [])), target=report.get("target"), flags=compile_flags(report),
            calls={c.get("name"): {k: c.get(k) for k in ("launches", "triton_launches", "intermediate_bytes",
                                                         "exp_count", "estimate_us", "roofline_us")}
                   for c in report.get("calls", [])}),
    )


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown(s: dict) -> str:
    env = s["env"]
    device = env.get("device") or "no CUDA device"
    lines = [f"# GPU check: {device}, {env.get('date', '?')}", ""]
    lines += ["| | |", "|---|---|"]
    for key, label in (("device", "device"), ("nvidia_smi", "nvidia-smi"), ("driver", "driver"),
                       ("driver_cuda", "driver CUDA"), ("torch_cuda", "torch CUDA"), ("nvcc", "nvcc"),
                       ("torch", "torch"), ("triton", "triton"), ("python", "python"), ("commit", "commit"),
                       ("torch_error", "torch error")):
        if env.get(key) is not None:
            lines.append(f"| {label} | {env[key]} |")
    pkgs = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items() if v and k not in ("torch", "triton"))
    lines += [f"| packages | {pkgs} |", ""]

    lines += ["## Stages", "", "| stage | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {_fmt(r['seconds'])} | {r['detail']} |" for r in s["stages"]]
    lines.append("")

    lines += ["## Kernel tests on CUDA", ""]
    t = s["kernel_tests"]
    if t is None:
        lines.append("no results (see the stages)")
    else:
        lines.append(f"{t['tests']} tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped")
        lines += [f"- {c['outcome']}: `{c['name']}`: {c['message']}" for c in t["not_passed"][:40]]
        if len(t["not_passed"]) > 40:
            lines.append(f"- ... {len(t['not_passed']) - 40} more (kernel_tests.xml)")
    lines.append("")

    lines += ["## compute-sanitizer (bench/sanitize_case.py)", ""]
    for tool, v in s["sanitizer"].items():
        lines.append(f"- {tool}: {(v or {}).get('verdict', 'no log')}"
                     + (f" ({v['summary']})" if v and v.get("summary") and v.get("verdict") == "clean" else ""))
    lines.append("")

    lines += ["## Targets (bench/test_targets.py)", ""]
    if (t := s["target_tests"]) is not None:
        lines += [f"{t['tests']} tests (targets, times, sweep): {t['passed']} passed, {t['failed']} failed, "
                  f"{t['errors']} errors, {t['skipped']} skipped", ""]
    if s["targets"]:
        lines += ["| target | case | ours ms | peer | peer ms | ratio | required | outcome |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in s["targets"]:
            outcome = r["outcome"] + (f": {r['message']}" if r["outcome"] != "passed" and r["message"] else "")
            lines.append(f"| `{r['test']}` | {r['case']} | {_fmt(r['ours_ms'])} | {r['peer']} | {_fmt(r['peer_ms'])} "
                         f"| {r['ratio_text']} | {r['required']} | {outcome} |")
    else:
        lines.append("no results (see the stages)")
    lines.append("")

    lines += [f"## Causal fwd+bwd sweep, {TARGET_SHAPE.replace(' n=8192', '')}: ms (ours / peer = speedup)", ""]
    if s["sweep"]:
        lines += ["| n | ours | " + " | ".join(PEERS) + " |", "|---" * (len(PEERS) + 2) + "|"]
        for r in s["sweep"]:
            cells = []
            for peer in PEERS:
                p = r["peers"].get(peer)
                if p is None:
                    cells.append("-")
                elif p.get("ms") is not None:
                    cells.append(f"{_fmt(p['ms'])} ({_fmt(p['speedup'])}x)")
                else:
                    cells.append(f"{p.get('outcome')}: {p.get('message', '')}")
            lines.append(f"| {r['n']} | {_fmt(r.get('ours_ms'))} | " + " | ".join(cells) + " |")
    else:
        lines.append("no results (see the stages)")
    lines.append("")

    lines += ["## Generation: ms per token against context length (bench/test_generation.py)", ""]
    if s.get("generation"):
        lines += ["| context | cached step ms | recompute ms |", "|---|---|---|"]
        lines += [f"| {r['n']} | {_fmt(r.get('cached_ms'))} | {_fmt(r.get('recompute_ms'))} |" for r in s["generation"]]
    else:
        lines.append("no results (see the stages)")
    if s.get("prefill"):
        lines += ["", "Chunked prefill (state passing), 8192 tokens: tokens per second by chunk length", "",
                  "| chunk | tokens/s |", "|---|---|"]
        lines += [f"| {r['chunk']} | {_fmt(r['tokens_per_s'])} |" for r in s["prefill"]]
    if s.get("packed"):
        lines += ["", "Packed sequences (bench/test_packed.py), fwd+bwd: one fused pack vs one call per sequence", "",
                  "| case | fused ms | per sequence ms | speedup |", "|---|---|---|---|"]
        lines += [f"| {r['case']} | {_fmt(r['fused_ms'])} | {_fmt(r['per_sequence_ms'])} | {_fmt(r['speedup'])} |"
                  for r in s["packed"]]
    lines.append("")

    lines += [f"## Profile (bench/gpu_profile.py), {TARGET_SHAPE}: per call", ""]
    if s.get("profile"):
        lines += [f"previous: the same run in {s.get('previous_profile') or '-'} (a kernel's previous us in "
                  "parentheses)", "", "| run | wall us | kernels us | previous kernels us | kernels (us) |",
                  "|---|---|---|---|---|"]
        for r in s["profile"]:
            before = r.get("previous") or {}
            top = ", ".join(f"{name.split('(')[0][:40]} {us:.0f}"
                            + (f" ({before[name]:.0f})" if name in before else "") for name, us in r["kernels"][:6])
            lines.append(f"| {r['run']} | {_fmt(r['wall_us'])} | {_fmt(r['kernels_us'])} "
                         f"| {_fmt(r.get('previous_kernels_us'))} | {top} |")
    else:
        lines.append("no results (see the stages)")
    lines.append("")

    if s.get("variants"):
        lines += ["Launch-configuration variants (`bench/gpu_profile.py --variants`), fwd+bwd kernel us "
                  "(relative error against the default configuration):", "",
                  "| variant | causal | non-causal |", "|---|---|---|"]
        for r in s["variants"]:
            cells = [c if isinstance(c, str) else f"{_fmt(c[0])} ({_fmt(c[1], 2)})"
                     for c in (r["causal"], r["noncausal"])]
            lines.append(f"| {r['variant']} | {cells[0]} | {cells[1]} |")
        lines.append("")

    lines += [f"## Compile report estimates vs measured, {TARGET_SHAPE}", ""]
    if s["estimates"]:
        lines += ["| call | estimate us | roofline us | measured us | kernels us | measured / estimate "
                  "| kernels / estimate | measured / roofline |", "|---|---|---|---|---|---|---|---|"]
        for r in s["estimates"]:
            lines.append(f"| {r['call']} | {_fmt(r['estimate_us'])} | {_fmt(r['roofline_us'])} "
                         f"| {_fmt(r['measured_us'])} | {_fmt(r.get('kernels_us'))} | {_fmt(r['measured_over_estimate'])} "
                         f"| {_fmt(r.get('kernels_over_estimate'))} | {_fmt(r['measured_over_roofline'])} |")
        lines.append("")
        lines.append("measured = wall time per call; kernels = summed device time of its kernels (profile); "
                     "bwd = fwd+bwd - fwd; fwd+bwd estimate = fwd + bwd estimates.")
    else:
        lines.append("no compile report and no measured times (see the stages)")
    cr = s["compile_report"]
    if cr is not None:
        target = " ".join(f"{k}={v}" for k, v in (cr["target"] or {}).items())
        lines += ["", f"Compile report ({target}): {cr['kernels']} kernels, "
                  + (f"{len(cr['flags'])} flagged:" if cr["flags"] else "none flagged")]
        lines += [f"- {flag}" for flag in cr["flags"]]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("env", "summary"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if argv[0] == "env":
        env = collect_env()
        (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
        print(f"cuda_available={int(env['cuda_available'])}")
        return 0
    s = summarize(out)
    (out / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(s))
    print(f"wrote {out / 'summary.md'} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
