"""The `performer-triton` command."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="performer-triton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="run every available path against the float64 reference")
    check.add_argument("--n", type=int, default=37, help="sequence length (default 37)")
    check.add_argument("--d", type=int, default=16, help="head dim (default 16)")
    check.add_argument("--m", type=int, default=44, help="number of random features (default 44)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        from . import check

        return check.main(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
