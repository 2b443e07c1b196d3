"""The ConvLSTM autoencoder: the layer against a NumPy reference, its models, training and scoring it through
the model registry, side by side with PredNet."""

import json
import shutil

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, run_on_jax, run_script, tiny_settings

from models.convlstm_ae import (
    ConvLSTMAutoencoder,
    build_training_model,
    find_autoencoder,
    reconstructor,
    window_scorer,
)
from models.errors import PipelineError

# Reconstructions of the constant-weight test below at pixel (0, 0), steps 0-2, from the NumPy reference
# (step 0 also by hand, in the test).
PINNED = [0.52802145, 0.53159916, 0.53579480]
TINY = dict(channels=2, encoder_filters=(3, 4), encoder_kernels=(2, 2), encoder_strides=(2, 2), lstm_filters=(5, 3))


def tiny_layer(**kwargs):
    return ConvLSTMAutoencoder(**(TINY | kwargs))


# A NumPy reference of the equations, independent of Keras. Kernels (kh, kw, in, out) for convolutions and
# (kh, kw, out, in) for transposed ones, as Keras stores them.
def _conv_same(x, kernel, bias):
    k = kernel.shape[0] // 2
    xp = np.pad(x, ((0, 0), (k, k), (k, k), (0, 0)))
    out = np.zeros((*x.shape[:3], kernel.shape[-1]))
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            out += xp[:, i : i + x.shape[1], j : j + x.shape[2]] @ kernel[i, j]
    return out + bias


def _conv_2x2_stride_2(x, kernel, bias):
    """A 2x2 convolution with stride 2 ('same' padding adds nothing when the size is even)."""
    out = sum(x[:, a::2, b::2] @ kernel[a, b] for a in range(2) for b in range(2))
    return out + bias


