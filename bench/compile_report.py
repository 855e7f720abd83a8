"""Ahead-of-time compile report for every Triton kernel configuration the launchers can launch.

    python bench/compile_report.py [--arch 90 80] [--filter TEXT] [--json FILE] [-j N] [--quick | --target]

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
causal-prefix (kernels.launchers) x forward/backward, b = BATCH, h = HEADS; the same launchers
on packed sequences (cu_seqlens: the BATCH sequences in one (1, HEADS, .) pack, VARLEN) where
kernels.extension_unsupported allows them; plus row_stats(q, k, projection) on its own, the
causal forward and backward from a state (causal_fwd_state, causal_bwd_state, with the prefix stabilizer) and the decode step (kernels.decode.decode_step, the
fused maps, with and without a keep mask; fp32 states as FavorState keeps for fp32 models and
16-bit ones for 16-bit models).  Targets: sm_90a (H100) and sm_80 (A100).

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

Every compile also reads its TTGIR (shown in the table; checked only by --target):
- ctas_per_sm = min(65536 // (regs * threads), smem_per_sm // (smem + 1024), 2048 // threads, 32),
  threads = 32 num_warps, smem_per_sm 233472 B (sm_90, 228 KiB) / 167936 B (sm_80, 164 KiB), 1 KiB
  reserved per CTA (function ctas_per_sm).
- duplication: for each tt.dot / ttng.warp_group_dot the nvidia_mma encoding of its result
  tensor<M x N>: rows covered W0 * 16 (mma v2 and v3: a warpgroup of 4 covers 64), columns covered
  W1 * instrShape[1] (v3) or W1 * 8 (v2); duplication = max over dots of max(rows covered / M,
  columns covered / N, 1).  Must be 1: above it warps recompute other warps' outputs.
- pipelined: every scf.for whose body loads from global memory (tt.load, async copies, TMA) has
  no synchronous tt.load (one whose result is used in the same iteration; a load whose result only
  feeds scf.yield is a register prefetch) and every ttg.async_wait in it keeps >= 1 group in flight
  (num >= 1); `ttg.async_wait {num = 0}` means each iteration waits for its own loads.
- narrow: 2-D async copies global -> shared that cannot move 16 bytes per cp.async (the tile's
  fastest dimension differs between the source's blocked layout and the shared layout, or a
  swizzle keeps fewer than 16 bytes together; narrow_copies_of): 4-byte copies scattered over the
  banks.  The first GPU run's two slowest kernels (17x their model) were the two that copied fp32
  state tiles into the transposed shared layout of a tf32 wgmma operand this way.

--target compiles only what the four launcher calls causal_fwd, causal_bwd, noncausal_fwd and
noncausal_bwd launch at TARGET (bf16, b=2 h=8 n=8192 d=e=64 m=256, softmax features, causal
without prefix), captured on meta tensors with the real specialisation (N % 16 == 0 hints), and
exits 1 also on duplication > 1, an unpipelined loop or a narrow copy (unless EXCEPTIONS names the
kernel and check with a reason).  Per call it reports:
- launches = Triton launches + torch ops.  Torch ops are counted by a TorchDispatchMode around the
  launcher on meta tensors: every aten op except views (OpOverload.is_view), empty allocations and
  metadata/alias ops (_NO_KERNEL_OPS), i.e. the ops that launch a GPU kernel.
- intermediate_bytes: HBM passes over the intermediates (every storage created during the call
  that is neither an input's nor a returned output's, and the key states the forward saves for
  the backward, the launchers' list of tensors): per launch, each tensor argument on one adds its
  storage's bytes (read or written once in full; an in-place scan takes its buffer twice, as
  source and destination: two passes); not in roofline_us's bytes.
- exp_count: exponentials executed.  Counted by running the launchers in Triton's interpreter in a
  subprocess (TRITON_INTERPRET=1, CPU tensors, b = h = 1, n in INTERP_LENGTHS): the elements of
  every tl.exp / tl.exp2 operand (masked lanes included, as the GPU computes them), extrapolated
  affinely in n to TARGET n and times b*h, then times the kernel's sm_90 duplication (the warps
  that duplicate a dot duplicate the elementwise work on its layout); exp_count_logical is without
  it.  Minimum: 2 b h n m per forward (q' and k' once each) and the same per backward (recompute).
  The dot FLOPs (2 M N K per tl.dot) come from the same runs.
- estimate_us (H100 SXM model, +-50 %, a hypothesis for the first GPU run), per Triton launch from
  its sm_90 compile: slots = ctas_per_sm * 132 SMs, waves = ceil(programs / slots), quantisation
  q = waves * slots / programs; time = max(tensor-core FLOPs * duplication / 990 TFLOP/s (bf16/fp16;
  495 for fp32 as tf32) * q, exps * duplication / (16 * 132 * 1.75e9 /s MUFU.EX2) * q, HBM bytes /
  3.35 TB/s) + chain steps * step latency * waves + 5 us launch/host time.  HBM bytes of a launch:
  every distinct tensor argument's storage once (re-reads taken as L2 hits).  Chain steps: the
  iterations of a program's sequential walk, from the launch arguments as CHAIN_STEPS gives them
  (causal _state_scan and _dstate_scan: NT - 1, 0.35 us each, an HBM round trip over two steps,
  the loads issued two steps ahead; walks that compute features in every step, 4.4 us each as
  measured on the H200: non-causal split kernels NTS; the non-causal combine: NSPLIT, 0.7 us each,
  its loads one step ahead), 0 for other kernels.  Each torch op adds
  5 us.  A call sums its launches.
- roofline_us = max(minimal FLOPs / 990 TFLOP/s, (inputs read once + outputs written once) /
  3.35 TB/s, minimal exps / MUFU rate); minimal FLOPs per row: forward 2 m (2 d + 2 e) (features
  of q and k, k'^T v, q' @ state), backward twice that.
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

from performer_triton.kernels import MAX_HEAD_DIM, extension_unsupported, launchers

# What the sweep reads: the feature-map registry (the kernel codes, by name) and every kernel
# module the library ships; a missing one fails the report (exit 2).
REQUIRED_MODULES = (
    "performer_triton.feature_maps",
    "performer_triton.kernels.feature_map",
    "performer_triton.kernels.noncausal",
    "performer_triton.kernels.causal",
    "performer_triton.kernels.decode",
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (d, e): every tile width the launchers choose (BD, BV in 16 ... 128; BK-chunked d and EV-sliced
# backward values from 80 up), non-powers of two included; pairs above MAX_HEAD_DIM are skipped
# (the launchers refuse them)
HEAD_DIMS = ((16, 16), (32, 32), (48, 48), (64, 64), (24, 64), (64, 40), (24, 32), (80, 96), (128, 128), (128, 48),
             (128, 32), (16, 128))
NB_FEATURES = (256, 266)
# --quick (what the test suite runs in CI): every kernel, feature map, mode and QUICK_DTYPES at the widest
# head dim (most registers: where spills show), with the default m (M % 16 != 0). The narrowest
# heads (16) never spilled and cost CI ~3 minutes: they are in the full sweep, run after kernel
# changes (kernels/NOTES.md "Compile report figures").
QUICK_HEAD_DIMS = ((MAX_HEAD_DIM, MAX_HEAD_DIM),)
# ... and bf16 heads of 64, the widest whose causal chunks are 128 rows (causal._config: other
# tiles, warps and loops than at 128; the pack and state runs below compile those modes)
QUICK_LONG_CHUNK_HEAD_DIMS = {"bf16": ((64, 64),)}
# fp32 and bf16 only: fp16 compiles the tiles, layouts and loops of bf16 with another element type
# (the full sweep compiles it); it cost CI a third of the quick sweep (~65 s). Except the causal
# chunk states of unpacked fp16 fused-map heads up to 64 wide, fp32 like fp32's: compiled by the
# full sweep (`--filter "causal fp16"`, kernels/NOTES.md "Sixth pass"), not by --quick
QUICK_DTYPES = ("fp32", "bf16")
# ... and the causal forward from a state and packed sequences (fp16/bf16, fused maps) at their
# widest heads
QUICK_STATE_HEAD_DIM = 64
QUICK_NB_FEATURES = (266,)
# One length / batch / head count: they change only divisibility hints (N % 16) or ints that can
# become 1 (n <= BT, b * h = 1), each a further compile of every kernel.
SEQ_LEN, BATCH, HEADS = 1000, 2, 8


@dataclass(frozen=True)
class Arch:
    name: str
    smem_limit: int  # bytes of shared memory per block (opt-in maximum)
    mma: str  # the tensor-core instruction a dot must become
    smem_per_sm: int  # shared memory capacity per SM (occupancy)


ARCHS = {
    90: Arch("sm_90a", 232448, "HGMMA", 233472),
    80: Arch("sm_80", 166912, "HMMA", 167936),
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
    grid: tuple = ()  # the launch grid (programs = its product)


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
    ctas_per_sm: int = 0  # occupancy from registers, shared memory and threads (ctas_per_sm)
    duplication: float = 1.0  # max over the TTGIR dots of rows/columns covered / tile (duplication_of)
    dup_detail: list = field(default_factory=list)  # per dot: "MxN vV warps=[W0,W1] -> xF"
    pipelined: bool = True  # every loop that loads from global memory keeps loads in flight
    loops: list = field(default_factory=list)  # per-loop details (loops_of): dicts
    narrow_copies: list = field(default_factory=list)  # async copies under 16 B each (narrow_copies_of)
    exp_static: list = field(default_factory=list)  # (elements, loop depth) per math.exp/exp2 (exp_ops)
    compile_s: float = 0.0
    problems: list = field(default_factory=list)
    error: str = ""  # full compiler message of a failed compile


# ----------------------------------------------------------------------------- capture


@contextlib.contextmanager
def intercept_launches(sink: list):
    """Replace JITFunction.run (what `kernel[grid](...)` calls) by a recorder that launches nothing."""
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        sink.append((self, args, kwargs, grid))

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
    return result, [Launch(label, fn, a, kw, grid) for fn, a, kw, grid in sink]


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
    # packed sequences (VARLEN): the BATCH sequences of SEQ_LEN rows in one (1, HEADS, .) pack
    packed = torch.empty((BATCH + 1,), device="meta", dtype=torch.int32)
    if "performer_triton.kernels.noncausal" in modules:
        modes.append(("noncausal", False, {"prefix": False}))
        modes.append(("noncausal-packed", False, {"prefix": False, "cu_seqlens": packed}))
    if "performer_triton.kernels.causal" in modules:
        modes.append(("causal", True, {"prefix": False}))
        modes.append(("causal-prefix", True, {"prefix": True}))
        modes.append(("causal-packed", True, {"prefix": False, "cu_seqlens": packed}))
        modes.append(("causal-packed-prefix", True, {"prefix": True, "cu_seqlens": packed}))
    if feature_map is None or registry is None:
        return launches

    def run_state(label, q, k, v, proj, feature, extra):  # state passing (attention_state): fwd and bwd
        _, h, _, e = v.shape
        b = extra["cu_seqlens"].shape[0] - 1 if "cu_seqlens" in extra else v.shape[0]  # a state per sequence
        m_s = q.shape[-1] if proj is None else proj.shape[0]
        state = [_meta((b, h, m_s, e + 1), torch.float32), _meta((b, h, e + 1), torch.float32),
                 _meta((b, h), torch.float32), _meta((b, h), torch.float32)]
        causal = modules["performer_triton.kernels.causal"]
        saved = run(label, causal.causal_fwd_state, q, k, v, proj, state, feature=feature, **extra)
        if saved is not None:
            out, *stats, states, final = saved
            run(label.replace(" fwd ", " bwd "), causal.causal_bwd_state, torch.empty_like(out), *final[:2], q, k, v,
                proj, out, *stats, states, state, feature=feature, **extra)

    dtypes = {name: DTYPES[name] for name in QUICK_DTYPES} if quick else DTYPES
    if quick:  # the widest heads that take a pack or a state
        for dname, dtype in dtypes.items():
            for feature, fmap in sorted(registry.KERNEL_MAPS.items()):
                d = e = QUICK_STATE_HEAD_DIM
                m = QUICK_NB_FEATURES[0]
                if extension_unsupported("packed sequences", dtype, feature, 0 if not fmap.fused else d, e) is None:
                    q, k, v = (_meta((1, HEADS, BATCH * SEQ_LEN, d), dtype) for _ in range(3))
                    for mode, causal, extra in modes:
                        if "cu_seqlens" in extra:
                            fwd, bwd, _ = launchers(causal)
                            label = f"{mode} {dname} d={d} e={e} m={m} {fmap.name}"
                            saved = run(f"{label} fwd", fwd, q, k, v, _meta((m, d), dtype), feature=feature, **extra)
                            if saved is not None:
                                run(f"{label} bwd", bwd, torch.empty_like(saved[0]), q, k, v, _meta((m, d), dtype),
                                    *saved, feature=feature, **extra)
                if "performer_triton.kernels.causal" in modules:
                    if extension_unsupported("a state", dtype, feature, 0 if not fmap.fused else d, e) is None:
                        q, k, v = (_meta((BATCH, HEADS, SEQ_LEN, d), dtype) for _ in range(3))
                        run_state(f"causal-prefix {dname} d={d} e={e} m={m} {fmap.name} fwd from a state", q, k, v,
                                  _meta((m, d), dtype), feature, {"prefix": True})
                        q, k, v = (_meta((1, HEADS, BATCH * SEQ_LEN, d), dtype) for _ in range(3))
                        run_state(f"causal-packed-prefix {dname} d={d} e={e} m={m} {fmap.name} fwd from a state", q,
                                  k, v, _meta((m, d), dtype), feature, {"prefix": True, "cu_seqlens": packed})
    for dname, dtype in dtypes.items():
        for d, e in QUICK_HEAD_DIMS + QUICK_LONG_CHUNK_HEAD_DIMS.get(dname, ()) if quick else HEAD_DIMS:
            if max(d, e) > MAX_HEAD_DIM:  # the launchers refuse these
                continue
            for m in QUICK_NB_FEATURES if quick else NB_FEATURES:
                shape = f"{dname} d={d} e={e} m={m}"
                projection = _meta((m, d), dtype)
                rows = _meta((BATCH, HEADS, SEQ_LEN, d), dtype)
                run(f"row_stats {shape}", feature_map.row_stats, rows, rows, projection)
                decode = modules.get("performer_triton.kernels.decode")
                for feature, fmap in sorted(registry.KERNEL_MAPS.items()) if decode else ():
                    if fmap.fused:
                        one, state = (BATCH, HEADS, 1), (BATCH, HEADS)
                        keep = torch.empty((BATCH,), device="meta", dtype=torch.bool)
                        for mask in (None, keep):
                            run(f"decode {shape} {fmap.name}", decode.decode_step, _meta((*one, d), dtype),
                                _meta((*one, d), dtype), _meta((*one, e), dtype), projection, mask,
                                _meta((*state, m, e + 1), dtype), _meta((*state, e + 1), dtype), _meta(state, dtype),
                                _meta(state, dtype), feature=feature, causal_coef=1e-6)
                for feature, fmap in sorted(registry.KERNEL_MAPS.items()):
                    given = not fmap.fused
                    qk = (BATCH, HEADS, SEQ_LEN, m if given else d)
                    plain = _meta(qk, dtype), _meta(qk, dtype), _meta((BATCH, HEADS, SEQ_LEN, e), dtype)
                    pack = tuple(_meta((1, HEADS, BATCH * SEQ_LEN, x.shape[-1]), dtype) for x in plain)
                    proj = None if given else projection
                    for mode, causal, extra in modes:
                        if "cu_seqlens" in extra and extension_unsupported(
                                "packed sequences", dtype, feature, 0 if given else d, e) is not None:
                            continue  # (the launchers refuse these packs)
                        q, k, v = pack if "cu_seqlens" in extra else plain
                        fwd, bwd, _ = launchers(causal)
                        label = f"{mode} {shape} {fmap.name}"
                        saved = run(f"{label} fwd", fwd, q, k, v, proj, feature=feature, **extra)
                        if mode == "causal-prefix" and extension_unsupported("a state", dtype, feature, 0 if given else d,
                                                                             e) is None:
                            run_state(f"{label} fwd from a state", q, k, v, proj, feature, extra)
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
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # newer tritons only
        if hasattr(knobs.compilation, knob) and knob in CUDAOptions.__dataclass_fields__:
            options[knob] = getattr(knobs.compilation, knob)
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



# ----------------------------------------------------------------------------- TTGIR readers
# Each works on the text of one TTGIR module (kernel.asm["ttgir"]); unit-tested on literal snippets
# in tests/test_compile_report.py.

_MMA_ALIAS = re.compile(r"^(#[\w.]+) = #ttg\.nvidia_mma<\{(.*?)\}>", re.M)
_DOT_RESULT = re.compile(r"= (?:tt\.dot|ttng\.warp_group_dot)\b.*->\s*tensor<(\d+)x(\d+)x\w+,\s*(#[^>]*?)>")
_TENSOR = re.compile(r"tensor<((?:\d+x)*)[a-z]\w*")


def _mma_params(body: str) -> dict:
    """{'versionMajor': 3, 'warpsPerCTA': [8, 1], 'instrShape': [16, 32, 16], ...} of an
    nvidia_mma encoding's attribute text."""
    out = {}
    for key, val in re.findall(r"(\w+) = (\[[^\]]*\]|\d+)", body):
        out[key] = [int(x) for x in val.strip("[]").split(",") if x.strip()] if val.startswith("[") else int(val)
    return out


