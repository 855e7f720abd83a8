"""`performer-triton bench`: attention implementations side by side on this machine's device, with
a progress bar; prints a table (median time with its min and max over the repeats) and writes CSV,
JSON and a PNG plot (time and peak memory vs n, one row of panels per mode).

`--regression` measures instead the ratio of our time to a fixed reference workload, interleaved
in the same run, and saves it; `--baseline FILE` (or `--compare BASE NEW`) fails when a ratio grew
by more than `--max-slowdown`: a regression check that holds on a shared machine, where absolute
times move by tens of percent between identical runs.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from .arguments import memory_problem, positive_int, positive_ints
from .benchmark import (
    DEFAULT_PAIRS,
    DEFAULT_REFERENCE,
    IMPLS,
    MAX_SLOWDOWN,
    REFERENCES,
    Case,
    Measurement,
    compare_ratios,
    device_name,
    load_ratios,
    measure_ratio,
    ratios_of,
    save_ratios,
    side_by_side,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_SIZES = [1024, 2048, 4096, 8192]
REGRESSION_SIZES = [1024]
# on a shared CPU, torch's intra-op threads wait on each other whenever another process holds a
# core, and times of many-op workloads (our chunked causal path) scatter by 10x; one thread does not
REGRESSION_THREADS = 1
DEFAULT_REPEATS = 3

# one look per implementation, the same in every panel: colour, marker and line style all differ,
# markers hollow, so lines that overlap still show
STYLES = {
    "performer_triton": dict(color="tab:blue", marker="o", linestyle="-"),
    "performer-pytorch": dict(color="tab:orange", marker="s", linestyle="--"),
    "torch-sdpa": dict(color="tab:green", marker="^", linestyle=":"),
    "fla-chunk": dict(color="tab:red", marker="D", linestyle="-."),
}
FALLBACK_STYLES = [dict(color=c, marker=m, linestyle=ls) for c, m, ls in
                   [("tab:purple", "v", "-"), ("tab:brown", "P", "--"), ("tab:gray", "X", ":")]]


def mode_of(case: Case) -> str:
    return f"{'causal' if case.causal else 'non-causal'} {'fwd+bwd' if case.backward else 'fwd'}"


def shape_of(case: Case) -> str:
    """What a case's label says besides its mode and n."""
    dtype = str(case.dtype).replace("torch.", "")
    return f"{dtype} b={case.b} h={case.h} d={case.d} m={case.m}"


def cases(args) -> list[Case]:
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    modes = {"causal": [True], "noncausal": [False], "both": [False, True]}[args.mode]
    passes = {"fwd": [False], "fwd+bwd": [True], "both": [False, True]}[args.passes]
    sizes = args.sizes or (REGRESSION_SIZES if args.regression else DEFAULT_SIZES)
    return [
        Case(n=n, causal=causal, backward=backward, b=args.batch, h=args.heads, d=args.dim_head, m=args.nb_features,
             dtype=dtype, device=args.device)
        for causal in modes for backward in passes for n in sizes
    ]


def format_table(results: list[Measurement]) -> str:
    repeats = max((len(r.times) for r in results), default=0)
    head = (f"{'mode':18} {'n':>6} {'implementation':18} {'median ms':>10} {'min ms':>10} {'max ms':>10} "
            f"{'peak MiB':>9} {'max rel err':>11}  note")
    lines = [f"time: median, min and max of {repeats} interleaved repetitions", head, "-" * len(head)]
    for r in results:
        c = r.case
        if r.skipped:
            lines.append(f"{mode_of(c):18} {c.n:>6} {r.impl:18} {'':>10} {'':>10} {'':>10} {'':>9} {'':>11}  "
                         f"skipped: {r.skipped}")
            continue
        mib = f"{r.peak_bytes / 2**20:9.1f}" if r.peak_bytes is not None else f"{'':>9}"
        lines.append(f"{mode_of(c):18} {c.n:>6} {r.impl:18} {r.seconds * 1e3:10.2f} {r.min_seconds * 1e3:10.2f} "
                     f"{r.max_seconds * 1e3:10.2f} {mib} {r.error:11.1e}")
    return "\n".join(lines)