def _deconv_2x2_stride_2(x, kernel, bias):
    """The transposed 2x2 stride-2 convolution: each input pixel writes one 2x2 block of the output."""
    n, h, w, _ = x.shape
    out = np.zeros((n, 2 * h, 2 * w, kernel.shape[2]))
    for a in range(2):
        for b in range(2):
            out[:, a::2, b::2] = x @ kernel[a, b].T
    return out + bias


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def reference(frames, weights, n_encoder, n_lstm):
    """Encoder (tanh), stacked ConvLSTMs (gates i, f, c, o), decoder (tanh, then sigmoid), frame by frame."""
    w = iter(weights)
    enc = [(next(w), next(w)) for _ in range(n_encoder)]
    lstm = [(next(w), next(w)) for _ in range(n_lstm)]
    dec = [(next(w), next(w)) for _ in range(n_encoder)]
    b, t_max = frames.shape[:2]
    h = c = None
    out = []
    for t in range(t_max):
        x = frames[:, t]
        for kernel, bias in enc:
            x = np.tanh(_conv_2x2_stride_2(x, kernel, bias))
        if h is None:
            h = [np.zeros((*x.shape[:3], k.shape[-1] // 4)) for k, _ in lstm]
            c = [np.zeros_like(v) for v in h]
        for l, (kernel, bias) in enumerate(lstm):
            i, f, ch, o = np.split(_conv_same(np.concatenate([x, h[l]], -1), kernel, bias), 4, axis=-1)
            c[l] = _sigmoid(f) * c[l] + _sigmoid(i) * np.tanh(ch)
            h[l] = _sigmoid(o) * np.tanh(c[l])
            x = h[l]
        for k, (kernel, bias) in enumerate(dec):
            x = _deconv_2x2_stride_2(x, kernel, bias)
            x = _sigmoid(x) if k == len(dec) - 1 else np.tanh(x)
        out.append(x)
    return np.stack(out, 1)


def test_output_shape_and_weight_count():
    layer = tiny_layer()
    x = np.zeros((3, 2, 8, 8, 2), "float32")
    assert tuple(layer(x).shape) == (3, 2, 8, 8, 2)
    encoder = (2 * 2 * 2 * 3 + 3) + (2 * 2 * 3 * 4 + 4)
    lstm = (3 * 3 * (4 + 5) * 20 + 20) + (3 * 3 * (5 + 3) * 12 + 12)
    decoder = (2 * 2 * 3 * 3 + 3) + (2 * 2 * 2 * 3 + 2)  # transposed: 3 -> 3 channels, then 3 -> 2
    assert layer.count_params() == encoder + lstm + decoder


def test_bad_arguments_repeat_the_value():
    with pytest.raises(ValueError, match=r"encoder_strides=\(2,\)"):
        tiny_layer(encoder_strides=(2,))
    with pytest.raises(ValueError, match="lstm_filters=()"):
        tiny_layer(lstm_filters=())
    with pytest.raises(ValueError, match="divide by 4"):
        tiny_layer()(np.zeros((1, 2, 6, 8, 2), "float32"))
    with pytest.raises(ValueError, match="3 channels"):
        tiny_layer()(np.zeros((1, 2, 8, 8, 3), "float32"))


def test_matches_numpy_reference():
    frames = np.random.default_rng(1).random((2, 3, 8, 8, 2)).astype("float32")
    layer = tiny_layer()
    layer.build(frames.shape)
    rng = np.random.default_rng(2)
    weights = [rng.normal(0, 0.5, w.shape).astype("float32") for w in layer.get_weights()]
    layer.set_weights(weights)
    expected = reference(frames.astype(np.float64), weights, 2, 2)
    np.testing.assert_allclose(np.asarray(layer(frames)), expected, atol=1e-5)


def test_constant_weights_pinned_numbers():
    layer = ConvLSTMAutoencoder(1, (2,), (2,), (2,), (2,))
    frames = np.linspace(0, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4, 1).astype("float32")
    layer.build(frames.shape)
    weights = [np.full(w.shape, 0.1, "float32") for w in layer.get_weights()]
    layer.set_weights(weights)
    out = np.asarray(layer(frames))
    np.testing.assert_allclose(reference(frames.astype(np.float64), weights, 1, 1)[0, :, 0, 0, 0], PINNED, atol=1e-7)
    np.testing.assert_allclose(out[0, :, 0, 0, 0], PINNED, atol=1e-6)
    # Step 0 by hand: each of the 2x2 codes is tanh(0.1 + 0.1 * its 2x2 block of pixels) in both channels; the
    # LSTM's 3x3 window at code (0, 0) sees all four codes, so its four gates share z = 0.1 + 0.1 * 2 * their
    # sum, and h = s(z) tanh(s(z) tanh(z)); the decoder's pixel (0, 0) is sigmoid(0.1 + 0.1 * 2h).
    x = frames[0, 0, :, :, 0].astype(np.float64)
    codes = np.tanh(0.1 + 0.1 * x.reshape(2, 2, 2, 2).sum(axis=(1, 3)))
    z = 0.1 + 0.2 * codes.sum()
    h = _sigmoid(z) * np.tanh(_sigmoid(z) * np.tanh(z))
    assert PINNED[0] == pytest.approx(_sigmoid(0.1 + 0.2 * h), abs=1e-7)


def test_forget_bias_starts_at_one():
    layer = tiny_layer()
    layer.build((None, 2, 8, 8, 2))
    bias = np.asarray(layer.lstm_convs[0].bias)
    assert (bias[5:10] == 1).all() and (bias[:5] == 0).all() and (bias[10:] == 0).all()


def test_a_frame_is_reconstructed_from_frames_up_to_it():
    frames = np.random.default_rng(3).random((2, 5, 8, 8, 2)).astype("float32")
    layer = tiny_layer()
    base = np.asarray(layer(frames))
    changed = frames.copy()
    changed[:, 3:] = 0.0
    np.testing.assert_allclose(np.asarray(layer(changed))[:, :3], base[:, :3], atol=1e-6)
    assert not np.allclose(np.asarray(layer(changed))[:, 3], base[:, 3])


def test_config_and_keras_round_trip(tmp_path):
    model = build_training_model(3, (8, 8, 2), **TINY)
    x = np.random.default_rng(4).random((2, 3, 8, 8, 2)).astype("float32")
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    cfg = json.loads(json.dumps(find_autoencoder(model).get_config()))
    assert ConvLSTMAutoencoder.from_config(cfg).get_config() == cfg | {
        k: tuple(v) for k, v in cfg.items() if isinstance(v, list)
    }
    recon = np.asarray(reconstructor(model).predict_on_batch(x))
    assert float(expected.mean()) == pytest.approx(float(((recon - x) ** 2).mean()), rel=1e-5)


def test_window_scorer_gives_the_last_frame_and_the_window_src():
    model = build_training_model(4, (8, 8, 2), **TINY)
    frames = np.random.default_rng(5).integers(0, 256, (3, 4, 8, 8, 2)).astype("uint8")
    out = window_scorer(model, 4).predict_on_batch(frames)
    x = frames / np.float32(255)
    recon = np.asarray(reconstructor(model).predict_on_batch(x))
    np.testing.assert_allclose(out["reconstruction"], recon[:, -1], atol=1e-6)
    src = np.sqrt(((x - recon) ** 2).sum(axis=(2, 3, 4))).sum(axis=1)
    np.testing.assert_allclose(out["src"][:, 0], src, rtol=1e-5)


def test_windows_end_at_each_frame_front_padded_within_its_video():
    from models.registry import window_indices

    sources = np.array(["a"] * 4 + ["b"] * 2)
    index = window_indices(sources, 3)
    assert index.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [1, 2, 3], [4, 4, 4], [4, 4, 5]]


class PerfectFrames:
    """A frame model that reconstructs every frame exactly: a third model through the seam."""

    error_names = ("src",)

    def __init__(self, frame_shape):
        self.frame_shape = frame_shape

    def predict_videos(self, X, sources, batch_size=4, window=None, horizon=1, per_window=1, progress=None):
        return X.astype(np.float32) / 255.0, np.zeros((len(X), 1), np.float32), 1.0


def _score(model, prepared, config):
    from models.data.store import load_labels, load_split
    from models.live import calibrate, score_frames, scoring_settings
    from models.scoring import add_smoothed

    X_tr, s_tr = load_split(prepared, "train")
    settings = scoring_settings(config)
    cal = calibrate(model, X_tr, s_tr, None, settings, batch_size=8)
    X, sources = load_split(prepared, "test")
    df, _, _, _ = score_frames(model, X, sources, cal, load_labels(prepared), batch_size=8)
    return add_smoothed(df, 5), cal


def test_a_perfect_reconstruction_is_regular_everywhere(prepared):
    model = PerfectFrames((16, 24, 1))
    df, cal = _score(model, prepared, {"arguments": {"nt": 4}, "model": "convlstm_ae"})
    scored = df[df["predictable"]]
    assert (cal.window, cal.per_window) == (4, 1)
    assert (scored["model_mse"] == 0).all() and (scored["model_src_regularity"] == 1).all()
    assert scored["copy_src_regularity"].between(0, 1).all() and scored["copy_src_regularity"].min() < 1


@pytest.fixture(scope="session")
def trained_ae(prepared, tmp_path_factory):
    from models.training import train

    model_dir = tmp_path_factory.mktemp("ae") / "m"
    train(ae_settings(prepared, model_dir))
    return model_dir


def ae_settings(prepared, model_dir, **overrides):
    values = dict(model="convlstm_ae", ae_filters=(4, 4), ae_kernels=(3, 3), ae_strides=(2, 2), ae_lstm_filters=(4,))
    return tiny_settings(prepared, model_dir, **(values | overrides))


def test_model_folder_records_the_model(trained_ae):
    from models.inference import load_predictor
    from models.registry import AutoencoderFrames

    config = json.loads((trained_ae / "config.json").read_text())
    assert config["model"] == "convlstm_ae" and "prednet" not in config
    assert config["convlstm_ae"]["encoder_strides"] == [2, 2] and config["convlstm_ae"]["lstm_filters"] == [4]
    r = config["results"]
    assert r["reconstruction_mse"] > 0 and r["copy_last_frame_mse"] > 0 and r["epochs_run"] == 2
    assert (trained_ae / "calibration.json").is_file()
    model, layer, config = load_predictor(trained_ae)
    assert isinstance(model, AutoencoderFrames) and isinstance(layer, ConvLSTMAutoencoder)
    assert model.frame_shape == (16, 24, 1)


def test_resume_equals_uninterrupted_training(prepared, tmp_path):
    """One batch per epoch holding every window once, so that the order of windows cannot matter: two epochs
    in one run, and one epoch then a resumed second, end with the same weights and optimizer state."""
    from models.data.store import load_split
    from models.prednet import load_model
    from models.training import train, window_starts

    _, sources = load_split(prepared, "train")
    n = len(window_starts(sources, 4))
    one_batch = dict(batch_size=n, samples_per_epoch=n, strides=(1,))
    train(ae_settings(prepared, tmp_path / "a", **one_batch))
    train(ae_settings(prepared, tmp_path / "b", nb_epoch=1, **one_batch))
    train(ae_settings(prepared, tmp_path / "b", resume=True, **one_batch))
    a, b = (load_model(tmp_path / m / "checkpoints" / "last.keras", compile=True) for m in "ab")
    assert int(a.optimizer.iterations) == int(b.optimizer.iterations) == 2
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, atol=1e-6)
    assert pd.read_csv(tmp_path / "b" / "history.csv")["epoch"].tolist() == [0, 1]


def test_resume_refuses_another_model(trained_ae, prepared, tmp_path):
    from models.training import train

    model_dir = tmp_path / "m"
    shutil.copytree(trained_ae, model_dir)
    # (train.py --resume without --model continues the autoencoder: the run's own settings)
    with pytest.raises(PipelineError, match=r"\(--model convlstm_ae\); this run was given --model prednet"):
        train(tiny_settings(prepared, model_dir, nb_epoch=3, resume=True, given=("model",)))


def test_prednet_settings_are_refused(prepared, tmp_path):
    from models.training import train

    with pytest.raises(PipelineError, match="--freeze_layers: PredNet settings"):
        train(ae_settings(prepared, tmp_path / "m", freeze_layers=(0,)))
    with pytest.raises(PipelineError, match="24 does not suit the autoencoder: height and width must divide by 16"):
        train(ae_settings(prepared, tmp_path / "m", ae_strides=(4, 4)))


def test_the_seam_gives_both_models_the_same_table(trained, trained_ae, prepared):
    """PredNet and the autoencoder, loaded from their folders alone, give the same columns and protocols, plus
    PredNet's layer errors (the autoencoder's own error, the window SRC, is its `model_src`, which PredNet's
    table sums from its per-frame errors)."""
    from models.inference import load_predictor
    from models.report import protocol_table

    tables = {}
    for folder in (trained, trained_ae):
        model, _, config = load_predictor(folder)
        df, _ = _score(model, prepared, config)
        tables[config.get("model", "prednet")] = df
    prednet, ae = (set(tables[k].columns) for k in ("prednet", "convlstm_ae"))
    assert prednet - ae == {"model_E0", "model_E1", "model_E2"} and ae - prednet == set()
    rows = [protocol_table(df, 5) for df in tables.values()]
    assert rows[0].index.tolist() == rows[1].index.tolist() and len(rows[0]) == 4
    # The baseline does not depend on the model: the same copy columns in both tables where both score
    # (PredNet's computed on the device, the autoencoder's in NumPy: float32 sums in another order).
    both = tables["prednet"]["predictable"] & tables["convlstm_ae"]["predictable"]
    np.testing.assert_allclose(tables["prednet"]["copy_mse"][both], tables["convlstm_ae"]["copy_mse"][both], rtol=1e-5)


def test_batch_scoring_and_fit_anoms_take_the_autoencoder_folder(trained_ae, prepared, tmp_path):
    out = tmp_path / "scored"
    done = run_script(
        "batch_scoring.py",
        "--preprocessed_data",
        prepared.parent,
        "--dataset",
        prepared.name,
        "--model_dir",
        trained_ae,
        "--scored_data",
        out,
        "--smooth",
        "5",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["per_window"] == 1 and summary["window"] == 4
    assert any(name.startswith("offline, SRC") for name in summary["protocols"])
    assert "model_src_regularity" in summary["metrics"]
    df = pd.read_pickle(out / "df.pkl.gz")
    assert {"model_src", "model_score", "alarm"} <= set(df.columns)
    done = run_script("fit_anoms.py", "--scored_data", out, "--model_path", tmp_path / "anoms")
    assert done.returncode == 0, done.stderr[-2000:]


def test_train_cli_knows_the_registry():
    import train
    from models.registry import SPECS

    assert sorted(train.SPECS) == sorted(SPECS)
    args = train.parse_args(["--model", "convlstm_ae", "--preprocessed_data", "p", "--dataset", "d"])
    assert args.config == "convlstm_ae" and args.ae_strides == (4, 2) and args.strides == (1, 2, 3, 4)
    assert train.parse_args(["--preprocessed_data", "p", "--dataset", "d"]).model == "prednet"
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "unet"])


