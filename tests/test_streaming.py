"""Streams scored frame by frame with the model's states carried along equal the windowed batch scores."""

import numpy as np
import pytest

from models.calibration import Calibration
from models.data.store import load_split


@pytest.mark.parametrize("per_window,horizon", [(2, 1), (1, 1), (3, 1), (1, 2)])
def test_staggered_states_predict_as_the_windows(trained, prepared, per_window, horizon):
    from models.inference import load_predictor, predict_videos
    from models.streaming import StaggeredStates

    model, layer, _ = load_predictor(trained)
    X, sources = load_split(prepared, "test")
    X, sources = X[:24], sources[:24]  # one video
    window = 4  # the model's training window
    batch, batch_err, _ = predict_videos(model, X, sources, 5, window, horizon, per_window)
    states = StaggeredStates(layer, window, per_window, horizon)
    assert states.slots == -(-window // per_window)  # model steps per frame: 2 for half the window
    for t, frame in enumerate(X):
        prediction, error = states.push(frame)
        if t >= horizon:  # earlier frames: nothing `horizon` frames before them to predict from
            np.testing.assert_allclose(prediction, batch[t], atol=2e-5, err_msg=f"frame {t}")
            np.testing.assert_allclose(error, batch_err[t], atol=2e-5, err_msg=f"frame {t}")


def test_stream_scores_equal_the_batch_scores(trained, prepared):
    from models.inference import load_predictor
    from models.live import score_frames
    from models.streaming import score_stream

    model, layer, _ = load_predictor(trained)
    cal = Calibration.load(trained / "calibration.json")
    X, sources = load_split(prepared, "test")
    X, sources = X[24:48], sources[24:48]
    df, _, _, _ = score_frames(model, X, sources, cal)
    scores = score_stream(layer, X, cal)
    np.testing.assert_allclose([s.score for s in scores], df["score"], atol=1e-4, equal_nan=True)
    np.testing.assert_allclose([s.copy_score for s in scores], df["copy_score"], atol=1e-4, equal_nan=True)
    assert [s.alarm for s in scores] == df["alarm"].astype(bool).tolist()
    assert np.isfinite([s.score for s in scores]).sum() == df["score"].notna().sum() > 0


def test_streams_sharing_model_calls_get_their_own_predictions(trained, prepared):
    """Three streams that start at different frames, moved on together in calls padded with empty streams,
    predict each frame as the same stream alone: no state leaks between streams or from the padding."""
    from models.inference import load_predictor
    from models.streaming import StaggeredStates, StateStepper

    _, layer, _ = load_predictor(trained)
    X, _ = load_split(prepared, "test")
    videos = [X[:24], X[24:48], X[::-1][:24]]
    alone = []
    for frames in videos:
        states = StaggeredStates(layer, 4, 2)
        alone.append(np.stack([states.push(f)[0] for f in frames]))
    stepper = StateStepper(layer, 4, 2)
    streams = [stepper.new_stream() for _ in videos]
    starts = [0, 3, 7]  # stream k joins at call starts[k]
    shared = [[] for _ in videos]
    for call in range(24 + max(starts)):
        active = [k for k in range(3) if 0 <= call - starts[k] < 24]
        frames = [videos[k][call - starts[k]] for k in active]
        predictions, _ = stepper.step([streams[k] for k in active], frames, pad_to=4)
        for k, p in zip(active, predictions, strict=True):
            shared[k].append(p)
    for k in range(3):
        np.testing.assert_allclose(np.stack(shared[k]), alone[k], atol=2e-5, err_msg=f"stream {k}")
    assert stepper.slots == 2  # model steps per frame with half the window scored


def test_a_stream_with_a_frame_waiting_cannot_send_another(trained, prepared):
    """Its states move on once per answered frame: a second frame before the answer is refused, the first
    is answered as if alone."""
    import asyncio

    from models.errors import PipelineError
    from models.inference import load_predictor
    from models.streaming import StaggeredStates, StateBatcher, StateStepper

    _, layer, _ = load_predictor(trained)
    X, _ = load_split(prepared, "test")

    async def run():
        batcher = StateBatcher(StateStepper(layer, 4, 2), max_batch=4, max_wait_ms=20)
        await batcher.start()
        stream = batcher.stepper.new_stream()
        try:
            return await asyncio.gather(
                batcher.submit(stream, X[0]), batcher.submit(stream, X[1]), return_exceptions=True
            )
        finally:
            await batcher.stop()

    first, second = asyncio.run(run())
    assert isinstance(second, PipelineError) and "before the answer to its last one" in str(second)
    np.testing.assert_allclose(first, StaggeredStates(layer, 4, 2).push(X[0])[0], atol=2e-5)
