"""A compiled loop over time whose per-step outputs may differ in shape from its carry.

`keras.ops.scan` is that loop on JAX (`lax.scan`) and PyTorch. On TensorFlow, Keras 3.15's `scan`
stores the per-step outputs in arrays shaped like the carry, so a step that returns, say, a frame and
a vector of errors cannot use it; there this module runs the same loop as a `tf.while_loop` over
`TensorArray`s, which is what Keras's own recurrent layers do on TensorFlow.
"""

from __future__ import annotations

import keras


def scan(step, init, xs):
    """Like `jax.lax.scan(step, init, xs)`: returns (final carry, per-step outputs stacked on axis 0)."""
    if keras.backend.backend() != "tensorflow":
        return keras.ops.scan(step, init, xs)
    import tensorflow as tf

    x_flat = keras.tree.flatten(xs)
    n = tf.shape(x_flat[0])[0]

    def x_at(i):
        return keras.tree.pack_sequence_as(xs, [x[i] for x in x_flat])

    carry, y0 = step(init, x_at(0))
    y0_flat = keras.tree.flatten(y0)
    arrays = [tf.TensorArray(y.dtype, size=n, element_shape=y.shape).write(0, y) for y in y0_flat]

    def body(i, carry, arrays):
        carry, y = step(carry, x_at(i))
        return i + 1, carry, [a.write(i, v) for a, v in zip(arrays, keras.tree.flatten(y), strict=True)]

    _, carry, arrays = tf.while_loop(lambda i, *_: i < n, body, (tf.constant(1), carry, arrays))
    stacked = []
    for a, y in zip(arrays, y0_flat, strict=True):
        out = a.stack()
        out.set_shape(tf.TensorShape([x_flat[0].shape[0]]).concatenate(y.shape))
        stacked.append(out)
    return carry, keras.tree.pack_sequence_as(y0, stacked)
