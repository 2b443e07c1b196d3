import json

import keras
import numpy as np
import pytest
from conftest import ROOT, run_on_jax

from models.prednet import PredNet, WeightedError, build_training_model, find_prednet, predictor, window_scorer

# Outputs of the constant-initialiser test below, checked by hand at step 0 and by the NumPy reference.
PINNED_PRED = [0.13628924, 0.2045117, 0.2829188]
PINNED_ERR = [0.22714797, 0.21782865, 0.22859615]
X = np.random.default_rng(0).random((3, 2, 4, 4, 3)).astype("float32")  # (batch, time, h, w, c)


def layer(**kwargs):
    return PredNet(**({"stack_sizes": (3, 4), "R_stack_sizes": (5, 6)} | kwargs))


@pytest.mark.parametrize(
    "mode,shape",
    [
        ("error", (3, 2, 2)),
        ("prediction", (3, 2, 4, 4, 3)),
        ("R0", (3, 2, 4, 4, 5)),
        ("R1", (3, 2, 2, 2, 6)),
        ("E1", (3, 2, 2, 2, 8)),
        ("A1", (3, 2, 2, 2, 4)),
        ("Ahat0", (3, 2, 4, 4, 3)),
    ],
)
def test_output_shapes(mode, shape):
    assert tuple(layer(output_mode=mode)(X).shape) == shape


def test_all_mode_returns_prediction_and_errors():
    out = layer(output_mode="all")(X)
    assert tuple(out["prediction"].shape) == (3, 2, 4, 4, 3) and tuple(out["error"].shape) == (3, 2, 2)


def test_weight_count():
    p = layer()
    p.build(X.shape)
    # LSTM convs: 3x3 over [R, E, R_up] -> 4R; Ahat: 3x3 R -> stack; A: 3x3 E -> next stack.
    lstm = (3 * 3 * (5 + 6 + 6) * 20 + 20) + (3 * 3 * (6 + 8) * 24 + 24)
    ahat = (3 * 3 * 5 * 3 + 3) + (3 * 3 * 6 * 4 + 4)
    a = 3 * 3 * 6 * 4 + 4
    assert p.count_params() == lstm + ahat + a


def test_bad_arguments_repeat_the_value():
    with pytest.raises(ValueError, match="output_mode='R7'"):
        layer(output_mode="R7")
    with pytest.raises(ValueError, match="R_stack_sizes"):
        PredNet(stack_sizes=(3, 4), R_stack_sizes=(5,))
    with pytest.raises(ValueError, match="divide by 2"):
        layer()(np.zeros((1, 2, 5, 4, 3), "float32"))


# A NumPy reference of the equations, independent of Keras.
def _conv_same(x, kernel, bias):
    k = kernel.shape[0] // 2
    xp = np.pad(x, ((0, 0), (k, k), (k, k), (0, 0)))
    out = np.zeros((*x.shape[:3], kernel.shape[-1]))
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            out += xp[:, i : i + x.shape[1], j : j + x.shape[2]] @ kernel[i, j]
    return out + bias


def _hard_sigmoid(x):
    return np.clip(x / 6 + 0.5, 0, 1)


def reference(frames, weights, stack, r_stack):
    n = len(stack)
    w = iter(weights)
    lstm, ahat, a_conv = [], [], []
    for l in range(n):
        lstm.append((next(w), next(w)))
        ahat.append((next(w), next(w)))
        if l < n - 1:
            a_conv.append((next(w), next(w)))
    b, t_max, h, wd, _ = frames.shape
    r = [np.zeros((b, h >> l, wd >> l, r_stack[l])) for l in range(n)]
    c = [np.zeros_like(x) for x in r]
    e = [np.zeros((b, h >> l, wd >> l, 2 * stack[l])) for l in range(n)]
    preds, errs = [], []
    for t in range(t_max):
        for l in reversed(range(n)):
            inp = [r[l], e[l]]
            if l < n - 1:
                inp.append(r[l + 1].repeat(2, axis=1).repeat(2, axis=2))
            z = _conv_same(np.concatenate(inp, -1), *lstm[l])
            i, f, ch, o = np.split(z, 4, axis=-1)
            c[l] = _hard_sigmoid(f) * c[l] + _hard_sigmoid(i) * np.tanh(ch)
            r[l] = _hard_sigmoid(o) * np.tanh(c[l])
        a = frames[:, t]
        layer_err = []
        for l in range(n):
            ah = np.maximum(_conv_same(r[l], *ahat[l]), 0)
            if l == 0:
                ah = np.minimum(ah, 1.0)
                preds.append(ah)
            e[l] = np.concatenate([np.maximum(a - ah, 0), np.maximum(ah - a, 0)], -1)
            layer_err.append(e[l].mean(axis=(1, 2, 3)))
            if l < n - 1:
                a = np.maximum(_conv_same(e[l], *a_conv[l]), 0)
                a = a.reshape(b, a.shape[1] // 2, 2, a.shape[2] // 2, 2, -1).max(axis=(2, 4))
        errs.append(np.stack(layer_err, -1))
    return np.stack(preds, 1), np.stack(errs, 1)


def test_matches_numpy_reference():
    frames = np.random.default_rng(1).random((2, 4, 4, 4, 3)).astype("float32")
    p = layer(output_mode="all")
    p.build(frames.shape)
    rng = np.random.default_rng(2)
    weights = [rng.normal(0, 0.3, w.shape).astype("float32") for w in p.get_weights()]
    p.set_weights(weights)
    out = p(frames)
    ref_pred, ref_err = reference(frames.astype(np.float64), weights, (3, 4), (5, 6))
    np.testing.assert_allclose(np.asarray(out["prediction"]), ref_pred, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["error"]), ref_err, atol=1e-5)


