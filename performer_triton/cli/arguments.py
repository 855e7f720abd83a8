"""argparse `type=` functions shared by the commands: a bad value is an argparse error that names
the flag and says what it expected (exit code 2), not a traceback from deep inside the run."""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable


def _int(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None


def int_in(low: int, high: int | None = None, expected: str | None = None) -> Callable[[str], int]:
    """A type for an integer in [low, high] (no upper bound when high is None)."""
    if expected is None:
        expected = (f"an integer from {low} to {high}" if high is not None
                    else "a positive integer" if low == 1 else f"an integer >= {low}")

    def parse(text: str) -> int:
        value = _int(text, expected)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value

    return parse


positive_int = int_in(1)


def positive_ints(what: str, example: str) -> Callable[[str], list[int]]:
    """A type for a comma-separated list of positive integers (at least one), such as '1024,2048'."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"comma-separated integers, e.g. {example}; got {text!r}") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"positive {what}, got {text!r}")
        return values

    return parse


def float_at_least(low: float, *, inclusive: bool = True, expected: str | None = None) -> Callable[[str], float]:
    """A type for a finite number >= low (> low when not inclusive)."""
    if expected is None:
        expected = (f"a finite number {'>=' if inclusive else '>'} {low:g}" if low != 0 or inclusive
                    else "a finite positive number")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value

    return parse


positive_float = float_at_least(0.0, inclusive=False)


def readable_file(text: str) -> str:
    """A type for the path of an existing, readable regular file (returned as given)."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"a readable file, got {text!r}: no such file")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"a readable file, got {text!r}: not a regular file")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"a readable file, got {text!r}: permission denied")
    return text


def device_memory(device: str) -> int | None:
    """Bytes of memory of the device ("cpu": physical RAM; "cuda": the current GPU), None if unknown."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None


def memory_problem(needed: int, device: str, what: str) -> str | None:
    """Why a run whose tensors need at least `needed` bytes cannot fit the device (None when it
    may): a clear message before the run instead of an allocator error (or minutes of swapping)."""
    total = device_memory(device)
    if total is None or needed <= total:
        return None
    return f"{what} need at least {needed / 2**30:,.1f} GiB, more than this {device} device's {total / 2**30:,.1f} GiB"
