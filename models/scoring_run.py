"""What batch_scoring.py does, step by step: gather the frames (a prepared test set, or any videos), the
model and its calibration; score; write the table, the alarms, the reports, the plots and the overlays."""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.calibration import DEFAULT_FPR, FILENAME, Calibration
from models.cli import progress
from models.data import frames as frame_io
from models.data import store
from models.data.index import Video
from models.data.inputs import find_inputs, frame_step, input_labels, listed, video_fps
from models.errors import PipelineError
from models.io import atomic_file
from models.report import count

log = logging.getLogger(__name__)


@dataclass
class ScoringInputs:
    """The frames to score (the model's size), their labels and masks if any, and the model."""

    X: np.ndarray
    sources: np.ndarray
    y: np.ndarray | None
    masks: np.ndarray | None
    fps: dict[str, float]  # video -> frames per second scored
    title: str
    model: object
    config: dict
    calibration: Calibration
    videos: dict[str, Video] = field(default_factory=dict)  # video -> where its frames are (--input)
    metadata: dict = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)  # video -> every how many of its frames is scored (1)


@dataclass
class _Read:
    """Videos read for scoring (`_read_videos`)."""

    videos: list[Video]
    X: np.ndarray
    sources: np.ndarray
    fps: dict[str, float]  # frames per second scored
    steps: dict[str, int]  # every how many frames is scored
    lengths: dict[str, int]  # frames in the video


def _read_videos(paths, size, channels, folder_fps: float, sample_fps: float | None = None, known=()):
    """The videos at `paths`, their frames resized to `size` (decoded one at a time: a video is never held at
    its own size), the video of each frame, the frames per second scored of each video (`folder_fps` for a
    folder of frames), every how many of its frames is kept (`frame_step` to `sample_fps`), and each video's
    frame count. `known`: files among them read for another purpose (`find_inputs`)."""
    videos = find_inputs(paths, known)
    xs, names, rates, steps, lengths = [], [], {}, {}, {}
    for video in progress(videos, unit="video", desc="reading"):
        meta: dict = {}
        frames, lost = frame_io.decode_video(video, size, channels, allow_truncated=True, meta=meta)
        if lost:
            log.warning("video file %s: %s; scoring them", video.path, frame_io.lost_frames_note(len(frames), lost))
        rate = video_fps(video, folder_fps, meta)
        steps[video.name], lengths[video.name] = frame_step(rate, sample_fps), len(frames)
        frames = frames[:: steps[video.name]]
        xs.append(frames)
        names.append(np.full(len(frames), video.name))
        rates[video.name] = rate / steps[video.name]
    slower = [f"{n} ({r:g})" for n, r in rates.items() if sample_fps and r < sample_fps / 1.5]
    if slower:
        log.warning(
            "--sample_fps %g is above the frame rate of %s: every frame of it scored", sample_fps, listed(slower)
        )
    if sample_fps:
        log.info(
            "--sample_fps %g: %s",
            sample_fps,
            listed(f"{n} 1 frame in {s} ({rates[n] * s:g} -> {rates[n]:g} frames/s)" for n, s in steps.items()),
        )
    return _Read(videos, np.concatenate(xs), np.concatenate(names), rates, steps, lengths)


