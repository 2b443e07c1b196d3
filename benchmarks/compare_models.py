r"""Several trained models side by side on a prepared dataset's labelled test videos: one table.

    python benchmarks/compare_models.py --preprocessed_data data/preprocessed --dataset UCSDped2 \
        --model_dir outputs/models/prednet outputs/models/convlstm_ae [--out compare.md]

Each model folder is read alone (its config.json says which model it holds, `models.registry`) and scored
the way batch_scoring.py scores it by default, with the calibration train.py wrote into it: the frame AUC of
every protocol of `models.report.protocol_table` for the model and for the copy-last-frame baseline scored
the same way (the same windows, context correction and SRC window as that model), the live alarm's false
alarms, the training time and frames/s from config.json, and the scoring frames/s (compilation excluded).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.args import positive_float, positive_int  # noqa: E402
from models.cli import add_prepared_data_options, choose_prepared_dataset, parser  # noqa: E402


def parse_args(argv=None):
    p = parser(__doc__)
    add_prepared_data_options(p)
    p.add_argument("--model_dir", nargs="+", required=True, help="model folders train.py wrote")
    p.add_argument("--fps", type=positive_float, default=10.0, help="frames per second of the videos (UCSD: 10)")
    p.add_argument("--batch_size", type=positive_int, default=64, help="windows per model call")
    p.add_argument("--smooth", type=positive_int, default=15, help="centred frames of the offline score")
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = p.parse_args(argv)
    args.dataset = choose_prepared_dataset(p, args)
    return args


def score_model(model_dir, X, sources, y, args) -> dict:
    """One model folder's column of the table."""
    from models.calibration import FILENAME, Calibration
    from models.inference import load_predictor
    from models.live import score_frames
    from models.registry import get, model_name
    from models.report import event_table, protocol_table
    from models.scoring import add_smoothed

    model, _, config = load_predictor(model_dir)
    spec = get(model_name(config))
    cal = Calibration.load(Path(model_dir) / FILENAME)
    score_frames(model, X[: 2 * args.batch_size], sources[: 2 * args.batch_size], cal, None, args.batch_size)  # compile
    start = time.perf_counter()
    df, _, _, _ = score_frames(model, X, sources, cal, y, args.batch_size)
    seconds = time.perf_counter() - start
    df = add_smoothed(df, args.smooth)
    r = config["results"]
    events = event_table(df, args.fps)
    return {
        "name": f"{Path(model_dir).name} ({spec.title})",
        "protocols": protocol_table(df, args.smooth),
        "facts": {
            "frames scored (the AUCs' frames)": int(df["predictable"].sum()),
            "window / scored per window": f"{cal.window} / {cal.per_window}",
            "val error / copy-last-frame's": f"{r[spec.mse_key] / r['copy_last_frame_mse']:.3f} ({spec.mse_label})",
            "training: epochs, seconds": f"{r['epochs_run']}, {r['train_seconds']:.0f}",
            "training frames/s": f"{r['train_frames_per_s']:.0f}",
            "scoring frames/s (compile excluded)": f"{len(X) / seconds:.0f}",
            "live alarm: events detected, false alarms": (
                f"{events.loc['model', 'detected']:.0f} of {events.loc['model', 'events']:.0f}, "
                f"{events.loc['model', 'false_alarms']:.0f}"
            ),
        },
    }


def tables(columns: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Frame AUC per protocol (each model, then its copy baseline) and the other facts, one column per model."""
    auc = {}
    for col in columns:
        auc[col["name"]] = col["protocols"]["model_auc"]
        auc[f"copy, scored as {col['name']}"] = col["protocols"]["copy_auc"]
    facts = pd.DataFrame({col["name"]: col["facts"] for col in columns})
    return pd.DataFrame(auc), facts


def main(argv=None) -> int:
    args = parse_args(argv)
    from models.data.store import dataset_dir, load_labels, load_split

    data = dataset_dir(args.preprocessed_data, args.dataset)
    X, sources = load_split(data, "test")
    y = load_labels(data)
    auc, facts = tables([score_model(m, X, sources, y, args) for m in args.model_dir])
    text = (
        f"Frame-level micro AUC on {args.dataset} ({len(X)} test frames; each model's frames scored below)\n\n"
        f"{auc.round(3).to_markdown()}\n\n"
        f"{facts.to_markdown()}\n"
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
