"""Ahead-of-time compile report for every Triton kernel configuration the launchers can launch.

    python bench/compile_report.py [--arch 90 80] [--filter TEXT] [--json FILE] [-j N]

Needs no GPU; TRITON_INTERPRET must be unset (the interpreter replaces the compiler).

How configurations are found: the real launchers (kernels/NOTES.md, "Launcher contract") are
called on device="meta" tensors over the sweep below, with JITFunction.run replaced by a
recorder, so every `kernel[grid](...)` is captured (kernel, bound arguments, launch options)
instead of launched; a backward sweep point first runs the forward launcher for its inputs.
Each capture is specialised the way JITFunction.run does it on a GPU (see `specialise`): pointer
types from tensor dtypes, int == 1 -> constexpr, int % 16 == 0 -> tt.divisibility 16, pointers
16-byte aligned -> tt.divisibility 16 (meta tensors have base address 0, torch allocations are
256-byte aligned, so a view's storage offset decides, as on a GPU), floats -> fp32.
Identical specialisations are compiled once per arch.

Sweep: dtype fp32/fp16/bf16 x (d, e) in HEAD_DIMS (up to kernels.MAX_HEAD_DIM) x m in
NB_FEATURES x n = SEQ_LEN x every kernel code of the feature-map registry
(performer_triton.feature_maps.KERNEL_MAPS: softmax, relu, given) x non-causal/causal/
causal-prefix (kernels.launchers) x forward/backward, b = BATCH, h = HEADS; plus
row_stats(x, projection) on its own.  Targets: sm_90a (H100) and sm_80 (A100).

Per unique compile: kernel, constexprs, argument dtypes and the int arguments without the
16-divisibility hint, num_warps/num_stages, registers and spill bytes (bundled ptxas -v with
Triton's own flags, registers cross-checked against the cubin), shared memory
(metadata.shared, the number Triton checks against the device limit at load time), and the
count of tensor-core instructions in the SASS (HGMMA on sm_90, HMMA on sm_80).

Exit status 1 when any launcher fails on meta tensors, any compile fails, any kernel spills,
needs more shared memory than the arch allows per block (sm_90: 232448 bytes, sm_80: 166912),
or has a tensor-core dot without the arch's MMA instruction; 2 when a module in
REQUIRED_MODULES is missing (the others are still reported); 0 otherwise.

MMA rule: a tl.dot needs tensor cores unless its operands are fp32 with input_precision "ieee"
(exact fp32 products: FFMA, no MMA exists) or fp64.  So fp16/bf16 dots and fp32 dots in tf32 /
tf32x3 / bf16x3 precision must yield HGMMA on sm_90 when the kernel has such a dot of M >= 64
rows (one warpgroup's wgmma; HMMA from mma.sync does not count then), HMMA on sm_90 when all of
them have fewer rows (mma.sync is the only tensor-core path for those), and HMMA on sm_80; a
kernel whose dots are all ieee fp32 must show none and is not checked.  The check is per kernel:
at least one such instruction when it has at least one tensor-core dot (TTIR).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDAOptions
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, KernelParam

from performer_triton.kernels import MAX_HEAD_DIM, launchers

# What the sweep reads: the feature-map registry (the kernel codes, by name) and every kernel
# module the library ships; a missing one fails the report (exit 2).
REQUIRED_MODULES = (
    "performer_triton.feature_maps",
    "performer_triton.kernels.feature_map",
    "performer_triton.kernels.noncausal",
    "performer_triton.kernels.causal",
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (d, e): every tile width the launchers choose (BD, BV in 16 ... 128; BK-chunked d and EV-sliced
# backward values from 80 up), non-powers of two included; pairs above MAX_HEAD_DIM are skipped
# (the launchers refuse them)
HEAD_DIMS = ((16, 16), (32, 32), (48, 48), (64, 64), (24, 64), (64, 40), (24, 32), (80, 96), (128, 128), (128, 48),
             (128, 32), (16, 128))
NB_FEATURES = (256, 266)
# --quick (what the test suite runs in CI): every kernel, feature map, dtype and mode at the widest
# head dim (most registers) and the narrowest, with the default m (M % 16 != 0)
QUICK_HEAD_DIMS = ((MAX_HEAD_DIM, MAX_HEAD_DIM), (16, 16))
QUICK_NB_FEATURES = (266,)
# One length / batch / head count: they change only divisibility hints (N % 16) or ints that can
# become 1 (n <= BT, b * h = 1), each a further compile of every kernel.
SEQ_LEN, BATCH, HEADS = 1000, 2, 8


@dataclass(frozen=True)
class Arch:
    name: str
    smem_limit: int  # bytes of shared memory per block (opt-in maximum)
    mma: str  # the tensor-core instruction a dot must become


ARCHS = {
    90: Arch("sm_90a", 232448, "HGMMA"),
    80: Arch("sm_80", 166912, "HMMA"),
}

_TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
    torch.uint8: "u8", torch.bool: "u1",
}
_DIV16 = [["tt.divisibility", 16]]


@dataclass
class Launch:
    """One intercepted `kernel[grid](*args, **kwargs)`."""
    label: str
    fn: JITFunction
    args: tuple
    kwargs: dict


@dataclass
class Spec:
    """What JITFunction.run would hand to the compiler for a launch."""
    signature: dict  # param name -> triton type or "constexpr"
    constexprs: dict  # (index,) -> value
    attrs: dict  # (index,) -> [["tt.divisibility", 16]] or []
    options: dict  # launch options (num_warps, num_stages, ...) as JITFunction.run passes them

    def key(self, fn: JITFunction) -> str:
        return repr((fn.module, fn.__name__, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.items())))


@dataclass
class Result:
    arch: int
    kernel: str
    constexprs: str
    args: str
    configs: list = field(default_factory=list)
    num_warps: int = 0
    num_stages: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    hgmma: int = 0
    hmma: int = 0
    dots: list = field(default_factory=list)  # (operand type, input precision) per TTIR tt.dot
    compile_s: float = 0.0
    problems: list = field(default_factory=list)
    error: str = ""  # full compiler message of a failed compile


# ----------------------------------------------------------------------------- capture


@contextlib.contextmanager
def intercept_launches(sink: list):
    """Replace JITFunction.run (what `kernel[grid](...)` calls) by a recorder that launches nothing."""
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        sink.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


def capture(label: str, launcher, *args, **kwargs):
    """Call a launcher with launches intercepted.  Returns (its result, [Launch])."""
    sink: list = []
    with intercept_launches(sink):
        result = launcher(*args, **kwargs)
    return result, [Launch(label, fn, a, kw) for fn, a, kw in sink]


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


def sweep(modules: dict, failures: list, quick: bool = False) -> list[Launch]:
    """All launches of the sweep (see the module docstring); launcher exceptions go to failures."""
    launches: list[Launch] = []

    def run(label, launcher, *args, **kwargs):
        try:
            result, found = capture(label, launcher, *args, **kwargs)
        except Exception as exc:  # a launcher that cannot run on meta tensors is a finding
            failures.append(f"{label}: launcher raised {type(exc).__name__}: {exc}")
            return None
        launches.extend(found)
        return result

    registry = modules.get("performer_triton.feature_maps")
    feature_map = modules.get("performer_triton.kernels.feature_map")
    modes = []  # (name, causal, keyword arguments) of the launchers kernels.launchers(causal) returns
    if "performer_triton.kernels.noncausal" in modules:
        modes.append(("noncausal", False, {"prefix": False}))
    if "performer_triton.kernels.causal" in modules:
        modes.append(("causal", True, {"prefix": False}))
        modes.append(("causal-prefix", True, {"prefix": True}))
    if feature_map is None or registry is None:
        return launches
    for dname, dtype in DTYPES.items():
        for d, e in QUICK_HEAD_DIMS if quick else HEAD_DIMS:
            if max(d, e) > MAX_HEAD_DIM:  # the launchers refuse these
                continue
            for m in QUICK_NB_FEATURES if quick else NB_FEATURES:
                shape = f"{dname} d={d} e={e} m={m}"
                projection = _meta((m, d), dtype)
                run(f"row_stats {shape}", feature_map.row_stats, _meta((BATCH, HEADS, SEQ_LEN, d), dtype), projection)
                for feature, fmap in sorted(registry.KERNEL_MAPS.items()):
                    given = not fmap.fused
                    qk = (BATCH, HEADS, SEQ_LEN, m if given else d)
                    q, k, v = _meta(qk, dtype), _meta(qk, dtype), _meta((BATCH, HEADS, SEQ_LEN, e), dtype)
                    proj = None if given else projection
                    for mode, causal, extra in modes:
                        fwd, bwd = launchers(causal)
                        label = f"{mode} {shape} {fmap.name}"
                        saved = run(f"{label} fwd", fwd, q, k, v, proj, feature=feature, **extra)
                        if saved is not None:
                            grad = torch.empty_like(saved[0])
                            run(f"{label} bwd", bwd, grad, q, k, v, proj, *saved, feature=feature, **extra)
    return launches


# ----------------------------------------------------------------------------- specialisation


def _arg_spec(param: KernelParam, value) -> tuple[str, str | None]:
    """(type, hint) as triton's native specialize_impl gives them; hint "D" = divisible by 16,
    "" = no hint, None = no attribute at all."""
    if param.annotation_type:
        raise NotImplementedError(f"annotated kernel parameter {param.name}: not modelled")
    specialize, align = not param.do_not_specialize, not param.do_not_specialize_on_alignment
    if value is None:
        return "constexpr", ""
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1 and specialize:
            return "constexpr", ""
        ty = "i32" if -2**31 <= value < 2**31 else "i64" if -2**63 <= value < 2**63 else "u64"
        return ty, ("D" if align and value % 16 == 0 else "") if specialize else None
    if isinstance(value, float):
        return "fp32", None
    if isinstance(value, torch.Tensor):
        ty = "*" + ("k" if param.is_const else "") + _TORCH_TO_TRITON[value.dtype]
        return ty, ("D" if align and value.data_ptr() % 16 == 0 else "") if specialize else None
    raise TypeError(f"kernel argument {param.name} of type {type(value).__name__}: not modelled")


def specialise(fn: JITFunction, args: tuple, kwargs: dict) -> Spec:
    """The signature, constexprs, attrs and options JITFunction.run (triton 3.9) builds for a launch."""
    names = [p.name for p in fn.params]
    options = {k: v for k, v in kwargs.items() if k not in names}
    unknown = set(options) - set(CUDAOptions.__dataclass_fields__)
    if unknown:
        raise KeyError(f"{fn.__name__}: unrecognised launch keyword(s) {sorted(unknown)}")
    # JITFunction.run sets these three before binding
    options["debug"] = options.get("debug", fn.debug) or knobs.runtime.debug
    options["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    options["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound = fn.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, value) in enumerate(zip(fn.params, bound.arguments.values())):
        ty, hint = ("constexpr", "") if param.is_constexpr else _arg_spec(param, value)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = value
        if hint is not None:
            attrs[(i,)] = _DIV16 if hint == "D" else []
    return Spec(signature, constexprs, attrs, options)


def describe(fn: JITFunction, spec: Spec) -> tuple[str, str]:
    """(constexprs, args) columns: 'BT=64 PRECISION=tf32', 'fp16,fp32 no16:H,N'."""
    names = [p.name for p in fn.params]
    consts = " ".join(f"{names[i]}={v}" for (i,), v in spec.constexprs.items())
    dtypes = sorted({ty.lstrip("*k") for ty in spec.signature.values() if ty.startswith("*")})
    plain = [names[i] for (i,), a in spec.attrs.items() if not a and spec.signature[names[i]] != "constexpr"
             and not spec.signature[names[i]].startswith("*")]
    unaligned = [names[i] for (i,), a in spec.attrs.items() if not a and spec.signature[names[i]].startswith("*")]
    text = ",".join(dtypes)
    if plain:
        text += " no16:" + ",".join(plain)
    if unaligned:
        text += " unaligned:" + ",".join(unaligned)
    return consts, text


# ----------------------------------------------------------------------------- compile + inspect

_DOT = re.compile(r"= tt\.dot .*?(?:inputPrecision = (\w+))?\s*:\s*tensor<(\d+)x\d+x(\w+)>")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
# Cache-key suffix of compiles made through _report_stages: any edit of this file invalidates them.
with open(__file__, "rb") as _src:
    _HOOK_KEY = "compile_report-" + hashlib.sha256(_src.read()).hexdigest()[:16]


def dots_of(ttir: str) -> list[tuple[str, str, int]]:
    """(operand element type, input precision, rows M) of every tt.dot in a TTIR module.
    TTIR elides the default input precision, IEEE."""
    return [(m.group(3), m.group(1) or "ieee", int(m.group(2))) for m in _DOT.finditer(ttir)]


def tensor_core_dots(dots: list) -> list:
    """The dots of the MMA rule (module docstring): all but fp64 and fp32 "ieee" ones."""
    return [dot for dot in dots if dot[0] != "f64" and not (dot[0] == "f32" and dot[1] == "ieee")]


def required_mma(arch: int, dots: list) -> str | None:
    """The instruction a kernel's tensor-core dots must produce: HGMMA on sm_90 when one of them
    has M >= 64 rows (a warpgroup's wgmma), otherwise HMMA (mma.sync); None without such dots."""
    tc = tensor_core_dots(dots)
    if not tc:
        return None
    return "HGMMA" if arch >= 90 and any(rows >= 64 for *_, rows in tc) else "HMMA"


def count_mma(sass: str) -> tuple[int, int]:
    """(HGMMA, HMMA) instruction counts in a SASS listing."""
    return len(re.findall(r"\bHGMMA\.", sass)), len(re.findall(r"\bHMMA\.", sass))


def ptxas_usage(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from a ptxas -v log of one kernel."""
    regs, spills = _PTXAS_REGS.search(log), _PTXAS_SPILL.search(log)
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def problems_of(r: Result) -> list[str]:
    """The failure rules of the module docstring for one compiled kernel."""
    arch = ARCHS[r.arch]
    found = []
    if r.spill_stores or r.spill_loads:
        found.append(f"spills {r.spill_stores} B stores + {r.spill_loads} B loads")
    if r.shared > arch.smem_limit:
        found.append(f"shared memory {r.shared} B > {arch.smem_limit} B")
    required = required_mma(r.arch, r.dots)
    if required is not None and (r.hgmma if required == "HGMMA" else r.hmma) == 0:
        found.append(f"tensor-core dot without {required}")
    return found


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"cuobjdump -sass failed: {done.stderr.strip()[:500]}")
    return done.stdout


def _report_stages(backend=None, stages=None, options=None, language=None, capability=None):
    """Triton pipeline hook (knobs.runtime.add_stages_inspection_hook).  Called without arguments
    it returns the cache-key suffix; called by the CUDA backend it wraps the cubin stage so that
    the -v log of Triton's own ptxas run and the cubin's MMA counts go into the kernel metadata,
    which Triton's cache keeps with the kernel (no second ptxas run, nothing cached by us)."""
    if stages is None:
        return _HOOK_KEY, _HOOK_KEY
    make_cubin = stages["cubin"]

    def cubin_stage(src, metadata):
        log, dump = io.StringIO(), knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas's -v output
        try:
            with contextlib.redirect_stdout(log):
                cubin = make_cubin(src, metadata)
        finally:
            knobs.nvidia.dump_ptxas_log = dump
        metadata["report_ptxas_log"] = log.getvalue()
        metadata["report_mma"] = count_mma(_sass(cubin))
        return cubin

    stages["cubin"] = cubin_stage


def _error_summary(exc: Exception) -> str:
    """One line: where in the kernel (outermost) and what (innermost cause)."""
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    where = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    what = str(inner).strip().splitlines()[-1] if str(inner).strip() else ""
    return f"compile error ({type(exc).__name__} {where}) {type(inner).__name__}: {what}"


def compile_and_inspect(fn: JITFunction, spec: Spec, arch: int, result: Result) -> Result:
    """Compile one specialisation for one arch and fill in result (problems on failure)."""
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")
    start = time.perf_counter()
    hook = knobs.runtime.add_stages_inspection_hook
    knobs.runtime.add_stages_inspection_hook = _report_stages
    try:
        src = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec.options)
    except Exception as exc:
        result.problems.append(_error_summary(exc))
        result.error = "".join(traceback.format_exception_only(exc)) + (
            "".join(traceback.format_exception_only(exc.__cause__)) if exc.__cause__ else "")
        return result
    finally:
        knobs.runtime.add_stages_inspection_hook = hook
    meta = kernel.metadata
    result.num_warps, result.num_stages, result.shared = meta.num_warps, meta.num_stages, meta.shared
    result.registers, result.spill_stores, result.spill_loads = ptxas_usage(meta.report_ptxas_log)
    result.hgmma, result.hmma = meta.report_mma
    result.dots = dots_of(kernel.asm["ttir"])
    result.problems += problems_of(result)
    result.compile_s = round(time.perf_counter() - start, 2)
    return result


_JOBS: list = []  # (fn, spec, arch, Result); read by forked workers


def _work(index: int) -> Result:
    fn, spec, arch, result = _JOBS[index]
    return compile_and_inspect(fn, spec, arch, result)


# ----------------------------------------------------------------------------- main


def import_required(failures: list) -> tuple[dict, list[str]]:
    """Import REQUIRED_MODULES; returns (modules found, names missing)."""
    modules, missing = {}, []
    for name in REQUIRED_MODULES:
        try:
            modules[name] = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            missing.append(name)
        except Exception as exc:  # a module that exists but does not import is a failure
            failures.append(f"import {name}: {type(exc).__name__}: {exc}")
    return modules, missing


def kernel_name(fn: JITFunction) -> str:
    """'causal._state_kernel': the kernel files share kernel names, so the module goes first."""
    return f"{fn.module.rsplit('.', 1)[-1]}.{fn.__name__}"


def build_jobs(launches: list[Launch], archs: list[int], text: str | None) -> list:
    """Deduplicate the launches into (fn, spec, arch, Result) jobs, keeping those whose
    kernel name or configuration label contains text."""
    unique: dict = {}
    for launch in launches:
        if text and text not in f"{kernel_name(launch.fn)} {launch.label}":
            continue
        spec = specialise(launch.fn, launch.args, launch.kwargs)
        entry = unique.setdefault(spec.key(launch.fn), (launch.fn, spec, []))
        if launch.label not in entry[2]:
            entry[2].append(launch.label)
    jobs = []
    for fn, spec, labels in unique.values():
        consts, args = describe(fn, spec)
        for arch in archs:
            jobs.append((fn, spec, arch, Result(arch, kernel_name(fn), consts, args, configs=labels)))
    return jobs


def print_table(results: list[Result]) -> None:
    head = ("arch", "kernel", "constexprs", "args", "w/s", "regs", "spill", "smem", "mma", "cfgs", "status")
    rows = []
    for r in sorted(results, key=lambda r: (-r.arch, r.kernel, r.constexprs, r.args)):
        mma = f"{ARCHS[r.arch].mma} {r.hgmma if r.arch >= 90 else r.hmma}"
        if r.arch >= 90 and r.hmma:
            mma += f" (+HMMA {r.hmma})"
        status = "ok" if not r.problems else "FAIL: " + "; ".join(p.splitlines()[0] for p in r.problems)
        rows.append((ARCHS[r.arch].name, r.kernel, r.constexprs, r.args, f"{r.num_warps}/{r.num_stages}",
                     str(r.registers), f"{r.spill_stores}+{r.spill_loads}", str(r.shared), mma,
                     str(len(r.configs)), status))
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head) - 1)]
    for row in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS, reverse=True))
    parser.add_argument("--filter", help="keep configurations whose kernel name or label contains this")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="head dims MAX_HEAD_DIM and 16, m=266 only (every kernel, feature map, dtype, mode)")
    parser.add_argument("-j", type=int, default=os.cpu_count() or 1, help="parallel compile workers")
    opts = parser.parse_args(argv)
    if "TRITON_INTERPRET" in os.environ:
        print("compile_report: TRITON_INTERPRET is set; unset it (the interpreter replaces the compiler)",
              file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")
    start = time.perf_counter()
    failures: list[str] = []
    modules, missing = import_required(failures)
    launches = sweep(modules, failures, quick=opts.quick)
    _JOBS[:] = build_jobs(launches, opts.arch, opts.filter)
    captured = time.perf_counter() - start
    if opts.j > 1:
        ctx = multiprocessing.get_context("fork")  # workers inherit _JOBS (JITFunctions do not pickle)
        with concurrent.futures.ProcessPoolExecutor(opts.j, mp_context=ctx) as pool:
            results = list(pool.map(_work, range(len(_JOBS))))
    else:
        results = [_work(i) for i in range(len(_JOBS))]
    print_table(results)
    elapsed = time.perf_counter() - start
    bad = [r for r in results if r.problems]
    for r in bad:
        for p in r.problems:
            failures.append(f"{ARCHS[r.arch].name} {r.kernel} [{r.constexprs}] [{r.args}] "
                            f"(e.g. {r.configs[0]}): {p}")
    print(f"\n{len(launches)} launches captured, {len(_JOBS)} compiles "
          f"({len(_JOBS) // max(1, len(opts.arch))} unique x {len(opts.arch)} arch), "
          f"capture {captured:.1f} s, total {elapsed:.1f} s with -j {opts.j}")
    for f in failures:
        print(f"FAIL {f}")
    for name in missing:
        print(f"FAIL required kernel module {name} is missing (REQUIRED_MODULES)")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"results": [asdict(r) for r in results], "failures": failures, "missing": missing,
                       "launches": len(launches), "seconds": round(elapsed, 1)}, f, indent=1)
    if missing:
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
