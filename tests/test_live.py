"""The live score: calibration on normal video, alarms, and batch_scoring.py --input on real encoded video."""

import json
import shutil

import imageio.v2 as imageio
import numpy as np
import pandas as pd
import pytest
from conftest import run_script, video_with_longer_audio

from models.alarms import AlarmRule, AlarmState, alarm_events, alarm_states, event_metrics
from models.calibration import (
    Calibration,
    LocalNorm,
    NormalTail,
    local_errors,
    mean_spreads,
    threshold_for,
    trailing_count,
    trailing_mean,
)
from models.data.store import load_labels, load_split
from models.errors import PipelineError
from models.inference import frame_contexts, window_rows
from models.report import sawtooth


def test_local_errors_are_log_cell_means():
    frames = np.zeros((1, 4, 4, 1), np.uint8)
    pred = np.zeros((1, 4, 4, 1), np.float32)
    pred[0, :2, :2] = 0.5  # top-left cell: squared error 0.25 everywhere
    pred[0, 2, 2] = 1.0  # bottom-right cell: one pixel of 4 errs by 1
    out = local_errors(frames, pred, cell=2)
    assert out.shape == (1, 2, 2)
    np.testing.assert_allclose(np.exp(out[0]) - 1e-5, [[0.25, 0], [0, 0.25]], atol=1e-6)


def test_local_norm_recovers_place_and_context_levels():
    rng = np.random.default_rng(0)
    mu = rng.normal(-6, 1, (3, 4))
    delta = np.array([1.5, 0.6, 0.0, 0.0])  # early contexts err more; the common ones carry no offset
    contexts = rng.choice(4, 4000, p=[0.05, 0.05, 0.45, 0.45])
    errors = mu[None] + delta[contexts][:, None, None] + rng.normal(0, 0.3, (4000, 3, 4))
    norm = LocalNorm.fit(errors, contexts, 4)
    np.testing.assert_allclose(norm.delta, delta, atol=0.05)
    np.testing.assert_allclose(norm.mu, mu, atol=0.05)
    heat = norm.heat(errors, contexts)  # what is left is the noise
    assert abs(heat.mean()) < 0.02 and abs(heat.std() - 0.3) < 0.01


def test_normal_tail_scores_are_exceedance_in_log10():
    # Normal live values with an exponential distribution: P(value >= x) = exp(-x), exactly.
    tail = NormalTail.fit(-np.log(1 - (np.arange(2000) + 0.5) / 2000))
    score = tail.score(np.array([-1.0, np.log(2), np.log(20), np.log(1e4), np.nan]))
    assert score[0] == 0  # below every normal value: exceeded by all of them
    assert score[1] == pytest.approx(np.log10(2), abs=0.01)  # the median: half the normal frames
    assert score[2] == pytest.approx(np.log10(20), abs=0.02)  # 1 in 20, in the fitted exponential tail
    assert score[3] == pytest.approx(4, abs=0.1)  # 1 in 10,000: beyond the 2000 normal values, extrapolated
    assert np.isnan(score[4])  # a frame without a score gets none
    assert tail.frames == 2000 and tail.observed_fpr == pytest.approx(1 / 2001)  # 1e-4 is beyond the data
    values = np.linspace(-1, 12, 300)
    assert (np.diff(tail.score(values)) >= 0).all()  # monotone
    assert threshold_for(0.01) == pytest.approx(2.0)
    with pytest.raises(Exception, match="false-positive rate"):
        threshold_for(0)


def test_trailing_mean_never_looks_ahead():
    values = np.array([1.0, 2.0, 3.0, np.nan, 5.0, 10.0, 20.0])
    videos = np.array(["a"] * 4 + ["b"] * 3)
    out = trailing_mean(values, videos, 2)
    np.testing.assert_allclose(out, [1.0, 1.5, 2.5, np.nan, 5.0, 7.5, 15.0])
    changed = values.copy()
    changed[2] = 100.0
    np.testing.assert_allclose(trailing_mean(changed, videos, 2)[:2], out[:2])


