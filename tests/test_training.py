import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, run_script, tiny_settings

import models
from models.data.store import load_split
from models.errors import PipelineError
from models.io import read_marker, write_marker
from models.prednet import build_training_model, find_prednet, load_model, predictor
from models.training import TrainSettings, WindowDataset, copy_last_frame_loss, train, window_starts


def test_windows_never_cross_videos():
    sources = np.array(["a"] * 7 + ["b"] * 3 + ["c"] * 9)
    starts = window_starts(sources, nt=3, strides=(1, 2, 3))
    assert len(starts)
    for start, stride in starts:
        idx = start + stride * np.arange(3)
        assert len(set(sources[idx])) == 1
    # every possible window is there: a has 5+3+1, b 1+0+0, c 7+5+3
    assert len(starts) == 9 + 1 + 15


def test_dataset_batches_are_scaled_windows_of_one_video():
    X = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1).repeat(2, axis=1).repeat(2, axis=2)
    sources = np.array(["a"] * 12 + ["b"] * 8)
    data = WindowDataset(X, sources, nt=4, batch_size=3, strides=(1, 2), samples_per_epoch=30, seed=1)
    assert len(data) == 10
    for i in range(len(data)):
        x, y = data[i]
        assert x.shape == (3, 4, 2, 2, 1) and y.shape == (3, 1) and (y == 0).all()
        frames = np.rint(x[:, :, 0, 0, 0] * 255).astype(int)
        assert all(len(set(sources[f])) == 1 for f in frames)
        steps = np.diff(frames, axis=1)
        assert ((steps == steps[:, :1]) & (steps > 0)).all()


def test_a_few_steps_lower_the_loss():
    keras.utils.set_random_seed(0)
    model = build_training_model(4, (8, 8, 1), (1, 0), stack_sizes=(1, 4))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mae")
    # Still images: after the first step each frame is predictable from the one before, while the
    # initial mid-grey prediction is already the best constant for these uniform pixels.
    x = np.repeat(np.random.default_rng(0).random((4, 1, 8, 8, 1)), 4, axis=1).astype("float32")
    y = np.zeros((4, 1), "float32")
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=15, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.8 * before


def test_model_folder(trained):
    for name in ("model.keras", "config.json", "history.csv", "history.png", "checkpoints/last.keras"):
        assert (trained / name).is_file(), name
    config = json.loads((trained / "config.json").read_text())
    assert config["arguments"]["nt"] == 4 and config["frame_shape"] == [16, 24, 1]
    assert config["prednet"]["stack_sizes"] == [1, 4, 8] and config["data"]["frames"]["test"] == 96
    assert config["prednet"]["R_stack_sizes"] == [3, 4, 8]  # --R0_channels widens the pixel layer's R only
    r = config["results"]
    assert r["epochs_run"] == 2 and r["eval_split"] == "val" and len(pd.read_csv(trained / "history.csv")) == 2
    # both MSEs, measured again here on the val windows: the model's through models.load, the copy by hand
    X_val, src_val = load_split(Path(config["arguments"]["preprocessed_data"]) / "Synthetic", "val")
    a = config["arguments"]
    windows = WindowDataset(X_val, src_val, 4, a["batch_size"], shuffle=False, step=4, samples_per_epoch=4, seed=0)
    x = np.concatenate([windows[i][0] for i in range(len(windows))])
    predicted = models.load(trained).predict(x, verbose=0)
    assert r["next_frame_mse"] == pytest.approx(float(((predicted[:, 1:] - x[:, 1:]) ** 2).mean()), rel=1e-4)
    assert r["copy_last_frame_mse"] == pytest.approx(float(((x[:, :-1] - x[:, 1:]) ** 2).mean()), rel=1e-5)


def test_copy_last_frame_loss_is_half_the_mean_absolute_step():
    """history.png's baseline, on the L_0 loss's scale: frames 0, 0.5, 0.5, 1 differ by 0.5, 0, 0.5 from
    the frame before; the mean absolute step is 1/3, its half 1/6."""
    x = np.array([0.0, 0.5, 0.5, 1.0], np.float32).reshape(1, 4, 1, 1, 1)
    assert copy_last_frame_loss([(x, None)]) == pytest.approx(1 / 6)
    # Batches as stored (uint8, as training sends them to the device): the same loss, no wrap-around at 0 - 255.
    stored = np.array([0, 128, 128, 255], np.uint8).reshape(1, 4, 1, 1, 1)
    assert copy_last_frame_loss([(stored, None)]) == pytest.approx(0.5 * (128 + 0 + 127) / 255 / 3)


