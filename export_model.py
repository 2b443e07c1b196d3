r"""Export the per-frame scoring model for serving stacks that do not run Python or this code.

    python export_model.py --model_dir outputs/models/UCSDped2 --out outputs/export/UCSDped2 \
        [--format savedmodel|onnx] [--per_window N] [--overwrite]

Writes <out>/saved_model/ (a TensorFlow SavedModel, endpoint `serve`) or <out>/model.onnx, with the model
folder's calibration.json and export.json (input and output shapes, window, frames per window). The model
takes a window of frames and returns the predictions of the steps it is asked for; docs/serving.md shows
how to load it and turn its predictions into the live score.
"""

from __future__ import annotations

import argparse
import logging

from models.args import folder, positive_int
from models.cli import import_keras, parser, run

log = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument(
        "--model_dir", type=folder, required=True, help="folder train.py wrote (model.keras, calibration.json)"
    )
    p.add_argument("--out", type=folder, required=True, help="folder to write")
    p.add_argument("--format", default="savedmodel", choices=["savedmodel", "onnx"], help="artefact to write")
    p.add_argument(
        "--per_window",
        type=positive_int,
        default=None,
        help="steps returned per window (default: the calibration's, as batch scoring; 1 for a stream)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if an earlier export wrote it")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import_keras()  # after argument errors, with the native libraries' start-up lines hidden
    from models.export import export_scorer

    path = export_scorer(args.model_dir, args.out, args.format, args.per_window, args.overwrite)
    log.info("-> %s", path)
    return 0


if __name__ == "__main__":
    run(main)
