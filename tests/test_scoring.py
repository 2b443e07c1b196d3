import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_script
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from models.data.store import load_labels, load_split
from models.scoring import anomaly_score, equal_error_rate, error_metrics, evaluate, min_max_per_video


def run_scoring(data_root, dataset, model_dir, out, *options):
    """batch_scoring.py from the command line, as a user runs it."""
    return run_script(
        "batch_scoring.py",
        "--preprocessed_data",
        data_root,
        "--dataset",
        dataset,
        "--model_dir",
        model_dir,
        "--scored_data",
        out,
        *options,
    )


def test_error_metrics_on_hand_made_arrays():
    frames = np.zeros((1, 2, 2, 1), np.float32)
    pred = np.array([0.0, 0.0, 0.0, 1.0], np.float32).reshape(1, 2, 2, 1)
    m = error_metrics(frames, pred, patch=1)
    assert m["mse"][0] == pytest.approx(0.25)
    assert m["p_50"][0] == 0 and m["p_99"][0] == pytest.approx(0.97)
    assert m["std"][0] == pytest.approx(np.sqrt(0.1875))
    assert m["psnr"][0] == pytest.approx(10 * np.log10(4))
    assert m["patch_max"][0] == 1.0
    assert error_metrics(frames, pred, patch=2)["patch_max"][0] == pytest.approx(0.25)


def test_min_max_per_video():
    values = pd.Series([1.0, 3.0, 2.0, 10.0, 20.0])
    videos = pd.Series(["a", "a", "a", "b", "b"])
    assert min_max_per_video(values, videos).tolist() == [0.0, 1.0, 0.5, 0.0, 1.0]


