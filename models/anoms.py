"""Stage 4: classifiers that turn per-frame metrics into anomaly labels, evaluated by video.

Cross-validation is grouped by video (no video has frames on both sides) and stratified, so that every
training fold holds both classes, and every score comes from `predict_proba`, never from hard labels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from models.cli import progress
from models.errors import PipelineError
from models.scoring import min_max_per_video, smooth


def load_scored(path: str | Path) -> pd.DataFrame:
    """The DataFrame batch_scoring.py wrote: a folder holding df.pkl.gz, or the file itself."""
    path = Path(path)
    file = path / "df.pkl.gz" if path.is_dir() else path
    if not file.is_file():
        raise PipelineError(f"No scored DataFrame at {file}; run batch_scoring.py first.")
    try:
        df = pd.read_pickle(file)
    except Exception as err:
        raise PipelineError(f"Cannot read {file}: {err}") from None
    if not isinstance(df, pd.DataFrame) or "video" not in df:
        raise PipelineError(f"{file} is not a batch_scoring.py DataFrame (no 'video' column).")
    return df


def default_features(df: pd.DataFrame) -> list[str]:
    """The model's metrics as batch_scoring.py wrote them (smoothing is fit_anoms.py's own --smooth)."""
    return [c for c in df.columns if c.startswith("model_") and "_smooth" not in c and not c.endswith("_alarm")]


def prepare_frames(
    df: pd.DataFrame, features: list[str], window: int = 1, need_labels: bool = True, per_video: bool = False
) -> pd.DataFrame:
    """Checks the columns, keeps the predictable frames, applies the smoothing and, with `per_video`, scales
    each feature to [0, 1] within each video (as the regularity score does): error levels differ from one
    video to the next, and a classifier must work on videos it never saw."""
    missing = [c for c in features if c not in df]
    if missing:
        raise PipelineError(f"The DataFrame has no column(s) {missing}; available: {list(df.columns)}")
    if need_labels and "y" not in df:
        raise PipelineError(
            "The DataFrame has no labels (column 'y'); the test videos need ground truth to fit a classifier."
        )
    if need_labels:
        check_labels(df)
    data = df[df["predictable"]] if "predictable" in df else df
    data = smooth(data, features, window).dropna(subset=features)
    if per_video:
        data = data.copy()
        for col in features:  # a feature constant within a video says nothing there: 0
            data[col] = min_max_per_video(data[col], data["video"]).fillna(0.0)
    return data


def check_labels(df: pd.DataFrame) -> None:
    """Raises a `PipelineError` naming the rows whose label (column 'y') is not 0 or 1, NaN included."""
    bad = df[~df["y"].isin([0, 1])]
    if len(bad):
        where = ", ".join(
            f"row {i}"
            + (f" (video {r['video']}, frame {r['frame']})" if "frame" in bad else f" (video {r['video']})")
            + f": {r['y']}"
            for i, r in bad.head(3).iterrows()
        )
        raise PipelineError(
            f"Column 'y' must hold 0 or 1 in every row, but {len(bad)} of {len(df)} rows do not: {where}"
            + (", ..." if len(bad) > 3 else "")
        )


class BestSingleFeature(ClassifierMixin, BaseEstimator):
    """Baseline: the one feature with the best training AUC, turned into a probability by a logistic fit."""

    def fit(self, X, y):
        X = np.asarray(X, float)
        aucs = np.array([roc_auc_score(y, X[:, j]) for j in range(X.shape[1])])
        self.feature_index_ = int(np.argmax(np.abs(aucs - 0.5)))
        self.train_auc_ = float(max(aucs[self.feature_index_], 1 - aucs[self.feature_index_]))
        self.classes_ = np.unique(y)
        self.logistic_ = LogisticRegression().fit(X[:, [self.feature_index_]], y)
        return self

    def predict_proba(self, X):
        return self.logistic_.predict_proba(np.asarray(X, float)[:, [self.feature_index_]])

    def predict(self, X):
        return self.classes_[(self.predict_proba(X)[:, 1] >= 0.5).astype(int)]


# Smallest leaf of the forest, as a fraction of the training frames. Neighbouring frames are near copies,
# so a leaf of a few frames memorises a moment of one video: on Ped2 (five training videos per fold) leaves
# of 5% scored 0.005-0.015 AUC above leaves of 5 frames for each of seven trained models, 10% a little more,
# and 30% collapsed (docs/results.md).
MIN_LEAF_FRACTION = 0.05


def make_models(seed: int = 0) -> dict[str, Pipeline]:
    """The random forest and its two baselines, each a scikit-learn Pipeline with scaling."""
    forest = RandomForestClassifier(
        n_estimators=300,
        min_samples_leaf=MIN_LEAF_FRACTION,
        class_weight="balanced",
        random_state=seed,
        n_jobs=-1,
    )
    return {
        "random_forest": Pipeline(
            [
                ("scale", StandardScaler()),
                ("model", forest),
            ]
        ),
        "logistic_regression": Pipeline(
            [
                ("scale", StandardScaler()),
                ("model", LogisticRegression(max_iter=2000, class_weight="balanced")),
            ]
        ),
        "best_single_metric": Pipeline([("scale", StandardScaler()), ("model", BestSingleFeature())]),
    }


def video_folds(y: np.ndarray, groups: np.ndarray, n_splits: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cross-validation folds by video whose training sides all hold both classes.

    `StratifiedGroupKFold` keeps each video on one side and spreads the anomalous frames over the folds;
    with `n_splits` (at most the number of videos) folds, one whose training side would lack a class is
    retried with fewer folds, down to 2.

    Returns:
        (train indices, test indices) per fold; the test sides cover every frame once.

    Raises:
        PipelineError: fewer than 2 videos, or a class found in one video only, or no number of folds that
            works: the message says why no evaluation by video is possible.
    """
    y, groups = np.asarray(y), np.asarray(groups)
    videos = np.unique(groups)
    if len(videos) < 2:
        raise PipelineError(
            f"Only {len(videos)} video in the DataFrame: a split by video needs at least 2 test videos."
        )
    for label, name in ((1, "anomalous"), (0, "normal")):
        holders = np.unique(groups[y == label])
        if len(holders) == 0:
            raise PipelineError(f"No video has {name} frames: a classifier needs both classes.")
        if len(holders) == 1:
            raise PipelineError(
                f"Cannot evaluate by video: only video {holders[0]} of {len(videos)} has {name} frames, so the "
                f"classifier tested on it would train without any; evaluation by video needs {name} frames in "
                "at least 2 videos."
            )
    for k in range(min(n_splits, len(videos)), 1, -1):
        with warnings.catch_warnings():  # "the least populated class has only N members": frames, not videos
            warnings.filterwarnings("ignore", "The least populated class", UserWarning)
            folds = list(StratifiedGroupKFold(n_splits=k).split(np.zeros(len(y)), y, groups))
        if all(len(np.unique(y[train])) == 2 for train, _ in folds):
            return folds
    raise PipelineError(
        f"Cannot evaluate by video: every split of the {len(videos)} videos into 2 to {min(n_splits, len(videos))} "
        "folds leaves a training fold with one class only."
    )