def duplication_of(ttgir: str) -> tuple[float, list[str]]:
    """(duplication, per-dot details).  For each tt.dot / ttng.warp_group_dot, the nvidia_mma
    encoding of its result tensor<M x N>: rows covered = W0 * 16 (v2: 16 rows per warp of
    mma.sync; v3: a warpgroup of 4 warps covers 64 rows), columns covered = W1 * instrShape[1]
    (v3) or W1 * 8 (v2).  duplication = max over dots of max(rows / M, cols / N, 1): the factor by
    which the warps compute the same outputs again (1 = none).  Dots with another encoding
    (FMA dots: blocked) count 1."""
    aliases = {name: _mma_params(body) for name, body in _MMA_ALIAS.findall(ttgir)}
    worst, detail = 1.0, []
    for line in ttgir.splitlines():
        hit = _DOT_RESULT.search(line)
        if not hit:
            continue
        rows, cols, enc = int(hit.group(1)), int(hit.group(2)), hit.group(3).strip()
        params = aliases.get(enc)
        if params is None and enc.startswith("#ttg.nvidia_mma<{"):
            params = _mma_params(enc)
        if params is None:
            continue
        w0, w1 = params["warpsPerCTA"][:2]
        version = params["versionMajor"]
        cover_m = w0 * 16
        cover_n = w1 * (params["instrShape"][1] if version >= 3 else 8)
        dup = max(cover_m / rows, cover_n / cols, 1.0)
        worst = max(worst, dup)
        detail.append(f"{rows}x{cols} v{version} warps=[{w0},{w1}] x{dup:g}")
    return worst, detail


