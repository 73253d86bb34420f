"""Argument types the commands share: numbers within their range, refused by argparse in one line.

A seed, a thread or worker count or a size outside what the library can use once failed deep inside torch,
numpy or the allocator (MemoryError, a fork bomb, a traceback); here it is refused before any work.
"""

from __future__ import annotations

import argparse
import math

__all__ = [
    "number",
    "POSITIVE_INT",
    "COUNT",
    "POSITIVE",
    "NON_NEGATIVE",
    "PROBABILITY",
    "FRACTION",
    "SEED",
    "THREADS",
    "WORKERS",
    "SIZE",
    "out_of_memory",
]


def number(kind, *, low, high=math.inf, low_open=False, high_open=False):
    """An argparse type: `kind` (int or float) within [low, high] (open ends where asked), finite."""
    high_open = high_open or math.isinf(high)  # the value must be finite: inf is never in
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}"
            ) from None
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text!r}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


POSITIVE_INT = number(int, low=1)
COUNT = number(int, low=0)
POSITIVE = number(float, low=0, low_open=True)
NON_NEGATIVE = number(float, low=0)
PROBABILITY = number(float, low=0, high=1)
FRACTION = number(float, low=0, high=1, low_open=True)  # of a data set: (0, 1]
SEED = number(int, low=0, high=2**32 - 1)  # numpy's seeds; torch takes these too
THREADS = number(int, low=0, high=1024)  # 0: the command's own choice
WORKERS = number(int, low=0, high=256)  # processes: beyond this a fork bomb, not a data loader
SIZE = number(int, low=1, high=8192)  # pixels of an image side, channels of a head, images of a batch


def out_of_memory(error: BaseException) -> str | None:
    """One line for an allocation that failed (torch's CPU allocator raises a plain RuntimeError), else None."""
    text = str(error).strip()
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return f"out of memory: {text.splitlines()[0] if text else type(error).__name__}"
    if isinstance(error, RuntimeError) and "can't allocate memory" in text:
        return "out of memory: " + text[text.index("can't allocate memory") :].splitlines()[0]
    return None
