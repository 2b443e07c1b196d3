"""Stage 1: read videos, resize, split by video, and hickle the frames to HDF5.

    python data_preparation.py --raw_data data --preprocessed_data data/preprocessed --dataset UCSDped2
    python data_preparation.py --make_synthetic --raw_data data/raw --dataset Synthetic --size 64x96

See docs/data_preparation.md for the expected folder tree, the custom-video layout and the outputs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models.args import folder, fraction, frame_size, int_at_least, non_negative_int, positive_int
from models.cli import choose_dataset, parser, run
from models.config import add_config_option, parse_with_config
from models.data.index import raw_datasets, resolve_root
from models.data.prepare import PrepareConfig, prepare, read_folders
from models.data.synthetic import MIN_FRAMES, MIN_SIDE, SyntheticSpec, make_synthetic
from models.errors import PipelineError
from models.io import atomic_dir, check_output
from models.shapes import check_frame_size

log = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    add_config_option(p, '"size": "128x192"')
    p.add_argument(
        "--raw_data", type=folder, default="data", help="folder holding the dataset (or UCSD_Anomaly_Dataset.v1p2/)"
    )
    p.add_argument("--preprocessed_data", type=folder, default="data/preprocessed", help="where to write <dataset>/")
    p.add_argument(
        "--dataset",
        default=None,
        help="dataset folder name, e.g. UCSDped1, UCSDped2 (default: the only dataset in --raw_data, required "
        "if it holds several; Synthetic with --make_synthetic)",
    )
    p.add_argument(
        "--size",
        type=frame_size(),
        default="128x192",
        help="HEIGHTxWIDTH to resize to (must divide by 2^(n_layers-1)); the figures of docs/results.md and the "
        "pretrained models are at 128x192",
    )
    p.add_argument("--n_layers", type=positive_int, default=4, help="PredNet layers the frame size must suit")
    p.add_argument(
        "--channels", default="auto", choices=["auto", "1", "3"], help="1 grey, 3 RGB, auto keeps the source's"
    )
    p.add_argument(
        "--val_fraction", type=fraction, default=0.15, help="fraction of normal videos held out for validation"
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the train/val split (and of the synthetic videos)"
    )
    p.add_argument("--compression", default="gzip", choices=["gzip", "lzf", "none"], help="HDF5 compression")
    p.add_argument("--workers", type=positive_int, default=None, help="decoding processes (default: all cores)")
    p.add_argument(
        "--allow_truncated",
        action="store_true",
        help="keep a video file that decodes to fewer frames than its container reports (with a warning giving "
        "the frames lost) instead of refusing it",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an output folder this stage wrote before")
    g = p.add_argument_group("synthetic dataset")
    g.add_argument(
        "--make_synthetic", action="store_true", help="first write the synthetic UCSD-like dataset to --raw_data"
    )
    g.add_argument(
        "--synthetic_size",
        type=frame_size(MIN_SIDE),
        default="120x180",
        help="HEIGHTxWIDTH of the synthetic source frames",
    )
    g.add_argument("--synthetic_train_videos", type=positive_int, default=8, help="normal videos to make")
    g.add_argument(
        "--synthetic_test_videos", type=positive_int, default=4, help="test videos to make, each with an anomaly"
    )
    g.add_argument(
        "--synthetic_frames", type=int_at_least(MIN_FRAMES, "frames"), default=120, help="frames per synthetic video"
    )
    args = parse_with_config(p, argv)
    try:
        check_frame_size(*args.size, args.n_layers)
    except PipelineError as err:
        p.error(f"argument --size: {err} (--n_layers {args.n_layers}: the layers of the model to train or fine-tune)")
    if args.make_synthetic:
        args.dataset = args.dataset or "Synthetic"
    else:
        found = raw_datasets(args.raw_data)
        what = "a folder with Train/ or Test/, there or in UCSD_Anomaly_Dataset.v1p2/"
        root = Path(args.raw_data)
        itself = (root / "Train").is_dir() or (root / "Test").is_dir()  # --raw_data names the dataset's own folder
        hint = f" (it is a dataset itself: pass --raw_data {root.parent} --dataset {root.name})" if itself else ""
        args.dataset = choose_dataset(p, args.dataset, args.raw_data, found, what, hint)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.preprocessed_data) / args.dataset
    size = args.size
    # Both outputs are checked before any work: a real dataset is never replaced by the synthetic one, and
    # neither output may be, hold or lie inside the other or the dataset read.
    if args.make_synthetic:
        target = Path(args.raw_data) / "UCSD_Anomaly_Dataset.v1p2" / args.dataset
        check_output(target, "synthetic", args.overwrite)
        check_output(out_dir, "data_preparation", args.overwrite, inputs=read_folders(target))
    else:
        root = resolve_root(args.raw_data, args.dataset)
        check_output(out_dir, "data_preparation", args.overwrite, inputs=read_folders(root))
    if args.make_synthetic:
        h, w = args.synthetic_size
        spec = SyntheticSpec(
            h, w, args.synthetic_train_videos, args.synthetic_test_videos, args.synthetic_frames, args.seed
        )
        with atomic_dir(target, args.overwrite, stage="synthetic") as tmp:
            # Written beside the target, then renamed into place.
            staging = make_synthetic(tmp / "staging", args.dataset, spec)
            for item in staging.iterdir():
                item.rename(tmp / item.name)
            for leftover in sorted((tmp / "staging").rglob("*"), reverse=True):
                leftover.rmdir()
            (tmp / "staging").rmdir()
        log.info("wrote synthetic dataset to %s", target)
    config = PrepareConfig(
        size=size,
        n_layers=args.n_layers,
        channels=args.channels,
        val_fraction=args.val_fraction,
        seed=args.seed,
        compression=None if args.compression == "none" else args.compression,
        workers=args.workers,
        allow_truncated=args.allow_truncated,
    )
    root = resolve_root(args.raw_data, args.dataset)
    meta = prepare(root, out_dir, config, overwrite=args.overwrite, argv=sys.argv[1:] if argv is None else argv)
    frames = meta["frames"]
    log.info(
        f"{args.dataset}: {frames['train']} train / {frames['val']} val / {frames['test']} test frames "
        f"({len(meta['videos']['train'])}/{len(meta['videos']['val'])}/{len(meta['videos']['test'])} videos), "
        f"{meta['height']}x{meta['width']}x{meta['channels']}, {meta['frames_per_second']:.0f} frames/s -> {out_dir}"
    )
    return 0


if __name__ == "__main__":
    run(main)
