"""What every script shares: its argument parser, its output (logging, progress bars, Keras's progress mode),
the error-to-exit-code wrapper and the environment report.

Every script builds its parser with `parser(__doc__)`, which gives it the house conventions::

    p = parser(__doc__)                       # -q/--quiet, -v/--verbose; defaults shown in --help
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    args = p.parse_args(argv)                 # a bad value: one line, `prog: error: ...`, exit code 2
    log.info("scored %d frames", n)           # shown unless --quiet
    for video in progress(videos, desc="reading", unit="video"): ...
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import os
import platform
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from models.errors import PipelineError

PACKAGES = ("keras", "tensorflow-cpu", "tensorflow", "jax", "numpy", "hickle", "h5py", "scikit-learn", "pandas")

# Libraries whose INFO and DEBUG lines say nothing to a user of the pipeline; shown with --verbose only
# (matplotlib and PIL stay at warnings even then: their debug lines are font and plugin searches).
_CHATTY = (
    "absl",
    "tensorflow",
    "jax",
    "h5py",
    "urllib3",
    "asyncio",
    "numexpr",
    "optuna",
    "multipart",
    "httpx",
    "httpcore",
    "tf2onnx",
)
_NEVER_DEBUG = ("matplotlib", "PIL")
SECRET_OPTIONS = ("api_key",)  # options whose value --help never shows

_quiet = False
_verbose = False


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's layout (its examples) and ends each option's help with its default, unless the
    help already says it; wide enough for the options' names and their help on one line each."""

    def __init__(self, prog: str, config_values: dict | None = None, **kwargs) -> None:
        kwargs.setdefault("max_help_position", 32)
        kwargs.setdefault("width", 110)
        super().__init__(prog, **kwargs)
        self.config_values = config_values or {}

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if action.dest in self.config_values and "default" in text.lower():  # the help explains the default
            shown = "set, not shown" if action.dest in SECRET_OPTIONS else option_text(default).replace("%", "%%")
            return f"{text} (the --config file: {shown})"
        if (
            "default" in text.lower()
            or default is None
            or default is False
            or default == ""
            or default == argparse.SUPPRESS
            or (isinstance(default, (list, tuple)) and not default)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: {option_text(default).replace('%', '%%')})"


def option_text(value) -> str:
    """A value as the command line writes it: lists and tuples comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class Parser(argparse.ArgumentParser):
    """An `ArgumentParser` with the house rules: no prefix matching of option names (`--model x` is not
    `--model_dir x`), defaults in --help, a one-line error (`prog: error: ...`, exit code 2, no usage
    block), the -q/--quiet and -v/--verbose pair, and the output set up (`configure_output`) as soon as the
    arguments are parsed, before any heavy import."""

    config_values: dict = {}  # what a --config file set (`models.config.parse_with_config`), for --help

    def __init__(self, *args, output_options: bool = True, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        if output_options:
            add_output_options(self)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _get_formatter(self):
        if isinstance(self.formatter_class, type) and issubclass(self.formatter_class, HelpFormatter):
            return self.formatter_class(prog=self.prog, config_values=self.config_values)
        return super()._get_formatter()

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if hasattr(parsed, "quiet"):
            configure_output(parsed)
        return parsed


def parser(doc: str | None, **kwargs) -> Parser:
    """A script's parser: its module docstring as the description, the house rules of `Parser`, and the
    calling script's file name as `prog` (also when its `main` runs inside another process, e.g. a test)."""
    caller = sys._getframe(1).f_globals.get("__file__")
    if caller:
        kwargs.setdefault("prog", Path(caller).name)
    return Parser(description=doc, **kwargs)


def add_output_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only; no progress bars")
    group.add_argument(
        "-v", "--verbose", action="store_true", help="debug messages too, and TensorFlow's and absl's own logs"
    )


