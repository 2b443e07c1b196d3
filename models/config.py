"""Config files in config/: JSON dictionaries of argument defaults that the command line overrides."""

from __future__ import annotations

import argparse
import sys
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
    if path.exists():
        raise PipelineError(f"Config {name_or_path!r} is a folder, not a JSON file.")
    candidate = CONFIG_DIR / f"{name_or_path}.json"
    if candidate.is_file():
        return candidate
    if "/" in name_or_path or name_or_path.endswith(".json"):
        raise PipelineError(f"Config file {name_or_path!r} not found.")
    raise PipelineError(f"Config {name_or_path!r} not found (neither a file nor config/{name_or_path}.json).")


def add_config_option(parser: argparse.ArgumentParser, example: str) -> None:
    """--config for a script whose settings are many: a JSON file of its options' values, read by
    `parse_with_config`; `example` is one of the script's own settings, as the file gives it."""
    parser.add_argument(
        "--config",
        default=None,
        help=f'JSON file of this script\'s settings by option name without "--" (e.g. {{{example}}}); flags '
        "override it, and --help after it shows its values as the defaults",
    )


def given_options(parser: argparse.ArgumentParser, argv=None) -> set[str]:
    """The options given on the command line `argv` (`sys.argv[1:]` when None), by `dest`: {"batch_size"} for
    `--batch_size 8` or `--batch_size=8`."""
    tokens = {token.split("=")[0] for token in (sys.argv[1:] if argv is None else argv)}
    return {a.dest for a in parser._actions if tokens & set(a.option_strings)}


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parses `argv`, taking defaults from the `--config` file first.

    A value from the file goes through its option's `type` and `choices` as a command-line value does, so
    `"batch_size": 0` in a config file stops with the same message (naming the file) and exit code 2.
    The file is read before `--help` is answered, so the help shows its values as the defaults.
    """
    config_action = next((a for a in parser._actions if a.dest == "config"), None)
    values: dict = {}
    if config_action is not None:
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument(*config_action.option_strings, dest="config", default=config_action.default)
        name = pre.parse_known_args(argv)[0].config
        if name:
            try:
                path = resolve_config(name)
                values = {k: v for k, v in read_json(path).items() if not k.startswith("_")}
            except PipelineError as err:
                parser.error(f"argument --config: {err}")
            known = {a.dest for a in parser._actions}
            unknown = sorted(set(values) - known)
            if unknown:
                parser.error(f"argument --config: {path} has unknown settings: {unknown}")
            given = given_options(parser, argv)
            for action in parser._actions:  # argparse would convert a text value itself, without the file's name
                value = values.get(action.dest)
                if isinstance(value, str) and action.dest not in given:
                    _check(parser, action, value, path)
            parser.set_defaults(**values)
            parser.config_values = values  # --help says which defaults the file set (models.cli.HelpFormatter)
    args = parser.parse_args(argv)
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        # Only values still the file's own objects: those given on the command line were checked already.
        if action.dest not in values or value is None or value is not values[action.dest]:
            continue
        setattr(args, action.dest, _check(parser, action, value, path))
    return args


def _check(parser: argparse.ArgumentParser, action: argparse.Action, value, path: Path):
    """A config file's value through its option's type and choices; an error names the option and the file."""
    option = action.option_strings[0] if action.option_strings else action.dest
    try:
        if callable(action.type):
            value = action.type(value)
    except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
        parser.error(f"argument {option} (from config {path}): {err}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(repr, action.choices))
        parser.error(f"argument {option} (from config {path}): invalid choice {value!r} (choose from {choices})")
    return value


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
