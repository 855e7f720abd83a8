"""The `performer-triton` command: demo, bench, check."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="performer-triton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small leak-free causal PerformerLM, then sample with the cached decoder")
    demo.add_argument("--text", default=None, help="a text file to train on (default: Python standard-library source)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: 200 on CPU, 1000 on CUDA)")
    demo.add_argument("--seq-len", type=int, default=256)
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--generate", type=int, default=400, help="tokens to sample after training")
    demo.add_argument("--seed", type=int, default=0)

    from .bench_cli import add_arguments

    add_arguments(sub.add_parser("bench", help="time and peak memory of ours and the peers vs sequence length"))

    check = sub.add_parser("check", help="run every available path against the float64 reference")
    check.add_argument("--n", type=int, default=37, help="sequence length (default 37)")
    check.add_argument("--d", type=int, default=16, help="head dim (default 16)")
    check.add_argument("--m", type=int, default=44, help="number of random features (default 44)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from . import demo

        return demo.run(args)
    if args.command == "bench":
        from . import bench_cli

        return bench_cli.run(args)
    from . import check

    return check.main(args)


if __name__ == "__main__":
    sys.exit(main())