def test_constant_initialisers_pinned_numbers():
    p = PredNet(stack_sizes=(1, 2), output_mode="all")
    frames = np.linspace(0, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8, 1).astype("float32")
    p.build(frames.shape)
    p.set_weights([np.full(w.shape, 0.1, "float32") for w in p.get_weights()])
    out = p(frames)
    pred, err = np.asarray(out["prediction"]), np.asarray(out["error"])
    # Step 0, away from the borders: layer 1 sees only its biases, so its gates are hard_sigmoid(0.1) and
    # R1 = g tanh(g tanh(0.1)); layer 0 adds 9 taps x 2 channels of 0.1 * R1 to its bias.
    hs = lambda x: x / 6 + 0.5  # noqa: E731 (Keras 3 hard_sigmoid inside [-3, 3])
    g = hs(0.1)
    r1 = g * np.tanh(g * np.tanh(0.1))
    z0 = 0.1 + 18 * 0.1 * r1
    r0 = hs(z0) * np.tanh(hs(z0) * np.tanh(z0))
    assert pred[0, 0, 3, 3, 0] == pytest.approx(0.1 + 9 * 0.1 * r0, abs=1e-6)
    np.testing.assert_allclose(pred[0, :, 3, 3, 0], PINNED_PRED, atol=1e-5)
    np.testing.assert_allclose(err[1, :, 0], PINNED_ERR, atol=1e-5)


def test_extrapolation_feeds_predictions_back():
    frames = np.random.default_rng(3).random((2, 6, 4, 4, 3)).astype("float32")
    p = layer(output_mode="prediction", extrap_start_time=3)
    base = np.asarray(p(frames))
    changed = frames.copy()
    changed[:, 3:] = 0.0  # frames from step 3 on are never read
    np.testing.assert_allclose(np.asarray(p(changed)), base, atol=1e-6)
    changed[:, 2] = 0.0  # step 2 still is
    assert not np.allclose(np.asarray(p(changed)), base)


def extrapolating_and_plain(shape, extrap_start_time):
    """Two layers with the same weights, output_mode 'all': one extrapolating from that step, one not."""
    extrap = layer(output_mode="all", extrap_start_time=extrap_start_time)
    extrap.build(shape)
    plain = layer(output_mode="all")
    plain.build(shape)
    plain.set_weights(extrap.get_weights())
    return extrap, plain


def test_extrapolation_is_closed_loop():
    # From step 3 on, the model's prediction of each frame stands in for it: the same as a model without
    # extrapolation fed those predictions as frames.
    frames = np.random.default_rng(4).random((2, 6, 4, 4, 3)).astype("float32")
    extrap, plain = extrapolating_and_plain(frames.shape, extrap_start_time=3)
    out = extrap(frames)
    fed = frames.copy()
    fed[:, 3:] = np.asarray(out["prediction"])[:, 3:]
    again = plain(fed)
    np.testing.assert_allclose(np.asarray(again["prediction"]), np.asarray(out["prediction"]), atol=1e-6)
    assert np.abs(np.asarray(out["error"])[:, 3:, 0]).max() < 1e-6  # a fed prediction has no error


def test_fed_steps_are_chosen_per_sequence():
    # (frames, fed): the prediction replaces the frame where fed > 0, sequence by sequence; a sequence fed
    # from step 3 on is the extrapolation above, one fed nowhere the plain model.
    frames = np.random.default_rng(6).random((2, 6, 4, 4, 3)).astype("float32")
    extrap, plain = extrapolating_and_plain(frames.shape, extrap_start_time=3)
    extrap_out = extrap(frames)
    fed = np.zeros((2, 6), "float32")
    fed[0, 3:] = 1
    out = plain((frames, fed))
    for key in ("prediction", "error"):
        np.testing.assert_allclose(np.asarray(out[key])[0], np.asarray(extrap_out[key])[0], atol=1e-6)
        np.testing.assert_allclose(np.asarray(out[key])[1], np.asarray(plain(frames)[key])[1], atol=1e-6)