def test_the_first_frames_of_a_video_reach_the_threshold_as_rarely_as_the_others():
    """A trailing mean over fewer frames strays further: unadjusted, a video's first frame (a mean of one
    frame) would reach a 1% threshold set on 5-frame means of independent normal values about 15% of the
    time. Scaled by the normal spreads of 1- and 5-frame means, every frame reaches it about 1% of the time."""
    rng = np.random.default_rng(0)

    def videos(n, length=50):
        return rng.normal(size=n * length), np.repeat(np.arange(n), length)

    local, names = videos(400)
    spread = mean_spreads(local, names, 5)
    assert spread == pytest.approx([1 / np.sqrt(k) for k in range(1, 6)], rel=0.05)
    tail = NormalTail.fit(trailing_mean(local, names, 5), spread)
    local, names = videos(4000)
    live, counts = trailing_mean(local, names, 5), trailing_count(local, names, 5)
    first, full = counts == 1, counts == 5
    assert first.sum() == 4000 and (counts[:6] == [1, 2, 3, 4, 5, 5]).all()
    scores = tail.score(live, counts)
    assert 0.005 < (scores[first] >= 2).mean() < 0.02 and 0.005 < (scores[full] >= 2).mean() < 0.02
    assert (tail.score(live)[first] >= 2).mean() > 0.1  # without the counts, as calibrations before spread
    assert (scores[full] == tail.score(live)[full]).all()  # full means are scored as before
    # videos too short for two full means: nothing to scale to, so no scaling (not an invented spread)
    short, names = videos(6, length=3)
    assert mean_spreads(short, names, 5) == [] and mean_spreads(np.zeros(100), np.zeros(100), 5) == []
    unscaled = NormalTail.fit(live)  # no spread: the counts change nothing
    assert (unscaled.score(live, counts) == unscaled.score(live)).all()


def test_a_calibration_from_before_the_spreads_scores_as_it_did(trained, tmp_path):
    """calibration.json written before `spread` existed (other model folders) loads, and scores every frame
    as then: without scaling the first frames."""
    data = json.loads((trained / "calibration.json").read_text())
    for tail in data["tails"].values():
        del tail["spread"]
    (tmp_path / "calibration.json").write_text(json.dumps(data))
    old, new = Calibration.load(tmp_path / "calibration.json"), Calibration.load(trained / "calibration.json")
    assert old.tails["model"].spread == [] and len(new.tails["model"].spread) == new.smooth
    live, counts = np.linspace(0, 8, 50), np.tile([1, 2, 3, 4, 5], 10)
    np.testing.assert_array_equal(old.tails["model"].score(live, counts), old.tails["model"].score(live))


def test_contexts_follow_the_windows():
    sources = np.array(["a"] * 11 + ["b"] * 3)
    contexts = frame_contexts(sources, window=4, per_window=2)
    # The first window of a video holds its first 4 frames (contexts 0-3); later frames are the last two
    # steps of 4-frame windows (contexts 2, 3, 2, 3, ...). A video shorter than the window: 0, 1, 2.
    assert contexts.tolist() == [0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 0, 1, 2]
    # The window that scores a frame does not depend on how long the video is (a stream never knows).
    for n in (9, 10, 11):
        starts, _, steps = window_rows(np.array(["a"] * n), 4, 2)
        assert (starts[:, None] + np.where(steps >= 0, steps, -99)).tolist()[:4] == [[0, 1], [2, 3], [4, 5], [6, 7]]
        assert starts.tolist()[:4] == [0, 0, 2, 4]
    assert frame_contexts(sources, window=0).tolist() == list(range(11)) + [0, 1, 2]


def test_alarm_goes_on_after_min_frames_and_off_after_gap():
    rule = AlarmRule(threshold=2.0, min_frames=3, gap=2)
    scores = [0, 3, 3, 3, 1, 3, 1, 1, 1, 3, 3, np.nan, 3]
    state = AlarmState(rule)
    assert [int(state.update(s)) for s in scores] == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1]
    videos = np.array(["a"] * 6 + ["b"] * 7)  # a new video starts from a fresh state
    # b: 1, 1, 1, 3, 3, (no score), 3: the third scored frame over the threshold raises it
    assert alarm_states(np.array(scores, float), videos, rule).tolist() == [0, 0, 0, 1, 1, 1] + [0] * 6 + [1]
    with pytest.raises(Exception, match="min_frames"):
        AlarmRule(2.0, min_frames=0)


