"""The `performer-triton` command: demo, bench, check."""
# An application of the library, kept apart from it: the modules of this package use only the
# library's public API (and the float64 oracle performer_triton.reference, which `check` tests
# against); the library never imports them.
from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    from performer_triton import __version__

    parser = argparse.ArgumentParser(prog="performer-triton", description=__doc__)
    parser.add_argument("--version", action="version", version=f"performer-triton {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small leak-free causal PerformerLM, then sample with the cached decoder")
    demo.add_argument("--text", default=None, help="a text file to train on (default: Python standard-library source)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: 200 on CPU, 1000 on CUDA)")
    demo.add_argument("--seq-len", type=int, default=256)
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--generate", type=int, default=400, help="tokens to sample after training")
    demo.add_argument("--seed", type=int, default=0)

    from .bench import add_arguments

    add_arguments(sub.add_parser("bench", help="time and peak memory of ours and the peers vs sequence length"))

    from .check import add_arguments as add_check_arguments

    add_check_arguments(sub.add_parser(
        "check", help="run every available path against the float64 reference (on CPU, the Triton kernels in "
                      "Triton's interpreter, in a subprocess)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from . import demo

        return demo.run(args)
    if args.command == "bench":
        from . import bench

        return bench.run(args)
    from . import check

    return check.main(args)

