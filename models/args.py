"""Argument types of the scripts: each checks one value when the arguments are parsed, before any work.

argparse turns the `ArgumentTypeError` they raise into `error: argument --name: <message>` and exit code 2,
so a bad number never reaches the data, and never waits for Keras to be imported. Each also accepts a value
that is already a number or a list (as a `--config` file gives), so `models.config.parse_with_config` checks
those with the same functions::

    p.add_argument("--batch_size", type=int_at_least(1, "windows"))
    p.add_argument("--val_fraction", type=fraction)
    p.add_argument("--filter_sizes", type=ints_at_least(1, lengths=(3,)))
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

ArgumentTypeError = argparse.ArgumentTypeError


def _int(value) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ArgumentTypeError(f"expected a whole number. Received: {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"expected a whole number. Received: {value!r}") from None


def _float(value) -> float:
    if isinstance(value, bool):
        raise ArgumentTypeError(f"expected a number. Received: {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"expected a number. Received: {value!r}") from None
    if not math.isfinite(number):
        raise ArgumentTypeError(f"expected a finite number. Received: {value!r}")
    return number


def _named(check: Callable, name: str) -> Callable:
    check.__name__ = name  # argparse names the type in some messages
    return check


def int_in(minimum: int, maximum: int | None = None, unit: str = "") -> Callable[[object], int]:
    """A whole number in [minimum, maximum] (no upper bound when `maximum` is None); `unit` (e.g. 'frames')
    only words the message."""
    words = f"{minimum} or more" if maximum is None else f"{minimum}-{maximum}"
    words += f" {unit}" if unit else ""

    def check(value) -> int:
        number = _int(value)
        if number < minimum or (maximum is not None and number > maximum):
            raise ArgumentTypeError(f"must be {words}. Received: {value}")
        return number

    return _named(check, f"int_in_{minimum}_{maximum}")


def int_at_least(minimum: int, unit: str = "") -> Callable[[object], int]:
    """A whole number >= `minimum`; `unit` (e.g. 'frames') only words the message."""
    return _named(int_in(minimum, None, unit), f"int_at_least_{minimum}")


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def float_in(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """A finite number within [low, high]; `low_open` / `high_open` exclude the bound itself."""
    if low is not None and high is not None:
        words = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        words = f"{'greater than' if low_open else 'at least'} {low:g}"
    else:
        words = f"{'less than' if high_open else 'at most'} {high:g}"

    def check(value) -> float:
        number = _float(value)
        too_low = low is not None and (number <= low if low_open else number < low)
        too_high = high is not None and (number >= high if high_open else number > high)
        if too_low or too_high:
            raise ArgumentTypeError(f"must be {words}. Received: {value}")
        return number

    return _named(check, "float_in")


positive_float = float_in(0, low_open=True)
fraction = float_in(0, 1, high_open=True)  # a share that must leave something: [0, 1)
probability = float_in(0, 1)


def _items(value) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [v for v in str(value).replace(" ", "").split(",") if v != ""]


def _list_of(item: Callable, minimum_words: str, lengths: tuple[int, ...] | None, allow_empty: bool):
    def check(value) -> tuple:
        items = _items(value)
        if not items and not allow_empty:
            raise ArgumentTypeError(f"needs at least one value, comma-separated. Received: {value!r}")
        if lengths is not None and items and len(items) not in lengths:
            counts = " or ".join(map(str, lengths))
            raise ArgumentTypeError(f"needs {counts} comma-separated values. Received: {value!r} ({len(items)})")
        try:
            return tuple(item(v) for v in items)
        except ArgumentTypeError:
            raise ArgumentTypeError(f"every value must be {minimum_words}. Received: {value!r}") from None

    return check


def ints_at_least(minimum: int = 1, lengths: tuple[int, ...] | None = None, allow_empty: bool = False):
    """Comma-separated whole numbers, each >= `minimum` ('48,96,192', or a list from a config file)."""
    check = _list_of(int_at_least(minimum), f"a whole number, {minimum} or more", lengths, allow_empty)
    return _named(check, "ints_at_least")


def floats_at_least(minimum: float = 0.0, lengths: tuple[int, ...] | None = None):
    """Comma-separated finite numbers, each >= `minimum` ('1,0.1', or a list from a config file)."""
    check = _list_of(float_in(minimum), f"a number, at least {minimum:g}", lengths, allow_empty=False)
    return _named(check, "floats_at_least")


def frame_size(minimum: int = 1) -> Callable[[object], tuple[int, int]]:
    """'HEIGHTxWIDTH' (e.g. '152x232') -> (height, width), each side at least `minimum` pixels."""

    def check(value) -> tuple[int, int]:
        parts = list(value) if isinstance(value, (list, tuple)) else str(value).lower().split("x")
        try:
            h, w = (_int(v) for v in parts)
        except (ArgumentTypeError, ValueError):  # not a number, or not two of them
            raise ArgumentTypeError(f"must look like HEIGHTxWIDTH, e.g. 152x232. Received: {value!r}") from None
        if min(h, w) < minimum:
            raise ArgumentTypeError(f"height and width must be {minimum} or more pixels. Received: {value!r}")
        return h, w

    return _named(check, "frame_size")


def existing_file(value) -> str:
    """A path that is an existing file."""
    path = Path(str(value))
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ArgumentTypeError(f"must be a file, but {path} {what}. Received: {str(value)!r}")
    return str(value)


def folder(value) -> str:
    """A path that is a folder, or can become one: neither it nor a folder above it is a file."""
    path = Path(str(value))
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                what = "is a file" if part == path else f"lies inside {part}, which is a file"
                raise ArgumentTypeError(f"must be a folder, but {path} {what}. Received: {str(value)!r}")
            break
    return str(value)
