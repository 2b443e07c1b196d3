"""Stage 2: train PredNet to predict the next frame of normal video.

    python train.py --config config/default.json --preprocessed_data data/preprocessed --dataset UCSDped2 \
        --model_dir outputs/models/UCSDped2
    python train.py --config config/cpu.json ...        # small CPU profile: seconds, for the demo and tests

On the GPU machine without TensorFlow: KERAS_BACKEND=jax python train.py ... (see docs/model_development.md).
Writes <model_dir>/model.keras, config.json, history.csv, history.png and checkpoints/, all at once at the end:
the run trains in .<model_dir name>.partial/ beside it, which --resume continues after a kill (docs/safety.md).
"""

from __future__ import annotations

import argparse

from models.cli import run
from models.config import float_list, int_list, parse_with_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help="settings file in config/ (name or path); flags override it")
    p.add_argument("--preprocessed_data", default="data/preprocessed")
    p.add_argument("--dataset", default="UCSDped2")
    p.add_argument("--model_dir", default=None, help="output folder (default: outputs/models/<dataset>)")
    p.add_argument("--stack_sizes", type=int_list, help="channels of the layers above the pixels, e.g. 48,96,192")
    p.add_argument(
        "--R0_channels",
        type=int,
        help="channels of the pixel layer's representation units (default: the frames' channels, as in the paper)",
    )
    p.add_argument("--filter_sizes", type=int_list, help="filter sizes of the A, Ahat and R convolutions, e.g. 3,3,3")
    p.add_argument("--layer_loss_weights", type=float_list, help="L_0: 1,0; L_all: 1,0.1 (layer 0, layers above)")
    p.add_argument("--nt", type=int, help="frames per training window")
    p.add_argument(
        "--horizon",
        type=int,
        default=1,
        help="frames ahead to train for: the last horizon - 1 steps of each window are fed the model's own "
        "predictions, and the loss is the frame prediction error (1: next-frame prediction with "
        "--layer_loss_weights)",
    )
    p.add_argument("--batch_size", type=int)
    p.add_argument("--nb_epoch", type=int)
    p.add_argument("--samples_per_epoch", type=int, help="training windows per epoch")
    p.add_argument("--val_samples", type=int, help="validation windows per epoch")
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--lr_decay", type=float, help="learning rate times this after each epoch (1: constant)")
    p.add_argument("--strides", type=int_list, help="frame strides sampled as augmentation, e.g. 1,2,3,4")
    p.add_argument("--patience", type=int, help="early stopping: epochs without a better val loss")
    p.add_argument(
        "--max_minutes",
        type=float,
        help="wall-clock budget: stop after the last epoch expected to end within it (best weights kept)",
    )
    p.add_argument(
        "--output_mode",
        help="output mode recorded in config.json for predicting models made from this one: all, "
        "prediction, error, or R0, E1, ... (checked here; batch_scoring.py always uses all)",
    )
    p.add_argument("--precision", choices=["float32", "mixed_bfloat16", "mixed_float16"])
    p.add_argument("--fine_tuning", default=None, help="start from the model in this earlier model folder")
    p.add_argument(
        "--freeze_layers", type=int_list, default=(), help="PredNet layers whose weights stay fixed, e.g. 0,1"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run (or a finished one, to more epochs) from its last epoch",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start over, replacing a model or interrupted run train.py wrote"
    )
    p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2])
    args = parse_with_config(p, argv)
    for name in ("stack_sizes", "filter_sizes", "strides"):
        setattr(args, name, int_list(getattr(args, name)))
    args.layer_loss_weights = float_list(args.layer_loss_weights)
    if args.nb_epoch is not None and args.nb_epoch < 1:
        p.error(f"--nb_epoch must be 1 or more; got {args.nb_epoch}")
    args.model_dir = args.model_dir or f"outputs/models/{args.dataset}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from models.training import TrainSettings, summary_line, train  # imports Keras: after argument errors

    settings = TrainSettings(**{k: v for k, v in vars(args).items() if k != "config"})
    config = train(settings)
    print(f"model -> {args.model_dir}/model.keras; {summary_line(config)}")
    return 0


if __name__ == "__main__":
    run(main)
