"""Option types that refuse a bad value as it is parsed, naming what is wanted (argparse exits with code 2).

Plain functions of a string, so a method's options (pac.methods.registry.method_option) can name them without
importing the CLI.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def number(
    kind: type,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    maximum: float | None = None,
) -> Callable[[str], Any]:
    """An argparse type: an int or float within bounds, refused with the bounds in the message (exit code 2)."""
    bounds = [f">= {minimum:g}" if minimum is not None else "", f"> {above:g}" if above is not None else ""]
    bounds += [f"< {below:g}" if below is not None else "", f"<= {maximum:g}" if maximum is not None else ""]
    wanted = f"{'a whole number' if kind is int else 'a number'} {' and '.join(b for b in bounds if b)}".strip()

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text!r}") from None
        out_of_range = (
            (minimum is not None and value < minimum)
            or (above is not None and value <= above)
            or (below is not None and value >= below)
            or (maximum is not None and value > maximum)
            or value != value  # nan
        )
        if out_of_range:
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text}")
        return value

    return parse


def layer_list(spec: str) -> list[int]:
    """'0,15-30' -> [0, 15, 16, ..., 30]: layer numbers and inclusive ranges, comma-separated."""
    from pac.plan.placement import PlanError, layer_ranges

    try:
        return [layer for first, end in layer_ranges(spec) for layer in range(first, end)]
    except PlanError:
        raise argparse.ArgumentTypeError(
            f"{spec!r} is not a layer list; write numbers and ranges such as 0,15-30"
        ) from None