def test_resume_continues(trained, prepared, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(trained, model_dir)
    train(tiny_settings(prepared, model_dir, nb_epoch=3, resume=True))
    history = pd.read_csv(model_dir / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2]


def test_resume_restores_the_optimizer_and_the_learning_rate_schedule(prepared, tmp_path):
    model_dir = tmp_path / "m"
    train(tiny_settings(prepared, model_dir, nb_epoch=1, lr_decay=0.5))
    last = load_model(model_dir / "checkpoints" / "last.keras", compile=True)
    assert int(last.optimizer.iterations) == 4  # 8 windows per epoch, 2 per batch
    moments = [v for v in last.optimizer.variables if "momentum" in v.path or "velocit" in v.path]
    assert moments and all(np.abs(np.asarray(v)).sum() > 0 for v in moments)
    last.save(tmp_path / "again.keras")
    again = load_model(tmp_path / "again.keras", compile=True)
    for a, b in zip(last.optimizer.variables, again.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    train(tiny_settings(prepared, model_dir, nb_epoch=2, lr_decay=0.5, resume=True))
    resumed = load_model(model_dir / "checkpoints" / "last.keras", compile=True)
    assert int(resumed.optimizer.iterations) == 8  # went on from 4: the optimizer state was restored
    history = pd.read_csv(model_dir / "history.csv")
    assert history["epoch"].tolist() == [0, 1]
    np.testing.assert_allclose(history["learning_rate"], [0.01, 0.005])  # the schedule went on, too


def test_resume_keeps_the_best_val_loss_so_far(trained, prepared, tmp_path):
    """A resumed run compares its epochs with the best of the run so far: a worse one never becomes best."""
    model_dir = tmp_path / "m"
    shutil.copytree(trained, model_dir)
    ckpt = model_dir / "checkpoints"
    state = json.loads((ckpt / "last.json").read_text())
    val_loss = pd.read_csv(model_dir / "history.csv")["val_loss"]
    assert state["epoch"] == 1 and state["best_epoch"] == int(val_loss.idxmin())
    assert state["best"] == pytest.approx(val_loss.min())  # the best so far is the lowest val loss of the history
    state["best"] = 1e-9  # an earlier best that no epoch of the resumed run can beat
    (ckpt / "last.json").write_text(json.dumps(state))
    write_marker(model_dir, "train")  # as train.py had written it (an edited file is the user's: refused)
    best_before = (ckpt / "best.keras").read_bytes()
    config = train(tiny_settings(prepared, model_dir, nb_epoch=3, resume=True))
    after = json.loads((ckpt / "last.json").read_text())
    assert (after["epoch"], after["best"], after["best_epoch"]) == (2, 1e-9, state["best_epoch"])
    assert after["wait"] == state["wait"] + 1 and config["results"]["best_epoch"] == state["best_epoch"]
    assert (ckpt / "best.keras").read_bytes() == best_before
    final = find_prednet(load_model(model_dir / "model.keras")).get_weights()
    for a, b in zip(final, find_prednet(load_model(ckpt / "best.keras")).get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_overwrite_replaces_the_whole_folder(trained, prepared, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(trained, model_dir)
    config = train(tiny_settings(prepared, model_dir, nb_epoch=1, overwrite=True))
    assert config["results"]["epochs_total"] == 1 and len(pd.read_csv(model_dir / "history.csv")) == 1
    assert json.loads((model_dir / "checkpoints" / "last.json").read_text())["epoch"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging folder, lock or old folder left


def test_a_note_put_in_the_model_folder_during_the_run_stays(trained, prepared, tmp_path):
    """--overwrite checks the old folder again when the run ends: a note the user saved in it meanwhile (or an
    edit) keeps it as it is, and the new model is set aside beside it instead of replacing it."""
    model_dir = tmp_path / "m"
    shutil.copytree(trained, model_dir)
    history = (model_dir / "history.csv").read_bytes()

    class UserWritesMeanwhile(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            (model_dir / "NOTES.txt").write_text("mine\n")

    changed = (
        r"m changed while this run worked \(.*NOTES.txt was not written by this pipeline, or changed since\), "
        r"so it is left as it is; this run's output is in .*m.new-"
    )
    with pytest.raises(PipelineError, match=changed):
        train(tiny_settings(prepared, model_dir, nb_epoch=1, overwrite=True), extra_callbacks=[UserWritesMeanwhile()])
    assert (model_dir / "NOTES.txt").read_text() == "mine\n" and (model_dir / "history.csv").read_bytes() == history
    kept = [p for p in tmp_path.iterdir() if p.name != "m"]
    assert [p.name[: len("m.new-")] for p in kept] == ["m.new-"]  # no staging folder or lock left either
    assert len(pd.read_csv(kept[0] / "history.csv")) == 1 and read_marker(kept[0])["complete"]


def test_a_run_killed_at_its_very_end_is_put_in_place_not_lost(prepared, tmp_path):
    """Between a run's last marker and the swap, a kill leaves the finished model in the staging folder: the next
    run puts it in place (its marker names the model folder it replaces, still there). After the swap, the
    staging folder holds the old model folder: that one is deleted. No clock is compared."""
    from models.training import _open_run, staging_dir

    def model(folder, created, note, replacing=None):
        folder.mkdir()
        (folder / "model.keras").write_text(note)
        write_marker(folder, "train", replacing=replacing)
        marker = json.loads((folder / ".prednet-output.json").read_text()) | {"created": created}
        (folder / ".prednet-output.json").write_text(json.dumps(marker))

    model_dir = tmp_path / "m"
    s = tiny_settings(prepared, model_dir, overwrite=True)
    model(model_dir, "2026-12-05T10:00:00+00:00", "old")  # from a machine whose clock runs ahead
    model(staging_dir(model_dir), "2026-12-03T10:00:00+00:00", "new", replacing="2026-12-05T10:00:00+00:00")
    _open_run(s, model_dir, [])  # finished, not swapped in: put in place
    assert (model_dir / "model.keras").read_text() == "new" and not staging_dir(model_dir).exists()
    model(staging_dir(model_dir), "2026-12-05T10:00:00+00:00", "old")  # swapped, the old one not yet deleted
    _open_run(s, model_dir, [])
    assert (model_dir / "model.keras").read_text() == "new" and not staging_dir(model_dir).exists()


def test_fine_tuning_keeps_frozen_layers(trained, prepared, tmp_path):
    base = find_prednet(load_model(trained / "model.keras"))
    train(tiny_settings(prepared, tmp_path / "ft", fine_tuning=str(trained), freeze_layers=(0,), nb_epoch=1))
    tuned = find_prednet(load_model(tmp_path / "ft" / "model.keras"))
    for convs in ("lstm_convs", "ahat_convs", "a_convs"):
        old, new = getattr(base, convs), getattr(tuned, convs)
        for a, b in zip(old[0].get_weights(), new[0].get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(base.lstm_convs[1].get_weights(), tuned.lstm_convs[1].get_weights(), strict=True)
    ]
    assert any(changed)


def _tiny_config(path: Path, **changes) -> str:
    """A --config file of the tiny settings of `tiny_settings`, as a user keeps one."""
    values = dict(stack_sizes=[4, 8], R0_channels=3, nt=4, batch_size=2, nb_epoch=1, samples_per_epoch=8)
    values |= dict(val_samples=4, learning_rate=0.01, strides=[1, 2], precision="float32") | changes
    path.write_text(json.dumps(values))
    return str(path)


def test_resume_continues_the_run_with_its_own_settings(trained, prepared, tmp_path):
    """`train.py --resume` without the first command's options trains on as that run did (here: its config
    file, fine-tuned with layer 0 frozen), not with the default config; an option that contradicts the run
    is refused before anything is written."""
    import train as train_script

    data = ["--preprocessed_data", str(prepared.parent), "--dataset", prepared.name, "-q"]
    model_dir = tmp_path / "m"
    first = ["--config", _tiny_config(tmp_path / "tiny.json"), "--model_dir", str(model_dir)]
    train_script.main([*first, *data, "--fine_tuning", str(trained), "--freeze_layers", "0"])
    train_script.main(["--model_dir", str(model_dir), "--resume", "--nb_epoch", "2", "-q"])  # its data, too

    arguments = json.loads((model_dir / "config.json").read_text())["arguments"]
    assert (arguments["batch_size"], arguments["stack_sizes"], arguments["learning_rate"]) == (2, [4, 8], 0.01)
    assert (arguments["fine_tuning"], arguments["freeze_layers"], arguments["nb_epoch"]) == (str(trained), [0], 2)
    assert pd.read_csv(model_dir / "history.csv")["epoch"].tolist() == [0, 1]
    base = find_prednet(load_model(trained / "model.keras")).lstm_convs[0].get_weights()
    tuned = find_prednet(load_model(model_dir / "model.keras")).lstm_convs[0].get_weights()
    for a, b in zip(base, tuned, strict=True):  # layer 0 stayed frozen through the resumed epoch
        np.testing.assert_array_equal(a, b)
    last = load_model(model_dir / "checkpoints" / "last.keras", compile=True)
    assert int(last.optimizer.iterations) == 8  # 4 steps an epoch: the optimizer went on from the first epoch's

    before = (model_dir / "config.json").read_bytes()
    resume = ["--model_dir", str(model_dir), "--resume", "-q"]
    for extra, message in [
        (["--nb_epoch", "3", "--batch_size", "16"], r"\(--batch_size 2\); this run was given --batch_size 16"),
        (["--nb_epoch", "3", "--dataset", "Other"], rf"\(--dataset {prepared.name}\); this run was given --dataset"),
        (
            [],
            r"is complete \(2 epochs, --nb_epoch 2\): nothing to resume; pass a larger --nb_epoch",
        ),  # a finished run: nothing to do
    ]:
        with pytest.raises(PipelineError, match=message):
            train_script.main([*resume, *extra])
    assert (model_dir / "config.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "tiny.json"]  # no staging folder or lock left


def test_fine_tuning_takes_and_records_the_layers_of_its_model(trained, prepared, tmp_path):
    """The layers of a fine-tuned model are its starting model's: config.json records those, not the config
    file's, and a layer option that contradicts them is refused."""
    import train as train_script

    config = _tiny_config(tmp_path / "wide.json", stack_sizes=[16, 32], R0_channels=8)
    args = ["--config", config, "--preprocessed_data", str(prepared.parent), "--dataset", prepared.name, "-q"]
    args += ["--fine_tuning", str(trained)]
    train_script.main([*args, "--model_dir", str(tmp_path / "ft")])
    arguments = json.loads((tmp_path / "ft" / "config.json").read_text())["arguments"]
    assert (arguments["stack_sizes"], arguments["R0_channels"], arguments["filter_sizes"]) == ([4, 8], 3, [3, 3, 3])
    with pytest.raises(PipelineError, match=r"brings its model's layers \(--stack_sizes 4,8\); this run was given"):
        train_script.main([*args, "--model_dir", str(tmp_path / "ft2"), "--stack_sizes", "16,32"])
    assert not (tmp_path / "ft2").exists()


def test_freezing_every_layer_is_refused(trained, prepared, tmp_path):
    with pytest.raises(PipelineError, match="--freeze_layers 0,1,2 freezes every layer: nothing would train"):
        train(tiny_settings(prepared, tmp_path / "m", fine_tuning=str(trained), freeze_layers=(0, 1, 2)))
    assert not (tmp_path / "m").exists()


def test_time_budget_stops_after_the_epoch_that_would_overrun(prepared, tmp_path):
    config = train(tiny_settings(prepared, tmp_path / "m", nb_epoch=50, max_minutes=1e-4))
    assert config["results"]["epochs_run"] == 1 and config["results"]["stopped_by_time_budget"]
    assert (tmp_path / "m" / "model.keras").is_file()


class _StillFrom(keras.callbacks.Callback):
    """From epoch `first` on, a learning rate of 0: Adam's steps move no weight (as a training step that
    holds the weights as constants)."""

    def __init__(self, first: int):
        super().__init__()
        self.first = first

    def on_epoch_begin(self, epoch, logs=None):  # after train()'s own scheduler has set the epoch's rate
        if epoch >= self.first:
            self.model.optimizer.learning_rate.assign(0.0)


def test_an_epoch_that_moves_no_weight_stops_the_run_before_it_is_saved(prepared, tmp_path):
    from models.training import staging_dir

    with pytest.raises(PipelineError, match=r"Epoch 1 left all \d+ trainable weights exactly as they were"):
        train(tiny_settings(prepared, tmp_path / "a", nb_epoch=2), [_StillFrom(0)])
    assert not (tmp_path / "a").exists()

    model_dir = tmp_path / "b"
    with pytest.raises(PipelineError, match="Epoch 2 left all"):
        train(tiny_settings(prepared, model_dir, nb_epoch=3), [_StillFrom(1)])
    checkpoints = staging_dir(model_dir) / "checkpoints"
    assert not model_dir.exists() and json.loads((checkpoints / "last.json").read_text())["epoch"] == 0
    assert pd.read_csv(checkpoints / "history.csv")["epoch"].tolist() == [0]  # the epoch that trained, kept


def test_training_frames_ahead(trained, prepared, tmp_path):
    model_dir = tmp_path / "ahead"
    config = train(tiny_settings(prepared, model_dir, fine_tuning=str(trained), horizon=2, nb_epoch=1))
    assert config["arguments"]["horizon"] == 2 and np.isfinite(config["results"]["next_frame_mse"])
    history = pd.read_csv(model_dir / "history.csv")
    assert np.isfinite(history["loss"]).all()
    # The saved model loads and, like any other, predicts the next frame for batch_scoring.py.
    layer = find_prednet(load_model(model_dir / "model.keras"))
    assert layer.extrap_start_time == 2 and predictor(layer).layers[-1].extrap_start_time is None


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"dataset": "Nope"}, "No prepared dataset .Nope. in .*; it holds Synthetic"),
        ({"nt": 30}, "longer than the shortest train video"),
        ({"stack_sizes": (4, 8, 8, 8)}, "does not suit a 5-layer PredNet"),
        ({"lr_schedule": "cosine"}, "--lr_schedule must be one of"),
        ({"nt": 1}, "at least 2"),
        ({"horizon": 4}, "horizon < nt"),
        ({"horizon": 2, "layer_loss_weights": (1.0, 0.1)}, "L_0"),
        ({"max_minutes": 0}, "--max_minutes must be positive"),
    ],
)
def test_bad_input(overrides, message, prepared, tmp_path):
    with pytest.raises(PipelineError, match=message):
        train(tiny_settings(prepared, tmp_path / "m", **overrides))
    assert not (tmp_path / "m" / "model.keras").exists()


def test_existing_model_is_kept(trained, prepared):
    with pytest.raises(PipelineError, match="already holds a trained model"):
        train(tiny_settings(prepared, trained))


def test_cli_error_exit(prepared, tmp_path):
    done = run_script("train.py", "--config", "cpu", "--preprocessed_data", str(tmp_path), "--dataset", "Missing")
    assert done.returncode == 2 and "data_preparation.py" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["default", "cpu"])
def test_config_files_parse(name):
    import train as train_script

    args = train_script.parse_args(["--config", name, "--dataset", "Ped2"])
    file = json.loads((ROOT / "config" / f"{name}.json").read_text())
    for key, value in file.items():  # every value of the file, checked by the same types as the flags
        if not key.startswith("_"):
            assert getattr(args, key) == (tuple(value) if isinstance(value, list) else value), key
    assert args.model_dir == "outputs/models/Ped2" and args.horizon == 1  # not in the file: the flag's default
    TrainSettings(**{k: v for k, v in vars(args).items() if k not in ("config", "quiet", "verbose")})


def test_training_defaults_are_the_default_config():
    import dataclasses
    import json

    from models.config import CONFIG_DIR

    config = {k: v for k, v in json.loads((CONFIG_DIR / "default.json").read_text()).items() if not k.startswith("_")}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    assert set(config) <= set(defaults)  # every setting of the file is a TrainSettings field ...
    for name, value in config.items():  # ... whose default is the file's value
        assert defaults[name] == (tuple(value) if isinstance(value, list) else value), name
    import train as train_script

    args = vars(train_script.parse_args(["--dataset", "d"]))  # and train.py without flags trains the same
    assert all(args[name] == defaults[name] for name in config)


def test_step_schedule_is_the_references():
    from models.training import learning_rate

    s = TrainSettings("p", "d", "m", learning_rate=1e-3, lr_schedule="step", lr_step_epoch=75)
    assert [learning_rate(s, e) for e in (0, 74, 75, 149)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    s = TrainSettings("p", "d", "m", learning_rate=1e-2, lr_schedule="decay", lr_decay=0.5)
    assert [learning_rate(s, e) for e in (0, 1, 2)] == pytest.approx([1e-2, 5e-3, 2.5e-3])


def test_step_schedule_in_training(prepared, tmp_path):
    s = tiny_settings(prepared, tmp_path / "m", nb_epoch=3, lr_schedule="step", lr_step_epoch=2)
    train(s)
    history = pd.read_csv(tmp_path / "m" / "history.csv")
    np.testing.assert_allclose(history["learning_rate"], [0.01, 0.01, 0.001])


def test_bf16_training_on_tensorflow(prepared, tmp_path):
    config = train(tiny_settings(prepared, tmp_path / "m", nb_epoch=2, precision="mixed_bfloat16"))
    assert np.isfinite(config["results"]["next_frame_mse"]) and config["arguments"]["precision"] == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"  # train() left the global policy as it found it
    model = load_model(tmp_path / "m" / "model.keras")
    assert find_prednet(model).dtype_policy.name == "mixed_bfloat16"
    assert all(w.dtype == "float32" for w in model.weights)  # bf16 compute, float32 weights
