r"""Search train.py's settings with Optuna: each trial trains a model folder, scored by its val next-frame ratio.

    python tune.py --config config/default.json --space config/tune.json --preprocessed_data data/preprocessed \
        --dataset UCSDped2 --n_trials 12 --study ped2 [--storage URL] [--output_dir outputs/tuning/ped2]
    python tune.py --config cpu --space config/tune_cpu.json ...     # small CPU space, for a try and the tests

The objective is the val next-frame MSE relative to copying the last frame (lower is better), reported after
every epoch so that the median pruner stops poor trials early; test labels are never read. The study is kept
in <output_dir>/study.db (SQLite): rerunning the command continues it. Every worker started with the same
command and a shared --storage URL (PostgreSQL, MySQL) joins the same study. See docs/tuning.md.
Writes <output_dir>/trial_NNNN/ (train.py model folders), best_config.json, trials.md, history.png,
intermediate.png and importances.png.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from models.args import folder, int_at_least, non_negative_int, positive_float
from models.cli import add_prepared_data_options, choose_prepared_dataset, import_keras, keras_verbose, parser, run
from models.config import resolve_config
from models.errors import PipelineError

log = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--config", default="default", help="train.py settings the trials start from (name or path)")
    p.add_argument("--space", default="config/tune.json", help="search-space file (docs/tuning.md)")
    add_prepared_data_options(p)
    p.add_argument(
        "--n_trials",
        type=int_at_least(1, "trials"),
        default=10,
        help="trials this worker runs (each worker counts its own)",
    )
    p.add_argument("--study", default=None, help="study name (default: the dataset's)")
    p.add_argument("--storage", default=None, help="Optuna database URL (default: sqlite:///<output_dir>/study.db)")
    p.add_argument(
        "--output_dir", type=folder, default=None, help="trial folders and reports (default: outputs/tuning/<study>)"
    )
    p.add_argument("--nb_epoch", type=int_at_least(1, "epochs"), help="epochs per trial (default: the config's)")
    p.add_argument("--max_minutes", type=positive_float, help="wall-clock budget per trial (train.py --max_minutes)")
    p.add_argument("--precision", choices=["float32", "mixed_bfloat16", "mixed_float16"], help="for the trials")
    p.add_argument("--seed", type=non_negative_int, default=0, help="training seed, the same for every trial")
    p.add_argument(
        "--sampler_seed",
        type=non_negative_int,
        default=None,
        help="seed of the TPE sampler, for a repeatable single-worker study; give each worker its own, or none",
    )
    p.add_argument(
        "--startup_trials", type=non_negative_int, default=3, help="complete trials before the pruner starts"
    )
    p.add_argument(
        "--warmup_epochs", type=non_negative_int, default=1, help="epochs of each trial that are never pruned"
    )
    p.add_argument(
        "--enqueue_config",
        action="store_true",
        help="first run the --config file's own values (where they lie in the space), as the hand-set reference",
    )
    p.add_argument("--distribute", action="store_true", help="each trial data-parallel over all local GPUs (JAX)")
    args = p.parse_args(argv)
    if not Path(args.space).is_file():
        raise PipelineError(f"Search-space file {args.space} not found (see config/tune.json).")
    resolve_config(args.config)
    args.dataset = choose_prepared_dataset(p, args)
    args.study = args.study or args.dataset
    args.output_dir = Path(args.output_dir or f"outputs/tuning/{args.study}")
    args.local_storage = args.storage is None
    args.storage = args.storage or f"sqlite:///{args.output_dir.resolve()}/study.db"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import_keras()  # after argument errors, with the native libraries' start-up lines hidden
    from models import tuning  # imports Optuna too
    from models.data.store import dataset_dir

    if args.distribute:
        from models.distribute import check_backend

        check_backend()
    space = tuning.load_space(args.space)
    overrides = {k: getattr(args, k) for k in ("nb_epoch", "max_minutes", "precision") if getattr(args, k) is not None}
    config_values, base = tuning.base_settings(
        args.config,
        preprocessed_data=args.preprocessed_data,
        dataset=args.dataset,
        model_dir="",
        seed=args.seed,
        verbose=keras_verbose(args) if args.verbose else 0,  # Keras's progress of each trial with --verbose
        distribute=args.distribute,
        **overrides,
    )
    tuning.check_space(space, base)
    data = [dataset_dir(args.preprocessed_data, args.dataset)]
    if args.local_storage:  # the study database is in the folder
        tuning.claim_output_dir(args.output_dir, args.study, data)
        if not (args.output_dir / "study.db").exists():  # a new database would have no trial: refuse before it
            tuning.check_trial_folders(args.output_dir, args.study, set())
    study = tuning.open_study(args.study, args.storage, args.sampler_seed, args.startup_trials, args.warmup_epochs)
    if not args.local_storage:  # a shared database opened: only now the folder
        tuning.claim_output_dir(args.output_dir, args.study, data)
    tuning.check_trial_folders(args.output_dir, args.study, {t.number for t in study.get_trials(deepcopy=False)})
    if args.enqueue_config:
        tuning.enqueue_config(study, space, config_values)
    study.optimize(tuning.Tuner(space, base, args.output_dir), n_trials=args.n_trials, catch=(tuning.TrialFailed,))
    log.info(
        "study %r in %s: %d trials in all, %d by this worker",
        args.study,
        tuning.shown_url(args.storage),
        len(study.trials),
        args.n_trials,
    )
    for line in tuning.write_reports(study, space, config_values, args.config, args.output_dir):
        log.info(line)
    return 0


if __name__ == "__main__":
    run(main)