def test_compare_models_puts_both_models_and_the_baseline_in_one_table(trained, trained_ae, prepared, tmp_path):
    out = tmp_path / "compare.md"
    done = run_script(
        "benchmarks/compare_models.py",
        "--preprocessed_data",
        prepared.parent,
        "--dataset",
        prepared.name,
        "--model_dir",
        trained,
        trained_ae,
        "--smooth",
        "5",
        "--out",
        out,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    header = text.splitlines()[2]
    assert "m (PredNet)" in header and "m (ConvLSTM autoencoder)" in header and header.count("copy, scored as") == 2
    assert "offline, SRC" in text and "live: calibrated score" in text and "scoring frames/s" in text


def test_prednet_only_stages_refuse_the_autoencoder_in_one_line(trained_ae, tmp_path):
    from models.export import scorer_for_export
    from models.service import ScoringModel, ServiceSettings
    from models.tuning import base_settings

    with pytest.raises(PipelineError, match="The export supports PredNet models only"):
        scorer_for_export(trained_ae)
    with pytest.raises(PipelineError, match="The service supports PredNet models only"):
        ScoringModel(trained_ae, ServiceSettings())
    with pytest.raises(PipelineError, match="The tuner supports PredNet models only"):
        base_settings("convlstm_ae_cpu", preprocessed_data="p", dataset="d", model_dir=str(tmp_path / "m"))


def test_same_reconstructions_on_tensorflow_and_jax(tmp_path):
    pytest.importorskip("jax")
    model = build_training_model(3, (8, 8, 2), **TINY)
    model.save(tmp_path / "m.keras")
    frames = np.random.default_rng(6).random((2, 5, 8, 8, 2)).astype("float32")
    np.save(tmp_path / "x.npy", frames)
    expected = reconstructor(model).predict(frames, verbose=0)
    script = (
        "import sys, numpy as np, keras; sys.path.insert(0, sys.argv[1])\n"
        "from models.convlstm_ae import reconstructor\n"
        "m = keras.saving.load_model(sys.argv[2] + '/m.keras')\n"
        "np.save(sys.argv[2] + '/r.npy', reconstructor(m).predict(np.load(sys.argv[2] + '/x.npy'), verbose=0))\n"
        "print(keras.backend.backend())\n"
    )
    done = run_on_jax(script, ROOT, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "jax", done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), expected, atol=1e-5)


def test_models_load_gives_the_autoencoder_as_a_keras_model_of_its_reconstructions(trained_ae, prepared):
    import keras

    import models
    from models.data.store import load_split

    model = models.load(trained_ae)
    assert isinstance(model, keras.Model)
    X, _ = load_split(prepared, "test")
    frames = (X[None, :8] / 255.0).astype("float32")
    expected = reconstructor(keras.saving.load_model(trained_ae / "model.keras")).predict(frames, verbose=0)
    np.testing.assert_allclose(model.predict(frames, verbose=0), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(PipelineError, match="output_mode 'prediction'"):
        models.load(trained_ae, "error")