def classification_report(y: np.ndarray, proba: np.ndarray, threshold: float) -> dict:
    pred = (proba >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {
        "roc_auc": float(roc_auc_score(y, proba)),
        "average_precision": float(average_precision_score(y, proba)),
        "threshold": threshold,
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def smooth_probabilities(proba: np.ndarray, videos, window: int) -> np.ndarray:
    """A classifier's probabilities averaged over `window` centred frames of the same video, as its features
    are: an anomaly spans tens of frames, while frame-by-frame probabilities flicker. On Ped2 (15 frames,
    features smoothed as well) this added 0.004-0.013 AUC to the forest for each of eight scored full-size
    runs (docs/results.md)."""
    return smooth(pd.DataFrame({"video": np.asarray(videos), "p": proba}), ["p"], window)["p"].to_numpy()


def evaluate_by_video(
    data: pd.DataFrame,
    features: list[str],
    seed: int = 0,
    n_splits: int = 5,
    threshold: float = 0.5,
    smooth_window: int = 1,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Out-of-fold probabilities of each model with folds by video (`video_folds`; averaged over
    `smooth_window` centred frames of each video, `smooth_probabilities`), and their report.

    Raises:
        PipelineError: fewer than two videos, labels of one class only, or folds that cannot keep both
            classes in training.
    """
    y, groups = data["y"].to_numpy().astype(int), data["video"].to_numpy()
    if len(np.unique(y)) < 2:
        raise PipelineError(
            f"All {len(y)} frames have label {y[0] if len(y) else '?'}: a classifier needs both classes."
        )
    cv = video_folds(y, groups, n_splits)
    X = data[features].to_numpy(float)
    report, probas = {}, {}
    models = make_models(seed)
    for name in progress(list(models), desc="classifiers", unit="classifier"):
        proba = cross_val_predict(models[name], X, y, groups=groups, cv=cv, method="predict_proba")[:, 1]
        proba = smooth_probabilities(proba, groups, smooth_window)
        probas[name] = proba
        report[name] = classification_report(y, proba, threshold)
    return report, probas


def copy_features(df: pd.DataFrame, features: list[str]) -> list[str]:
    """The copy-last-frame baseline's columns that match `features` (`model_mse` -> `copy_mse`), where the
    DataFrame has them: batch_scoring.py computes every error metric for the frame copied from the one
    before as well, so a classifier on those columns shows what the model's predictions add."""
    matched = [f"copy_{c[len('model_') :]}" for c in features if c.startswith("model_")]
    return [c for c in matched if c in df]


def best_model(report: dict[str, dict]) -> str:
    """The classifier with the highest cross-validated ROC AUC (the first listed, on a tie)."""
    return max(report, key=lambda name: report[name]["roc_auc"])


def held_out_importances(
    name: str,
    data: pd.DataFrame,
    features: list[str],
    folds: list[tuple[np.ndarray, np.ndarray]],
    seed: int = 0,
    n_repeats: int = 5,
) -> pd.DataFrame:
    """Permutation importance of each feature on held-out videos: for each fold, classifier `name` is fitted
    on the training videos, and each feature's values are shuffled among the frames of the held-out videos
    (`n_repeats` times); the importance is the drop in ROC AUC there, averaged over the folds.

    Frames the classifier was fitted on would reward what it memorised; held-out videos measure what
    carries over to videos it never saw. A fold whose held-out videos hold one class only has no AUC and is
    left out; `table.attrs["folds"]` counts those used.

    Returns:
        One row per feature, sorted by `permutation_auc_drop` (the mean over folds), with its standard
        deviation over folds, `permutation_auc_drop_std`.
    """
    from sklearn.inspection import permutation_importance

    X, y = data[features].to_numpy(float), data["y"].to_numpy().astype(int)
    drops = []
    usable = [(train, test) for train, test in folds if len(np.unique(y[test])) == 2]
    for train, test in progress(usable, desc="importances", unit="fold"):
        model = make_models(seed)[name].fit(X[train], y[train])
        perm = permutation_importance(
            model, X[test], y[test], scoring="roc_auc", n_repeats=n_repeats, random_state=seed, n_jobs=1
        )
        drops.append(perm.importances_mean)
    values = np.asarray(drops) if drops else np.full((1, len(features)), np.nan)
    table = pd.DataFrame(
        {"permutation_auc_drop": values.mean(axis=0), "permutation_auc_drop_std": values.std(axis=0)},
        index=pd.Index(features, name="feature"),
    ).sort_values("permutation_auc_drop", ascending=False)
    table.attrs = {"folds": len(drops), "folds_in_all": len(folds), "n_repeats": n_repeats, "classifier": name}
    return table
