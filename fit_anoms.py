"""Stage 4: fit a random forest (and simpler baselines) that turns per-frame metrics into anomaly labels.

    python fit_anoms.py --scored_data outputs/scored/UCSDped2 --model_path outputs/anoms/UCSDped2
    python fit_anoms.py --apply outputs/anoms/UCSDped2 --scored_data outputs/scored/NewCamera

Evaluated by cross-validation by video (StratifiedGroupKFold: no video on both sides, both classes in
every training fold), with ROC AUC and average precision from predicted probabilities. Writes
classifier.joblib (the forest fitted on all frames), report.json, report.md, importances.csv and
importances.png to --model_path. With --apply, scores a new
DataFrame from batch_scoring.py with a saved classifier and writes anomaly_scores.csv beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from models.args import folder, int_at_least, non_negative_int, probability
from models.cli import run
from models.errors import PipelineError
from models.io import atomic_dir, atomic_output_file, check_output, check_output_file


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scored_data", default=None, help="folder batch_scoring.py wrote, or its df.pkl.gz")
    p.add_argument("--dataset", default="UCSDped2", help="names the default folders")
    p.add_argument("--model_path", type=folder, default=None, help="output folder (default: outputs/anoms/<dataset>)")
    p.add_argument("--features", default=None, help="comma-separated metric columns (default: every model_ column)")
    p.add_argument(
        "--smooth",
        type=int_at_least(1, "frames"),
        default=None,
        help="centred moving average of the features and of the classifiers' probabilities over this many frames "
        "of each video (1: none; default: batch_scoring.py's --smooth)",
    )
    p.add_argument(
        "--normalize",
        choices=["video", "none"],
        default="video",
        help="video: scale each feature to [0, 1] within each video before the classifiers see it (as the "
        "regularity score does); none: raw values",
    )
    p.add_argument(
        "--threshold", type=probability, default=0.5, help="probability above which a frame is called anomalous"
    )
    p.add_argument(
        "--n_splits",
        type=int_at_least(2, "folds"),
        default=5,
        help="folds by video (at most the number of videos; fewer where a training fold would lack a class)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument(
        "--apply", type=folder, default=None, help="score --scored_data with the classifier saved in this folder"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --model_path (with --apply: anomaly_scores.csv) if an earlier run of this stage wrote it",
    )
    args = p.parse_args(argv)
    args.scored_data = args.scored_data or f"outputs/scored/{args.dataset}"
    args.model_path = args.model_path or f"outputs/anoms/{args.dataset}"
    return args


def scored_file(scored_data: str | Path) -> Path:
    """The DataFrame that --scored_data names: a folder's df.pkl.gz, or the file itself."""
    path = Path(scored_data)
    return path / "df.pkl.gz" if path.is_dir() else path