def _elements(type_text: str) -> int:
    """Element count of the first tensor<...> type in the text (1 for a scalar)."""
    hit = _TENSOR.search(type_text)
    if not hit or not hit.group(1):
        return 1
    count = 1
    for dim in hit.group(1).rstrip("x").split("x"):
        count *= int(dim)
    return count


_GLOBAL_ASYNC = ("ttg.async_copy_global_to_local", "ttng.async_tma_copy_global_to_local", "tt.descriptor_load",
                 "ttng.async_tma_gather")
_RESULT_NAME = re.compile(r"^\s*(%[\w.#-]+)(?::\d+)?\s*=")


def loops_of(ttgir: str) -> list[dict]:
    """One dict per scf.for of the module, in order, with the ops directly in its body (ops of
    nested loops belong to the nested loop):
      depth (1 = outermost), line (of the scf.for in the TTGIR), sync_loads (global tt.load whose
      result is used in the same iteration), prefetch_loads (global tt.load whose result only
      feeds the scf.yield: issued for the next iteration), async_loads (async copies / TMA),
      waits (the num of every ttg.async_wait), pipelined (see pipelining_of).
    A loop "loads" when it has any of the three kinds of loads."""
    loops, stack = [], []  # stack of (loop dict or None for other regions)
    for number, line in enumerate(ttgir.splitlines(), 1):
        text = line.split(" loc(")[0]
        current = next((x for x in reversed(stack) if x is not None), None)
        if "scf.for " in text:
            loop = dict(depth=sum(1 for x in stack if x is not None) + 1, line=number, sync_loads=0,
                        prefetch_loads=0, async_loads=0, waits=[], _loads=[], _body=[])
            loops.append(loop)
        elif current is not None:
            current["_body"].append(text)
            if re.search(r"= tt\.load ", text):
                name = _RESULT_NAME.match(text)
                current["_loads"].append(name.group(1) if name else "")
            elif any(f"= {op} " in text or f" {op} " in text for op in _GLOBAL_ASYNC):
                current["async_loads"] += 1
            elif "ttg.async_wait" in text:
                num = re.search(r"num = (\d+)", text)
                current["waits"].append(int(num.group(1)) if num else 0)
        opened = text.count("{") - text.count("}")
        if "scf.for " in text:
            stack.append(loops[-1])
            opened -= 1
        while opened > 0:
            stack.append(None)
            opened -= 1
        while opened < 0 and stack:
            stack.pop()
            opened += 1
    for loop in loops:
        body, names = loop.pop("_body"), loop.pop("_loads")
        yields = " ".join(x for x in body if "scf.yield" in x)
        for name in names:
            uses = sum(len(re.findall(re.escape(name) + r"(?![\w.#-])", x)) for x in body if "scf.yield" not in x)
            if name and uses <= 1 and re.search(re.escape(name) + r"(?![\w.#-])", yields):
                loop["prefetch_loads"] += 1  # defined here (1 match), carried to the next iteration
            else:
                loop["sync_loads"] += 1
        loop["loads"] = bool(loop["sync_loads"] or loop["prefetch_loads"] or loop["async_loads"])
        loop["pipelined"] = pipelining_of(loop)
    return loops


