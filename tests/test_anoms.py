import json

import joblib
import numpy as np
import pandas as pd
import pytest
from conftest import run_script

import fit_anoms
from models.anoms import best_model, evaluate_by_video, held_out_importances, prepare_frames, video_folds
from models.errors import PipelineError


def frames_table(n_videos=6, n=40, seed=0):
    """Each video is half normal, half anomalous; model_good separates them, model_noise does not."""
    rng = np.random.default_rng(seed)
    rows = []
    for v in range(n_videos):
        y = np.r_[np.zeros(n // 2), np.ones(n // 2)].astype(int)
        rows.append(
            pd.DataFrame(
                {
                    "video": f"Test{v + 1:03d}",
                    "frame": np.arange(1, n + 1),
                    "y": y,
                    "predictable": True,
                    "model_good": y * 2.0 + rng.random(n),
                    "model_noise": rng.random(n),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def test_folds_never_share_a_video_and_train_on_both_classes():
    groups = np.repeat(np.arange(6), 10)
    y = np.zeros(60, int)
    y[[5, 6, 25, 45, 46, 47]] = 1  # anomalies in videos 0, 2 and 4 only
    folds = video_folds(y, groups)
    assert len(folds) == 5 and sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(60))
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert set(y[train]) == {0, 1}


def test_folds_fall_back_to_fewer_when_a_training_fold_would_lack_a_class():
    sizes, anomalous = [17, 19, 14, 14, 27, 22], [2, 18, 0, 0, 0, 0]  # frames per video, the first ones anomalous
    groups = np.repeat(np.arange(6), sizes)
    y = np.concatenate([np.r_[np.ones(a), np.zeros(n - a)] for n, a in zip(sizes, anomalous, strict=True)]).astype(int)
    # 5 stratified folds would test videos 0 and 1 together and train on normal frames only
    folds = video_folds(y, groups, n_splits=5)
    assert len(folds) == 4 and all(set(y[train]) == {0, 1} for train, _ in folds)


def test_one_video_with_anomalies_cannot_be_evaluated():
    groups = np.repeat(["Test001", "Test002"], 10)
    y = np.r_[np.zeros(5), np.ones(5), np.zeros(10)].astype(int)  # Test002 all normal, as the docs allow
    with pytest.raises(PipelineError, match="only video Test001 of 2 has anomalous frames"):
        video_folds(y, groups)


def test_labels_that_are_not_0_or_1_are_named():
    df = frames_table()
    df.loc[[3, 41], "y"] = np.nan
    with pytest.raises(PipelineError, match=r"Column 'y' .* 2 of 240 rows .*row 3 \(video Test001, frame 4\)"):
        prepare_frames(df, ["model_good"])


def test_perfect_feature_gives_auc_one_and_noise_about_half():
    df = frames_table()
    report, probas = evaluate_by_video(df, ["model_good"])
    assert all(r["roc_auc"] == 1.0 for r in report.values())
    noise, _ = evaluate_by_video(df, ["model_noise"])
    assert all(abs(r["roc_auc"] - 0.5) < 0.12 for r in noise.values())
    # scores are probabilities, not hard labels
    assert len(np.unique(probas["logistic_regression"])) > 10


def test_per_video_scaling_removes_each_video_s_error_level():
    """An anomaly raises the error above its own video's level, and levels differ between videos."""
    df = frames_table()
    rng = np.random.default_rng(1)
    level = df["video"].str[-1].astype(int).to_numpy() * 1.5
    df["model_level"] = level + df["y"] + 0.5 * rng.random(len(df))
    data = prepare_frames(df, ["model_level"], per_video=True)
    assert data.groupby("video")["model_level"].agg(["min", "max"]).to_numpy().tolist() == [[0.0, 1.0]] * 6
    scaled, _ = evaluate_by_video(data, ["model_level"])
    raw, _ = evaluate_by_video(prepare_frames(df, ["model_level"]), ["model_level"])
    assert scaled["random_forest"]["roc_auc"] == 1.0 and raw["random_forest"]["roc_auc"] < 0.9


def test_probabilities_are_averaged_over_neighbouring_frames_of_a_video():
    df = frames_table()
    df["model_flicker"] = df["y"] + 2.0 * np.random.default_rng(2).standard_normal(len(df))  # informative, noisy
    raw_report, raw = evaluate_by_video(df, ["model_flicker"])
    report, smoothed = evaluate_by_video(df, ["model_flicker"], smooth_window=5)
    video = (df["video"] == "Test002").to_numpy()
    for name in raw:
        p, q = raw[name][video], smoothed[name][video]
        assert q[10] == pytest.approx(p[8:13].mean())
        assert q[0] == pytest.approx(p[:3].mean())  # frames of the video before it do not count
    assert report["random_forest"]["roc_auc"] > raw_report["random_forest"]["roc_auc"] + 0.05


def test_bad_smoothing_is_refused(tmp_path, capsys):
    frames_table().to_pickle(tmp_path / "df.pkl.gz")
    with pytest.raises(SystemExit) as done:
        fit_anoms.main(["--scored_data", str(tmp_path), "--model_path", str(tmp_path / "a"), "--smooth", "0"])
    assert done.value.code == 2 and "--smooth: must be 1 or more frames" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_bad_input():
    df = frames_table()
    with pytest.raises(PipelineError, match="no labels"):
        prepare_frames(df.drop(columns="y"), ["model_good"])
    with pytest.raises(PipelineError, match="model_missing"):
        prepare_frames(df, ["model_missing"])
    with pytest.raises(PipelineError, match="Only 1 video"):
        evaluate_by_video(df[df["video"] == "Test001"], ["model_good"])
    with pytest.raises(PipelineError, match="both classes"):
        evaluate_by_video(df[df["y"] == 0], ["model_good"])


def test_cli_fits_saves_and_applies(tmp_path):
    df = frames_table()
    df.attrs = {"smooth": 3}  # batch_scoring.py's smoothing, which fit_anoms.py uses by default
    df.to_pickle(tmp_path / "df.pkl.gz")
    out = tmp_path / "anoms"
    done = run_script("fit_anoms.py", "--scored_data", str(tmp_path), "--model_path", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("classifier.joblib", "report.json", "report.md", "importances.csv", "importances.png"):
        assert (out / name).is_file(), name
    importances = pd.read_csv(out / "importances.csv", index_col=0)
    assert importances.index[0] == "model_good"
    bundle = joblib.load(out / "classifier.joblib")
    assert bundle["smooth"] == 3 and bundle["normalize"] == "video"
    data = prepare_frames(df, bundle["features"], bundle["smooth"], per_video=True)
    proba = bundle["pipeline"].predict_proba(data[bundle["features"]].to_numpy(float))[:, 1]
    expected = (
        pd.Series(proba)
        .groupby(data["video"].to_numpy())
        .transform(lambda p: p.rolling(3, center=True, min_periods=1).mean())
    )  # the forest's probabilities, averaged over the same 3 frames of each video as the features
    new = tmp_path / "new"
    new.mkdir()
    df.drop(columns="y").to_pickle(new / "df.pkl.gz")
    done = run_script("fit_anoms.py", "--apply", str(out), "--scored_data", str(new))
    assert done.returncode == 0, done.stderr[-2000:]
    scores = pd.read_csv(new / "anomaly_scores.csv")
    np.testing.assert_allclose(scores["anomaly_probability"], expected)
    warning = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "assumes every video holds both normal and anomalous frames" in warning[0]

    raw = tmp_path / "anoms_raw"  # raw levels: no per-video assumption, nothing to warn of
    done = run_script("fit_anoms.py", "--scored_data", str(tmp_path), "--model_path", str(raw), "--normalize", "none")
    assert done.returncode == 0, done.stderr[-2000:]
    done = run_script("fit_anoms.py", "--apply", str(raw), "--scored_data", str(new), "--overwrite")
    assert done.returncode == 0 and "warning:" not in done.stderr, done.stderr[-2000:]


def test_cli_single_video_is_an_error(tmp_path):
    frames_table(n_videos=1).to_pickle(tmp_path / "df.pkl.gz")
    done = run_script("fit_anoms.py", "--scored_data", str(tmp_path), "--model_path", str(tmp_path / "out"))
    assert done.returncode == 2 and "Only 1 video" in done.stderr and not (tmp_path / "out").exists()


def test_held_out_importance_is_the_auc_lost_on_videos_the_classifier_never_saw():
    """Shuffling the perfect feature among held-out frames takes a 1.0 AUC to chance (a drop of about 0.5);
    shuffling pure noise changes nothing there, though a forest fitted on those frames would have used it."""
    data = frames_table(n_videos=6, n=40)
    features = ["model_good", "model_noise"]
    folds = video_folds(data["y"].to_numpy(), data["video"].to_numpy(), 3)
    table = held_out_importances("random_forest", data, features, folds, seed=0)
    assert table.index[0] == "model_good" and table.attrs["folds"] == 3
    assert table.loc["model_good", "permutation_auc_drop"] == pytest.approx(0.5, abs=0.1)
    assert abs(table.loc["model_noise", "permutation_auc_drop"]) < 0.02


def test_best_model_is_the_highest_auc():
    report = {"random_forest": {"roc_auc": 0.695}, "logistic_regression": {"roc_auc": 0.808}}
    assert best_model(report) == "logistic_regression"  # the case of the issue: the forest was saved regardless
    assert best_model({"random_forest": {"roc_auc": 0.9}, "logistic_regression": {"roc_auc": 0.9}}) == "random_forest"


def test_cli_saves_the_best_classifier_and_compares_with_the_copy_baseline(tmp_path):
    df = frames_table()
    df["copy_good"] = np.random.default_rng(5).random(len(df))  # copying the last frame tells nothing here
    df.to_pickle(tmp_path / "df.pkl.gz")
    out = tmp_path / "anoms"
    done = run_script("fit_anoms.py", "--scored_data", tmp_path, "--model_dir", out, "--features", "model_good")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["copy_baseline_features"] == ["copy_good"]
    for name, scores in report["models"].items():  # the model's metric separates perfectly, the copy's not
        assert scores["roc_auc"] == 1.0 and abs(report["copy_baseline"][name]["roc_auc"] - 0.5) < 0.12
    assert report["saved_classifier"] == "random_forest" and report["selection"] == "highest cross-validated ROC AUC"
    assert "held-out permutation importance" in report["importances"]
    assert "auc_gain" in (out / "report.md").read_text() and "held-out videos" in (out / "report.md").read_text()
    assert f"Chosen among {len(report['models'])} on the same folds" in (out / "report.md").read_text()
    named = tmp_path / "named"
    done = run_script(
        "fit_anoms.py", "--scored_data", tmp_path, "--model_dir", named, "--classifier", "logistic_regression"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    bundle = joblib.load(named / "classifier.joblib")
    assert bundle["classifier"] == "logistic_regression"
    assert type(bundle["pipeline"].named_steps["model"]).__name__ == "LogisticRegression"
    assert json.loads((named / "report.json").read_text())["selection"] == "named by --classifier"
    assert "Chosen among" not in (named / "report.md").read_text()  # named beforehand, not picked on the folds