def test_auc_and_eer_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    y = np.array([0, 0, 1, 1, 0, 1, 0, 1] * 5)
    score = y + rng.normal(0, 0.8, len(y))
    df = pd.DataFrame(
        {"video": ["a"] * 20 + ["b"] * 20, "y": y, "predictable": True, "model_mse": score, "model_psnr": -score}
    )
    res = evaluate(df, ["model_mse", "model_psnr"])
    assert res.loc["model_mse", "micro_auc"] == pytest.approx(roc_auc_score(y, score))
    assert res.loc["model_psnr", "micro_auc"] == pytest.approx(roc_auc_score(y, score))  # PSNR is negated
    macro = np.mean([roc_auc_score(y[:20], score[:20]), roc_auc_score(y[20:], score[20:])])
    assert res.loc["model_mse", "macro_auc"] == pytest.approx(macro)
    fpr, tpr, _ = roc_curve(y, score)
    i = np.argmin(np.abs(1 - tpr - fpr))
    assert equal_error_rate(y, score) == pytest.approx((fpr[i] + 1 - tpr[i]) / 2)
    assert equal_error_rate(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 0.0


@pytest.fixture(scope="module")
def scored(trained, prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored") / "s"
    done = run_scoring(
        prepared.parent,
        prepared.name,
        trained,
        out,
        "--batch_size",
        "3",
        "--smooth",
        "5",
        "--warmup",
        "2",
        "--save_prediction_error_video_frames",
        "--plot_videos",
        "Test002",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "frames/s" in done.stdout and "offline: regularity" in done.stdout
    return out


def test_every_test_frame_once_with_its_label(scored, prepared):
    df = pd.read_pickle(scored / "df.pkl.gz")
    X, sources = load_split(prepared, "test")
    assert len(df) == len(X) and (df["video"].to_numpy() == sources).all()
    assert (df["y"].to_numpy() == load_labels(prepared)).all()
    assert df.groupby("video")["frame"].apply(lambda f: f.tolist() == list(range(1, 25))).all()
    # Frame t is predicted from frames up to t - 1 (the default horizon), and scored once the model has seen
    # 2 frames (--warmup 2): the first 2 frames of each video get no score.
    first = df["frame"] <= 2
    assert (~df.loc[first, "predictable"]).all() and df.loc[~first, "predictable"].all()
    assert df.loc[first, "model_mse"].isna().all() and df.loc[~first, "model_mse"].notna().all()
    assert df["video"].dtype == object  # readable where pandas has no pyarrow


def test_baseline_is_difference_to_previous_frame(scored, prepared):
    df = pd.read_pickle(scored / "df.pkl.gz")
    X, _ = load_split(prepared, "test")
    frames = X.astype(np.float32) / 255
    i = 30  # Test002, frame 7
    assert df.loc[i, "video"] == "Test002" and df.loc[i, "frame"] == 7
    assert df.loc[i, "copy_mse"] == pytest.approx(float(((frames[i] - frames[i - 1]) ** 2).mean()), rel=1e-5)


def test_smoothed_scores_are_centred_means_within_a_video(scored):
    df = pd.read_pickle(scored / "df.pkl.gz")
    video = df[df["video"] == "Test002"]
    raw, smoothed = video["model_patch_max"].to_numpy(), video["model_patch_max_smooth5"].to_numpy()
    assert smoothed[10] == pytest.approx(np.nanmean(raw[8:13]))
    assert smoothed[3] == pytest.approx(np.nanmean(raw[2:6]))  # frames 1-2 have no score and do not count
    assert np.isnan(raw[:2]).all() and np.isnan(smoothed[:2]).all()
    assert smoothed[-1] == pytest.approx(np.nanmean(raw[-3:]))  # and at the end: it never reaches another video
    # Smoothed regularity: the PSNR's centred mean, then scaled to [0, 1] within the video.
    # (of the PSNR without its dependence on the frames of context, `models.calibration`)
    psnr = pd.Series(video["model_psnr_ctx"].to_numpy()).rolling(5, center=True, min_periods=1).mean()
    psnr[:2] = np.nan
    expected = (psnr - psnr.min()) / (psnr.max() - psnr.min())
    np.testing.assert_allclose(video["model_regularity_smooth5"].to_numpy(), expected.to_numpy(), rtol=1e-6)
    assert np.nanmin(expected) == 0 and np.nanmax(expected) == 1
    summary = json.loads((scored / "metrics.json").read_text())
    assert summary["smooth"] == 5 and "copy_patch_max_smooth5" in summary["metrics"]
    # Smoothed regularity is still "higher is normal": evaluated negated, like the raw score.
    data = df[df["predictable"]]
    auc = roc_auc_score(data["y"], -data["copy_regularity_smooth5"])
    assert summary["metrics"]["copy_regularity_smooth5"]["micro_auc"] == pytest.approx(auc)


def test_outputs(scored):
    summary = json.loads((scored / "metrics.json").read_text())
    assert summary["training"]["nt"] == 4  # the scores say which training run made them
    assert summary["window"] == 4  # and, by default, were predicted in windows of the training length
    assert summary["horizon"] == 1 and summary["per_window"] == 2  # by default the next frame, 2 per 4-frame window
    assert summary["warmup"] == 2
    df = pd.read_pickle(scored / "df.pkl.gz")
    data = df[df["predictable"]]
    for col in ("model_regularity", "copy_regularity", "model_mse", "model_E2", "copy_patch_max"):
        valid = data[data[col].notna()]  # every frame pooled, the score oriented so that higher is anomalous
        expected = roc_auc_score(valid["y"], anomaly_score(valid, col))
        assert summary["metrics"][col]["micro_auc"] == pytest.approx(expected)
    # Oriented as the error: a PSNR is -10 log10 of the frame's mean squared error (the context-corrected one
    # too, up to an offset per context length), the regularity its scaling within each video.
    # (The smoothed ones keep their metric's orientation: test_smoothed_scores_are_centred_means_within_a_video.)
    for col in ("model_psnr", "model_psnr_ctx", "model_regularity"):
        assert anomaly_score(data, col).corr(data["model_mse"], method="spearman") > 0.5, col
    for name in ("metrics.md", "roc.png", "scores.png", "Test002_prediction_error.gif"):
        assert (scored / name).is_file(), name
    gif = Image.open(scored / "Test002_prediction_error.gif")  # 16x24 frames, 3 panels, scaled 15x to 240
    assert gif.size == (3 * 24 * 15, 240 + 24) and gif.n_frames > 1  # under a 24-pixel strip of labels
    report = (scored / "metrics.md").read_text()
    assert "| regularity" in report and "- fps: 10 frames/s\n" in report  # one rate for every video


def test_gifs_of_a_video_that_is_not_scored_are_refused_before_scoring(prepared, trained, tmp_path):
    out = tmp_path / "scored"
    done = run_scoring(
        str(prepared.parent), prepared.name, str(trained), str(out), "--save_prediction_error_video_frames",
        "--plot_videos", "Test002,Test01",
    )  # fmt: skip
    assert done.returncode == 2 and not out.exists()
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith("--plot_videos names Test01: not among the videos scored (Test001, Test002, Test003, Test004).")
    )


def test_model_and_data_of_different_size(trained, synthetic_root, tmp_path):
    from models.data.prepare import PrepareConfig, prepare

    prepare(synthetic_root, tmp_path / "pre" / "Big", PrepareConfig(size=(24, 32), n_layers=3, workers=1))
    out = tmp_path / "scored"
    done = run_scoring(str(tmp_path / "pre"), "Big", str(trained), str(out))
    assert done.returncode == 2 and "(16, 24, 1)" in done.stderr and "(24, 32, 1)" in done.stderr
    assert not out.exists()


def test_missing_model_folder(prepared, tmp_path):
    done = run_scoring(str(prepared.parent), prepared.name, str(tmp_path / "none"), str(tmp_path / "s"))
    assert done.returncode == 2 and "run train.py first" in done.stderr and not (tmp_path / "s").exists()


def test_whole_videos_through_a_model_of_short_windows_are_scored_with_a_warning(prepared, trained, tmp_path):
    done = run_scoring(prepared.parent, prepared.name, trained, tmp_path / "s", "--window", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--window 0 runs whole videos through a model trained on 4-frame sequences" in done.stderr
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["window"] == 0


def test_negative_window_is_refused(prepared, trained, tmp_path):
    out = tmp_path / "s"
    done = run_scoring(prepared.parent, prepared.name, trained, out, "--window", "-3")
    assert done.returncode == 2 and "--window" in done.stderr and "-3" in done.stderr and not out.exists()


def test_without_labels_metrics_are_still_written(trained, prepared, tmp_path):
    import shutil

    unlabelled = tmp_path / "pre" / prepared.name
    shutil.copytree(prepared, unlabelled)
    (unlabelled / "y_test.hkl").unlink()
    out = tmp_path / "scored"
    done = run_scoring(tmp_path / "pre", prepared.name, trained, out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "evaluation skipped" in done.stdout
    df = pd.read_pickle(out / "df.pkl.gz")
    assert "y" not in df and df["model_regularity"].notna().sum() == len(df) - 4  # the first frame of each video
    assert "metrics" not in json.loads((out / "metrics.json").read_text())


def test_windowed_prediction_sees_only_its_window(trained, prepared):
    from models.inference import load_predictor, predict_videos

    model, _, _ = load_predictor(trained)
    X, sources = load_split(prepared, "test")
    X, sources = X[:48], sources[:48]  # two 24-frame videos
    whole, whole_err, _ = predict_videos(model, X, sources, batch_size=2, window=0)
    windowed, windowed_err, _ = predict_videos(model, X, sources, batch_size=5, window=4)
    # Up to the window's length a window holds the whole history, so the two agree ...
    for start in (0, 24):
        np.testing.assert_allclose(windowed[start : start + 4], whole[start : start + 4], atol=1e-5)
        np.testing.assert_allclose(windowed_err[start : start + 4], whole_err[start : start + 4], atol=1e-5)
    # ... later, frame t is the last step of a run over frames t-3..t alone.
    t = 24 + 13
    alone, _, _ = predict_videos(model, X[t - 3 : t + 1], sources[t - 3 : t + 1], window=0)
    np.testing.assert_allclose(windowed[t], alone[-1], atol=1e-5)
    assert np.abs(windowed[t] - whole[t]).max() > 1e-4  # the longer history does change the prediction
    with pytest.raises(Exception, match="window"):
        predict_videos(model, X, sources, window=-1)


def test_window_rows_score_every_frame_once_from_enough_earlier_frames():
    from models.inference import window_rows

    sources = np.array(["a"] * 23 + ["b"] * 3 + ["c"] * 12)
    first = {"a": 0, "b": 23, "c": 26}
    window = 6
    for per_window in (1, 2, 4):
        starts, stops, steps = window_rows(sources, window, per_window)
        frames = starts[:, None] + steps
        valid = steps >= 0
        assert sorted(frames[valid]) == list(range(len(sources)))  # each frame once
        assert (steps < window).all() and (frames < stops[:, None])[valid].all()
        for start, row, step in zip(starts, frames, steps, strict=True):
            for t, k in zip(row[step >= 0], step[step >= 0], strict=True):
                video_start = first[sources[t]]
                assert sources[start] == sources[t] and start >= video_start
                # the first frames of a video share its first window; later ones see window - per_window or more
                assert start == video_start if t - video_start < window else k >= window - per_window
        # video a: 23 frames, the first 6 in ceil(6 / per_window) rows, the other 17 in ceil(17 / per_window)
        assert (sources[starts] == "a").sum() == -(-window // per_window) + -(-17 // per_window)


def test_a_call_is_padded_to_a_power_of_two_rows_and_scores_do_not_depend_on_it(trained, prepared):
    """A short clip is scored in a call of 8 rows, not a whole batch of 64, with the same scores."""
    from models.inference import load_predictor, padded_rows, predict_videos

    assert [padded_rows(n, 64) for n in (1, 7, 8, 9, 33, 64)] == [8, 8, 8, 16, 64, 64]
    assert [padded_rows(n, 5) for n in (1, 5)] == [5, 5]  # never above the batch size
    model, _, _ = load_predictor(trained)
    X, sources = load_split(prepared, "test")
    X, sources = X[:24], sources[:24]  # 12 rows of 4-frame windows, 2 frames each: one call of 16 rows
    padded, padded_err, _ = predict_videos(model, X, sources, batch_size=64, window=4, per_window=2)
    tight, tight_err, _ = predict_videos(model, X, sources, batch_size=12, window=4, per_window=2)
    np.testing.assert_allclose(padded, tight, atol=1e-6)
    np.testing.assert_allclose(padded_err, tight_err, atol=1e-6)


def test_several_frames_per_window_are_each_predicted_from_their_own_window(trained, prepared):
    from models.inference import load_predictor, predict_videos

    model, _, _ = load_predictor(trained)
    X, sources = load_split(prepared, "test")
    X, sources = X[:48], sources[:48]  # two 24-frame videos
    one, one_err, _ = predict_videos(model, X, sources, batch_size=5, window=4)
    two, two_err, _ = predict_videos(model, X, sources, batch_size=3, window=4, per_window=2)
    for start in (0, 24):  # the first window holds the whole history, whichever step scores the frame
        np.testing.assert_allclose(two[start : start + 4], one[start : start + 4], atol=1e-5)
        np.testing.assert_allclose(two_err[start : start + 4], one_err[start : start + 4], atol=1e-5)
    # Later, frames 4, 5 | 6, 7 | ... of a video share the 4-frame window that ends at the second of them.
    for t, window_start in ((24 + 12, 24 + 10), (24 + 13, 24 + 10), (23, 20)):
        alone, alone_err, _ = predict_videos(model, X[window_start : t + 1], sources[window_start : t + 1], window=0)
        np.testing.assert_allclose(two[t], alone[-1], atol=1e-5)
        np.testing.assert_allclose(two_err[t], alone_err[-1], atol=1e-5)
    assert np.abs(two[24 + 12] - one[24 + 12]).max() > 1e-4  # 2 frames of history instead of 3
    np.testing.assert_allclose(two[24 + 13], one[24 + 13], atol=1e-5)  # the window's last step: as before
    for kwargs in ({"window": 4, "horizon": 2}, {"window": 0}, {"window": 4, "per_window": 4}):
        with pytest.raises(Exception, match="per window"):
            predict_videos(model, X, sources, **{"per_window": 2, **kwargs})


def test_the_window_scorer_is_built_once_per_model_and_follows_its_weights(trained, prepared):
    from models.inference import _SCORERS, load_predictor, predict_videos
    from models.prednet import find_prednet, predictor

    model, _, _ = load_predictor(trained)
    X, sources = load_split(prepared, "test")
    X, sources = X[:48], sources[:48]
    first, first_err, _ = predict_videos(model, X, sources, batch_size=3, window=4, per_window=2)
    scorer = _SCORERS[find_prednet(model)][(4, 2)]
    again, again_err, _ = predict_videos(model, X, sources, batch_size=3, window=4, per_window=2)
    assert _SCORERS[find_prednet(model)][(4, 2)] is scorer  # compiled once, not once per call
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(again_err, first_err)

    layer = find_prednet(model)
    layer.set_weights([w * 0.5 for w in layer.get_weights()])  # e.g. trained further
    changed, changed_err, _ = predict_videos(model, X, sources, batch_size=3, window=4, per_window=2)
    assert np.abs(changed - first).max() > 1e-3
    fresh, fresh_err, _ = predict_videos(predictor(layer), X, sources, batch_size=3, window=4, per_window=2)
    np.testing.assert_allclose(changed, fresh, atol=1e-6)
    np.testing.assert_allclose(changed_err, fresh_err, atol=1e-6)


def test_predicting_frames_ahead_feeds_the_model_its_own_predictions(trained, prepared):
    from models.inference import load_predictor, predict_videos

    model, _, _ = load_predictor(trained)
    X, sources = load_split(prepared, "test")
    X, sources = X[:24], sources[:24]  # one video
    next_frame, _, _ = predict_videos(model, X, sources, batch_size=5, window=4)
    ahead, ahead_err, _ = predict_videos(model, X, sources, batch_size=5, window=4, horizon=2)
    # Frame 2 from frame 0 alone: the model's prediction of frame 1 stands in for frame 1.
    steps = np.zeros((1, 4, *X.shape[1:]), np.float32)
    steps[0, 0], steps[0, 1], steps[0, 2] = X[0] / 255, next_frame[1], X[2] / 255
    out = model.predict_on_batch(steps)
    np.testing.assert_allclose(ahead[2], np.asarray(out["prediction"])[0, 2], atol=1e-5)
    np.testing.assert_allclose(ahead_err[2], np.asarray(out["error"])[0, 2], atol=1e-5)
    # Later in the video frame t comes from frames t-3 and t-2 alone: t-1 is never seen.
    t = 15
    changed = X.copy()
    changed[t - 1] = 255 - changed[t - 1]
    unseen, _, _ = predict_videos(model, changed, sources, batch_size=5, window=4, horizon=2)
    np.testing.assert_allclose(unseen[t], ahead[t], atol=1e-5)
    assert np.abs(ahead[t] - next_frame[t]).max() > 1e-3  # and the two horizons differ
    changed[t - 2] = 255 - changed[t - 2]
    seen, _, _ = predict_videos(model, changed, sources, batch_size=5, window=4, horizon=2)
    assert np.abs(seen[t] - ahead[t]).max() > 1e-3
    with pytest.raises(Exception, match="window"):
        predict_videos(model, X, sources, window=2, horizon=2)  # no frame of the window left to predict from
    with pytest.raises(Exception, match="horizon"):
        predict_videos(model, X, sources, window=4, horizon=0)


def test_frames_ahead_in_one_call_equal_feeding_predictions_back_call_by_call(trained, prepared):
    from models.inference import load_predictor, predict_videos

    model, _, _ = load_predictor(trained)
    X, sources = load_split(prepared, "test")
    X, sources = X[:24], sources[:24]  # one video
    ahead, ahead_err, _ = predict_videos(model, X, sources, batch_size=5, window=4, horizon=3)
    for t in (3, 10, 23):  # full 4-frame windows: frame t from frame t - 3 alone
        steps = (X[t - 3 : t + 1] / 255.0).astype(np.float32)[None]
        for step in (1, 2):  # the next call reads the prediction of the call before
            steps[0, step] = np.asarray(model.predict_on_batch(steps)["prediction"])[0, step]
        out = model.predict_on_batch(steps)
        np.testing.assert_allclose(ahead[t], np.asarray(out["prediction"])[0, 3], atol=1e-5)
        np.testing.assert_allclose(ahead_err[t], np.asarray(out["error"])[0, 3], atol=1e-5)


def test_horizon_and_warmup_leave_the_first_frames_unscored(trained, prepared, tmp_path):
    out = tmp_path / "s"
    done = run_scoring(prepared.parent, prepared.name, trained, out, "--horizon", "2", "--warmup", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_pickle(out / "df.pkl.gz")
    early = df["frame"] <= 3  # warmup + horizon - 1 frames of each video
    assert (~df.loc[early, "predictable"]).all() and df.loc[~early, "predictable"].all()
    assert df.loc[early, "model_mse"].isna().all() and df.loc[early, "copy_mse"].isna().all()
    summary = json.loads((out / "metrics.json").read_text())
    assert (summary["horizon"], summary["warmup"], summary["window"]) == (2, 2, 4)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--horizon", "0"], "--horizon: must be 1"),
        (["--warmup", "-1"], "--warmup: must be 1"),
        (["--horizon", "4"], "window longer"),
        (["--batch_size", "0"], "--batch_size: must be 1"),
        (["--per_window", "0"], "--per_window: must be 1"),
        (["--per_window", "4"], "scoring 4 frames per window"),
        (["--horizon", "2", "--per_window", "2"], "horizon 1"),
    ],  # the training window is 4 frames
)
def test_bad_scoring_options_are_refused(prepared, trained, tmp_path, options, message):
    out = tmp_path / "s"
    done = run_scoring(prepared.parent, prepared.name, trained, out, *options)
    assert done.returncode == 2 and message in done.stderr and not out.exists()


def test_metrics_computed_on_the_device_equal_numpys(trained, prepared):
    from models.calibration import copy_predictions, local_errors
    from models.inference import load_predictor, score_videos
    from models.prednet import find_prednet

    model, layer, _ = load_predictor(trained)
    assert find_prednet(model) is layer  # the predicting model runs the trained layer: no copy of its weights
    X, sources = load_split(prepared, "test")
    X, sources = X[:48], sources[:48]
    for window, per_window in ((4, 2), (0, 1)):
        out = score_videos(model, X, sources, 5, window, 1, per_window, cell=4, patch=4, maps=True)
        assert set(out) == {"error", "model", "copy", "model_cells", "copy_cells", "prediction", "fps"}
        frames = X.astype(np.float32) / 255
        for source, pred in (("model", out["prediction"]), ("copy", copy_predictions(X, sources))):
            expected = error_metrics(frames, pred, patch=4)
            for name, values in expected.items():  # float32 sums in another order: relative 1e-5
                np.testing.assert_allclose(out[source][name], values, rtol=1e-4, atol=1e-7, err_msg=name)
            np.testing.assert_allclose(out[f"{source}_cells"], local_errors(X, pred, 4), rtol=1e-5, atol=1e-5)
        without = score_videos(model, X, sources, 5, window, 1, per_window, cell=4, patch=4)
        assert "prediction" not in without  # only the metrics come back unless the maps are asked for
        np.testing.assert_array_equal(without["model"]["mse"], out["model"]["mse"])