def pipelining_of(loop: dict) -> bool:
    """A loop that loads from global memory is pipelined when none of its loads is synchronous
    (used in the iteration that issues it), it has asynchronous loads (cp.async / TMA) or loads
    prefetched into registers, and every ttg.async_wait in it leaves at least one group in flight
    (num >= 1: with num = 0 each iteration waits for its own loads, nothing overlaps).
    A loop without global loads is not a hot loop of this check: True."""
    if not (loop["sync_loads"] or loop["prefetch_loads"] or loop["async_loads"]):
        return True
    if loop["sync_loads"]:
        return False
    return min(loop["waits"], default=1) >= 1


_LAYOUT_DEF = re.compile(r"^(#[\w]+) = #ttg\.(blocked|nvmma_shared|swizzled_shared)<\{(.*)\}>")
_COPY = re.compile(r"ttg\.async_copy_global_to_local .*: tensor<([\dx]+)x!tt\.ptr<(\w+)>, (#\w+)> -> "
                   r"<[\dx]+x\w+, (#\w+),")
_BYTES = {"f32": 4, "i32": 4, "bf16": 2, "f16": 2, "i8": 1, "i64": 8, "f64": 8}


def narrow_copies_of(ttgir: str) -> list[str]:
    """The 2-D async copies (global -> shared) that move fewer than 16 bytes per copy: the tile's
    fastest dimension in shared memory is not its fastest in global memory (the order of the
    source's blocked layout against the shared layout's: nvmma_shared is fastest along its last
    dimension, or its first when transposed), or a swizzled layout's vector is under 16 bytes.
    Such a copy is split into 4-byte cp.async writes scattered across shared-memory banks (an fp32
    tile feeding a tf32 wgmma operand of the other major, the first GPU run's 17x kernels).
    -> "RxC dtype" per such copy."""
    layouts = {}
    for line in ttgir.splitlines():
        found = _LAYOUT_DEF.match(line)
        if found:
            name, kind, body = found.groups()
            order = re.search(r"order = \[([\d, ]+)\]", body)
            layouts[name] = dict(kind=kind, order=[int(x) for x in order.group(1).split(",")] if order else None,
                                 transposed="transposed = true" in body,
                                 vec=int(re.search(r"vec = (\d+)", body).group(1)) if "vec = " in body else None,
                                 swizzled="maxPhase = 1," not in body)
    narrow = []
    for line in ttgir.splitlines():
        found = _COPY.search(line.split(" loc(")[0])
        if not found:
            continue
        shape, dtype, src, dst = found.groups()
        dims = shape.split("x")
        source, target = layouts.get(src), layouts.get(dst)
        if len(dims) != 2 or not source or not target or not source["order"]:
            continue
        if target["kind"] == "nvmma_shared":
            fast = 0 if target["transposed"] else 1
            too_small = False
        else:
            fast = target["order"][0]
            too_small = (target["swizzled"] and target["vec"] * _BYTES.get(dtype, 4) < 16
                         and int(dims[fast]) * _BYTES.get(dtype, 4) >= 16)
        if fast != source["order"][0] or too_small:
            narrow.append(f"{shape} {dtype}")
    return narrow


def exp_ops(ttgir: str) -> list[tuple[int, int]]:
    """(elements, loop depth) of every math.exp / math.exp2 in a TT(G)IR module: the tensor
    element count of its result (1 for a scalar) and how many scf.for loops enclose it."""
    out, depth_stack = [], []
    for line in ttgir.splitlines():
        text = line.split(" loc(")[0]
        if re.search(r"= math\.exp2? ", text):
            out.append((_elements(text.split(" : ")[-1]), sum(depth_stack)))
        opened = text.count("{") - text.count("}")
        is_for = "scf.for " in text
        if is_for:
            depth_stack.append(1)
            opened -= 1
        while opened > 0:
            depth_stack.append(0)
            opened -= 1
        while opened < 0 and depth_stack:
            depth_stack.pop()
            opened += 1
    return out


