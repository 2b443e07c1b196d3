"""Training on JAX (CPU): every epoch changes every weight, also where JAX keeps the traces of loop bodies.

On the H100 (JAX 0.11.2) one run stopped in its first epoch with "Array has been deleted" naming the top
LSTM kernel, and a timed benchmark epoch left the weights unchanged. The cause: `lax.scan` caches the trace
of its body keyed on the body function, and the body was the layer's bound method `step`, which read the
weights from the layer; a trace taken while they were concrete arrays (building the model) held them as
constants, and a training step that found it in the cache trained nothing, then read them again after
donating them (docs/model_development.md). JAX 0.10.2 here drops that cache entry with the bound method, so
the test keeps every body's trace alive, as the H100's JAX evidently did, and checks that training is
unaffected: the PredNet layer now hands the weights to a new loop body on every call.
"""

import math

from conftest import run_on_jax, script_result

SCRIPT = """
import json, sys
from pathlib import Path
import keras, numpy as np
from jax._src import config as jax_config
from jax._src.interpreters import partial_eval as pe

traced, memo, hits = pe.trace_to_jaxpr, {}, []

def trace_kept_alive(fun, in_avals, debug_info, *context, **kwargs):
    # JAX's own cache (a weakref LRU cache) with a strong reference to the traced function.
    key = (fun, in_avals, debug_info, context, tuple(sorted(kwargs.items())), jax_config.trace_context())
    if key not in memo:
        memo[key] = traced(fun, in_avals, debug_info, *context, **kwargs)
    else:
        hits.append(getattr(fun, "__qualname__", str(fun)))
    return memo[key]

pe.trace_to_jaxpr = trace_kept_alive
sys.path.insert(0, "tests")
from conftest import tiny_settings
from models.prednet import find_prednet
from models.training import train


class WeightChanges(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.last, self.changes = find_prednet(self.model).get_weights(), []

    def on_epoch_end(self, epoch, logs=None):
        now = find_prednet(self.model).get_weights()
        self.changes.append([float(np.abs(a - b).max()) for a, b in zip(now, self.last)])
        self.last = now


prepared, out = Path(sys.argv[1]), Path(sys.argv[2])
result = {}
for name, precision in (("float32", "float32"), ("bf16", "mixed_bfloat16")):
    watch = WeightChanges()
    config = train(tiny_settings(prepared, out / name, seed=2, nb_epoch=3, precision=precision), [watch])
    result[name] = {
        "changes": watch.changes,
        "mse": config["results"]["next_frame_mse"],
        "copy": config["results"]["copy_last_frame_mse"],
        "policy_after": keras.config.dtype_policy().name,
    }
result["step_hits"] = [h for h in hits if "step" in h]
print("RESULT " + json.dumps(result))
"""


def test_every_epoch_changes_every_weight_on_jax(prepared, tmp_path):
    done = run_on_jax(SCRIPT, prepared, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = script_result(done)
    assert result["step_hits"] == []  # no trace of a step is reused from another call
    for name in ("float32", "bf16"):
        r = result[name]
        assert len(r["changes"]) == 3
        for epoch, changes in enumerate(r["changes"]):
            unchanged = changes.count(0.0)
            assert unchanged == 0, f"{name}: epoch {epoch} left {unchanged} of {len(changes)} weights as they were"
        assert math.isfinite(r["mse"]) and r["mse"] > 0  # bf16 included: no NaN
        assert r["policy_after"] == "float32"  # train() leaves the global dtype policy as it found it
