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

    from .demo import add_arguments as add_demo_arguments

    add_demo_arguments(sub.add_parser(
        "demo", help="train a small leak-free causal PerformerLM on text, then sample with the cached decoder"))

    from .bench import add_arguments

    add_arguments(sub.add_parser("bench", help="time and peak memory of ours and the peers vs sequence length"))

    from .check import add_arguments as add_check_arguments

    add_check_arguments(sub.add_parser(
        "check", help="run every available path against the float64 reference (on CPU, the Triton kernels in "
                      "Triton's interpreter, in a subprocess)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    validate = getattr(args, "validate", None)  # a command's checks across arguments (a parser error)
    if validate is not None:
        validate(args)
    if args.command == "demo":
        from . import demo

        return demo.run(args)
    if args.command == "bench":
        from . import bench

        return bench.run(args)
    from . import check

    return check.main(args)