def ctas_per_sm(registers: int, num_warps: int, shared: int, arch: int) -> int:
    """Resident CTAs per SM: min(65536 // (registers * threads), smem_per_sm // (shared + 1024),
    2048 // threads, 32), threads = 32 * num_warps, smem_per_sm = 233472 B (sm_90, 228 KiB) or
    167936 B (sm_80, 164 KiB), 1 KiB reserved per CTA.  Register allocation granularity (per warp,
    256 registers) is ignored: ptxas reports multiples of 8 here."""
    threads = 32 * max(1, num_warps)
    limits = [32, 2048 // threads, ARCHS[arch].smem_per_sm // (shared + 1024)]
    if registers:
        limits.append(65536 // (registers * threads))
    return max(0, min(limits))


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
    ttgir = kernel.asm["ttgir"]
    result.ctas_per_sm = ctas_per_sm(result.registers, result.num_warps, result.shared, arch)
    result.duplication, result.dup_detail = duplication_of(ttgir)
    result.loops = loops_of(ttgir)
    result.pipelined = all(loop["pipelined"] for loop in result.loops)
    result.exp_static = exp_ops(ttgir)
    result.narrow_copies = narrow_copies_of(ttgir)
    result.problems += problems_of(result)
    result.compile_s = round(time.perf_counter() - start, 2)
    return result


_JOBS: list = []  # (fn, spec, arch, Result); read by forked workers


def _work(index: int) -> Result:
    fn, spec, arch, result = _JOBS[index]
    return compile_and_inspect(fn, spec, arch, result)



# ----------------------------------------------------------------------------- --target

TARGET = dict(b=2, h=8, n=8192, d=64, e=64, m=256, dtype="bf16", feature="softmax")
TARGET_CALLS = ("causal_fwd", "causal_bwd", "noncausal_fwd", "noncausal_bwd")
# Interpreter runs for the exponential and FLOP counts (count_in_interpreter): b = h = 1 at two
# lengths; counts are affine in n between them (extrapolated to TARGET n) and linear in b*h.
INTERP_LENGTHS = (128, 256)

# H100 SXM model of estimate_us (module docstring, "--target"): +-50 % hypotheses
SMS, CLOCK_HZ = 132, 1.75e9
TC_FLOPS = {"bf16": 990e12, "fp16": 990e12, "fp32": 495e12}  # dense; fp32 dots run as tf32
MUFU_PER_S = 16 * SMS * CLOCK_HZ  # MUFU.EX2: 16 per clock per SM
HBM_BYTES_PER_S = 3.35e12
# Exposed latency of one step of a sequential chunk walk: a step that only rescales and adds tiles
# its loads brought ahead (a scan) waits for an HBM round trip (half of one when they are issued
# two steps ahead); a step that computes features
# first (dot, row max, exponentials, then the dot its update needs) waits for that chain too:
# 4.4 us measured per step of the causal forward walk that did so (H200, 2026-12-04: 283 us for
# 64 steps; its reverse walk 6.0 us, the non-causal split walks ~3.4 us).
STEP_US = 0.7
FEATURE_STEP_US = 4.4
LAUNCH_US = 5.0  # host + launch time per Triton launch or torch op
# Kernels whose programs walk the sequence's chunks one after another (a latency chain): the
# steps of one program's walk (its loop's iterations) from the launch's arguments, and the
# exposed latency of a step.
CHAIN_STEPS = {
    "causal._state_scan_kernel": (lambda a: a["NT"] - 1, STEP_US / 2),  # its loads issued two steps ahead
    "causal._dstate_scan_kernel": (lambda a: a["NT"] - 1, STEP_US / 2),
    "noncausal._state_kernel": (lambda a: a["NTS"], FEATURE_STEP_US),
    "noncausal._dstate_kernel": (lambda a: a["NTS"], FEATURE_STEP_US),
    # the split sums: each step adds one split's partials, its loads issued one step ahead
    "noncausal._combine_kernel": (lambda a: a["NSPLIT"], STEP_US),
}

# Accepted failures of the --target checks: kernel name, or "kernel name@sm_NN" for one arch ->
# {check: reason}; check is "duplication", "pipelined" or "narrow".  Only for reasons that hold on the
# GPU, not "not fixed yet".
EXCEPTIONS: dict[str, dict[str, str]] = {}

# aten ops that launch no GPU kernel (besides views, OpOverload.is_view): allocations and metadata
_NO_KERNEL_OPS = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::detach", "aten::alias", "aten::lift_fresh", "aten::_unsafe_view", "aten::as_strided",
    "aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset", "aten::is_contiguous",
    "aten::resize_",
}


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(storage identity, storage bytes) of a tensor (meta tensors have storages too)."""
    st = t.untyped_storage()
    return st._cdata, st.nbytes()


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in _tensors(x)]
    return []


class TorchOpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops of a launcher call that launch a GPU kernel: every op but views
    (OpOverload.is_view) and _NO_KERNEL_OPS (empty allocations, detach/alias, metadata); records
    the storages every op returns (allocations of the call, views included, deduplicated later)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.storages: dict[int, int] = {}
        self.alive: list = []  # the storages, held so that no later one reuses a freed one's address

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if not func.is_view and name not in _NO_KERNEL_OPS:
            self.ops.append(str(func).removesuffix(".default"))
        for t in _tensors(out):
            ident, nbytes = _storage(t)
            self.storages.setdefault(ident, nbytes)
            self.alive.append(t.untyped_storage())
        return out


@dataclass
class Call:
    """One launcher call at the target shape, captured on meta tensors."""
    name: str
    launches: list  # [Launch]
    torch_ops: list  # names of the counted aten ops
    intermediate_bytes: int
    min_bytes: int  # inputs read once + outputs written once
    min_flops: float
    min_exps: int


def _capture_call(name: str, launcher, args: tuple, kwargs: dict) -> tuple[object, Call]:
    """Run a launcher on meta tensors with launches intercepted and aten ops counted.

    intermediate_bytes: HBM passes over intermediates: for every launch, every tensor argument
    whose storage is an intermediate (created during the call by allocations or ops and neither an
    input's nor a returned output's, or a saved key state: the list among the results or the
    arguments) adds that storage's bytes (each argument read or written once in full; an in-place
    update, which takes its buffer as source and destination, counts twice)."""
    counter = TorchOpCounter()
    sink: list = []
    with intercept_launches(sink), counter:
        result = launcher(*args, **kwargs)
    launches = [Launch(name, fn, a, kw, grid) for fn, a, kw, grid in sink]
    inputs = {_storage(t)[0]: _storage(t)[1] for t in _tensors(args)}
    outputs = {_storage(t)[0]: _storage(t)[1] for t in _tensors(result)}
    saved = {_storage(t)[0]: _storage(t)[1] for x in (*args, *result) if isinstance(x, list) for t in x}
    intermediate = {ident: b for ident, b in counter.storages.items() if ident not in inputs and ident not in outputs}
    intermediate |= saved
    passes = sum(intermediate.get(_storage(x)[0], 0) for launch in launches for x in _tensors((launch.args,
                                                                                              launch.kwargs)))
    essential = sum(b for ident, b in (inputs | outputs).items() if ident not in saved)
    t = TARGET
    bhn = t["b"] * t["h"] * t["n"]
    # minimal work of FAVOR+ (kernels/NOTES.md "Roofline"): features of q and k (2 m d each),
    # k'^T v and q' @ state (2 m e each); the backward recomputes the features and runs 4 m e
    # products and 2 m d input-gradient products per row and side (3x the forward)
    fwd_flops = bhn * (2 * 2 * t["m"] * t["d"] + 2 * 2 * t["m"] * t["e"])
    min_flops = fwd_flops * (2 if name.endswith("bwd") else 1)
    call = Call(name, launches, counter.ops, passes, essential, min_flops, 2 * bhn * t["m"])
    return result, call


def target_calls(modules: dict, failures: list, shape: dict | None = None, device="meta") -> list[Call]:
    """The four launcher calls (TARGET_CALLS) at the target shape (or shape), softmax features,
    causal without prefix; a backward runs its forward first (not counted)."""
    t = shape or TARGET
    dtype = DTYPES[t["dtype"]]
    feature = _feature_code(t["feature"])
    gen = torch.Generator().manual_seed(0)

    def tensor(*shape_):
        if device == "meta":
            return torch.empty(shape_, device="meta", dtype=dtype)
        return (torch.randn(shape_, generator=gen) * 0.5).to(dtype)

    q, k, v = (tensor(t["b"], t["h"], t["n"], t["d"]), tensor(t["b"], t["h"], t["n"], t["d"]),
               tensor(t["b"], t["h"], t["n"], t["e"]))
    projection = tensor(t["m"], t["d"])
    calls = []
    for causal in (True, False):
        mode = "causal" if causal else "noncausal"
        fwd, bwd, _ = launchers(causal)
        try:
            saved, call = _capture_call(f"{mode}_fwd", fwd, (q, k, v, projection), dict(feature=feature))
            calls.append(call)
            grad = tensor(*saved[0].shape)
            _, call = _capture_call(f"{mode}_bwd", bwd, (grad, q, k, v, projection, *saved), dict(feature=feature))
            calls.append(call)
        except Exception as exc:
            failures.append(f"{mode} at the target shape: launcher raised {type(exc).__name__}: {exc}")
    return calls


def _feature_code(name: str) -> int:
    """The kernel code of a feature map of performer_triton.feature_maps.KERNEL_MAPS, by name."""
    from performer_triton.feature_maps import KERNEL_MAPS
    return next(code for code, fmap in KERNEL_MAPS.items() if fmap.name == name)


def _launch_programs(launch: Launch) -> int:
    grid = launch.grid
    if callable(grid):
        fn = launch.fn
        bound = fn.signature.bind(*launch.args, **{k: v for k, v in launch.kwargs.items()
                                                  if k in [p.name for p in fn.params]})
        grid = grid(dict(bound.arguments))
    programs = 1
    for g in grid:
        programs *= int(g)
    return programs


def _launch_args(launch: Launch) -> dict:
    """The launch's arguments by parameter name."""
    fn = launch.fn
    params = [p.name for p in fn.params]
    bound = fn.signature.bind_partial(*launch.args, **{k: v for k, v in launch.kwargs.items() if k in params})
    return dict(bound.arguments)