def _minor_label(value: float, _pos) -> str:
    """Labels at 2x and 5x a power of ten: a log axis spanning less than a decade still has some."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if round(mantissa, 6) in (2.0, 5.0) else ""


def _style(impl: str, order: list[str]) -> dict:
    if impl in STYLES:
        return STYLES[impl]
    return FALLBACK_STYLES[order.index(impl) % len(FALLBACK_STYLES)]


def plot(results: list[Measurement], path: Path, title: str) -> bool:
    """figure() saved to path as PNG.  False when matplotlib is missing (the `plot` extra) or
    nothing ran."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = figure(results, title)
    if fig is None:
        return False
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def figure(results: list[Measurement], title: str):
    """Time (median, bars from min to max) and peak memory vs n, log-log: one row of two panels per
    mode, each titled with its mode and shape; one legend for the figure, below the panels.  None
    when nothing ran."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups: dict[str, dict[str, list[Measurement]]] = {}
    skipped: dict[str, set[str]] = {}
    for r in results:
        key = f"{mode_of(r.case)}, {shape_of(r.case)}"
        if r.skipped:
            skipped.setdefault(key, set()).add(r.impl)
            continue
        groups.setdefault(key, {}).setdefault(r.impl, []).append(r)
    if not groups:
        return None
    impl_order = list(dict.fromkeys(r.impl for r in results))
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 4.2 * len(groups) + 1.2), squeeze=False)
    handles = {}
    for (key, series), (ax_t, ax_m) in zip(groups.items(), axes):
        for impl, rows in series.items():
            rows.sort(key=lambda r: r.case.n)
            ns = [r.case.n for r in rows]
            style = dict(_style(impl, impl_order), markerfacecolor="none", markersize=7, linewidth=1.6, alpha=0.9)
            med = [r.seconds * 1e3 for r in rows]
            err = [[m - r.min_seconds * 1e3 for m, r in zip(med, rows)], [r.max_seconds * 1e3 - m for m, r in zip(med, rows)]]
            line = ax_t.errorbar(ns, med, yerr=err, capsize=3, label=impl, **style)
            handles.setdefault(impl, line)
            if all(r.peak_bytes is not None for r in rows):
                ax_m.plot(ns, [r.peak_bytes / 2**20 for r in rows], label=impl, **style)
        note = f"; skipped: {', '.join(sorted(skipped[key]))}" if key in skipped else ""
        ax_t.set_title(f"{key}: time{note}", fontsize=9)
        measured = any(r.peak_bytes is not None for rows in series.values() for r in rows)
        ax_m.set_title(f"{key}: peak memory" + ("" if measured else " not measured (--no-memory)"), fontsize=9)
        sizes = sorted({r.case.n for rows in series.values() for r in rows})
        for ax, ylabel in ((ax_t, "time (ms): median, bar = min to max"), (ax_m, "peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sizes, [str(n) for n in sizes])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(_minor_label))
            ax.set_xlabel("sequence length n")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.9 / fig.get_figheight(), 1, 1 - 0.35 / fig.get_figheight()))
    return fig


def write_data(results: list[Measurement], meta: dict, out: Path) -> None:
    """bench.csv and bench.json in out."""
    rows = [r.row() for r in results]
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    records = [dict(row, times_ms=[round(t * 1e3, 3) for t in r.times]) for row, r in zip(rows, results)]
    (out / "bench.json").write_text(json.dumps(dict(meta=meta, results=records), indent=1))


def _meta(args, impls) -> dict:
    return dict(device=device_name(args.device), torch=torch.__version__, python=platform.python_version(),
                versions={i.name: i.version() for i in impls})


def read_ratios(path: str) -> dict[str, float]:
    """load_ratios; ValueError saying why a file cannot be read."""
    try:
        return load_ratios(Path(path).expanduser())
    except OSError as error:
        why = error.strerror or str(error)
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # (json.JSONDecodeError is a ValueError)
        why = f"not a regression file ({type(error).__name__}: {str(error).removeprefix(f'{Path(path).expanduser()}: ')})"
    raise ValueError(f"{path}: {why}")


def load_baseline(paths: list[str]) -> dict[str, float]:
    """The ratios of one saved run, or per case the median over several (a firmer baseline)."""
    runs = [read_ratios(p) for p in paths]
    cases = dict.fromkeys(c for run in runs for c in run)
    return {c: statistics.median(run[c] for run in runs if c in run) for c in cases}


def print_comparison(base_paths: list[str], base: dict[str, float], new: dict[str, float], max_slowdown: float) -> int:
    comparisons = compare_ratios(base, new, max_slowdown)
    where = ", ".join(str(Path(p).resolve()) for p in base_paths)
    median = "the median of " if len(base_paths) > 1 else ""
    print(f"ours / reference against {median}{where} (fails above +{max_slowdown:.0%}):")
    for c in comparisons:
        print("  " + c.line())
    regressed = [c for c in comparisons if c.regressed]
    compared = [c for c in comparisons if c.change is not None]
    missing = [c for c in comparisons if c.missing]
    if not compared:
        print("no case in common with the baseline: nothing compared")
        return 1
    print(f"{len(regressed)} of {len(compared)} cases slower than the baseline by more than {max_slowdown:.0%}"
          if regressed else f"no regression in {len(compared)} cases")
    if missing:
        print(f"{len(missing)} case(s) of the baseline missing from the new run: failed (measure them, or compare "
              "with a baseline of the same cases)")
    return 1 if regressed or missing else 0


def run_regression(args, out: Path, baseline: dict[str, float] | None) -> int:
    todo = cases(args)
    pairs = args.repeats or DEFAULT_PAIRS
    ours = IMPLS["performer_triton"]
    ratios = []
    bar = tqdm(todo, desc="regression", unit="case")
    for case in bar:
        bar.set_postfix_str(case.label)
        ratios.append(measure_ratio(case, ours=ours, reference=args.reference, pairs=pairs,
                                    slowdown=args.inject_slowdown))
    bar.close()
    injected = f"; ours slowed by {args.inject_slowdown:.0%} on purpose" if args.inject_slowdown else ""
    print(f"ours / {args.reference} (median of {pairs} interleaved pairs, quartiles in brackets; "
          f"{torch.get_num_threads()} CPU thread(s){injected}):")
    for r in ratios:
        print(f"  {r.case}: {r.ratio:.3f} [{r.q1:.3f}, {r.q3:.3f}]  (ours {r.ours_ms:.2f} ms, "
              f"{r.reference} {r.reference_ms:.2f} ms)")
    path = out / "regression.json"
    meta = _meta(args, [ours, REFERENCES[args.reference]]) | dict(
        reference=args.reference, pairs=pairs, threads=torch.get_num_threads(), inject_slowdown=args.inject_slowdown)
    save_ratios(ratios, meta, path)
    print(f"wrote {path}")
    if baseline is not None:
        return print_comparison(args.baseline, baseline, ratios_of(ratios), args.max_slowdown)
    return 0


def validate(args, parser) -> None:
    """Checks across arguments, after parsing; a bad one is a parser error (exit 2), so that exit 1
    means a regression only.  The regression check's options only where they act (a --baseline
    that a plain sweep ignored would let a CI gate pass without comparing anything); the saved
    files read (args.baseline_ratios, args.compare_ratios), the largest case's memory checked and
    the output folder made before anything is measured."""
    given = {"--baseline": args.baseline is not None, "--inject-slowdown": args.inject_slowdown is not None,
             "--reference": args.reference is not None}
    if not args.regression:
        stray = [name for name, set_ in given.items() if set_]
        if stray:
            parser.error(f"argument {stray[0]}: only with --regression")
    if args.max_slowdown is not None and not (args.baseline or args.compare):
        parser.error("argument --max-slowdown: only with --baseline or --compare (it is what a comparison accepts)")
    if args.compare and (args.regression or any(given.values())):
        parser.error("argument --compare: compares saved files only: no --regression, --baseline, --reference or "
                     "--inject-slowdown with it")
    if args.compare and len(args.compare) < 2:
        parser.error("argument --compare: give BASE [BASE ...] NEW, at least two files")
    args.reference = args.reference or DEFAULT_REFERENCE
    args.inject_slowdown = args.inject_slowdown or 0.0
    args.max_slowdown = MAX_SLOWDOWN if args.max_slowdown is None else args.max_slowdown
    try:
        args.baseline_ratios = load_baseline(args.baseline) if args.baseline else None
    except ValueError as error:
        parser.error(f"argument --baseline: {error}")
    if args.compare:
        try:
            args.compare_ratios = (load_baseline(args.compare[:-1]), read_ratios(args.compare[-1]))
        except ValueError as error:
            parser.error(f"argument --compare: {error}")
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda, but CUDA is not available")
    big = max(cases(args), key=lambda c: c.b * c.h * c.n)
    problem = memory_problem(4 * big.b * big.h * big.n * big.d * big.dtype.itemsize, args.device,
                             f"q, k, v and the output gradient at --batch {big.b} --heads {big.h} --sizes {big.n} "
                             f"--dim-head {big.d}")
    if problem is not None:
        parser.error(f"argument --sizes: {problem}")
    out = Path(args.out).expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"argument --out: cannot create {out}: {error.strerror}")


def run(args) -> int:
    """The sweep, the regression check or the comparison (after validate)."""
    if args.compare:
        base, new = args.compare_ratios
        return print_comparison(args.compare[:-1], base, new, args.max_slowdown)
    out = Path(args.out).expanduser().resolve()
    print(f"output folder: {out}")
    threads = args.threads or (REGRESSION_THREADS if args.regression and args.device == "cpu" else None)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        if args.regression:
            return run_regression(args, out, args.baseline_ratios)
        return run_sweep(args, out)
    finally:
        torch.set_num_threads(previous)


def run_sweep(args, out: Path) -> int:
    impls = [IMPLS[name] for name in args.impls]
    todo = cases(args)
    meta = _meta(args, impls)
    results: list[Measurement] = []
    bar = tqdm(todo, desc="bench", unit="case")
    for case in bar:
        bar.set_postfix_str(case.label)
        results += side_by_side(impls, case, repeats=args.repeats or DEFAULT_REPEATS, memory=not args.no_memory)
        write_data(results, meta, out)  # after every case: a long run that dies keeps what it measured
    bar.close()
    print(format_table(results))
    ran = {r.impl for r in results if not r.skipped}
    versions = ", ".join(f"{i.name} {i.version()}" for i in impls if i.name in ran and i.version())
    title = f"{device_name(args.device)}; {versions}"
    written = ["bench.csv", "bench.json"]
    if plot(results, out / "bench.png", title):
        written.append("bench.png")
    else:
        print("matplotlib is not installed (pip install 'performer-triton[plot]'): no plot written")
    print(f"wrote {', '.join(str(out / w) for w in written)}")
    return 0


def _fraction(text: str) -> float:
    """A slowdown: a fraction below 1 (0.1) or a percentage (10%, up to 1000%).  A bare number of 1
    or more is refused: "5" meant as 5% would otherwise accept +500%."""
    percent = text.endswith("%")
    try:
        value = float(text[:-1] if percent else text) / (100 if percent else 1)
    except ValueError:
        value = -1.0
    if not (0 < value <= 10 if percent else 0 < value < 1):
        raise argparse.ArgumentTypeError(
            f"a fraction between 0 and 1 (0.1) or a percentage between 0% and 1000% (10%), got {text!r}"
            + (f" (for {text}% write {text}%)" if not percent and value >= 1 else ""))
    return value


def add_arguments(parser) -> None:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    parser.add_argument("--sizes", type=positive_ints("sequence lengths", "1024,2048"), default=None, metavar="N,N,...",
                        help="comma-separated sequence lengths (default: 1024,2048,4096,8192; with --regression 1024)")
    parser.add_argument("--mode", choices=["causal", "noncausal", "both"], default="both")
    parser.add_argument("--passes", choices=["fwd", "fwd+bwd", "both"], default="fwd+bwd")
    parser.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(IMPLS))
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--dim-head", type=positive_int, default=64)
    parser.add_argument("--nb-features", type=positive_int, default=256)
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help=f"timed repetitions per implementation (default {DEFAULT_REPEATS}; "
                             f"with --regression, interleaved pairs, default {DEFAULT_PAIRS})")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help=f"CPU threads (torch.set_num_threads; default: torch's default, with --regression "
                             f"{REGRESSION_THREADS})")
    parser.add_argument("--out", default="bench/out",
                        help="folder for bench.csv, bench.json, bench.png (or regression.json), relative to the "
                             "current directory; the full path is printed")
    group = parser.add_argument_group("regression check (ratios to a reference timed in the same run)")
    group.add_argument("--regression", action="store_true",
                       help="measure ours / reference per case in interleaved pairs and write regression.json")
    group.add_argument("--reference", choices=list(REFERENCES), default=None,
                       help="with --regression: the reference workload: 'linear' (FAVOR+-like linear attention "
                            "as plain torch ops, chunked when causal; default) or 'torch-sdpa'")
    group.add_argument("--baseline", metavar="FILE", nargs="+", default=None,
                       help="with --regression: compare with this earlier regression.json (or pytest-benchmark "
                            "JSON of bench/test_regression.py; several: their median per case); exit 1 on a "
                            "regression")
    group.add_argument("--compare", nargs="+", metavar="FILE", default=None,
                       help="BASE [BASE ...] NEW: compare saved files only (no measurement; several bases: their "
                            "median per case); exit 1 on a regression")
    group.add_argument("--inject-slowdown", type=_fraction, default=None, metavar="FRACTION",
                       help="with --regression: make ours this much slower on purpose (busy CPU after each run), "
                            "to see the check fail on this machine, e.g. 15%%")
    group.add_argument("--max-slowdown", type=_fraction, default=None,
                       help=f"with --baseline or --compare: largest accepted growth of ours / reference (default "
                            f"{MAX_SLOWDOWN * 100:.0f}%%)")
    parser.set_defaults(validate=lambda args: validate(args, parser))  # called by cli.main after parsing
