"""What every script shares: the error-to-exit-code wrapper and the environment report."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from collections.abc import Callable

from models.errors import PipelineError

PACKAGES = ("keras", "tensorflow-cpu", "tensorflow", "jax", "numpy", "hickle", "h5py", "scikit-learn", "pandas")


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Runs a script's `main`: a `PipelineError` becomes a one-line message and exit code 2, Ctrl-C the line
    "interrupted" and exit code 130 (outputs are left as they were: see models/io.py)."""
    try:
        code = main(argv)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
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
