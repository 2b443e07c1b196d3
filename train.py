r"""Stage 2: train PredNet to predict the next frame of normal video (or a ConvLSTM autoencoder to reconstruct it).

    python train.py --config config/default.json --preprocessed_data data/preprocessed --dataset UCSDped2 \
        --model_dir outputs/models/UCSDped2
    python train.py --config config/cpu.json ...        # small CPU profile: seconds, for the demo and tests
    python train.py --model convlstm_ae ...             # the autoencoder, config/convlstm_ae.json (a GPU's)
    python train.py --config convlstm_ae_cpu ...        # the autoencoder's small CPU profile

On the GPU machine without TensorFlow: KERAS_BACKEND=jax python train.py ... (see docs/model_development.md).
On several GPUs: KERAS_BACKEND=jax python train.py ... --distribute (data-parallel; see docs/tuning.md).
Writes <model_dir>/model.keras, config.json, calibration.json, history.csv, history.png and checkpoints/, all at
once at the end: the run trains in .<model_dir name>.partial/ beside it, which --resume continues after a kill
(docs/safety.md).
"""

from __future__ import annotations

import argparse
import logging

from models.args import (
    floats_at_least,
    folder,
    int_at_least,
    ints_at_least,
    non_negative_int,
    positive_float,
    positive_int,
)
from models.cli import add_prepared_data_options, choose_prepared_dataset, import_keras, keras_verbose, parser, run
from models.config import given_options, parse_with_config, training_defaults

log = logging.getLogger(__name__)

SPECS = ("convlstm_ae", "prednet")  # the names of models.registry.SPECS (checked there), without importing Keras


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument(
        "--config",
        default=None,
        help="settings file in config/ (name or path); the defaults shown below are its values, flags override "
        "them (default: default, or convlstm_ae with --model convlstm_ae)",
    )
    p.add_argument(
        "--model",
        choices=sorted(SPECS),
        help="the model to train: prednet (next-frame prediction, the default) or convlstm_ae (a ConvLSTM "
        "autoencoder of --nt-frame windows, Chong & Tay 2017); the model folder records it",
    )
    add_prepared_data_options(p)
    p.add_argument("--model_dir", type=folder, default=None, help="output folder (default: outputs/models/<dataset>)")
    p.add_argument(
        "--stack_sizes", type=ints_at_least(1), help="channels of the layers above the pixels, e.g. 48,96,192"
    )
    p.add_argument(
        "--R0_channels",
        type=positive_int,
        help="channels of the pixel layer's representation units (a config without it: the frames' channels, "
        "as in the paper)",
    )
    p.add_argument(
        "--filter_sizes",
        type=ints_at_least(1, lengths=(3,)),
        help="filter sizes of the A, Ahat and R convolutions, e.g. 3,3,3",
    )
    p.add_argument(
        "--layer_loss_weights", type=floats_at_least(0.0), help="L_0: 1,0; L_all: 1,0.1 (layer 0, layers above)"
    )
    p.add_argument("--nt", type=int_at_least(2, "frames"), help="frames per training window")
    p.add_argument(
        "--horizon",
        type=int_at_least(1, "frames"),
        default=1,
        help="frames ahead to train for: the last horizon - 1 steps of each window are fed the model's own "
        "predictions, and the loss is the frame prediction error (1: next-frame prediction with "
        "--layer_loss_weights)",
    )
    p.add_argument("--batch_size", type=int_at_least(1, "windows"), help="training windows per step")
    p.add_argument("--nb_epoch", type=int_at_least(1, "epochs"), help="epochs at most")
    p.add_argument("--samples_per_epoch", type=int_at_least(1, "windows"), help="training windows per epoch")
    p.add_argument("--val_samples", type=int_at_least(1, "windows"), help="validation windows per epoch")
    p.add_argument("--learning_rate", type=positive_float, help="Adam's initial learning rate")
    # Settings newer than some config files (a tuner's best_config.json): config/default.json's unless set.
    defaults = training_defaults()
    p.add_argument(
        "--lr_schedule",
        choices=["decay", "step"],
        default=defaults["lr_schedule"],
        help="decay: times --lr_decay after each epoch; step: the reference's, a tenth from --lr_step_epoch on",
    )
    p.add_argument("--lr_decay", type=positive_float, help="learning rate times this after each epoch (1: constant)")
    p.add_argument(
        "--lr_step_epoch",
        type=non_negative_int,
        default=defaults["lr_step_epoch"],
        help="with --lr_schedule step: the first epoch at a tenth of the rate",
    )
    p.add_argument("--strides", type=ints_at_least(1), help="frame strides sampled as augmentation, e.g. 1,2,3,4")
    p.add_argument("--patience", type=non_negative_int, help="early stopping: epochs without a better val loss")
    p.add_argument(
        "--max_minutes",
        type=positive_float,
        help="wall-clock budget: stop after the last epoch expected to end within it (best weights kept; "
        "default: none)",
    )
    p.add_argument(
        "--precision",
        choices=["float32", "mixed_bfloat16", "mixed_float16"],
        help="float32, or mixed precision for a GPU",
    )
    p.add_argument(
        "--fine_tuning",
        type=folder,
        default=None,
        help="start from the model in this earlier model folder (its layers: the layer options do not apply)",
    )
    p.add_argument(
        "--freeze_layers",
        type=ints_at_least(0, allow_empty=True),
        default=(),
        help="PredNet layers whose weights stay fixed, e.g. 0,1 (default: none)",
    )
    g = p.add_argument_group("ConvLSTM autoencoder (--model convlstm_ae)")
    g.add_argument("--ae_filters", type=ints_at_least(1), help="channels of the encoder convolutions, e.g. 128,64")
    g.add_argument("--ae_kernels", type=ints_at_least(1), help="kernel sizes of the encoder convolutions, e.g. 11,5")
    g.add_argument(
        "--ae_strides",
        type=ints_at_least(1),
        help="strides of the encoder convolutions (frames must divide by their product)",
    )
    g.add_argument("--ae_lstm_filters", type=ints_at_least(1), help="channels of the ConvLSTM layers, e.g. 64,32,64")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the weights and the window sampling")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run (or a finished one, to more epochs) from its last epoch, with its own "
        "settings and data: only --nb_epoch, --patience, --max_minutes and (data moved) --preprocessed_data may "
        "change",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start over, replacing a model or interrupted run train.py wrote"
    )
    p.add_argument(
        "--distribute",
        action="store_true",
        help="data-parallel over all local accelerators, --batch_size split among them (JAX backend only; "
        "docs/tuning.md)",
    )
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --model first, before --help answers
    pre.add_argument("--model")  # checked by the full parser
    if p.get_default("config") is None:  # the model's own default settings
        model = pre.parse_known_args(argv)[0].model
        p.set_defaults(config="convlstm_ae" if model == "convlstm_ae" else "default")
    args = parse_with_config(p, argv)  # checks the config file's values with the same types
    args.given = tuple(sorted(given_options(p, argv)))  # what --resume and --fine_tuning must not override
    made_for = _config_model(p.config_values)
    if made_for and args.model and args.model != made_for:
        p.error(
            f"argument --model: {args.model}, but --config {args.config} holds {made_for} settings; drop one, or "
            f"pass a config of {args.model} (config/{'convlstm_ae_cpu' if args.model == 'convlstm_ae' else 'cpu'}.json "
            "for a CPU)"
        )
    args.model = args.model or "prednet"
    _check_together(p, args)
    if args.resume and args.model_dir and args.dataset is None:
        return args  # the run's own data, from its record (models.training)
    args.dataset = choose_prepared_dataset(p, args)
    args.model_dir = args.model_dir or f"outputs/models/{args.dataset}"
    return args