def _launch_bytes(launch: Launch) -> int:
    """HBM bytes of a launch in the model: every distinct tensor argument's storage once
    (re-reads within the launch are taken as L2 hits)."""
    seen = {}
    for t in _tensors(list(launch.args) + list(launch.kwargs.values())):
        ident, nbytes = _storage(t)
        seen[ident] = nbytes
    return sum(seen.values())


def count_in_interpreter(timeout: float = 900) -> dict:
    """Exponentials and dot FLOPs per Triton launch of each target call, counted by running the
    launchers in Triton's interpreter (a subprocess with TRITON_INTERPRET=1, CPU tensors, b = h = 1,
    n in INTERP_LENGTHS): every element passed to tl.exp / tl.exp2 (InterpreterBuilder.create_exp,
    create_exp2; masked lanes included, as the GPU computes them) and 2 M N K per tl.dot; then
    affine in n to TARGET n, times TARGET b*h.  Returns {call: [{"kernel", "exps", "flops"}, ...]}
    in launch order."""
    env = {k: v for k, v in os.environ.items()}
    env["TRITON_INTERPRET"] = "1"
    runs = []
    for n in INTERP_LENGTHS:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpreter-counts", str(n)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"interpreter count at n={n} failed: {done.stderr.strip()[-2000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    (n1, c1), (n2, c2) = zip(INTERP_LENGTHS, runs)
    t = TARGET
    bh = t["b"] * t["h"]
    out = {}
    for call, kernels in c1.items():
        rows = []
        for a, b in zip(kernels, c2[call]):
            row = {"kernel": a["kernel"]}
            for key in ("exps", "flops"):
                slope = (b[key] - a[key]) / (n2 - n1)
                row[key] = int(round(bh * (a[key] + slope * (t["n"] - n1))))
            rows.append(row)
        out[call] = rows
    return out


def _interpreter_counts_main(n: int) -> int:
    """--interpreter-counts N (run by count_in_interpreter, TRITON_INTERPRET=1): print the JSON
    {call: [{"kernel", "exps", "flops"}, ...]} for b = h = 1 at length n."""
    from triton.runtime import interpreter as interp
    import numpy as np
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    counts: list = []

    def counting(name, key, size):
        original = getattr(interp.InterpreterBuilder, name)

        def wrapped(self, *args, **kwargs):
            if counts:
                counts[-1][key] += size(*args)
            return original(self, *args, **kwargs)
        setattr(interp.InterpreterBuilder, name, wrapped)

    counting("create_exp", "exps", lambda arg: int(np.size(arg.data)))
    counting("create_exp2", "exps", lambda arg: int(np.size(arg.data)))
    counting("create_dot", "flops", lambda a, b, *_: 2 * int(np.prod(a.data.shape)) * int(b.data.shape[-1]))
    original_call = interp.GridExecutor.__call__

    def call(self, *args, **kwargs):
        fn = self.fn  # the kernel's Python function here
        counts.append({"kernel": f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}", "exps": 0, "flops": 0})
        return original_call(self, *args, **kwargs)
    interp.GridExecutor.__call__ = call
    failures: list = []
    modules, _ = import_required(failures)
    shape = dict(TARGET, b=1, h=1, n=n)
    out = {}
    for causal in (True, False):
        mode = "causal" if causal else "noncausal"
        fwd, bwd, _ = launchers(causal)
        gen = torch.Generator().manual_seed(0)
        dtype = DTYPES[shape["dtype"]]
        q, k, v = ((torch.randn(1, 1, n, shape[c], generator=gen) * 0.5).to(dtype) for c in "dde")
        projection = torch.randn(shape["m"], shape["d"], generator=gen).to(dtype)
        feature = _feature_code(shape["feature"])
        counts.clear()
        saved = fwd(q, k, v, projection, feature=feature)
        out[f"{mode}_fwd"] = list(counts)
        counts.clear()
        bwd(torch.randn(saved[0].shape, generator=gen).to(dtype), q, k, v, projection, *saved, feature=feature)
        out[f"{mode}_bwd"] = list(counts)
    print(json.dumps(out))
    return 0


def estimate_kernel(r: Result, launch: Launch, exps: int, flops: int, dtype: str) -> dict:
    """The estimate model for one launch on H100 (sm_90 compile result r), module docstring."""
    programs = _launch_programs(launch)
    slots = max(1, r.ctas_per_sm) * SMS
    waves = -(-programs // slots)
    # a wave of partly filled slots takes as long as a full one: scale by slots used / programs
    quant = waves * slots / programs
    dup = r.duplication
    tc_us = dup * flops / TC_FLOPS[dtype] * quant * 1e6
    mufu_us = dup * exps / MUFU_PER_S * quant * 1e6
    hbm_us = _launch_bytes(launch) / HBM_BYTES_PER_S * 1e6
    steps, step_us = 0, 0.0
    chain = CHAIN_STEPS.get(r.kernel)
    if chain:
        steps, step_us = chain[0](_launch_args(launch)), chain[1]
    chain_us = steps * step_us * waves
    total = max(tc_us, mufu_us, hbm_us) + chain_us + LAUNCH_US
    return dict(kernel=r.kernel, programs=programs, waves=waves, tc_us=tc_us, mufu_us=mufu_us, hbm_us=hbm_us,
                chain_steps=steps, chain_us=chain_us, us=total, exps=dup * exps, flops=dup * flops,
                bytes=_launch_bytes(launch))

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
    """'causal._output_kernel': the kernel files share kernel names, so the module goes first."""
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
    head = ("arch", "kernel", "constexprs", "args", "w/s", "regs", "spill", "smem", "ctas/SM", "dup", "pipe", "mma",
            "cfgs", "status")
    rows = []
    for r in sorted(results, key=lambda r: (-r.arch, r.kernel, r.constexprs, r.args)):
        mma = f"{ARCHS[r.arch].mma} {r.hgmma if r.arch >= 90 else r.hmma}"
        if r.arch >= 90 and r.hmma:
            mma += f" (+HMMA {r.hmma})"
        status = "ok" if not r.problems else "FAIL: " + "; ".join(p.splitlines()[0] for p in r.problems)
        rows.append((ARCHS[r.arch].name, r.kernel, r.constexprs, r.args, f"{r.num_warps}/{r.num_stages}",
                     str(r.registers), f"{r.spill_stores}+{r.spill_loads}", str(r.shared), str(r.ctas_per_sm),
                     f"{r.duplication:g}", "yes" if r.pipelined else "no", mma, str(len(r.configs)), status))
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head) - 1)]
    for row in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])


