"""Backend-neutral test helpers: arrays, gradients and a layer test in Keras's manner.

The layer and regularizer tests run on every Keras backend the library supports
(`KERAS_BACKEND=tensorflow` and `jax`), so they compute gradients and read tensors only
through these helpers, never through `tf.GradientTape` or `.numpy()`.
"""

import os

import keras
import numpy as np
import pytest
from keras import ops

BACKEND = keras.backend.backend()

requires_tensorflow = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="TensorFlow-only by nature (tf.distribute, tf graphs)"
)


def to_numpy(x):
    """A tensor, variable or nested structure of them as numpy arrays (None stays None)."""
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return type(x)(to_numpy(v) for v in x)
    if isinstance(x, dict):
        return {k: to_numpy(v) for k, v in x.items()}
    return np.asarray(ops.convert_to_numpy(x))


def gradients(fn, inputs=(), variables=()):
    """Value and gradients of the scalar `fn(*inputs)` on the current backend.

    Args:
        fn: Called as `fn(*inputs)`; returns a scalar tensor. It may read any Keras
            variable; the gradient is taken with respect to `variables` and `inputs`.
        inputs: Arrays to differentiate with respect to (passed to `fn`).
        variables: Keras variables to differentiate with respect to.

    Returns:
        `(value, input_grads, variable_grads)` as numpy arrays. A gradient that does not
        depend on the value is None on TensorFlow and zeros on JAX; compare with
        `assert_no_gradient`.
    """
    inputs = [ops.convert_to_tensor(x) for x in inputs]
    variables = list(variables)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            for x in inputs:
                tape.watch(x)
            value = fn(*inputs)
        grads = tape.gradient(value, inputs + variables)
        grads = [None if g is None else tf.convert_to_tensor(g) for g in grads]
        return (
            to_numpy(value),
            [to_numpy(g) for g in grads[: len(inputs)]],
            [to_numpy(g) for g in grads[len(inputs) :]],
        )
    if BACKEND == "jax":
        import jax

        def pure(input_values, variable_values):
            mapping = list(zip(variables, variable_values))
            # collect_losses: `add_loss` terms of layers called inside `fn` are kept
            # (and read back by `layer.losses`), as they are outside a stateless scope.
            with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
                return fn(*input_values)

        value, (input_grads, variable_grads) = jax.value_and_grad(pure, argnums=(0, 1))(
            inputs, [v.value for v in variables]
        )
        return to_numpy(value), to_numpy(list(input_grads)), to_numpy(list(variable_grads))
    raise NotImplementedError(f"no gradient helper for backend {BACKEND!r}")


def outputs_and_gradients(layer, x):
    """A layer's outputs on `x` and the gradients of a fixed weighted sum of them:
    the input's first, then each trainable weight's (as numpy)."""
    weights = np.sin(np.arange(layer.units, dtype="float32"))

    def loss(inputs):
        return ops.sum(layer(inputs) * weights)

    _, input_grads, weight_grads = gradients(loss, [x], layer.trainable_weights)
    return to_numpy(layer(x)), input_grads + weight_grads


def assert_no_gradient(grad):
    """The gradient of something the value does not depend on: None (TF) or zeros (JAX)."""
    assert grad is None or not np.any(grad), grad


def as_array(grad, like):
    """A gradient as an array, a None gradient as zeros shaped like `like`."""
    return np.zeros(np.shape(like), "float32") if grad is None else np.asarray(grad)


def _is_shape(value):
    return isinstance(value, (tuple, list)) and all(
        d is None or isinstance(d, int) for d in value
    )


def _shapes(structure):
    """The shape tuples of a structure of shapes (a shape is a tuple of ints/None)."""
    if _is_shape(structure):
        return [tuple(structure)]
    if isinstance(structure, dict):
        return [s for key in sorted(structure) for s in _shapes(structure[key])]
    return [s for item in structure for s in _shapes(item)]


