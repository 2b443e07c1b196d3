"""Config files in config/: JSON dictionaries of argument defaults that the command line overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from models.errors import PipelineError
from models.io import read_json

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


def resolve_config(name_or_path: str) -> Path:
    """'cpu' -> config/cpu.json; a path is taken as it is."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.json"
    if candidate.is_file():
        return candidate
    raise PipelineError(f"Config {name_or_path!r} not found (neither a file nor config/{name_or_path}.json).")


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parses `argv`, taking defaults from the `--config` file first."""
    pre, _ = parser.parse_known_args(argv)
    if getattr(pre, "config", None):
        values = {k: v for k, v in read_json(resolve_config(pre.config)).items() if not k.startswith("_")}
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PipelineError(f"Config {pre.config} has unknown settings: {unknown}.")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def int_list(text) -> tuple[int, ...]:
    """'48,96,192' (or a list from a config file) -> (48, 96, 192)."""
    return _number_list(text, int)


def float_list(text) -> tuple[float, ...]:
    return _number_list(text, float)


def _number_list(value, kind):
    items = value if isinstance(value, (list, tuple)) else str(value).replace(" ", "").split(",")
    try:
        return tuple(kind(v) for v in items if v != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None