def _config_model(values: dict) -> str | None:
    """The model a config file's settings are for: its `model`, else what its model-specific settings say."""
    if "model" in values:
        return values["model"]
    if any(k.startswith("ae_") for k in values):
        return "convlstm_ae"
    if {"stack_sizes", "R0_channels", "filter_sizes", "layer_loss_weights"} & set(values):
        return "prednet"
    return None


def _check_together(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Settings that are only wrong in combination, checked before Keras is imported."""
    if args.resume and args.overwrite:
        p.error("argument --overwrite: not allowed with --resume (continue the run, or start it over: one of them)")
    ae_options = sorted(f"--{k}" for k in args.given if k.startswith("ae_"))
    if args.model != "convlstm_ae" and ae_options:
        p.error(f"argument {ae_options[0]}: the autoencoder's (--model convlstm_ae); this run trains {args.model}")
    weights = args.layer_loss_weights
    if args.stack_sizes and weights and not args.fine_tuning:  # a fine-tuned model brings its own layers
        n_layers = len(args.stack_sizes) + 1
        if len(weights) not in (2, n_layers):
            p.error(
                f"argument --layer_loss_weights: needs 2 values (layer 0, layers above) or one per layer "
                f"({n_layers} with --stack_sizes {','.join(map(str, args.stack_sizes))}). Received: {weights}"
            )
        too_high = [layer for layer in args.freeze_layers if layer >= n_layers]
        if too_high:
            p.error(f"argument --freeze_layers: the model has layers 0-{n_layers - 1}. Received: {too_high}")
    if args.horizon > 1 and args.nt and not args.horizon < args.nt:
        p.error(f"argument --horizon: {args.horizon} frames ahead needs --nt above it. Received: nt {args.nt}")
    if args.horizon > 1 and weights and any(weights[1:]):
        p.error(f"argument --horizon: more than 1 frame ahead needs L_0 --layer_loss_weights. Received: {weights}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import_keras()  # after argument errors, with the native libraries' start-up lines hidden
    from models.training import TrainSettings, summary_line, train

    # Settings neither the config file nor the command line gives keep TrainSettings' defaults.
    values = {k: v for k, v in vars(args).items() if k not in ("config", "quiet", "verbose") and v is not None}
    values["dataset"] = args.dataset  # None with --resume: the run's own (models.training)
    config = train(TrainSettings(**values, verbose=keras_verbose(args)))
    log.info("model -> %s/model.keras; %s", args.model_dir, summary_line(config))
    return 0


if __name__ == "__main__":
    run(main)