class _StreamHandler(logging.Handler):
    """Messages to stdout, warnings and errors to stderr; the streams looked up at each message, so that a
    redirected `sys.stdout` (pytest, a notebook) gets them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except BrokenPipeError:  # its reader stopped (`| head`): the run goes on, its messages to it are dropped
            _silence(stream)
        except Exception:  # a closed stream must not turn a message into a crash
            self.handleError(record)


def _silence(stream) -> None:
    """Points `stream`'s file descriptor at /dev/null (so that Python's flush at exit does not fail too)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # not a real file (pytest's capture): nothing to point elsewhere
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        if record.levelno <= logging.DEBUG:
            return f"debug {record.name}: {message}"
        return message


def configure_output(args: argparse.Namespace) -> None:
    """Sets up what a script shows, from its --quiet / --verbose flags: the level of Python's logging (INFO;
    WARNING with --quiet; DEBUG with --verbose), TensorFlow's C++ logs and absl's (none unless --verbose;
    an explicit TF_CPP_MIN_LOG_LEVEL in the environment wins), and whether progress bars show
    (never with --quiet; otherwise only on a terminal, as tqdm decides)."""
    global _quiet, _verbose
    verbose, quiet = bool(getattr(args, "verbose", False)), bool(getattr(args, "quiet", False))
    _quiet, _verbose = quiet, verbose
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    # 3 hides TensorFlow's C++ errors too: the ones seen in normal runs are notes (oneDNN's "supports DT_INT32
    # only on platforms with AVX-512. Falling back ..."); a real failure still raises in Python.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StreamHandler)]:
        root.removeHandler(handler)
    handler = _StreamHandler()
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    root.setLevel(level)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    for name in _NEVER_DEBUG:
        logging.getLogger(name).setLevel(logging.WARNING)


def import_keras() -> None:
    """Imports Keras and its backend, hiding what the native libraries write to the process's stderr while
    they load (TensorFlow 2.21's "oneDNN custom operations are on" and "All log messages before
    absl::InitializeLog()" lines, which TF_CPP_MIN_LOG_LEVEL does not reach) unless --verbose. Should the
    import fail, the hidden lines are written out before the error."""
    if "keras" in sys.modules:
        return
    with _interrupt_after():
        _import_keras()