def test_window_scorer_returns_the_picked_steps_of_uint8_windows():
    keras.utils.set_random_seed(0)
    model = build_training_model(5, (4, 4, 3), (1.0, 0.0), stack_sizes=(3, 4), R_stack_sizes=(5, 6))
    frames = np.random.default_rng(7).integers(0, 256, (2, 5, 4, 4, 3)).astype("uint8")
    fed = np.zeros((2, 5), "float32")
    fed[1, 2:4] = 1
    picked = [(4, 2), (3, None)]  # steps to return of each window (None: nothing)
    pick = np.zeros((2, 2, 5), "float32")
    for j, steps in enumerate(picked):
        for k, step in enumerate(steps):
            if step is not None:
                pick[j, k, step] = 1
    out = window_scorer(model, 5, per_window=2).predict_on_batch([frames, fed, pick])
    full = predictor(model, "all", fed=True).predict_on_batch([frames / np.float32(255), fed])
    assert out["prediction"].shape == (2, 2, 4, 4, 3) and out["error"].shape == (2, 2, 2)
    for j, steps in enumerate(picked):
        for k, step in enumerate(steps):
            want = {key: 0 * full[key][j, 0] if step is None else full[key][j, step] for key in ("prediction", "error")}
            np.testing.assert_allclose(out["prediction"][j, k], want["prediction"], atol=1e-6)
            np.testing.assert_allclose(out["error"][j, k], want["error"], atol=1e-6)


def test_training_several_frames_ahead_scores_the_predictions():
    keras.utils.set_random_seed(0)
    model = build_training_model(5, (4, 4, 3), (1.0, 0.0), horizon=3, stack_sizes=(3, 4), R_stack_sizes=(5, 6))
    frames = np.random.default_rng(5).random((2, 5, 4, 4, 3)).astype("float32")
    expected = predictor(model, "prediction", extrap_start_time=2).predict_on_batch(frames)
    loss = 0.5 * np.abs(np.asarray(expected)[:, 1:] - frames[:, 1:]).mean(axis=(1, 2, 3, 4))
    np.testing.assert_allclose(model.predict_on_batch(frames)[:, 0], loss, rtol=1e-5)
    with pytest.raises(Exception, match="L_0"):
        build_training_model(5, (4, 4, 3), (1.0, 0.1), horizon=3, stack_sizes=(3, 4))
    with pytest.raises(Exception, match="horizon < nt"):
        build_training_model(5, (4, 4, 3), (1.0, 0.0), horizon=5, stack_sizes=(3, 4))


def test_config_and_keras_round_trip(tmp_path):
    model = build_training_model(3, (4, 4, 3), (1.0, 0.1), stack_sizes=(3, 4), R_stack_sizes=(5, 6))
    x = X[:, :2].repeat(2, axis=1)[:, :3]
    expected = model.predict(x, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    cfg = find_prednet(model).get_config()
    again = PredNet.from_config(json.loads(json.dumps(cfg)))
    assert again.get_config() == json.loads(json.dumps(cfg)) | {
        "stack_sizes": (3, 4),
        "R_stack_sizes": (5, 6),
        "A_filt_sizes": (3,),
        "Ahat_filt_sizes": (3, 3),
        "R_filt_sizes": (3, 3),
    }
    assert find_prednet(loaded).get_config()["stack_sizes"] == (3, 4)


def test_weighted_error_skips_step_zero():
    errors = np.array([[[9.0, 9.0], [1.0, 2.0], [3.0, 4.0]]], "float32")
    out = WeightedError((1.0, 0.5))(errors)
    assert float(out[0, 0]) == pytest.approx(((1 + 1) + (3 + 2)) / 2)


def test_error_model_becomes_predictor_without_retraining():
    model = build_training_model(2, (4, 4, 3), (1, 0), stack_sizes=(3, 4))
    direct = PredNet.from_config({**find_prednet(model).get_config(), "output_mode": "prediction", "name": "p2"})
    direct.build((None, None, 4, 4, 3))
    direct.set_weights(find_prednet(model).get_weights())
    pred = predictor(model, "prediction")
    long = np.random.default_rng(5).random((1, 7, 4, 4, 3)).astype("float32")  # longer than training windows
    np.testing.assert_allclose(pred.predict(long, verbose=0), np.asarray(direct(long)), atol=1e-6)


def test_same_outputs_on_tensorflow_and_jax(tmp_path):
    pytest.importorskip("jax")
    model = build_training_model(3, (4, 4, 3), (1, 0), stack_sizes=(3, 4))
    model.save(tmp_path / "m.keras")
    frames = np.random.default_rng(4).random((2, 5, 4, 4, 3)).astype("float32")
    np.save(tmp_path / "x.npy", frames)
    expected = predictor(model, "all").predict(frames, verbose=0)
    script = (
        "import sys, numpy as np, keras; sys.path.insert(0, sys.argv[1])\n"
        "from models.prednet import predictor\n"
        "m = keras.saving.load_model(sys.argv[2] + '/m.keras')\n"
        "out = predictor(m, 'all').predict(np.load(sys.argv[2] + '/x.npy'), verbose=0)\n"
        "np.save(sys.argv[2] + '/p.npy', out['prediction']); np.save(sys.argv[2] + '/e.npy', out['error'])\n"
        "print(keras.backend.backend())\n"
    )
    done = run_on_jax(script, ROOT, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "jax", done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected["prediction"], atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), expected["error"], atol=1e-5)
