"""Frame-size rules of a PredNet with several layers (pure Python: data preparation uses it too)."""

from __future__ import annotations

from models.errors import PipelineError


def size_multiple(n_layers: int) -> int:
    """Height and width must divide by this: each layer above the first halves the frame."""
    return 2 ** (n_layers - 1)


def nearby_sizes(value: int, multiple: int) -> tuple[int, int]:
    """The multiples of `multiple` just below and just above `value`."""
    below = max(multiple, value // multiple * multiple)
    return below, below + multiple


def check_frame_size(height: int, width: int, n_layers: int) -> None:
    """Raises a `PipelineError` naming nearby sizes that work when the frame does not divide.

    Args:
        height: frame height in pixels.
        width: frame width in pixels.
        n_layers: number of PredNet layers (length of the stack sizes).
    """
    m = size_multiple(n_layers)
    bad = [(name, v) for name, v in (("height", height), ("width", width)) if v <= 0 or v % m]
    if bad:
        hints = ", ".join(f"{name} {v} -> {' or '.join(map(str, nearby_sizes(v, m)))}" for name, v in bad)
        raise PipelineError(
            f"Frame size {height}x{width} does not suit a {n_layers}-layer PredNet: height and width "
            f"must divide by {m}. Nearby sizes that do: {hints}."
        )


def parse_size(text: str) -> tuple[int, int]:
    """Parses 'HxW' (e.g. '152x232') into (height, width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise PipelineError(f"Frame size must look like HEIGHTxWIDTH, e.g. 152x232. Received: {text!r}") from None
    if h <= 0 or w <= 0:
        raise PipelineError(f"Frame size must be positive. Received: {text!r}")
    return h, w
