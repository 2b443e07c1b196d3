"""Config files in config/: JSON dictionaries of argument defaults that the command line overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from models.errors import PipelineError
from models.io import read_json

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


def training_defaults() -> dict:
    """config/default.json: the one source of the training defaults (`models.training.TrainSettings`)."""
    return {k: v for k, v in read_json(CONFIG_DIR / "default.json").items() if not k.startswith("_")}


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
    """Parses `argv`, taking defaults from the `--config` file first.

    A value from the file goes through its option's `type` and `choices` as a command-line value does, so
    `"batch_size": 0` in a config file stops with the same message (naming the file) and exit code 2.
    """
    pre, _ = parser.parse_known_args(argv)
    values: dict = {}
    if getattr(pre, "config", None):
        path = resolve_config(pre.config)
        values = {k: v for k, v in read_json(path).items() if not k.startswith("_")}
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PipelineError(f"Config {pre.config} has unknown settings: {unknown}.")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        # Only values still the file's own objects: those given on the command line were checked already.
        if action.dest not in values or value is None or value is not values[action.dest]:
            continue
        option = action.option_strings[0] if action.option_strings else action.dest
        try:
            if callable(action.type):
                value = action.type(value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
            parser.error(f"argument {option} (from config {path}): {err}")
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(repr, action.choices))
            parser.error(f"argument {option} (from config {path}): invalid choice {value!r} (choose from {choices})")
        setattr(args, action.dest, value)
    return args


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
