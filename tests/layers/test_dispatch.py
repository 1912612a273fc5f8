"""Dispatch functions (`keras_moe.layers.dispatch`) against references, on TF and JAX.

The layer-level agreement of the three modes is in `test_moe_dense.py`; here the grouped
feed-forward network each backend runs for sparse dispatch (TensorFlow: one matmul per
expert with a hand-written gradient; JAX: `jax.lax.ragged_dot`) is checked against every
row run through its own expert's weights, differentiated by autodiff.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers import dispatch
from testing_utils import BACKEND, to_numpy

pytestmark = pytest.mark.multi_backend

# float64 where the backend computes in it by default (JAX needs x64 mode for it).
DTYPE, RTOL, ATOL = ("float64", 1e-10, 1e-12) if BACKEND == "tensorflow" else (
    "float32", 2e-5, 2e-5
)


def _grouped_ffn_reference(x, expert_ids, layers, activation):
    """Every row through its own expert's weights, gathered per row; autodiff only."""
    h = x
    for index, (kernel, bias) in enumerate(layers):
        h = ops.einsum("nd,ndu->nu", h, ops.take(kernel, expert_ids, axis=0))
        if bias is not None:
            h = h + ops.take(bias, expert_ids, axis=0)
        if index < len(layers) - 1 and activation is not None:
            h = activation(h)
    return h


