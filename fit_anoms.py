"""Stage 4: fit classifiers that turn per-frame metrics into anomaly labels; save the best one.

    python fit_anoms.py --scored_data outputs/scored/UCSDped2 --model_dir outputs/anoms/UCSDped2
    python fit_anoms.py --apply outputs/anoms/UCSDped2 --scored_data outputs/scored/NewCamera

Three classifiers (a random forest, logistic regression, the best single metric) are evaluated by
cross-validation by video (StratifiedGroupKFold: no video on both sides, both classes in every training
fold), with ROC AUC and average precision from predicted probabilities, and each is compared with the same
classifier on the copy-last-frame baseline's metrics (copy_*), which show what the model's predictions add.
The best one by cross-validated ROC AUC (or --classifier) is fitted on all frames and saved. Writes
classifier.joblib, report.json, report.md, importances.csv and importances.png (permutation importance on
held-out videos) to --model_dir. With --apply, scores a new DataFrame from batch_scoring.py with a saved
classifier and writes anomaly_scores.csv beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pandas as pd

from models.args import folder, int_at_least, non_negative_int, probability
from models.cli import choose_dataset, parser, run
from models.config import add_config_option, parse_with_config
from models.errors import PipelineError
from models.io import atomic_dir, atomic_output_file, check_output, check_output_file

log = logging.getLogger(__name__)

CLASSIFIERS = ("random_forest", "logistic_regression", "best_single_metric")  # models.anoms.make_models
SCORED_ROOT = Path("outputs/scored")


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    add_config_option(p, '"classifier": "random_forest"')
    p.add_argument(
        "--scored_data",
        default=None,
        help="folder batch_scoring.py wrote, or its df.pkl.gz (default: outputs/scored/<dataset>)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="names the default folders outputs/scored/<dataset> and outputs/anoms/<dataset> (default: the "
        "--scored_data folder's name; without --scored_data, the only dataset scored in outputs/scored/)",
    )
    p.add_argument(
        "--model_dir",
        "--model_path",
        dest="model_dir",
        type=folder,
        default=None,
        help="output folder (default: outputs/anoms/<dataset>); --model_path is the same option",
    )
    p.add_argument(
        "--features",
        default=None,
        help="comma-separated metric columns (default: every model_ column but the smoothed *_smooth<N> ones: "
        "--smooth smooths here)",
    )
    p.add_argument(
        "--classifier",
        choices=["best", *CLASSIFIERS],
        default="best",
        help="the classifier to save: best is the one with the highest cross-validated ROC AUC",
    )
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
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the forest and of the permutations")
    p.add_argument(
        "--apply", type=folder, default=None, help="score --scored_data with the classifier saved in this folder"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --model_dir (with --apply: anomaly_scores.csv) if an earlier run of this stage wrote it",
    )
    args = parse_with_config(p, argv)
    if args.scored_data is None:
        found = sorted(d.name for d in SCORED_ROOT.glob("*") if (d / "df.pkl.gz").is_file())
        args.dataset = choose_dataset(p, args.dataset, SCORED_ROOT, found, "a folder with df.pkl.gz")
        args.scored_data = str(SCORED_ROOT / args.dataset)
    if args.apply:
        return args
    scored = Path(args.scored_data)
    name = args.dataset or (scored.name if scored.suffix != ".gz" else scored.parent.name)
    args.model_dir = args.model_dir or f"outputs/anoms/{name}"
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
    log.info("scored %d frames, %d called anomalous -> %s", len(out), int(out["anomalous"].sum()), target)
    if bundle.get("normalize") == "video":
        log.warning(
            "this classifier scales each video to [0, 1] (it was fitted with --normalize video), so it assumes "
            "every video holds both normal and anomalous frames: it calls part of an all-normal video anomalous. "
            "For clips that may be all normal, use batch_scoring.py's live score and alarms (score, alarm), or "
            "a classifier fitted with --normalize none."
        )
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.apply:
        return apply(args)
    inputs = [scored_file(args.scored_data)]  # the output may sit beside it, in the scored folder
    check_output(args.model_dir, "fit_anoms", args.overwrite, inputs)
    import joblib

    from models.anoms import (
        best_model,
        copy_features,
        default_features,
        evaluate_by_video,
        held_out_importances,
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
    baseline = copy_features(df, features)
    if args.smooth is None:
        args.smooth = int(df.attrs.get("smooth", 1))
    if args.smooth < 1:
        raise PipelineError(f"--smooth must be 1 (none) or more frames. Received: {args.smooth}")
    # One table for both: the model's and the baseline's classifiers see the same frames and the same folds.
    data = prepare_frames(df, features + baseline, args.smooth, per_video=args.normalize == "video")
    y, videos = data["y"].to_numpy().astype(int), data["video"].to_numpy()
    folds = video_folds(y, videos, args.n_splits)
    asked = min(args.n_splits, data["video"].nunique())
    if len(folds) < asked:
        log.info("%d folds by video instead of %d: with more, a training fold would lack a class", len(folds), asked)
    with atomic_dir(args.model_dir, args.overwrite, stage="fit_anoms", inputs=inputs) as out:
        settings = (args.seed, args.n_splits, args.threshold, args.smooth)
        log.info("cross-validating on the model's %d metrics", len(features))
        report, _ = evaluate_by_video(data, features, *settings)
        copy_report = {}
        if baseline:
            log.info("cross-validating on the copy-last-frame baseline's %d metrics", len(baseline))
            copy_report, _ = evaluate_by_video(data, baseline, *settings)
        chosen = best_model(report) if args.classifier == "best" else args.classifier
        pipeline = make_models(args.seed)[chosen].fit(data[features].to_numpy(float), y)
        table = held_out_importances(chosen, data, features, folds, args.seed)
        joblib.dump(
            {
                "pipeline": pipeline,
                "classifier": chosen,
                "features": features,
                "smooth": args.smooth,
                "normalize": args.normalize,
                "threshold": args.threshold,
            },
            out / "classifier.joblib",
        )
        table.to_csv(out / "importances.csv")
        how = (
            f"held-out permutation importance of the {chosen.replace('_', ' ')}: fitted on the training videos "
            f"of each fold, each feature shuffled {table.attrs['n_repeats']} times among the frames of the "
            f"held-out videos, drop in ROC AUC averaged over {table.attrs['folds']} of {len(folds)} folds"
            + (" (the others held out one class only)" if table.attrs["folds"] < len(folds) else "")
        )
        plot_importances(table, out / "importances.png", chosen, table.attrs["folds"])
        why = "highest cross-validated ROC AUC" if args.classifier == "best" else "named by --classifier"
        summary = {
            "scored_data": str(args.scored_data),
            "features": features,
            "copy_baseline_features": baseline,
            "smooth": args.smooth,
            "normalize": args.normalize,
            "frames": len(data),
            "videos": int(data["video"].nunique()),
            "anomalous": int(y.sum()),
            "cross_validation": f"StratifiedGroupKFold by video, {len(folds)} folds",
            "saved_classifier": chosen,
            "selection": why,
            "models": report,
            "copy_baseline": copy_report,
            "importances": how,
        }
        (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
        rows = _table(report, copy_report, chosen)
        (out / "report.md").write_text(_markdown(summary, rows, table, args))
    log.info(rows.round(3).to_string())
    log.info("saved the %s (%s) -> %s", chosen.replace("_", " "), why, args.model_dir)
    return 0


def _table(report: dict, copy_report: dict, chosen: str) -> pd.DataFrame:
    """One row per classifier: its AUC and AP on the model's metrics, on the copy baseline's, and the gain."""
    rows = pd.DataFrame(
        {
            name: {k: v for k, v in r.items() if k != "confusion_matrix"} | r["confusion_matrix"]
            for name, r in report.items()
        }
    ).T
    rows = rows[["roc_auc", "average_precision", "precision", "recall", "f1", "tn", "fp", "fn", "tp"]]
    if copy_report:
        rows.insert(1, "copy_roc_auc", [copy_report[name]["roc_auc"] for name in rows.index])
        rows.insert(2, "auc_gain", rows["roc_auc"] - rows["copy_roc_auc"])
        rows.insert(4, "copy_average_precision", [copy_report[name]["average_precision"] for name in rows.index])
    rows.index = [f"{name} (saved)" if name == chosen else name for name in rows.index]
    return rows.astype(float)


def _markdown(summary: dict, rows: pd.DataFrame, table: pd.DataFrame, args) -> str:
    baseline = (
        "`copy_*` columns: the same classifier, folds and settings on the copy-last-frame baseline's metrics "
        f"({', '.join(summary['copy_baseline_features'])}); `auc_gain` is the model's ROC AUC minus the baseline's."
        if summary["copy_baseline"]
        else "No copy-last-frame columns in the scored data: no baseline comparison."
    )
    return (
        f"# Anomaly classifiers, cross-validated by video\n\n"
        f"{summary['frames']} frames, {summary['videos']} videos, {summary['anomalous']} anomalous; "
        f"{summary['cross_validation']}; features and probabilities averaged over {args.smooth} frames, "
        f"normalized per video: {args.normalize == 'video'}; threshold {args.threshold:g}.\n\n"
        f"Saved: **{summary['saved_classifier']}** ({summary['selection']}), fitted on all frames."
        + (
            f" Chosen among {len(summary['models'])} on the same folds it is scored on, its figure is a little "
            "optimistic."
            if args.classifier == "best" and len(summary["models"]) > 1
            else ""
        )
        + "\n\n"
        f"{baseline}\n\n{rows.round(4).to_markdown()}\n\n"
        f"## Feature importances\n\n{summary['importances'][0].upper()}{summary['importances'][1:]}; "
        "`_std` is the spread over folds.\n\n"
        f"{table.round(4).to_markdown()}\n"
    )


if __name__ == "__main__":
    run(main)