def _one_sync_load(loop: dict) -> bool:
    """The loop is pipelined but for one synchronous load."""
    return loop["sync_loads"] == 1 and pipelining_of(dict(loop, sync_loads=0))


def target_problems(r: Result) -> list[str]:
    """The --target checks beyond problems_of: duplication > 1, unpipelined loops that load
    from global memory and narrow copies (narrow_copies_of), unless EXCEPTIONS accepts them for
    the kernel (with a reason)."""
    accepted = EXCEPTIONS.get(r.kernel, {}) | EXCEPTIONS.get(f"{r.kernel}@{ARCHS[r.arch].name}", {})
    found = []
    if r.duplication > 1 and "duplication" not in accepted:
        found.append(f"duplication x{r.duplication:g} (" + "; ".join(d for d in r.dup_detail if not d.endswith("x1"))
                     + ")")
    # an accepted "pipelined" covers the one synchronous load its reason names, in loops whose
    # other loads stay in flight: a second one, or a loop left unpipelined, still fails
    bad = [f"loop@{x['line']} sync={x['sync_loads']} async={x['async_loads']} waits={x['waits']}"
           for x in r.loops if not x["pipelined"] and not ("pipelined" in accepted and _one_sync_load(x))]
    if bad:
        found.append("unpipelined loop(s): " + ", ".join(bad))
    if r.narrow_copies and "narrow" not in accepted:
        found.append("copies under 16 B: " + ", ".join(sorted(set(r.narrow_copies))))
    return found


def _loop_text(r: Result) -> str:
    parts = []
    for x in r.loops:
        if not x["loads"]:
            continue
        parts.append(f"loop@{x['line']}(d{x['depth']}): async {x['async_loads']}, prefetch {x['prefetch_loads']}, "
                     f"sync {x['sync_loads']}, waits {x['waits'] or '-'} -> "
                     f"{'pipelined' if x['pipelined'] else 'NOT pipelined'}")
    return "; ".join(parts) or "no loop loads"


def print_target_table(results: list[Result], calls: list[dict], kernel_rows: list[dict]) -> None:
    head = ("arch", "kernel", "constexprs", "w/s", "regs", "spill", "smem", "ctas/SM", "dup", "pipelined", "narrow",
            "mma", "status")
    rows = []
    for r in sorted(results, key=lambda r: (-r.arch, r.kernel, r.constexprs)):
        status = "ok" if not r.problems else "FAIL: " + "; ".join(p.splitlines()[0] for p in r.problems)
        rows.append((ARCHS[r.arch].name, r.kernel, r.constexprs, f"{r.num_warps}/{r.num_stages}", str(r.registers),
                     f"{r.spill_stores}+{r.spill_loads}", str(r.shared), str(r.ctas_per_sm), f"{r.duplication:g}",
                     "yes" if r.pipelined else "no", str(len(r.narrow_copies)), f"HGMMA {r.hgmma} HMMA {r.hmma}",
                     status))
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head) - 1)]
    for row in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    print("\nloops (TTGIR scf.for with global loads):")
    for r in sorted(results, key=lambda r: (-r.arch, r.kernel, r.constexprs)):
        print(f"  {ARCHS[r.arch].name} {r.kernel} [{r.constexprs}]: {_loop_text(r)}")
    print("\nper launch on H100 (sm_90a compile; model in the module docstring; exps and FLOPs x duplication):")
    head = ("call", "kernel", "programs", "waves", "exps M", "GFLOP", "MB", "tc us", "mufu us", "hbm us", "chain",
            "us")
    rows = [(k["call"], k["kernel"], k["programs"], k["waves"], f"{k['exps'] / 1e6:.1f}", f"{k['flops'] / 1e9:.1f}",
             f"{k['bytes'] / 1e6:.1f}", f"{k['tc_us']:.1f}", f"{k['mufu_us']:.1f}", f"{k['hbm_us']:.1f}",
             f"{k['chain_steps']} ({k['chain_us']:.0f} us)", f"{k['us']:.1f}") for k in kernel_rows]
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print("\nper call at the target shape " + " ".join(f"{k}={v}" for k, v in TARGET.items()) + ":")
    head = ("call", "launches", "triton", "torch ops", "intermediate MB", "exps M (min)", "estimate us",
            "roofline us")
    rows = [(c["name"], c["launches"], c["triton_launches"], c["torch_launches"],
             f"{c['intermediate_bytes'] / 1e6:.1f}",
             "n/a" if c["exp_count"] is None else f"{c['exp_count'] / 1e6:.1f} ({c['exp_min'] / 1e6:.1f})",
             f"{c['estimate_us']:.1f}",
             f"{c['roofline_us']:.1f}") for c in calls]
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    for c in calls:
        print(f"  {c['name']} torch ops: {', '.join(c['torch_ops']) or '-'}")