@contextlib.contextmanager
def _interrupt_after():
    """Holds Ctrl-C back until the block ends, then raises it: a KeyboardInterrupt raised inside a callback
    of the libraries being imported (a garbage-collection hook) is printed and dropped by Python, and the run
    went on as if never stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda *_: pending.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def _import_keras() -> None:
    if _verbose:
        import keras  # noqa: F401

        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as hidden:
        saved = os.dup(2)
        os.dup2(hidden.fileno(), 2)
        try:
            import keras  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            hidden.seek(0)
            sys.stderr.write(hidden.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def is_quiet() -> bool:
    return _quiet


def progress(iterable: Iterable | None = None, **kwargs):
    """A tqdm bar (on stderr, gone when done), off under --quiet and when stderr is not a terminal."""
    from tqdm import tqdm

    kwargs.setdefault("leave", False)
    kwargs.setdefault("disable", True if _quiet else None)
    return tqdm(iterable, **kwargs)


def keras_verbose(args: argparse.Namespace) -> int:
    """Keras's `verbose` for fit and predict: 0 with --quiet, the progress bar (1) on a terminal, one line
    per epoch (2) when stdout is a file or a pipe (a bar would fill the log with escape codes)."""
    if getattr(args, "quiet", False):
        return 0
    return 1 if sys.stdout.isatty() else 2


def choose_dataset(
    p: argparse.ArgumentParser, given: str | None, root: str | Path, found: list[str], what: str, hint: str = ""
) -> str:
    """The dataset a script works on: `given` (--dataset) if any, else the only one under `root`.

    Args:
        found: the datasets under `root` (folder names).
        what: how a dataset is recognised there, for the message (e.g. "a folder with metadata.json").
        hint: what else the user may mean, ending the message when `root` holds no dataset.

    Exits with a one-line error (code 2) when --dataset is missing and `root` holds none or several.
    """
    if given is not None:  # even "": what it means is for the script to judge
        return given
    if len(found) == 1:
        logging.getLogger(__name__).debug("--dataset %s: the only dataset in %s", found[0], root)
        return found[0]
    if not found:
        where = f"{root} holds no dataset ({what})" if Path(root).is_dir() else f"{root} does not exist"
        p.error(f"argument --dataset: none given and {where}; pass --dataset NAME{hint}")
    p.error(f"argument --dataset: {root} holds {len(found)} datasets ({', '.join(found)}); pass --dataset NAME")


def add_alarm_options(g) -> None:
    """--fpr, --alarm_min_frames and --alarm_gap, the alarm of the live score (batch_scoring.py, serve.py)."""
    from models.alarms import DEFAULT_GAP, DEFAULT_MIN_FRAMES
    from models.args import float_in, int_at_least

    g.add_argument(
        "--fpr",
        type=float_in(0, 1, low_open=True, high_open=True),
        default=None,
        help="alarm threshold as a false-positive rate on normal frames (default: the calibration's, 0.01)",
    )
    g.add_argument(
        "--alarm_min_frames",
        type=int_at_least(1, "frames"),
        default=DEFAULT_MIN_FRAMES,
        help="frames over the threshold that raise an alarm (default: 3)",
    )
    g.add_argument(
        "--alarm_gap",
        type=int_at_least(1, "frames"),
        default=DEFAULT_GAP,
        help="frames under the threshold that end one (default: 5)",
    )


def add_sample_fps_option(p, when: str = "") -> None:
    """--sample_fps: score a faster camera at about the model's rate (batch_scoring.py, serve.py)."""
    from models.args import positive_float

    p.add_argument(
        "--sample_fps",
        type=positive_float,
        default=None,
        help=f"{when}score about this many frames a second of each video, every round(rate / F)-th frame (a 30 "
        "fps camera at 10 for a model trained at Ped2's 10); default: every frame",
    )


def add_prepared_data_options(p: argparse.ArgumentParser, when: str = "") -> None:
    """--preprocessed_data and --dataset, for a script that reads what data_preparation.py wrote; `when`
    (e.g. "without --input: ") starts their help. `choose_prepared_dataset` resolves --dataset after parsing."""
    from models.args import folder

    p.add_argument(
        "--preprocessed_data",
        type=folder,
        default="data/preprocessed",
        help=f"{when}folder data_preparation.py wrote into",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help=f"{when}dataset folder in --preprocessed_data (default: the only one there; required if it holds several)",
    )


def choose_prepared_dataset(p: argparse.ArgumentParser, args: argparse.Namespace, hint: str = "") -> str:
    """--dataset, or the only dataset prepared in --preprocessed_data (see `choose_dataset`)."""
    found = prepared_datasets(args.preprocessed_data)
    return choose_dataset(p, args.dataset, args.preprocessed_data, found, "a folder with metadata.json", hint)


def prepared_datasets(root: str | Path) -> list[str]:
    """Datasets prepared under `root` (--preprocessed_data): its folders holding metadata.json."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "metadata.json").is_file())


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Runs a script's `main`: a `PipelineError` (or a `PermissionError`) becomes a one-line message and exit
    code 2, Ctrl-C the line "interrupted" and exit code 130 (outputs are left as they were: see models/io.py)."""
    interrupted = []

    def on_ctrl_c(signum, frame):
        interrupted.append(True)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_ctrl_c) if main_thread else None
    try:
        code = main(argv)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except PermissionError as err:  # a file or folder this account may not write (or read), however it came up
        print(f"error: no permission: {err.strerror}: {err.filename}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:  # Ctrl-C raised inside a native library's callback comes out as another error
        if not interrupted:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    sys.exit(code or 0)


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the outputs, for the metadata files."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