def _value_and_grads(fn, sources, upstream, compiled):
    """`fn(*sources)` and the gradient of `sum(fn(...) * upstream)` w.r.t. every source."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def run(*values):
            with tf.GradientTape() as tape:
                tape.watch(values)
                y = fn(*values)
                loss = tf.reduce_sum(y * upstream)
            return y, [tf.convert_to_tensor(g) for g in tape.gradient(loss, values)]

        if compiled:
            run = tf.function(run, autograph=False)
        y, grads = run(*sources)
        return to_numpy(y), to_numpy(grads)
    import jax

    def loss(values):
        y = fn(*values)
        return ops.sum(y * upstream), y

    run = jax.value_and_grad(loss, has_aux=True)
    if compiled:
        run = jax.jit(run)
    (_, y), grads = run(list(sources))
    return to_numpy(y), to_numpy(list(grads))


@pytest.mark.parametrize(
    "activation, sizes, use_bias",
    [
        (keras.activations.relu, (6, 9, 5), True),  # TF: ReLU's own gradient kernel
        (keras.activations.tanh, (6, 9, 5), True),  # TF: autodiff of the activation alone
        (None, (6, 9, 5), False),  # linear hidden layer, no biases
        (None, (7, 4), True),  # single-layer experts
    ],
)
@pytest.mark.parametrize("compiled", [False, True])
def test_grouped_ffn_matches_autodiff_of_per_row_reference(activation, sizes, use_bias, compiled):
    rng = np.random.default_rng(7)
    # Expert 0 gets no row; expert 2 gets more than dispatch._FEW_ROWS, so both forms of
    # TensorFlow's input-gradient product are checked.
    counts = np.array([0, 3, dispatch._FEW_ROWS + 44, 17, 1], np.int32)
    experts = len(counts)
    expert_ids = ops.convert_to_tensor(np.repeat(np.arange(experts), counts).astype("int32"))
    x = rng.normal(size=(counts.sum(), sizes[0])).astype(DTYPE)
    weights = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        weights.append((rng.normal(size=(experts, d_in, d_out)) / np.sqrt(d_in)).astype(DTYPE))
        weights.append(rng.normal(size=(experts, d_out)).astype(DTYPE) if use_bias else None)
    present = [w for w in weights if w is not None]
    upstream = ops.convert_to_tensor(rng.normal(size=(counts.sum(), sizes[-1])).astype(DTYPE))
    group_sizes = ops.convert_to_tensor(counts)

    def as_layers(values):
        values = list(values)
        return [
            (values.pop(0), values.pop(0) if use_bias else None)
            for _ in range(len(sizes) - 1)
        ]

    def grouped(x, *values):
        return dispatch.grouped_ffn(x, group_sizes, as_layers(values), activation)

    def reference(x, *values):
        return _grouped_ffn_reference(x, expert_ids, as_layers(values), activation)

    sources = [ops.convert_to_tensor(v) for v in [x] + present]
    y, grads = _value_and_grads(grouped, sources, upstream, compiled)
    want_y, want_grads = _value_and_grads(reference, sources, upstream, False)
    assert str(y.dtype) == DTYPE
    np.testing.assert_allclose(y, want_y, rtol=RTOL, atol=ATOL)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # The expert without rows gets exactly zero gradient.
    for weight_grad in grads[1:]:
        assert np.all(weight_grad[0] == 0.0)


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_grouped_ffn_of_a_two_part_layer_matches_the_concatenated_reference(use_bias, compiled):
    """A GLU's gate and up kernels given as two parts of one layer (what gated experts
    pass, so that their kernels are never concatenated) equal the reference on the
    concatenated `[gate | up]` kernel, values and every gradient."""
    from keras_moe.layers.experts import clamped_swiglu

    rng = np.random.default_rng(11)
    counts = np.array([0, 5, dispatch._FEW_ROWS + 9, 2], np.int32)
    experts, d, h, units = len(counts), 6, 4, 5
    expert_ids = ops.convert_to_tensor(np.repeat(np.arange(experts), counts).astype("int32"))
    x = rng.normal(size=(counts.sum(), d)).astype(DTYPE)
    weights = [(2.0 * rng.normal(size=(experts, d, h))).astype(DTYPE),  # gate: clamps hit
               rng.normal(size=(experts, d, h)).astype(DTYPE),  # up
               rng.normal(size=(experts, h, units)).astype(DTYPE)]
    if use_bias:
        weights += [rng.normal(size=(experts, h)).astype(DTYPE) for _ in range(2)]
        weights.append(rng.normal(size=(experts, units)).astype(DTYPE))
    upstream = ops.convert_to_tensor(rng.normal(size=(counts.sum(), units)).astype(DTYPE))
    group_sizes = ops.convert_to_tensor(counts)

    def grouped(x, gate, up, kernel, *biases):
        gate_bias, up_bias, bias = biases or (None, None, None)
        layers = [((gate, up), None if gate_bias is None else (gate_bias, up_bias)),
                  (kernel, bias)]
        return dispatch.grouped_ffn(x, group_sizes, layers, clamped_swiglu)

    def reference(x, gate, up, kernel, *biases):
        gate_bias, up_bias, bias = biases or (None, None, None)
        first_bias = None if gate_bias is None else ops.concatenate([gate_bias, up_bias], -1)
        layers = [(ops.concatenate([gate, up], -1), first_bias), (kernel, bias)]
        return _grouped_ffn_reference(x, expert_ids, layers, clamped_swiglu)

    sources = [ops.convert_to_tensor(v) for v in [x] + weights]
    y, grads = _value_and_grads(grouped, sources, upstream, compiled)
    want_y, want_grads = _value_and_grads(reference, sources, upstream, False)
    np.testing.assert_allclose(y, want_y, rtol=RTOL, atol=ATOL)
    assert len(grads) == len(want_grads) == len(sources)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    for weight_grad in grads[1:]:
        assert np.all(weight_grad[0] == 0.0)  # the expert without rows


def test_expert_capacity_formula():
    assert dispatch.expert_capacity(40, 2, 4, 0.5) == 10  # ceil(0.5 * 2 * 40 / 4)
    assert dispatch.expert_capacity(3, 1, 8, 1.0) == 1  # never below one slot
    assert dispatch.expert_capacity(41, 2, 4, 1.0) == 21
    # The factor as written: 1.1 * 2 * 50 / 11 is 10 exactly (in floats 10.000000000000002).
    assert dispatch.expert_capacity(50, 2, 11, 1.1) == 10


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's symbolic dimensions")
def test_expert_capacity_of_a_symbolic_batch_is_the_formula_at_every_size():
    """`model.export` on JAX traces with a batch of unknown size (a dimension expression):
    the capacity must stay one, and equal the integer formula once the size is known."""
    import jax
    import jax.numpy as jnp
    from jax import export

    batch = jax.ShapeDtypeStruct(export.symbolic_shape("b"), "float32")
    for k, experts, factor in [(2, 8, 1.25), (1, 3, 1.0), (2, 11, 1.1), (3, 5, 0.7)]:
        def slots(x, k=k, experts=experts, factor=factor):
            return jnp.zeros(dispatch.expert_capacity(x.shape[0], k, experts, factor))

        exported = export.export(jax.jit(slots))(batch)
        for n in [1, 2, 7, 50, 129, 4096]:
            assert exported.call(np.zeros(n, "float32")).shape[0] == \
                dispatch.expert_capacity(n, k, experts, factor), (k, experts, factor, n)
