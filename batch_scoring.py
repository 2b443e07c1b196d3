r"""Stage 3: score every frame with the trained model (PredNet, or the ConvLSTM autoencoder: its folder says
which): metrics, the live anomaly score, alarms, evaluation.

    # the test videos of a prepared dataset
    python batch_scoring.py --preprocessed_data data/preprocessed --dataset UCSDped2 \
        --model_dir outputs/models/UCSDped2 --scored_data outputs/scored/UCSDped2
    # any videos: files, folders of frames, or folders of either (no preparation, no labels needed)
    python batch_scoring.py --model_dir outputs/models/UCSDped2 --input clip.mp4 frames_folder/ \
        --scored_data outputs/scored/clips [--labels labels.csv] [--calibrate_on normal1.mp4 normal2.mp4]

Writes <scored_data>/df.pkl.gz (one row per frame: video, frame, the metrics, `score` (the live anomaly
score, calibrated on normal video: 2 = an estimated rate of 1 normal frame in 100) and `alarm`), alarms.csv (one row
per alarm), calibration.json (the calibration used), metrics.json, scores.png and, with --input (or
--overlays), overlays/<video>.mp4 (the frame with the model's unusual error as a heat map, the score and the
alarm), and metrics.md (the run's settings, alarms and sawtooth check). With labels, metrics.md also gives
the frame AUC of the offline protocol (centred smoothing, per-video scaling, as papers report) and of the
live one, each next to the copy-last-frame baseline, and the live alarm's events, and roc.png is written.
See docs/anomaly_detection.md.
"""

from __future__ import annotations

import argparse
import logging

from models.args import existing_file, folder, int_at_least, positive_float, positive_int
from models.calibration import DEFAULT_SMOOTH
from models.cli import (
    add_alarm_options,
    add_prepared_data_options,
    add_sample_fps_option,
    choose_prepared_dataset,
    import_keras,
    parser,
    run,
)
from models.config import add_config_option, parse_with_config
from models.inference import DEFAULT_HORIZON
from models.io import atomic_dir, check_output

log = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    add_config_option(p, '"fpr": 0.001')
    add_prepared_data_options(p, when="without --input: ")
    p.add_argument(
        "--input", nargs="+", default=None, help="score these videos instead: files, frame folders, or folders of them"
    )
    p.add_argument(
        "--labels",
        type=existing_file,
        default=None,
        help="with --input: a video,start_frame,end_frame CSV, or a UCSD .m file (entries in the videos' name "
        "order), for evaluation",
    )
    p.add_argument("--fps", type=positive_float, default=10.0, help="frames per second of folders of frames")
    add_sample_fps_option(p, "with --input or --calibrate_on: ")
    p.add_argument(
        "--model_dir",
        type=folder,
        default=None,
        help="folder train.py wrote (default: outputs/models/<dataset>; required with --input)",
    )
    p.add_argument(
        "--scored_data",
        type=folder,
        default=None,
        help="output folder (default: outputs/scored/<dataset>, with --input outputs/scored/clips)",
    )
    g = p.add_argument_group("live score and alarms")
    g.add_argument(
        "--calibration",
        type=existing_file,
        default=None,
        help="calibration.json to use (default: the model folder's, which train.py writes)",
    )
    g.add_argument(
        "--calibrate_on",
        nargs="+",
        default=None,
        help="fit the calibration on these videos of normal footage instead (a new camera), without retraining",
    )
    g.add_argument(
        "--live_smooth",
        type=int_at_least(1, "frames"),
        default=DEFAULT_SMOOTH,
        help="with --calibrate_on or a new calibration: trailing frames averaged into the live score (default: 5)",
    )
    add_alarm_options(g)
    g.add_argument(
        "--overlays",
        type=int_at_least(0, "videos"),
        default=None,
        help="how many videos (the first N) to write overlays/<video>.mp4 for (default: all with --input, 0 without)",
    )
    g = p.add_argument_group("model runs")
    g.add_argument(
        "--window",
        type=int_at_least(0, "frames (0: whole videos)"),
        default=None,
        help="predict each frame from the window of frames ending at it, this many frames long (default: the "
        "model's training window, nt); 0: run each video as one sequence",
    )
    g.add_argument(
        "--horizon",
        type=int_at_least(1, "frames"),
        default=DEFAULT_HORIZON,
        help="predict each frame from the frames up to this many steps before it, the model fed its own "
        "predictions in between (1: the next frame; more needs --window longer than the horizon)",
    )
    g.add_argument(
        "--per_window",
        type=int_at_least(1, "frames"),
        default=None,
        help="with --horizon 1, score this many frames per window (the last steps of windows this many frames "
        "apart): window / per_window model steps per frame instead of window, each frame predicted from the "
        "last window - per_window to window - 1 frames (default: half the window with --horizon 1, else 1)",
    )
    g.add_argument(
        "--warmup",
        type=int_at_least(1, "frames"),
        default=1,
        help="frames the model must have seen before a frame's prediction is scored: the first "
        "warmup + horizon - 1 frames of each video get no score",
    )
    g.add_argument(
        "--batch_size",
        type=int_at_least(1, "sequences"),
        default=64,
        help="sequences (windows, or videos with --window 0) per model call; every GPU figure in docs/results.md "
        "used 64",
    )
    g = p.add_argument_group("offline metrics and plots")
    g.add_argument(
        "--patch", type=int_at_least(1, "pixels"), default=16, help="patch side in pixels for the patch_max metric"
    )
    g.add_argument(
        "--smooth",
        type=int_at_least(1, "frames"),
        default=15,
        help="also evaluate regularity and patch_max averaged over this many centred frames, which looks "
        "smooth // 2 frames ahead (1: no smoothing)",
    )
    g.add_argument("--n_plot", type=positive_int, default=12, help="videos shown in scores.png")
    g.add_argument(
        "--save_prediction_error_video_frames",
        action="store_true",
        help="write <video>_prediction_error.gif (frame | prediction | error) for --plot_videos",
    )
    g.add_argument("--plot_videos", default=None, help="comma-separated videos for the GIFs (default: the first 2)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --scored_data if an earlier batch_scoring.py run wrote it"
    )
    args = parse_with_config(p, argv)
    if args.plot_videos and not args.save_prediction_error_video_frames:
        p.error("argument --plot_videos: goes with --save_prediction_error_video_frames (the GIFs it names)")
    if args.labels and not args.input:
        p.error("argument --labels: goes with --input (a prepared dataset has its own labels)")
    if args.sample_fps and not (args.input or args.calibrate_on):
        p.error("argument --sample_fps: goes with --input or --calibrate_on (a prepared dataset is scored as prepared)")
    if args.calibration and args.calibrate_on:
        p.error("argument --calibration: not allowed with --calibrate_on, which fits a new calibration")
    if args.input:
        if args.dataset:
            p.error(
                f"argument --dataset: not allowed with --input, which scores the videos given. Received: {args.dataset}"
            )
        if not args.model_dir:
            p.error("argument --model_dir: required with --input (no dataset names the model folder)")
        args.scored_data = args.scored_data or "outputs/scored/clips"
        return args
    args.dataset = choose_prepared_dataset(p, args, ", or score videos of your own: --input VIDEO ... --model_dir M")
    args.model_dir = args.model_dir or f"outputs/models/{args.dataset}"
    args.scored_data = args.scored_data or f"outputs/scored/{args.dataset}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import_keras()  # after argument errors, with the native libraries' start-up lines hidden
    from models.scoring_run import load_scoring_inputs, run_scoring, scoring_inputs_read

    protected = scoring_inputs_read(args)
    check_output(args.scored_data, "batch_scoring", args.overwrite, protected)
    inputs = load_scoring_inputs(args)
    with atomic_dir(args.scored_data, args.overwrite, stage="batch_scoring", inputs=protected) as out:
        summary = run_scoring(args, inputs, out)
    log.info("-> %s", args.scored_data)
    return 0 if summary else 1


if __name__ == "__main__":
    run(main)