def test_events_and_event_metrics_on_a_hand_made_table():
    df = pd.DataFrame(
        {
            "video": ["a"] * 10 + ["b"] * 10,
            "frame": list(range(1, 11)) * 2,
            "y": [0, 0, 0, 1, 1, 1, 1, 0, 0, 0] + [0] * 10,
            "score": [0, 0, 0, 1, 3, 4, 3, 0, 0, 0] + [0, 5, 5, 0, 0, 0, 0, 0, 0, 0],
            "alarm": [0, 0, 0, 0, 0, 1, 1, 1, 0, 0] + [0, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        }
    )
    events = alarm_events(df)
    assert events.values.tolist() == [["a", 6, 8, 6, 4.0], ["b", 2, 3, 2, 5.0]]
    m = event_metrics(df, "alarm", fps=1.0)
    assert m["events"] == 1 and m["detected"] == 1 and m["median_delay_frames"] == 2  # frames 4 -> 6
    assert m["false_alarms"] == 1 and m["normal_minutes"] == pytest.approx(16 / 60)
    assert m["false_alarms_per_minute"] == pytest.approx(60 / 16)
    m = event_metrics(df, "alarm", fps={"a": 1.0, "b": 2.0})  # each video's minutes at its own rate
    assert m["normal_minutes"] == pytest.approx((6 / 1 + 10 / 2) / 60)


def test_sawtooth_measures_dependence_on_context():
    rng = np.random.default_rng(0)
    contexts = np.tile([2, 3], 200)
    mask = np.ones(400, bool)
    noise = rng.normal(size=400)
    assert sawtooth(noise + np.where(contexts == 2, 1.0, 0.0), contexts, mask) > 50  # a period-2 sawtooth
    assert sawtooth(noise, contexts, mask) < 5  # noise alone: F about 1
    # A single video's first window holds contexts seen once (0, 1 here): they are left out, not a NaN.
    once = np.concatenate([[0, 1], contexts])
    shifted = np.concatenate([[0.0, 0.0], noise + np.where(contexts == 2, 1.0, 0.0)])
    assert sawtooth(shifted, once, np.ones(402, bool)) == pytest.approx(
        sawtooth(noise + np.where(contexts == 2, 1.0, 0.0), contexts, mask)
    )
    assert np.isnan(sawtooth(noise[:3], np.array([1, 2, 3]), np.ones(3, bool)))  # no context seen twice


def test_training_writes_a_calibration(trained):
    cal = Calibration.load(trained / "calibration.json")
    assert cal.window == 4 and cal.per_window == 2 and cal.cell == 2  # 16-pixel frames: 8 rows of 2 pixels
    assert cal.threshold == pytest.approx(2.0) and set(cal.norms) == {"model", "copy"}
    assert np.asarray(cal.norms["model"].mu).shape == (8, 12)
    config = json.loads((trained / "config.json").read_text())
    assert len(cal.tails["model"].values) == config["data"]["frames"]["val"] - 1  # each val frame but the first
    spread = cal.tails["model"].spread  # a mean of more frames strays less
    assert len(spread) == cal.smooth and spread[0] > spread[-1] > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fpr": "x"}, r"fpr must be a number in \(0, 1\). Received: 'x'"),
        ({"fpr": 1.5}, r"fpr must be a number in \(0, 1\)"),
        ({"smooth": -5}, "smooth must be a whole number, 1 or more. Received: -5"),
        ({"smooth": 2.5}, "smooth must be a whole number"),
        ({"cell": 0}, "cell must be a whole number, 1 or more"),
        ({"per_window": 9}, r"per_window must be at most the window \(4\)"),
        ({"version": 2}, "calibration version 2; this pipeline reads version 1"),
        ({"norms": []}, r"norms must hold one entry for each of \['model', 'copy'\]"),
        ({"tails": {"model": {"values": []}, "copy": {"values": [1.0]}}}, "tails.model.values must be a non-empty"),
        ({"tails": {"model": {"values": ["a"]}, "copy": {"values": [1.0]}}}, "tails.model.values must be a non-empty"),
        ({"cel": 2}, r"unknown fields \['cel'\]"),
        ({"tails": {"model": {"values": [1.0], "frames": "x"}, "copy": {"values": [1.0]}}}, "tails.model.frames must"),
        ({"tails": {"model": {"values": [1.0], "spread": [1.0]}, "copy": {"values": [1.0]}}}, "spread must hold 5"),
        ({"tails": {"model": {"values": [1.0], "spread": [1, 1, 0, 1, 1]}, "copy": {"values": [1.0]}}}, "positive"),
    ],
)
def test_a_hand_edited_calibration_is_refused_in_one_line(trained, tmp_path, change, message):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(json.loads((trained / "calibration.json").read_text()) | change))
    with pytest.raises(PipelineError, match=message):
        Calibration.load(path)
    norms = json.loads((trained / "calibration.json").read_text())
    norms["norms"]["model"]["mu"] = "x"
    path.write_text(json.dumps(norms))
    with pytest.raises(PipelineError, match="norms.model.mu must be a non-empty array of finite numbers"):
        Calibration.load(path)


