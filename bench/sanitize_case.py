"""A tiny forward+backward through the Triton kernels, for compute-sanitizer (bench/gpu_check.sh):

    compute-sanitizer --tool memcheck  python bench/sanitize_case.py
    compute-sanitizer --tool racecheck python bench/sanitize_case.py

Cases (backend="triton", so nothing falls back to PyTorch): non-causal and causal (global and
prefix key stabilizer) softmax features, bf16, fp16 and fp32, b=1 h=2 n=100 (a partial last chunk)
d=e=64 m=100 (not a multiple of the feature block), and relu features causal (prefix).  Each output and
gradient is compared with the float64 PyTorch path, loosely: this is a memory and race check, the
kernel tests hold the precise budgets.  The last line is "sanitize_case: ok, N cases" when every
case ran and matched; anything else exits non-zero.  Without CUDA it prints a skip and exits 0.
`--cpu` runs the cases on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1), to test this
script without a GPU.  Run it once without the sanitizer first: the compiles land in Triton's cache, so the instrumented
run only loads them.
"""
from __future__ import annotations

import sys

import torch

CASES = [  # (causal, key_stabilizer, feature_map, dtype)
    (False, "global", "softmax", torch.bfloat16),
    (True, "global", "softmax", torch.bfloat16),
    (True, "prefix", "softmax", torch.float16),
    (False, "global", "softmax", torch.float32),
    (True, "global", "softmax", torch.float32),
    (True, "prefix", "relu", torch.float16),
]
SHAPE = dict(b=1, h=2, n=100, d=64, e=64, m=100)
LOOSE = {torch.bfloat16: 5e-2, torch.float16: 3e-2, torch.float32: 1e-2}


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def run_case(causal: bool, stabilizer: str, feature_map: str, dtype: torch.dtype, device: str = "cuda") -> dict[str, float]:
    from performer_triton import favor_attention, gaussian_orthogonal_random_matrix

    s = SHAPE
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(s["b"], s["h"], s["n"], s["d"], generator=gen) for _ in range(2))
    v, g = (torch.randn(s["b"], s["h"], s["n"], s["e"], generator=gen) for _ in range(2))
    proj = gaussian_orthogonal_random_matrix(s["m"], s["d"], generator=gen)
    kw = dict(causal=causal, key_stabilizer=stabilizer, feature_map=feature_map)

    leaves = [t.to(device, dtype).clone().requires_grad_() for t in (q, k, v)]
    out = favor_attention(*leaves, proj.to(device), backend="triton", **kw)
    out.backward(g.to(device, dtype))
    if device == "cuda":
        torch.cuda.synchronize()

    ref_leaves = [t.double().clone().requires_grad_() for t in (q, k, v)]
    ref = favor_attention(*ref_leaves, proj.double(), backend="torch", **kw)
    ref.backward(g.double())
    errs = {"out": rel(out.detach().cpu(), ref.detach())}
    for name, got, want in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        errs[name] = float("inf") if got.grad is None else rel(got.grad.cpu(), want.grad)
    return errs


def main(argv: list[str]) -> int:
    # --cpu: the same cases on CPU tensors, for a smoke test of this script in Triton's
    # interpreter (TRITON_INTERPRET=1 must be set before triton is imported)
    device = "cpu" if "--cpu" in argv else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("sanitize_case: skipped: no CUDA device")
        return 0
    failed = ran = 0
    for causal, stabilizer, feature_map, dtype in CASES:
        label = f"{'causal' if causal else 'non-causal'} {stabilizer} {feature_map} {str(dtype)[6:]}"
        if device == "cpu" and dtype == torch.bfloat16:  # the interpreter's bf16 dot (tests/conftest.py)
            print(f"{label}: skipped on CPU (the interpreter multiplies raw bf16 bits, triton#11584)")
            continue
        ran += 1
        errs = run_case(causal, stabilizer, feature_map, dtype, device)
        ok = all(e <= LOOSE[dtype] for e in errs.values())  # NaN fails too
        failed += not ok
        print(f"{label}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()) + ("" if ok else "  OVER"), flush=True)
    if failed:
        print(f"sanitize_case: FAILED, {failed} of {ran} cases over {LOOSE}")
        return 1
    print(f"sanitize_case: ok, {ran} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