def apply(args) -> int:
    import joblib

    from models.anoms import load_scored, prepare_frames, smooth_probabilities

    path = Path(args.apply) / "classifier.joblib"
    if not path.is_file():
        raise PipelineError(f"No saved classifier at {path}; run fit_anoms.py without --apply first.")
    scored = Path(args.scored_data)
    target = (scored if scored.is_dir() else scored.parent) / "anomaly_scores.csv"
    inputs = [path, scored_file(scored)]
    check_output_file(target, "fit_anoms --apply", args.overwrite, inputs)
    try:
        bundle = joblib.load(path)
    except Exception as err:  # a truncated or foreign file fails in pickle, zlib or numpy
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise PipelineError(f"Cannot read the saved classifier {path}: {type(err).__name__} {first}".strip()) from None
    keys = {"pipeline", "features", "smooth", "threshold"}
    if not isinstance(bundle, dict) or keys - set(bundle):
        raise PipelineError(f"{path} is not a classifier saved by fit_anoms.py (it needs the entries {sorted(keys)}).")
    data = prepare_frames(
        load_scored(args.scored_data),
        bundle["features"],
        bundle["smooth"],
        need_labels=False,
        per_video=bundle.get("normalize") == "video",
    )
    out = data[["video", "frame"] + (["y"] if "y" in data else [])].copy()
    proba = bundle["pipeline"].predict_proba(data[bundle["features"]].to_numpy(float))[:, 1]
    out["anomaly_probability"] = smooth_probabilities(proba, data["video"], bundle["smooth"])
    out["anomalous"] = (out["anomaly_probability"] >= bundle["threshold"]).astype(int)
    with atomic_output_file(target, args.overwrite, stage="fit_anoms --apply", inputs=inputs) as tmp:
        out.to_csv(tmp, index=False)
    print(f"scored {len(out)} frames, {int(out['anomalous'].sum())} called anomalous -> {target}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.apply:
        return apply(args)
    inputs = [scored_file(args.scored_data)]  # the output may sit beside it, in the scored folder
    check_output(args.model_path, "fit_anoms", args.overwrite, inputs)
    import joblib

    from models.anoms import (
        default_features,
        evaluate_by_video,
        importances,
        load_scored,
        make_models,
        prepare_frames,
        video_folds,
    )
    from models.plots import plot_importances

    df = load_scored(args.scored_data)
    features = args.features.split(",") if args.features else default_features(df)
    if not features:
        raise PipelineError("No feature columns: pass --features or score the data with batch_scoring.py.")
    if args.smooth is None:
        args.smooth = int(df.attrs.get("smooth", 1))
    if args.smooth < 1:
        raise PipelineError(f"--smooth must be 1 (none) or more frames. Received: {args.smooth}")
    data = prepare_frames(df, features, args.smooth, per_video=args.normalize == "video")
    n_folds = len(video_folds(data["y"].to_numpy().astype(int), data["video"].to_numpy(), args.n_splits))
    asked = min(args.n_splits, data["video"].nunique())
    if n_folds < asked:
        print(f"note: {n_folds} folds by video instead of {asked}: with more, a training fold would lack a class")
    with atomic_dir(args.model_path, args.overwrite, stage="fit_anoms", inputs=inputs) as out:
        report, _ = evaluate_by_video(data, features, args.seed, args.n_splits, args.threshold, args.smooth)
        forest = make_models(args.seed)["random_forest"].fit(data[features].to_numpy(float), data["y"].astype(int))
        table = importances(forest, data, features, args.seed)
        joblib.dump(
            {
                "pipeline": forest,
                "features": features,
                "smooth": args.smooth,
                "normalize": args.normalize,
                "threshold": args.threshold,
            },
            out / "classifier.joblib",
        )
        table.to_csv(out / "importances.csv")
        plot_importances(table, out / "importances.png")
        summary = {
            "scored_data": str(args.scored_data),
            "features": features,
            "smooth": args.smooth,
            "normalize": args.normalize,
            "frames": len(data),
            "videos": int(data["video"].nunique()),
            "anomalous": int(data["y"].sum()),
            "cross_validation": f"StratifiedGroupKFold by video, {n_folds} folds",
            "models": report,
        }
        (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
        rows = pd.DataFrame(
            {
                name: {k: v for k, v in r.items() if k != "confusion_matrix"} | r["confusion_matrix"]
                for name, r in report.items()
            }
        ).T
        (out / "report.md").write_text(
            f"# Anomaly classifiers, grouped by video\n\n{summary['frames']} frames, {summary['videos']} videos, "
            f"{summary['anomalous']} anomalous; {summary['cross_validation']}; features and probabilities "
            f"averaged over {args.smooth} frames, normalized per video: {args.normalize == 'video'}.\n\n"
            f"{rows.round(4).to_markdown()}\n\n## Feature importances (random forest)\n\n"
            f"{table.round(4).to_markdown()}\n"
        )
    print(rows[["roc_auc", "average_precision", "precision", "recall", "f1"]].round(3).to_string())
    print(f"-> {args.model_path}")
    return 0


if __name__ == "__main__":
    run(main)