def _calibration(args, model, config, settings, dataset_dir):
    """The calibration asked for; fitted anew when it must be (--calibrate_on, a model without one, or
    other window settings on a prepared dataset)."""
    from models.live import calibrate

    frame_shape = tuple(config["frame_shape"])
    if args.calibrate_on:
        read = _read_videos(args.calibrate_on, frame_shape[:2], frame_shape[2], args.fps, args.sample_fps)
        X, sources = read.X, read.sources
        log.info("calibrating on %d frames of %s", len(X), count(len(set(sources)), "normal video"))
        fpr = args.fpr or DEFAULT_FPR
        with progress(total=len(X), unit="frame", desc="calibrating") as bar:
            return calibrate(
                model,
                X,
                sources,
                None,
                settings,
                args.live_smooth,
                fpr,
                args.batch_size,
                {"videos": [str(p) for p in args.calibrate_on], "frames": len(X)},
                bar,
            )
    path = Path(args.calibration) if args.calibration else Path(args.model_dir) / FILENAME
    cal = Calibration.load(path) if (args.calibration or path.is_file()) else None
    same = cal is not None and all(getattr(cal, k) == v for k, v in settings.items())
    if same:
        return cal
    if dataset_dir is None:
        if cal is None:
            raise PipelineError(
                f"No calibration in {args.model_dir} (a model trained before calibration existed): pass "
                "--calibrate_on with a few minutes of normal footage from the camera."
            )
        raise PipelineError(
            f"{path} was fitted for window {cal.window}, {cal.per_window} per window, horizon {cal.horizon}, "
            f"first scored frame {cal.first_scored}; score with those settings or pass --calibrate_on."
        )
    X, sources, tail = _normal_frames(dataset_dir)
    why = "no calibration.json in the model folder" if cal is None else "other scoring settings than its calibration"
    log.info("calibrating on the %d normal train and val frames of %s (%s)", len(X), dataset_dir, why)
    with progress(total=len(X), unit="frame", desc="calibrating") as bar:
        return calibrate(
            model,
            X,
            sources,
            tail,
            settings,
            cal.smooth if cal else args.live_smooth,
            args.fpr or (cal.fpr if cal else DEFAULT_FPR),
            args.batch_size,
            {"dataset": str(dataset_dir), "frames": len(X)},
            bar,
        )


def _normal_frames(dataset_dir):
    """Train and val frames of a prepared dataset, and the videos that set the tail (val; train without)."""
    X_train, src_train = store.load_split(dataset_dir, "train")
    X_val, src_val = store.load_split(dataset_dir, "val")
    tail = set(src_val.tolist()) or set(src_train.tolist())
    return np.concatenate([X_train, X_val]), np.concatenate([src_train, src_val]), tail


def scoring_inputs_read(args) -> list[Path]:
    """Every path a scoring run reads, which its output folder must neither be, hold nor lie inside."""
    paths = [Path(args.model_dir)]
    if args.input:
        paths += [Path(p) for p in args.input]
    else:
        paths.append(Path(args.preprocessed_data) / args.dataset)
    paths += [Path(p) for p in (args.calibrate_on or [])]
    paths += [Path(p) for p in (args.labels, args.calibration) if p]
    return paths


def load_scoring_inputs(args) -> ScoringInputs:
    from models.inference import load_predictor
    from models.live import scoring_settings

    model, trained, config = load_predictor(args.model_dir)
    h, w, c = trained.frame_shape
    config.setdefault("frame_shape", [h, w, c])
    settings = scoring_settings(config, args.window, args.per_window, args.warmup, args.horizon)
    if args.patch >= min(h, w):
        log.warning("--patch %d is not below the model's %dx%d frames: patch_max is the frame's mse", args.patch, h, w)
    nt = config.get("arguments", {}).get("nt")
    if settings["window"] == 0 and nt:
        log.warning(
            "--window 0 runs whole videos through a model trained on %d-frame sequences: past them its predictions "
            "drift and its scores are not those of its windows (the default, --window %d)",
            nt,
            nt,
        )
    inputs, meta, masks, dataset_dir = {}, {}, None, None
    if args.input:
        read = _read_videos(args.input, (h, w), c, args.fps, args.sample_fps, known=[args.labels])
        videos, X, sources, fps, steps = read.videos, read.X, read.sources, read.fps, read.steps
        inputs = {v.name: v for v in videos}
        y = input_labels(videos, read.lengths, args.labels, steps) if args.labels else None
        title = count(len(videos), "input video")
    else:
        dataset_dir = store.dataset_dir(args.preprocessed_data, args.dataset)
        meta = store.read_metadata(dataset_dir)
        X, sources = store.load_split(dataset_dir, "test")
        if len(X) == 0:
            raise PipelineError(f"{dataset_dir} has no test frames to score.")
        if (h, w, c) != X.shape[1:]:
            raise PipelineError(
                f"Model in {args.model_dir} takes frames {(h, w, c)} (h, w, c) but the test frames of "
                f"{dataset_dir} are {X.shape[1:]}; prepare the data with the model's size and channels."
            )
        y = store.load_labels(dataset_dir)
        mask_file = dataset_dir / "masks_test.hkl"
        masks = store.load(mask_file) if mask_file.is_file() else None
        fps, title, steps = {str(video): args.fps for video in dict.fromkeys(sources)}, args.dataset, {}
    _check_plot_videos(args.plot_videos, sources)
    calibration = _calibration(args, model, config, settings, dataset_dir)
    if args.fpr:
        calibration.fpr = args.fpr
    note = calibration.extrapolated_fpr_note()
    if note:
        log.warning(note)
    return ScoringInputs(X, sources, y, masks, fps, title, model, config, calibration, inputs, meta, steps)