def run_target(opts, failures: list, modules: dict) -> tuple[list[Result], list[dict], list[dict]]:
    """--target: compile what the four target calls launch, check it, and model the calls."""
    calls = target_calls(modules, failures)
    launches = [launch for call in calls for launch in call.launches]
    _JOBS[:] = build_jobs(launches, opts.arch, opts.filter)
    if opts.j > 1:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(opts.j, mp_context=ctx) as pool:
            futures = [pool.submit(_work, i) for i in range(len(_JOBS))]
            try:
                counts = count_in_interpreter()
            except Exception as exc:
                counts = None
                failures.append(f"exponential/FLOP counts: {type(exc).__name__}: {exc}")
            results = [f.result() for f in futures]
    else:
        results = [_work(i) for i in range(len(_JOBS))]
        try:
            counts = count_in_interpreter()
        except Exception as exc:
            counts = None
            failures.append(f"exponential/FLOP counts: {type(exc).__name__}: {exc}")
    for r in results:
        r.problems += target_problems(r)
    by_key = {}
    for (fn, spec, arch, _), r in zip(_JOBS, results):
        by_key[(spec.key(fn), arch)] = r
    est_arch = 90 if 90 in opts.arch else opts.arch[0]
    call_rows, kernel_rows = [], []
    for call in calls:
        exps = flops = 0
        estimate = 0.0
        per_kernel = (counts or {}).get(call.name, [])
        if counts is not None and [k["kernel"] for k in per_kernel] != [kernel_name(l.fn) for l in call.launches]:
            failures.append(f"{call.name}: interpreter launches {[k['kernel'] for k in per_kernel]} differ from "
                            f"the captured ones")
            per_kernel = []
        for i, launch in enumerate(call.launches):
            r = by_key.get((specialise(launch.fn, launch.args, launch.kwargs).key(launch.fn), est_arch))
            count = per_kernel[i] if i < len(per_kernel) else {"exps": 0, "flops": 0}
            if r is None or r.error:
                estimate += LAUNCH_US
                continue
            row = estimate_kernel(r, launch, count["exps"], count["flops"], TARGET["dtype"])
            kernel_rows.append(dict(row, call=call.name))
            exps += int(round(row["exps"]))
            flops += int(round(row["flops"]))
            estimate += row["us"]
        estimate += LAUNCH_US * len(call.torch_ops)
        roofline = max(call.min_flops / TC_FLOPS[TARGET["dtype"]], call.min_bytes / HBM_BYTES_PER_S,
                       call.min_exps / MUFU_PER_S) * 1e6
        call_rows.append(dict(
            name=call.name, launches=len(call.launches) + len(call.torch_ops), triton_launches=len(call.launches),
            torch_launches=len(call.torch_ops), torch_ops=call.torch_ops, intermediate_bytes=call.intermediate_bytes,
            exp_count=exps if counts is not None else None, exp_min=call.min_exps,
            exp_count_logical=sum(k["exps"] for k in per_kernel) if counts is not None else None, flops=flops,
            min_flops=call.min_flops, min_bytes=call.min_bytes,
            estimate_us=round(estimate, 1), roofline_us=round(roofline, 1)))
    return results, call_rows, kernel_rows


def target_json(results: list[Result], calls: list[dict], kernel_rows: list[dict], failures: list) -> dict:
    kernels = []
    for r in sorted(results, key=lambda r: (r.kernel, r.constexprs, -r.arch)):
        dtypes = sorted({d for d in r.args.split(" ")[0].split(",") if d in ("bf16", "fp16", "fp32")})
        kernels.append(dict(
            name=r.kernel, arch=ARCHS[r.arch].name, dtype=TARGET["dtype"] if TARGET["dtype"] in dtypes else
            ",".join(dtypes), regs=r.registers, spill_bytes=r.spill_stores + r.spill_loads, smem_bytes=r.shared,
            num_warps=r.num_warps, num_stages=r.num_stages, ctas_per_sm=r.ctas_per_sm, duplication=r.duplication,
            pipelined=r.pipelined, narrow_copies=r.narrow_copies, mma={"HGMMA": r.hgmma, "HMMA": r.hmma},
            constexprs=r.constexprs,
            loops=r.loops, dup_detail=r.dup_detail, problems=r.problems))
    return {"target": TARGET, "kernels": kernels, "calls": calls, "launches": kernel_rows, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--interpreter-counts"]:
        return _interpreter_counts_main(int(argv[1]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS, reverse=True))
    parser.add_argument("--filter", help="keep configurations whose kernel name or label contains this")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="head dims MAX_HEAD_DIM, m=266, fp32 and bf16 only (every kernel, feature map, mode)")
    parser.add_argument("--target", action="store_true",
                        help="only what the launchers launch at the target shape (TARGET), with the duplication, "
                             "pipelining, occupancy and per-call model")
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
    if opts.target:
        results, calls, kernel_rows = run_target(opts, failures, modules)
        print_target_table(results, calls, kernel_rows)
        launches = sum(c["triton_launches"] for c in calls)
    else:
        launches = sweep(modules, failures, quick=opts.quick)
        _JOBS[:] = build_jobs(launches, opts.arch, opts.filter)
        if opts.j > 1:
            ctx = multiprocessing.get_context("fork")  # workers inherit _JOBS (JITFunctions do not pickle)
            with concurrent.futures.ProcessPoolExecutor(opts.j, mp_context=ctx) as pool:
                results = list(pool.map(_work, range(len(_JOBS))))
        else:
            results = [_work(i) for i in range(len(_JOBS))]
        print_table(results)
        launches = len(launches)
    elapsed = time.perf_counter() - start
    bad = [r for r in results if r.problems]
    for r in bad:
        for p in r.problems:
            failures.append(f"{ARCHS[r.arch].name} {r.kernel} [{r.constexprs}] [{r.args}] "
                            f"(e.g. {r.configs[0]}): {p}")
    print(f"\n{launches} launches captured, {len(_JOBS)} compiles "
          f"({len(_JOBS) // max(1, len(opts.arch))} unique x {len(opts.arch)} arch), "
          f"total {elapsed:.1f} s with -j {opts.j}")
    for f in failures:
        print(f"FAIL {f}")
    for name in missing:
        print(f"FAIL required kernel module {name} is missing (REQUIRED_MODULES)")
    if opts.json:
        with open(opts.json, "w") as f:
            if opts.target:
                data = target_json(results, calls, kernel_rows, failures)
                data.update(missing=missing, seconds=round(elapsed, 1))
            else:
                data = {"results": [asdict(r) for r in results], "failures": failures, "missing": missing,
                        "launches": launches, "seconds": round(elapsed, 1)}
            json.dump(data, f, indent=1)
    if missing:
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
