"""Export the per-frame scoring model for serving stacks that do not run Python or this code.

    python export_model.py --model_dir outputs/models/UCSDped2 --out outputs/export/UCSDped2 \
        [--format savedmodel|onnx] [--per_window N] [--overwrite]

Writes <out>/saved_model/ (a TensorFlow SavedModel, endpoint `serve`) or <out>/model.onnx, with the model
folder's calibration.json and export.json (input and output shapes, window, frames per window). The model
takes a window of frames and returns the predictions of the steps it is asked for; docs/serving.md shows
how to load it and turn its predictions into the live score.
"""

from __future__ import annotations

import argparse

from models.cli import run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--model_dir", required=True, help="folder train.py wrote (model.keras, calibration.json)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--format", default="savedmodel", choices=["savedmodel", "onnx"], help="default: savedmodel")
    p.add_argument(
        "--per_window",
        type=int,
        default=None,
        help="steps returned per window (default: the calibration's, as batch scoring; 1 for a stream)",
    )
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.per_window is not None and args.per_window < 1:
        p.error(f"--per_window must be 1 or more; got {args.per_window}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from models.export import export_scorer

    path = export_scorer(args.model_dir, args.out, args.format, args.per_window, args.overwrite)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    run(main)