def _assert_shapes(outputs, expected):
    got = [tuple(x.shape) for x in keras.tree.flatten(outputs)]
    assert got == _shapes(expected), (got, expected)


def _float_leaves(structure):
    return [
        x
        for x in keras.tree.flatten(structure)
        if "float" in str(getattr(x, "dtype", ""))
    ]


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_data,
    *,
    expected_output_shape,
    expected_num_trainable_weights=None,
    expected_num_non_trainable_weights=None,
    expected_num_losses=0,
    call_kwargs=None,
    tmp_path=None,
):
    """Checks a layer the way `keras.src.testing.TestCase.run_layer_test` does.

    1. `get_config` round trip: `from_config(get_config())` has the same config.
    2. Symbolic call on `keras.Input`s: output shapes as expected, and equal to the
       eager call's.
    3. Weight counts after build.
    4. Losses: none at inference, `expected_num_losses` in training.
    5. A training step through `model.fit` changes the trainable weights.
    6. `.keras` save and `safe_mode=True` load give the same outputs (with `tmp_path`).

    Args:
        layer_cls: The layer class.
        init_kwargs: Constructor keywords.
        input_data: A numpy array or a list of them (multi-input layers).
        expected_output_shape: A shape tuple or a structure of them, matching the
            layer's output structure (dict for gate layers).
        expected_num_trainable_weights: If not None, the number of trainable weights.
        expected_num_non_trainable_weights: If not None, likewise non-trainable.
        expected_num_losses: `add_loss` terms of one training-mode call.
        call_kwargs: Extra keywords for the call.
        tmp_path: A folder for the `.keras` round trip (skipped without one).

    Returns:
        The layer used in the model (built and trained one step).
    """
    call_kwargs = dict(call_kwargs or {})
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config

    multi_input = isinstance(input_data, (list, tuple))
    arrays = list(input_data) if multi_input else [input_data]
    symbolic = [keras.Input(batch_shape=a.shape, dtype=str(a.dtype)) for a in arrays]
    outputs = layer(symbolic if multi_input else symbolic[0], **call_kwargs)
    _assert_shapes(outputs, expected_output_shape)

    if expected_num_trainable_weights is not None:
        assert len(layer.trainable_weights) == expected_num_trainable_weights
    if expected_num_non_trainable_weights is not None:
        assert len(layer.non_trainable_weights) == expected_num_non_trainable_weights

    eager_inputs = arrays if multi_input else arrays[0]
    eager = layer(eager_inputs, training=False, **call_kwargs)
    _assert_shapes(eager, expected_output_shape)
    assert len(layer.losses) == 0
    layer(eager_inputs, training=True, **call_kwargs)
    assert len(layer.losses) == expected_num_losses, layer.losses

    # Per-example float outputs get a target (a gate's per-expert "load" does not).
    float_outputs = [o for o in _float_leaves(outputs) if o.shape[0] == len(arrays[0])]
    model = keras.Model(symbolic, float_outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=["mse"] * len(float_outputs))
    before = [to_numpy(w).copy() for w in model.trainable_weights]
    targets = [np.zeros(tuple(o.shape), "float32") for o in float_outputs]
    model.fit(eager_inputs, targets, batch_size=len(arrays[0]), epochs=1, verbose=0)
    after = [to_numpy(w) for w in model.trainable_weights]
    assert any(not np.array_equal(b, a) for b, a in zip(before, after)), "no weight moved"
    assert all(np.isfinite(a).all() for a in after)

    if tmp_path is not None:
        path = os.path.join(str(tmp_path), f"{layer_cls.__name__}.keras")
        model.save(path)
        restored = keras.saving.load_model(path, safe_mode=True)
        for got, want in zip(
            keras.tree.flatten(restored.predict(eager_inputs, verbose=0)),
            keras.tree.flatten(model.predict(eager_inputs, verbose=0)),
        ):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    return layer