def _check_plot_videos(names: str | None, sources: np.ndarray) -> None:
    """--plot_videos names only videos that are scored (before any scoring)."""
    if not names:
        return
    videos = list(dict.fromkeys(sources))
    unknown = [name for name in names.split(",") if name not in videos]
    if unknown:
        raise PipelineError(
            f"--plot_videos names {', '.join(unknown)}: not among the videos scored ({listed(videos)})."
        )


def run_scoring(args, inputs: ScoringInputs, out: Path) -> dict:
    """Scores the frames and writes every output into `out`; returns the summary (metrics.json)."""
    from models.alarms import AlarmRule, alarm_events
    from models.live import score_frames
    from models.plots import error_frames, plot_live_scores, plot_roc, save_gif
    from models.report import event_table, markdown, protocol_table, sawtooth_table
    from models.scoring import add_smoothed, evaluate, metric_columns, number_in_video, portable

    cal, X, sources = inputs.calibration, inputs.X, inputs.sources
    rule = AlarmRule(cal.threshold, args.alarm_min_frames, args.alarm_gap)
    with progress(total=len(X), unit="frame", desc="scoring") as bar:
        df, heats, predictions, rate = score_frames(
            inputs.model, X, sources, cal, inputs.y, args.batch_size, args.patch, rule, bar,
            maps=bool(args.save_prediction_error_video_frames),
        )  # fmt: skip
    number_in_video(df, inputs.steps)
    frames = count(len(X), "frame")
    log.info(
        f"scored {frames} of {count(len(set(sources)), 'video')} at {rate:.0f} frames/s (compilation included), "
        f"each from the frames before it ({cal.per_window} per {cal.window}-frame window)"
        if cal.window
        else f"scored {frames} of {count(len(set(sources)), 'video')} at {rate:.0f} frames/s (whole videos)"
    )
    scored_frames = df.groupby("video", sort=False)["predictable"].sum()
    short = scored_frames.index[scored_frames == 0].tolist()
    if short:
        log.warning(
            "too short for a score: %s (a video's first scored frame is frame %d)",
            listed(short),
            max(cal.first_scored, 1) + 1,
        )
    df = add_smoothed(df, args.smooth)
    settings = {
        "model_dir": str(args.model_dir),
        "input": args.input or args.dataset,
        "window": cal.window,
        "horizon": cal.horizon,
        "per_window": cal.per_window,
        "warmup": args.warmup,
        "smooth": args.smooth,
        "live_smooth": cal.smooth,
        "threshold": cal.threshold,
        "fpr": cal.fpr,
        "alarm_min_frames": rule.min_frames,
        "alarm_gap": rule.gap,
        "fps": dict(inputs.fps),  # each video's frames per second scored
        **({"sample_fps": args.sample_fps, "frame_step": dict(inputs.steps)} if args.sample_fps else {}),
    }
    df.attrs = {**settings, "height": int(X.shape[1]), "width": int(X.shape[2])}
    portable(df).to_pickle(out / "df.pkl.gz")
    events = alarm_events(df)
    events.to_csv(out / "alarms.csv", index=False)
    cal.save(out / "calibration.json")
    summary = {
        "frames": len(df),
        "videos": int(df["video"].nunique()),
        "frames_per_s": rate,
        "alarms": len(events),
        **settings,
        "training": inputs.config.get("arguments"),
    }
    log.info(
        f"{count(len(events), 'alarm')} at score >= {cal.threshold:.2f} "
        f"(false-positive rate {cal.fpr:g} on normal frames)"
    )
    protocols = event_rows = results = None
    pixel = {}
    if inputs.masks is not None and len(inputs.masks) == len(df):
        from models.overlay import pixel_auroc

        pixel = {f"{s}_heat": pixel_auroc(heats[s], inputs.masks) for s in heats}
        summary["pixel_auroc"] = pixel
    saw = sawtooth_table(df)
    summary["sawtooth"] = saw
    if inputs.y is not None and df["y"].nunique() == 2:
        results = evaluate(df, metric_columns(df))
        protocols = protocol_table(df, args.smooth)
        event_rows = event_table(df, inputs.fps)
        summary["metrics"] = json.loads(results.to_json(orient="index"))
        summary["protocols"] = json.loads(protocols.to_json(orient="index"))
        summary["events"] = json.loads(event_rows.to_json(orient="index"))
        log.info(protocols[["model_auc", "copy_auc"]].round(3).to_string())
        log.info(
            event_rows[["events", "detected", "median_delay_frames", "false_alarms_per_minute"]].round(2).to_string()
        )
        aucs = results["micro_auc"].to_dict()
        plot_roc(df, [c for c in roc_columns(args.smooth) if c in df], out / "roc.png", aucs)
    else:
        log.info("no labels with both classes: scores and alarms written, evaluation skipped")
    (out / "metrics.md").write_text(
        markdown(
            f"Scores: {inputs.title}",
            df,
            protocols,
            event_rows,
            saw,
            pixel,
            cal.threshold,
            inputs.fps,
            results,
            alarms=events,
            settings=settings,
        )  # fmt: skip
    )
    plot_live_scores(df, out / "scores.png", cal.threshold, args.smooth, args.n_plot)
    _write_overlays(args, inputs, df, heats, out)
    if args.save_prediction_error_video_frames:
        names = args.plot_videos.split(",") if args.plot_videos else list(dict.fromkeys(sources))[:2]
        for name, sl in store.video_slices(sources):
            if name in names:
                save_gif(error_frames(X[sl] / 255.0, predictions[sl]), out / f"{name}_prediction_error.gif")
    with atomic_file(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def roc_columns(smooth: int) -> list[str]:
    """The headline score of each protocol, model and baseline."""
    offline = f"regularity_smooth{smooth}" if smooth > 1 else "regularity"
    return [f"model_{offline}", f"copy_{offline}", "model_score", "copy_score"]


def _write_overlays(args, inputs: ScoringInputs, df, heats, out: Path) -> None:
    n_videos = args.overlays if args.overlays is not None else (len(inputs.videos) if args.input else 0)
    if n_videos <= 0:
        return
    from models.overlay import write_overlay

    (out / "overlays").mkdir(exist_ok=True)
    slices = store.video_slices(inputs.sources)[:n_videos]
    for name, sl in progress(slices, unit="video", desc="overlays"):
        video, step = inputs.videos.get(name), inputs.steps.get(name, 1)
        # an input video decoded again, at its own size and colours (the frames scored); a prepared one as stored
        frames = (
            inputs.X[sl]
            if video is None
            else itertools.islice(frame_io.frame_arrays(frame_io.frame_images(video), name, 3), 0, None, step)
        )
        write_overlay(
            out / "overlays" / f"{name}.mp4",
            frames,
            heats["model"][sl],
            df["score"].to_numpy()[sl],
            inputs.calibration.threshold,
            df["alarm"].to_numpy()[sl],
            fps=inputs.fps[name],
            frame_numbers=df["frame"].to_numpy()[sl],
            title=name,
        )
    log.info("overlays of %s -> %s/overlays/", count(len(slices), "video"), args.scored_data)
