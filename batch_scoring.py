"""Stage 3: score every test frame with the trained PredNet and evaluate the scores against the labels.

    python batch_scoring.py --preprocessed_data data/preprocessed --dataset UCSDped2 \
        --model_dir outputs/models/UCSDped2 --scored_data outputs/scored/UCSDped2

Writes <scored_data>/df.pkl.gz (one row per test frame), metrics.json and metrics.md (frame-level AUC
and EER of each metric, the model's next to the copy-last-frame baseline's), scores.png, roc.png and,
with --save_prediction_error_video_frames, frame | prediction | error GIFs. See docs/anomaly_detection.md.
"""

from __future__ import annotations

import argparse
import json

from models.cli import run
from models.data.store import dataset_dir, load_labels, load_split, read_metadata, video_slices
from models.errors import PipelineError
from models.inference import DEFAULT_HORIZON
from models.io import atomic_dir, check_output

HEADLINE = ["model_regularity", "copy_regularity", "model_mse", "copy_mse"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preprocessed_data", default="data/preprocessed")
    p.add_argument("--dataset", default="UCSDped2")
    p.add_argument("--model_dir", default=None, help="folder train.py wrote (default: outputs/models/<dataset>)")
    p.add_argument("--scored_data", default=None, help="output folder (default: outputs/scored/<dataset>)")
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="predict each frame from the window of frames ending at it, this many frames long (default: the "
        "model's training window, nt); 0: run each video as one sequence",
    )
    p.add_argument(
        "--horizon",
        type=int,
        default=DEFAULT_HORIZON,
        help="predict each frame from the frames up to this many steps before it, the model fed its own "
        "predictions in between (1: the next frame; more needs --window longer than the horizon)",
    )
    p.add_argument(
        "--per_window",
        type=int,
        default=None,
        help="with --horizon 1, score this many frames per window (the last steps of windows this many frames "
        "apart): window / per_window model steps per frame instead of window, each frame predicted from the "
        "last window - per_window to window - 1 frames (default: half the window with --horizon 1, else 1)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="frames the model must have seen before a frame's prediction is scored: the first "
        "warmup + horizon - 1 frames of each video get no score",
    )
    p.add_argument(
        "--batch_size",
        type=int,
        default=64,
        help="sequences (windows, or videos with --window 0) per model call; every GPU figure in docs/results.md "
        "used 64",
    )
    p.add_argument("--patch", type=int, default=16, help="patch side in pixels for the patch_max metric")
    p.add_argument(
        "--smooth",
        type=int,
        default=15,
        help="also evaluate regularity and patch_max averaged over this many centred frames, which looks "
        "smooth // 2 frames ahead (1: no smoothing)",
    )
    p.add_argument("--n_plot", type=int, default=12, help="videos shown in scores.png")
    p.add_argument(
        "--save_prediction_error_video_frames",
        action="store_true",
        help="write frame | prediction | error GIFs for --plot_videos",
    )
    p.add_argument("--plot_videos", default=None, help="comma-separated videos for the GIFs (default: the first 2)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.window is not None and args.window < 0:
        p.error(f"--window must be 0 (whole videos) or a number of frames; got {args.window}")
    for name in ("horizon", "warmup", "per_window"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be 1 or more frames; got {value}")
    if args.batch_size < 1:
        p.error(f"--batch_size must be 1 or more sequences; got {args.batch_size}")
    args.model_dir = args.model_dir or f"outputs/models/{args.dataset}"
    args.scored_data = args.scored_data or f"outputs/scored/{args.dataset}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    data_dir = dataset_dir(args.preprocessed_data, args.dataset)
    inputs = [data_dir, args.model_dir]
    check_output(args.scored_data, "batch_scoring", args.overwrite, inputs)
    meta = read_metadata(data_dir)
    X, sources = load_split(data_dir, "test")
    if len(X) == 0:
        raise PipelineError(f"{data_dir} has no test frames to score.")
    y = load_labels(data_dir)

    from models.inference import default_per_window, load_predictor, predict_videos
    from models.plots import error_frames, plot_roc, plot_scores, save_gif
    from models.scoring import add_smoothed, build_frame_table, evaluate, metric_columns, portable, side_by_side

    model, trained, config = load_predictor(args.model_dir)
    if tuple(trained.frame_shape) != X.shape[1:]:
        raise PipelineError(
            f"Model in {args.model_dir} takes frames {tuple(trained.frame_shape)} (h, w, c) but the test frames of "
            f"{data_dir} are {X.shape[1:]}; prepare the data with the model's size and channels."
        )
    with atomic_dir(args.scored_data, args.overwrite, stage="batch_scoring", inputs=inputs) as out:
        window = config.get("arguments", {}).get("nt", 0) if args.window is None else args.window
        horizon, per_window = args.horizon, args.per_window or default_per_window(window, args.horizon)
        predictions, layer_errors, fps = predict_videos(model, X, sources, args.batch_size, window, horizon, per_window)
        print(
            f"scored {len(X)} frames of {len(set(sources))} videos, each from the frames up to {horizon} before it"
            + (f" ({per_window} per {window}-frame window)" if window else " (whole videos)")
            + f", at {fps:.0f} frames/s (compilation included)"
        )
        first_scored = args.warmup + horizon - 1
        df = build_frame_table(X, sources, y, predictions, layer_errors, args.patch, first_scored)
        df = add_smoothed(df, args.smooth)
        scoring = {
            "model_dir": str(args.model_dir),
            "dataset": args.dataset,
            "window": window,
            "horizon": horizon,
            "per_window": per_window,
            "warmup": args.warmup,
            "smooth": args.smooth,
        }
        df.attrs = {**scoring, "height": meta["height"], "width": meta["width"]}
        portable(df).to_pickle(out / "df.pkl.gz")
        summary = {
            "frames": len(df),
            "videos": int(df["video"].nunique()),
            "frames_per_s": fps,
            **scoring,
            "training": config.get("arguments"),
        }
        if y is not None and df["y"].nunique() == 2:
            results = evaluate(df, metric_columns(df))
            table = side_by_side(results)
            print(table.round(3).to_string())
            summary["metrics"] = json.loads(results.to_json(orient="index"))
            (out / "metrics.md").write_text(
                f"# Frame-level evaluation: {args.dataset}\n\n{len(df)} frames, "
                f"{int(df['predictable'].sum())} predictable, {int(df['y'].sum())} anomalous.\n\n"
                f"{table.round(4).to_markdown()}\n"
            )
            plot_roc(df, HEADLINE, out / "roc.png", results["micro_auc"].to_dict())
            best = results["micro_auc"]
            line = (
                f"micro AUC: model regularity {best['model_regularity']:.3f}, "
                f"copy-last-frame regularity {best['copy_regularity']:.3f}"
            )
            if args.smooth > 1:
                line += (
                    f"; smoothed over {args.smooth} frames {best[f'model_regularity_smooth{args.smooth}']:.3f} and "
                    f"{best[f'copy_regularity_smooth{args.smooth}']:.3f}"
                )
            print(line)
        else:
            print("no labels with both classes: metrics written, evaluation skipped")
        plot_scores(df, HEADLINE[:2], out / "scores.png", args.n_plot)
        if args.save_prediction_error_video_frames:
            names = args.plot_videos.split(",") if args.plot_videos else list(dict.fromkeys(sources))[:2]
            for name, sl in video_slices(sources):
                if name in names:
                    save_gif(error_frames(X[sl] / 255.0, predictions[sl]), out / f"{name}_prediction_error.gif")
        (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"-> {args.scored_data}")
    return 0


if __name__ == "__main__":
    run(main)