def _write_video(path, frames, fps=10):
    codec = "libvpx-vp9" if str(path).endswith(".webm") else "libx264"
    with imageio.get_writer(str(path), fps=fps, codec=codec, quality=9, macro_block_size=4) as w:
        for f in frames:
            w.append_data(np.repeat(f, 3, axis=-1) if f.shape[-1] == 1 else f)


@pytest.fixture(scope="module")
def clips(synthetic_root, tmp_path_factory):
    """Two test videos of the synthetic set as real .mp4 files, one as a folder of frames, and their labels."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("clips")
    test = synthetic_root / "Test"
    for name in ("Test001", "Test002"):
        frames = [np.asarray(Image.open(p).convert("L"))[..., None] for p in sorted((test / name).glob("*.tif"))]
        _write_video(folder / f"{name}.mp4", frames)
    (folder / "cam3").mkdir()
    for p in sorted((test / "Test003").glob("*.tif")):
        Image.open(p).save(folder / "cam3" / f"{p.stem}.png")
    normal = tmp_path_factory.mktemp("normal")
    for name in ("Train001", "Train002"):
        frames = [
            np.asarray(Image.open(p).convert("L"))[..., None]
            for p in sorted((synthetic_root / "Train" / name).glob("*.tif"))
        ]
        _write_video(normal / f"{name}.mp4", frames)
    (folder / "labels.csv").write_text("video,start_frame,end_frame\nTest001,10,24\nTest002,8,24\ncam3,7,24\n")
    return folder, normal


def test_score_any_video(trained, clips, tmp_path):
    folder, _ = clips
    out = tmp_path / "scored"
    inputs = [folder / "Test001.mp4", folder / "Test002.mp4", folder / "cam3"]
    done = run_script(
        "batch_scoring.py", "--model_dir", trained, "--input", *inputs, "--labels", folder / "labels.csv",
        "--scored_data", out, "--overlays", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "frames/s" in done.stdout and "live: calibrated score" in done.stdout
    df = pd.read_pickle(out / "df.pkl.gz")
    assert df["video"].tolist() == ["Test001"] * 24 + ["Test002"] * 24 + ["cam3"] * 24
    assert df.groupby("video")["frame"].apply(lambda f: f.tolist() == list(range(1, 25))).all()
    assert df["y"].sum() == 15 + 17 + 18
    assert set(df["alarm"].unique()) <= {0, 1} and df["score"].notna().sum() == 69  # all but each first frame
    events = pd.read_csv(out / "alarms.csv")
    assert list(events.columns) == ["video", "start_frame", "end_frame", "peak_frame", "peak_score"]
    for _, e in events.iterrows():
        g = df[df["video"] == e["video"]].set_index("frame")
        assert g.loc[e["start_frame"] : e["end_frame"], "alarm"].all()
        assert g.loc[e["peak_frame"], "score"] == pytest.approx(e["peak_score"])
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["threshold"] == pytest.approx(2.0) and summary["alarms"] == len(events)
    assert "live: calibrated score, causal, one threshold" in summary["protocols"]
    for name in ("metrics.md", "scores.png", "roc.png", "calibration.json"):
        assert (out / name).is_file(), name


def test_videos_of_different_frame_rates_keep_their_own(trained, clips, tmp_path):
    """Each input's overlay plays at its own rate, and its normal minutes count at that rate; a folder of
    inputs says what it skipped."""
    folder, _ = clips
    fast = tmp_path / "fast"
    fast.mkdir()
    with imageio.get_reader(str(folder / "Test002.mp4")) as r:
        _write_video(fast / "Test002.webm", [f[..., :1] for f in r], fps=25)  # a WebM (VP9) camera at 25 fps
    (fast / "notes.txt").write_text("not a video\n")
    (fast / "labels.csv").write_text((folder / "labels.csv").read_text())  # the labels, given: not "skipped"
    _write_video(fast / "short.webm", [np.zeros((24, 24, 1), np.uint8)], fps=25)  # nothing before its frame
    out = tmp_path / "scored"
    done = run_script(
        "batch_scoring.py", "--model_dir", trained, "--input", folder / "Test001.mp4", fast, folder / "cam3",
        "--fps", "5", "--labels", fast / "labels.csv", "--scored_data", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped 1 entries of" in done.stderr and "notes.txt" in done.stderr and "labels.csv" not in done.stderr
    assert "too short for a score: short (a video's first scored frame is frame 2)" in done.stderr
    rates = {"Test001": 10.0, "Test002": 25.0, "short": 25.0, "cam3": 5.0}  # cam3: a folder of frames, at --fps
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["fps"] == rates
    assert "- fps: frames/s: Test001 10, Test002 25, short 25, cam3 5\n" in (out / "metrics.md").read_text()
    df = pd.read_pickle(out / "df.pkl.gz")
    normal = df[df["y"] == 0].groupby("video").size()
    minutes = sum(normal[v] / rates[v] for v in rates) / 60
    assert summary["events"]["model"]["normal_minutes"] == pytest.approx(minutes)
    for name, fps in rates.items():
        with imageio.get_reader(str(out / "overlays" / f"{name}.mp4")) as r:
            assert r.get_meta_data()["fps"] == pytest.approx(fps), name
            assert r.get_data(0).shape[-1] == 3  # drawn on the frame in colour
    assert "Test002 25" in (out / "metrics.md").read_text()


def test_sample_fps_scores_a_faster_camera_at_the_model_s_rate(trained, clips, tmp_path):
    """A 30 frames/s camera of the same scene (each frame of cam3 three times) scored with --sample_fps 10 gets
    cam3's scores at 10 frames/s, each on its frame's number in the 30 frames/s video, as are its labels and
    alarms; its overlay plays its 24 frames at 10 frames/s."""
    folder, _ = clips
    fast = tmp_path / "cam3_30"
    fast.mkdir()
    for i, p in enumerate(sorted((folder / "cam3").glob("*.png"))):
        for k in range(3):
            shutil.copy(p, fast / f"{3 * i + k + 1:03d}.png")
    (tmp_path / "cam3.csv").write_text("video,start_frame,end_frame\ncam3,7,24\n")
    (tmp_path / "cam3_30.csv").write_text("video,start_frame,end_frame\ncam3_30,19,72\n")  # the same frames
    runs = {}
    for name, extra in (("cam3", ["--fps", "10"]), ("cam3_30", ["--fps", "30", "--sample_fps", "10"])):
        out = tmp_path / f"scored_{name}"
        done = run_script(
            "batch_scoring.py", "--model_dir", trained, "--input", folder / "cam3" if name == "cam3" else fast,
            "--labels", tmp_path / f"{name}.csv", "--scored_data", out, "--fpr", "0.3", *extra,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = (pd.read_pickle(out / "df.pkl.gz"), pd.read_csv(out / "alarms.csv"), out)
    (slow, slow_alarms, _), (sampled, sampled_alarms, out) = runs["cam3"], runs["cam3_30"]
    assert sampled["frame"].tolist() == list(range(1, 72, 3))
    assert sampled["y"].tolist() == slow["y"].tolist()
    for col in ("score", "alarm", "model_mse", "model_regularity_smooth15"):
        np.testing.assert_allclose(sampled[col], slow[col], atol=1e-6, equal_nan=True, err_msg=col)
    assert len(slow_alarms) > 0  # a low threshold: alarms to compare
    for col in ("start_frame", "end_frame", "peak_frame"):
        assert sampled_alarms[col].tolist() == [1 + 3 * (f - 1) for f in slow_alarms[col]]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["fps"] == {"cam3_30": 10.0} and summary["frame_step"] == {"cam3_30": 3}
    with imageio.get_reader(str(out / "overlays" / "cam3_30.mp4")) as r:
        assert r.get_meta_data()["fps"] == pytest.approx(10) and r.count_frames() == 24


def test_live_score_uses_no_later_frame(trained):
    from models.inference import load_predictor
    from models.live import score_frames

    model, _, _ = load_predictor(trained)
    cal = Calibration.load(trained / "calibration.json")
    X = np.random.default_rng(0).integers(0, 255, (20, 16, 24, 1), dtype=np.uint8)
    sources = np.array(["v"] * 20)
    base, _, _, _ = score_frames(model, X, sources, cal)
    changed = X.copy()
    changed[12:] = 255 - changed[12:]
    after, _, _, _ = score_frames(model, changed, sources, cal)
    for col in ("score", "alarm", "model_live", "copy_score"):
        np.testing.assert_allclose(after[col][:12], base[col][:12], atol=1e-5, err_msg=col)
    assert not np.allclose(after["score"][12:], base["score"][12:])


def test_recalibrate_on_normal_footage(trained, clips, tmp_path):
    folder, normal = clips
    out = tmp_path / "scored"
    done = run_script(
        "batch_scoring.py", "--model_dir", trained, "--input", folder / "Test001.mp4", "--scored_data", out,
        "--calibrate_on", normal, "--fpr", "0.05", "--overlays", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "calibrating on 48 frames of 2 normal videos" in done.stdout
    report = (out / "metrics.md").read_text()
    assert "\n24 frames of 1 video, 23 scored, no labels.\n" in report
    alarms = pd.read_csv(out / "alarms.csv")  # without labels too, metrics.md lists the alarms and the settings
    assert f"{len(alarms)} alarm" in report and "## Settings" in report and "- fpr: 0.05" in report
    # 46 scored frames (each video's first has no score) at --fpr 0.05 put 2.3 over the threshold: too few, and
    # said so (10 need 200 frames)
    assert "rests on 46 scored normal frames: at a false-positive rate of 0.05 about 2.3" in done.stderr
    assert "(200 frames or more)" in done.stderr
    cal = Calibration.load(out / "calibration.json")
    assert cal.fitted_on["frames"] == 48 and cal.threshold == pytest.approx(-np.log10(0.05))
    # Its tail is the normal footage's own: scored against it, about 5% of those frames pass the threshold.
    values = np.asarray(cal.tails["model"].values)
    assert (cal.tails["model"].score(values) >= cal.threshold).mean() == pytest.approx(0.05, abs=0.03)
    assert "no labels" in done.stdout


def test_inputs_of_one_name_in_different_folders_are_named_after_their_folder(tmp_path):
    from models.data.inputs import find_inputs
    from models.errors import PipelineError

    for cam in ("cam1", "cam2", "x/cam1", "y/cam1"):
        (tmp_path / cam).mkdir(parents=True)
        (tmp_path / cam / "today.mp4").write_bytes(b"")  # (not opened to be found)
    videos = find_inputs([tmp_path / "cam1" / "today.mp4", tmp_path / "cam2"])
    assert [v.name for v in videos] == ["cam1_today", "cam2_today"]
    (tmp_path / "recordings").mkdir()  # a folder of camera folders: their videos
    for cam in ("camA", "camB"):
        (tmp_path / "recordings" / cam).mkdir()
        (tmp_path / "recordings" / cam / "clip.mp4").write_bytes(b"")
    assert [v.name for v in find_inputs([tmp_path / "recordings"])] == ["camA_clip", "camB_clip"]
    with pytest.raises(PipelineError, match="both named 'cam1_today'"):  # their folders share a name too
        find_inputs([tmp_path / "x" / "cam1", tmp_path / "y" / "cam1"])
    (tmp_path / "cam1" / "today.webm").write_bytes(b"")  # one name in one folder: named after the suffix too
    videos = find_inputs([tmp_path / "cam1", tmp_path / "cam2"])
    assert [v.name for v in videos] == ["cam1_today_mp4", "cam1_today_webm", "cam2_today"]
    assert [v.name for v in find_inputs([tmp_path / "cam1"])] == ["today_mp4", "today_webm"]


def test_input_errors(trained, clips, tmp_path):
    folder, _ = clips
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "labels.csv").write_text("video,start_frame,end_frame\ntest001,3,9\n")  # a wrong case
    cases = [
        (
            ["--input", folder / "Test001.mp4", "--labels", tmp_path / "labels.csv"],
            "names videos that are not among the inputs: ['test001'] (the inputs: Test001).",
        ),
        (["--input", tmp_path / "missing.mp4"], "does not exist"),
        (["--input", tmp_path / "notes.txt"], "is not a video file"),
        (["--input", folder / "Test001.mp4", folder / "Test001.mp4"], "Test001.mp4 is given twice"),
        (["--input", folder / "Test001.mp4", "--fpr", "2"], "--fpr"),
        (["--labels", folder / "labels.csv"], "--labels: goes with --input"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        done = run_script("batch_scoring.py", "--model_dir", trained, "--scored_data", out, *extra)
        assert done.returncode == 2 and message in done.stderr, (extra, done.stderr[-500:])
        assert not out.exists()


def test_a_cut_video_or_a_longer_audio_track_is_scored_with_a_warning(tmp_path, caplog):
    """Frames short of the container's count (a file cut off, an audio track that outlasts the video): the
    frames that decode are scored, and the warning says how many the container reports."""
    from models.scoring_run import _read_videos

    audio = video_with_longer_audio(tmp_path / "audio.mp4")  # 20 frames, 5 s of sound
    noise = np.random.default_rng(0).integers(0, 256, (20, 32, 48, 3), np.uint8)  # every frame's data its own
    _write_video(tmp_path / "cut.mkv", noise)
    data = (tmp_path / "cut.mkv").read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        read = _read_videos([audio, tmp_path / "cut.mkv"], (16, 24), 1, 10.0)
    X, sources = read.X, read.sources
    kept = int((sources == "cut").sum())
    assert (sources == "audio").sum() == 20 and 0 < kept < 20 and len(X) == 20 + kept
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("audio.mp4: 20 frames decoded but its container reports 50" in w for w in warnings), warnings
    assert any(f"cut.mkv: {kept} frames decoded but its container reports 20" in w for w in warnings), warnings


def test_prepared_dataset_scores_carry_the_live_columns(trained, prepared, tmp_path):
    out = tmp_path / "s"
    done = run_script(
        "batch_scoring.py", "--preprocessed_data", prepared.parent, "--dataset", prepared.name,
        "--model_dir", trained, "--scored_data", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_pickle(out / "df.pkl.gz")
    X, _ = load_split(prepared, "test")
    assert len(df) == len(X) and (df["y"].to_numpy() == load_labels(prepared)).all()
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["pixel_auroc"]) == {"model_heat", "copy_heat"}  # the synthetic set has masks
    # The calibration removes the context dependence of windowed scoring from the live score.
    assert summary["sawtooth"]["model_score"] < summary["sawtooth"]["model_psnr"]


def test_labels_of_input_videos_from_a_ucsd_m_file(tmp_path):
    """A UCSD .m file's entries go to the input videos in their names' natural order (Test2 before Test10),
    as data_preparation.py reads it; a count that does not match is refused."""
    from models.data.index import Video
    from models.data.inputs import input_labels
    from models.errors import PipelineError

    videos = [Video("Test10", "test", tmp_path), Video("Test2", "test", tmp_path)]  # in the order given
    lengths = {"Test10": 6, "Test2": 5}
    m = tmp_path / "gt.m"
    m.write_text("TestVideoFile{end+1}.gt_frame = [2:3];\nTestVideoFile{end+1}.gt_frame = [5:6];\n")
    y = input_labels(videos, lengths, m)
    assert y.tolist() == [0, 0, 0, 0, 1, 1] + [0, 1, 1, 0, 0]  # Test10 (2nd entry), then Test2 (1st)
    m.write_text("TestVideoFile{end+1}.gt_frame = [2:3];\n")
    with pytest.raises(PipelineError, match="has 1 entries but there are 2 input videos"):
        input_labels(videos, lengths, m)
