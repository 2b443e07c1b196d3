"""The per-frame scoring model as a standalone artefact, for serving stacks that do not run this code.

The exported model is `window_scorer` (models/prednet/model.py) with the window and frames per window of
the model folder's calibration:

    inputs   frames (batch, window, h, w, c) uint8, fed (batch, window) float32 (1 where the model's own
             prediction replaces the frame; all 0 to predict the next frame), pick (batch, per_window,
             window) float32 (one-hot: the steps to return)
    outputs  prediction (batch, per_window, h, w, c) float32 in [0, 1], error (batch, per_window, layers)

Batch scoring runs it on the windows of `models.inference.window_rows` and picks their last `per_window`
steps; a stream (per_window 1) runs frame t's window up to t and picks step t - start
(`models.streaming`). The live score is then computed from the prediction with calibration.json, which
the export folder holds too (docs/serving.md says how). Formats, both by Keras `model.export`: a
TensorFlow SavedModel, and ONNX (through tf2onnx), for which the loop over the window's steps is unrolled
(`UnrolledPredNet`): tf2onnx 1.17 cannot convert the model's while loop and writes a file that ONNX Runtime
refuses to load.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np

from models.calibration import FILENAME, Calibration
from models.errors import PipelineError
from models.io import atomic_dir, check_output, write_json

FORMATS = {"savedmodel": "tf_saved_model", "onnx": "onnx"}
ARTEFACT = {"savedmodel": "saved_model", "onnx": "model.onnx"}


def scorer_for_export(model_dir: str | Path, per_window: int | None = None, unroll: bool = False):
    """The window scorer of a model folder, its calibration, and the (window, per_window) it scores."""
    from models.inference import check_model_dir, load_predictor
    from models.prednet import find_prednet, window_scorer
    from models.registry import model_name, require_prednet

    model_dir = check_model_dir(model_dir)
    cal_path = model_dir / FILENAME
    if not cal_path.is_file():
        raise PipelineError(f"No calibration {cal_path}: train.py writes it; the export takes its window from it.")
    calibration = Calibration.load(cal_path)
    if not calibration.window:
        raise PipelineError(f"{cal_path} scores whole videos (window 0): there is no fixed window to export.")
    per_window = per_window or calibration.per_window
    if not 1 <= per_window <= calibration.window:
        raise PipelineError(
            f"per_window must be 1 to the window ({calibration.window}). Received: per_window={per_window}"
        )
    model, trained, config = load_predictor(model_dir)
    require_prednet(model_name(config), "The export", "score with batch_scoring.py")
    scorer = window_scorer(find_prednet(model), calibration.window, per_window, unroll)
    return scorer, calibration, config, per_window


def export_scorer(
    model_dir: str | Path, out: str | Path, fmt: str = "savedmodel", per_window: int | None = None, overwrite=False
) -> Path:
    """Writes `out/` with the exported scorer (saved_model/ or model.onnx), calibration.json and export.json
    (the shapes, the settings and how to call it); returns the artefact's path.

    Raises:
        PipelineError: an unknown format, a missing calibration, an existing `out` without overwrite, or
            an export the installed packages cannot make (ONNX without tf2onnx).
    """
    if fmt not in FORMATS:
        raise PipelineError(f"Unknown export format {fmt!r}; expected one of {sorted(FORMATS)}.")
    check_output(out, "export", overwrite, [model_dir])
    scorer, calibration, config, per_window = scorer_for_export(model_dir, per_window, unroll=fmt == "onnx")
    h, w, c = (int(v) for v in scorer.inputs[0].shape[2:])
    window = calibration.window
    scorer.predict_on_batch(  # Keras exports to ONNX only a model that has run
        [np.zeros((1, window, h, w, c), np.uint8), np.zeros((1, window), np.float32), np.zeros((1, per_window, window))]
    )
    with atomic_dir(out, overwrite, stage="export", inputs=[model_dir]) as tmp:
        artefact = tmp / ARTEFACT[fmt]
        try:
            with warnings.catch_warnings():  # Keras's tf2onnx patch probes np.object, which NumPy 2 warns of
                warnings.filterwarnings("ignore", message="In the future `np.object`", category=FutureWarning)
                scorer.export(str(artefact), format=FORMATS[fmt], verbose=False)
        except ImportError as err:
            raise PipelineError(f"Export to {fmt} needs a package that is not installed: {err}") from None
        shutil.copyfile(Path(model_dir) / FILENAME, tmp / FILENAME)
        write_json(
            tmp / "export.json",
            {
                "format": fmt,
                "artefact": ARTEFACT[fmt],
                "endpoint": "serve" if fmt == "savedmodel" else None,
                "window": calibration.window,
                "per_window": per_window,
                "horizon": calibration.horizon,
                "frame_shape": [h, w, c],
                "inputs": {
                    "frames": f"uint8 (batch, {calibration.window}, {h}, {w}, {c})",
                    "fed": f"float32 (batch, {calibration.window}); 0 everywhere to predict the next frame",
                    "pick": f"float32 (batch, {per_window}, {calibration.window}); one-hot rows: the steps to return",
                },
                "outputs": {
                    "prediction": f"float32 (batch, {per_window}, {h}, {w}, {c}) in [0, 1]",
                    "error": "float32 (batch, per_window, layers): PredNet's mean error per layer",
                },
                "model": Path(model_dir).name,
                "training": config.get("arguments", {}).get("dataset"),
            },
        )
    return Path(out) / ARTEFACT[fmt]
