"""`performer-triton bench`: attention implementations side by side on this machine's device, with
a progress bar; prints a table and writes CSV, JSON and a PNG plot (time and peak memory vs n)."""
from __future__ import annotations

import csv
import json
import platform
from pathlib import Path

import torch
from tqdm import tqdm

from .benchmark import IMPLS, Case, Measurement, device_name, side_by_side

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cases(args) -> list[Case]:
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    modes = {"causal": [True], "noncausal": [False], "both": [False, True]}[args.mode]
    passes = {"fwd": [False], "fwd+bwd": [True], "both": [False, True]}[args.passes]
    return [
        Case(n=n, causal=causal, backward=backward, b=args.batch, h=args.heads, d=args.dim_head, m=args.nb_features,
             dtype=dtype, device=args.device)
        for causal in modes for backward in passes for n in args.sizes
    ]


def format_table(results: list[Measurement]) -> str:
    head = f"{'mode':28} {'n':>6} {'implementation':18} {'ms':>10} {'peak MiB':>9} {'max rel err':>11}  note"
    lines = [head, "-" * len(head)]
    for r in results:
        c = r.case
        mode = f"{'causal' if c.causal else 'non-causal'} {'fwd+bwd' if c.backward else 'fwd'}"
        if r.skipped:
            lines.append(f"{mode:28} {c.n:>6} {r.impl:18} {'':>10} {'':>9} {'':>11}  skipped: {r.skipped}")
            continue
        mib = f"{r.peak_bytes / 2**20:9.1f}" if r.peak_bytes is not None else f"{'':>9}"
        lines.append(f"{mode:28} {c.n:>6} {r.impl:18} {r.seconds * 1e3:10.2f} {mib} {r.error:11.1e}")
    return "\n".join(lines)


def plot(results: list[Measurement], path: Path, title: str) -> bool:
    """Time and peak memory vs n, log-log, one line per implementation and mode.  False when
    matplotlib is missing (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    series: dict[str, list[Measurement]] = {}
    for r in results:
        if not r.skipped:
            mode = f"{'causal' if r.case.causal else 'non-causal'} {'fwd+bwd' if r.case.backward else 'fwd'}"
            series.setdefault(f"{r.impl} ({mode})", []).append(r)
    for label, rows in series.items():
        rows.sort(key=lambda r: r.case.n)
        ns = [r.case.n for r in rows]
        ax_t.plot(ns, [r.seconds * 1e3 for r in rows], marker="o", label=label)
        if all(r.peak_bytes is not None for r in rows):
            ax_m.plot(ns, [r.peak_bytes / 2**20 for r in rows], marker="o", label=label)
    for ax, ylabel in ((ax_t, "time (ms)"), (ax_m, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_data(results: list[Measurement], meta: dict, out: Path) -> None:
    """bench.csv and bench.json in out."""
    rows = [r.row() for r in results]
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "bench.json").write_text(json.dumps(dict(meta=meta, results=rows), indent=1))


def run(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("performer-triton bench: --device cuda, but CUDA is not available")
    impls = [IMPLS[name] for name in args.impls]
    todo = cases(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device_name(args.device), torch=torch.__version__, python=platform.python_version(),
                versions={i.name: i.version() for i in impls})
    results: list[Measurement] = []
    bar = tqdm(todo, desc="bench", unit="case")
    for case in bar:
        bar.set_postfix_str(case.label)
        results += side_by_side(impls, case, repeats=args.repeats, memory=not args.no_memory)
        write_data(results, meta, out)  # after every case: a long run that dies keeps what it measured
    bar.close()
    print(format_table(results))
    versions = ", ".join(f"{i.name} {i.version()}" for i in impls if i.version())
    title = f"{device_name(args.device)}, {todo[0].label.split(' n=')[0]} (n varies); {versions}"
    written = ["bench.csv", "bench.json"]
    if plot(results, out / "bench.png", title):
        written.append("bench.png")
    else:
        print("matplotlib is not installed (pip install 'performer-triton[plot]'): no plot written")
    print(f"wrote {', '.join(str(out / w) for w in written)}")
    return 0


def add_arguments(parser) -> None:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1024, 2048, 4096, 8192], help="comma-separated sequence lengths")
    parser.add_argument("--mode", choices=["causal", "noncausal", "both"], default="both")
    parser.add_argument("--passes", choices=["fwd", "fwd+bwd", "both"], default="fwd+bwd")
    parser.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(IMPLS))
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--nb-features", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", default="bench/out", help="folder for bench.csv, bench.json, bench.png")
