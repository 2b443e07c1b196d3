r"""Does the live score's calibration transfer? Both protocols on a prepared dataset's labelled test videos.

    python benchmarks/live_protocol.py --preprocessed_data data/preprocessed --dataset UCSDped2 \
        --model_dir outputs/models/UCSDped2 [--out live_protocol.json]

Calibrates on the normal train and val videos (as train.py does), scores the test videos, and reports:
- frame AUC of the offline protocol (centred smoothing, min-max per video) and of the live one (causal,
  calibrated, one scale for all videos), model and copy-last-frame baseline;
- the trailing mean of the live score (the one setting of the score that labels could tune) chosen
  leave-one-video-out: for each test video, the width that scores best on the other videos, and the AUC of
  all held-out scores together (calibrated scores share one scale, so they can be pooled);
- a stress form of the same videos, cut at the label boundaries into normal-only and anomalous-only videos
  (as real test sets hold videos anomalous from first frame to last), scored again from scratch;
- the live alarm's events, delay and false alarms per minute at the default threshold, and the sawtooth.
No setting is fitted on test labels except the reported leave-one-video-out choice.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.args import positive_float, positive_int  # noqa: E402
from models.cli import add_prepared_data_options, choose_prepared_dataset, parser  # noqa: E402

WIDTHS = (1, 3, 5, 9, 15)


def parse_args(argv=None):
    p = parser(__doc__)
    add_prepared_data_options(p)
    p.add_argument("--model_dir", required=True, help="model folder train.py wrote")
    p.add_argument("--fps", type=positive_float, default=10.0, help="frames per second of the videos (UCSD: 10)")
    p.add_argument("--batch_size", type=positive_int, default=64, help="windows per model call")
    p.add_argument("--smooth", type=positive_int, default=15, help="centred frames of the offline score")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    args.dataset = choose_prepared_dataset(p, args)
    return args


def cut_at_labels(X, sources, y):
    """Each run of equal labels within a video becomes its own video, named <video>_<a|n><k>."""
    names = np.empty(len(sources), dtype=object)
    for video in dict.fromkeys(sources):
        idx = np.flatnonzero(sources == video)
        change = np.flatnonzero(np.diff(y[idx])) + 1
        for k, part in enumerate(np.split(idx, change)):
            names[part] = f"{video}_{'a' if y[part[0]] else 'n'}{k}"
    return X, names.astype(str), y


def main(argv=None) -> int:
    args = parse_args(argv)
    from models.alarms import AlarmRule, alarm_states
    from models.calibration import apply_calibration, default_cell, fit_calibration, trailing_count, trailing_mean
    from models.data.store import dataset_dir, load_labels, load_split
    from models.inference import frame_contexts, load_predictor, predict_videos
    from models.live import _local, predictable_mask, score_frames, scoring_settings
    from models.report import event_table, protocol_table, sawtooth_table
    from models.scoring import add_smoothed, evaluate, min_max_per_video

    data = dataset_dir(args.preprocessed_data, args.dataset)
    model, _, config = load_predictor(args.model_dir)
    settings = scoring_settings(config)
    X_tr, s_tr = load_split(data, "train")
    X_va, s_va = load_split(data, "val")
    Xn, sn = np.concatenate([X_tr, X_va]), np.concatenate([s_tr, s_va])
    tail = np.isin(sn, np.unique(s_va)) if len(s_va) else np.ones(len(sn), bool)
    start = time.perf_counter()
    pred, _, _ = predict_videos(model, Xn, sn, args.batch_size, settings["window"], 1, settings["per_window"])
    local_n = _local(Xn, sn, pred, default_cell(Xn.shape[1]))
    contexts_n = frame_contexts(sn, settings["window"], settings["per_window"])
    pred_n = predictable_mask(sn, settings["first_scored"])
    base = {**settings, "cell": default_cell(Xn.shape[1]), "fpr": 0.01}
    cals = {k: fit_calibration(local_n, contexts_n, pred_n, sn, tail, {**base, "smooth": k}) for k in WIDTHS}
    print(f"calibrated on {len(Xn)} normal frames ({int(tail.sum())} val) in {time.perf_counter() - start:.0f} s")

    X, sources = load_split(data, "test")
    y = load_labels(data)
    report = {"model_dir": args.model_dir, "dataset": args.dataset, "frames": len(X), **settings}

    def scored(cal, X, sources, y):
        df, _, predictions, rate = score_frames(model, X, sources, cal, y, args.batch_size, maps=True)
        return add_smoothed(df, args.smooth), rate, predictions

    df, rate, pred_t = scored(cals[5], X, sources, y)

    # The grid: cells of 1/4, 1/8 (the default) and 1/16 of the frame's height, with the default trailing mean.
    contexts_t, pred_mask = df["context"].to_numpy(), df["predictable"].to_numpy()
    by_rows = {}
    for rows in (4, 8, 16):
        cell = max(1, Xn.shape[1] // rows)
        local = _local(Xn, sn, pred, cell)
        cal = fit_calibration(local, contexts_n, pred_n, sn, tail, {**base, "cell": cell, "smooth": 5})
        columns, _ = apply_calibration(cal, _local(X, sources, pred_t, cell), contexts_t, pred_mask, sources)
        by_rows[rows] = {
            src: float(roc_auc_score(y[pred_mask], columns[f"{src}_score"][pred_mask])) for src in ("model", "copy")
        }
    report["auc_by_grid_rows"] = by_rows
    report["frames_per_s"] = rate
    # The offline score made of the raw PSNR, as before the context correction (for comparison).
    valid = df[df["predictable"]]
    report["offline_raw_psnr"] = {}
    for source in ("model", "copy"):
        smoothed = valid.groupby("video")[f"{source}_psnr"].transform(
            lambda v: v.rolling(args.smooth, center=True, min_periods=1).mean()
        )
        for name, values in (("unsmoothed", valid[f"{source}_psnr"]), (f"smooth{args.smooth}", smoothed)):
            regularity = min_max_per_video(values, valid["video"])
            report["offline_raw_psnr"][f"{source}_{name}"] = float(roc_auc_score(valid["y"], -regularity))
    report["protocols"] = json.loads(protocol_table(df, args.smooth).to_json(orient="index"))
    report["events"] = json.loads(event_table(df, args.fps).to_json(orient="index"))
    report["sawtooth"] = sawtooth_table(df)

    # The trailing width: every width's AUC, and the width chosen leave-one-video-out.
    videos = df["video"].to_numpy()
    by_width = {}
    for source in ("model", "copy"):
        for k in WIDTHS:
            local = df[f"{source}_local"].to_numpy()
            live, counts = trailing_mean(local, videos, k), trailing_count(local, videos, k)
            df[f"{source}_score_w{k}"] = cals[k].tails[source].score(live, counts)
        by_width[source] = {k: float(evaluate(df, [f"{source}_score_w{k}"]).iloc[0]["micro_auc"]) for k in WIDTHS}
        held = pd.Series(np.nan, index=df.index)
        chosen = {}
        for v in dict.fromkeys(videos):
            rest = df[videos != v]
            best = max(WIDTHS, key=lambda k: evaluate(rest, [f"{source}_score_w{k}"]).iloc[0]["micro_auc"])
            chosen[v] = best
            held[videos == v] = df.loc[videos == v, f"{source}_score_w{best}"]
        df[f"{source}_score_lovo"] = held
        report[f"{source}_lovo"] = {
            "auc": float(evaluate(df, [f"{source}_score_lovo"]).iloc[0]["micro_auc"]),
            "chosen_width": chosen,
        }
    report["auc_by_trailing_width"] = by_width

    # The stress form: cut at the label boundaries, scored from scratch.
    Xc, sc, yc = cut_at_labels(X, sources, y)
    dfc, _, _ = scored(cals[5], Xc, sc, yc)
    report["stress_protocols"] = json.loads(protocol_table(dfc, args.smooth).to_json(orient="index"))
    report["stress_videos"] = int(dfc["video"].nunique())
    rule = AlarmRule(cals[5].threshold)
    dfc["alarm"] = alarm_states(dfc["score"].to_numpy(), dfc["video"].to_numpy(), rule)
    report["stress_events"] = json.loads(event_table(dfc, args.fps).to_json(orient="index"))
    report["false_positive_rate_on_normal_test_frames"] = {
        s: float((df.loc[(df["y"] == 0) & df["predictable"], f"{s}_score"] >= cals[5].threshold).mean())
        for s in ("model", "copy")
    }

    print(json.dumps(report, indent=1, default=float))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
