"""A trained model folder in one call (`models.load`), and Keras's own loader after `import models`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from conftest import ROOT

import models
from models.prednet import find_prednet, load_model, predictor


def test_load_gives_the_predicting_model_of_the_folder(trained):
    model = models.load(trained)
    frames = np.random.default_rng(0).random((2, 5, 16, 24, 1)).astype("float32")
    # the same weights as the training graph's PredNet layer, asked for its predictions
    direct = predictor(find_prednet(load_model(trained / "model.keras")), "prediction")
    np.testing.assert_allclose(model.predict(frames, verbose=0), direct.predict(frames, verbose=0), atol=1e-6)
    assert model.output.shape == (None, None, 16, 24, 1)  # frames, not the training loss (None, 1)


def test_keras_load_model_works_after_import_models_alone(trained):
    code = (
        "import sys, models\n"
        "assert 'keras' not in sys.modules  # importing models stays light\n"
        "import keras\n"
        "model = keras.saving.load_model(sys.argv[1])\n"
        "print(model.name, [layer.__class__.__name__ for layer in model.layers])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(trained / "model.keras")], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "prednet_training" and "PredNet" in done.stdout


def test_a_damaged_model_file_is_named_as_such(tmp_path):
    import pytest

    from models.errors import PipelineError

    path = tmp_path / "model.keras"
    path.write_text("not a model")  # Keras itself would say "File not found"
    with pytest.raises(PipelineError, match=r"model.keras: not a .keras file \(a zip archive\); it is damaged"):
        load_model(path)
