"""GatedConv2D and ShallowEmbedding (DeepMoE, paper 004): numerics against numpy, config,
saving, training, argument checks; on TensorFlow and JAX."""

import numpy as np
import pytest

import keras

from keras_moe.layers.gated_conv import GatedConv2D
from keras_moe.layers.gated_conv import ShallowEmbedding
from keras_moe.layers.gates import ReLUGate
from testing_utils import gradients, run_layer_test, to_numpy

pytestmark = pytest.mark.multi_backend


def _same_pads(size, k, s, d):
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return out, total // 2, total - total // 2


def numpy_gated_conv(x, g, kernel, strides, padding, dilation, bias=None):
    """Explicit eq. 3: z[o,s,t] = sum_i sum_u sum_v g_i K[u,v,i,o] x[i, s*st+u*d, t*st+v*d]."""
    kh, kw, cin, cout = kernel.shape
    (sh, sw), (dh, dw) = strides, dilation
    n, h, w, _ = x.shape
    if padding == "same":
        oh, ph0, ph1 = _same_pads(h, kh, sh, dh)
        ow, pw0, pw1 = _same_pads(w, kw, sw, dw)
        x = np.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
    else:
        oh = (h - dh * (kh - 1) - 1) // sh + 1
        ow = (w - dw * (kw - 1) - 1) // sw + 1
    z = np.zeros((n, oh, ow, cout))
    for b in range(n):
        for s in range(oh):
            for t in range(ow):
                for u in range(kh):
                    for v in range(kw):
                        pixel = x[b, s * sh + u * dh, t * sw + v * dw, :]  # (cin,)
                        z[b, s, t, :] += (g[b] * pixel) @ kernel[u, v]
    if bias is not None:
        z = z + bias
    return z


@pytest.mark.parametrize(
    "kernel_size,strides,padding,dilation,use_bias",
    [
        (3, 1, "same", 1, False),
        (3, 2, "same", 1, True),
        (3, 1, "same", 2, False),
        ((1, 3), (2, 1), "valid", 1, False),
        (2, 2, "same", 1, True),
    ],
)
def test_matches_numpy_reference(kernel_size, strides, padding, dilation, use_bias):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 6, 3)).astype("float32")
    g = np.maximum(rng.normal(1.0, 1.0, size=(2, 3)), 0).astype("float32")
    g[0, 1] = 0.0  # one expert (input channel) switched off for example 0
    layer = GatedConv2D(
        4, kernel_size, strides=strides, padding=padding, dilation_rate=dilation,
        use_bias=use_bias, bias_initializer="random_normal",
    )
    out = np.asarray(layer([x, g]))
    bias = to_numpy(layer.bias) if use_bias else None
    expected = numpy_gated_conv(
        x, g, to_numpy(layer.kernel), layer.strides, padding, layer.dilation_rate, bias
    )
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert layer.compute_output_shape([x.shape, g.shape]) == out.shape


def test_unit_gates_equal_plain_conv_and_zero_gate_removes_channel():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 8, 8, 5)).astype("float32")
    layer = GatedConv2D(6, 3, strides=2)
    conv = keras.layers.Conv2D(6, 3, strides=2, padding="same", use_bias=False)
    conv.build(x.shape)
    out = np.asarray(layer([x, np.ones((3, 5), "float32")]))
    conv.kernel.assign(layer.kernel)
    np.testing.assert_allclose(out, np.asarray(conv(x)), rtol=1e-5, atol=1e-5)
    # Eq. 5: a zero gate removes expert i, so its input channel no longer matters.
    g = np.ones((3, 5), "float32")
    g[:, 2] = 0.0
    x2 = x.copy()
    x2[..., 2] = rng.normal(size=x2[..., 2].shape)
    np.testing.assert_allclose(
        np.asarray(layer([x, g])), np.asarray(layer([x2, g])), rtol=1e-6, atol=1e-6
    )
    assert not np.allclose(np.asarray(layer([x, g])), out, atol=1e-3)


def test_gate_gradient_matches_expert_outputs():
    # d sum(z) / d g_i = sum(E_i(x)) with E_i(x) = K_i * x_i (eq. 5).
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 5, 3)).astype("float32")
    g = rng.uniform(0.5, 1.5, size=(2, 3)).astype("float32")
    layer = GatedConv2D(4, 3)
    layer([x, g])
    _, (grad,), _ = gradients(lambda gates: keras.ops.sum(layer([x, gates])), [g])
    kernel = to_numpy(layer.kernel)
    for i in range(3):
        onehot = np.zeros((2, 3), "float32")
        onehot[:, i] = 1.0
        expert = numpy_gated_conv(x, onehot, kernel, (1, 1), "same", (1, 1))
        np.testing.assert_allclose(grad[:, i], expert.sum(axis=(1, 2, 3)), rtol=1e-4, atol=1e-4)


def test_gate_length_mismatch_raises_naming_gates():
    with pytest.raises(ValueError, match="gates"):
        GatedConv2D(4, 3)([keras.Input((8, 8, 3)), keras.Input((4,))])
    with pytest.raises(ValueError, match="gates"):
        GatedConv2D(4, 3)([np.zeros((2, 8, 8, 3), "float32"), np.zeros((2, 3, 1), "float32")])
    with pytest.raises(ValueError, match=r"\[feature_map, gates\]"):
        GatedConv2D(4, 3)(keras.Input((8, 8, 3)))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(filters=0, kernel_size=3), "filters"),
        (dict(filters=4, kernel_size=(3, 0)), "kernel_size"),
        (dict(filters=4, kernel_size=3, strides=0), "strides"),
        (dict(filters=4, kernel_size=3, padding="causal"), "padding"),
        (dict(filters=4, kernel_size=3, strides=2, dilation_rate=2), "dilation_rate"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GatedConv2D(**kwargs)


def test_config_round_trip_and_symbolic_shape():
    layer = GatedConv2D(
        8, (3, 1), strides=(2, 1), padding="valid", use_bias=True,
        kernel_regularizer=keras.regularizers.L2(1e-4), name="gc",
    )
    clone = GatedConv2D.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    out = clone([keras.Input((9, 5, 4)), keras.Input((4,))])
    assert tuple(out.shape) == (None, 4, 5, 8)


def _gated_model():
    images = keras.Input((8, 8, 3))
    mixture = keras.Input((5,))
    gates = ReLUGate(3)(mixture)["gates"]
    x = GatedConv2D(4, 3, strides=2, name="gc")([images, gates])
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model([images, mixture], keras.layers.Dense(2)(x))


def test_save_load_safe_mode_and_training_step(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 8, 8, 3)).astype("float32")
    e = rng.dirichlet(np.ones(5), size=8).astype("float32")
    y = rng.integers(0, 2, size=8)
    model = _gated_model()
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = to_numpy(model.get_layer("gc").kernel).copy()
    model.fit([x, e], y, epochs=1, batch_size=8, verbose=0)
    assert not np.allclose(before, to_numpy(model.get_layer("gc").kernel))
    path = tmp_path / "gated.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.get_layer("gc"), GatedConv2D)
    np.testing.assert_allclose(
        loaded.predict([x, e], verbose=0), model.predict([x, e], verbose=0), rtol=1e-5, atol=1e-6
    )


def test_mixed_precision_keeps_float32_gates():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    g = rng.uniform(0, 2, size=(2, 3)).astype("float32")
    layer = GatedConv2D(4, 3, dtype="mixed_bfloat16")
    out = layer([x, g])
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(layer.kernel.dtype) == "float32"
    expected = numpy_gated_conv(x, g, to_numpy(layer.kernel), (1, 1), "same", (1, 1))
    np.testing.assert_allclose(np.asarray(keras.ops.cast(out, "float32")), expected,
                               rtol=5e-2, atol=5e-2)


# ShallowEmbedding -----------------------------------------------------------------------


def test_embedding_outputs_and_parameter_count():
    widths = (4, 6, 8, 10)
    emb = ShallowEmbedding(num_classes=7, widths=widths)
    x = np.random.default_rng(5).normal(size=(3, 32, 32, 3)).astype("float32")
    out = emb(x, training=False)
    probs, logits = np.asarray(out["probs"]), np.asarray(out["logits"])
    assert probs.shape == logits.shape == (3, 7)
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(probs, shifted / shifted.sum(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    # 3x3 convs without bias, BN (gamma, beta, moving mean, moving variance), dense.
    channels = (3,) + widths
    expected = sum(9 * a * b + 4 * b for a, b in zip(channels[:-1], channels[1:]))
    expected += widths[-1] * 7 + 7
    assert emb.count_params() == expected
    assert [c.strides for c in emb.convs] == [(2, 2)] * 4
    symbolic = emb(keras.Input((32, 32, 3)))
    assert tuple(symbolic["probs"].shape) == (None, 7)


def test_embedding_config_and_bad_arguments():
    emb = ShallowEmbedding(num_classes=5, widths=(8, 8, 8, 8, 8), name="emb")
    clone = ShallowEmbedding.from_config(emb.get_config())
    assert clone.widths == (8, 8, 8, 8, 8) and clone.num_classes == 5
    with pytest.raises(ValueError, match="num_classes"):
        ShallowEmbedding(num_classes=1)
    with pytest.raises(ValueError, match="widths"):
        ShallowEmbedding(num_classes=3, widths=())
    with pytest.raises(ValueError, match="widths"):
        ShallowEmbedding(num_classes=3, widths=(4, 0))


def test_gated_conv_layer_contract(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    g = rng.uniform(0, 2, size=(2, 3)).astype("float32")
    run_layer_test(
        GatedConv2D, dict(filters=4, kernel_size=3, strides=2, use_bias=True), [x, g],
        expected_output_shape=(2, 3, 3, 4), expected_num_trainable_weights=2,
        tmp_path=tmp_path,
    )


def test_shallow_embedding_layer_contract(tmp_path):
    x = np.random.default_rng(7).normal(size=(2, 16, 16, 3)).astype("float32")
    run_layer_test(
        ShallowEmbedding, dict(num_classes=5, widths=(4, 6)), x,
        expected_output_shape={"logits": (2, 5), "probs": (2, 5)},
        expected_num_trainable_weights=2 + 2 * 2 + 2,  # kernels, BN gamma/beta, dense
        expected_num_non_trainable_weights=2 * 2,  # BN moving statistics
        tmp_path=tmp_path,
    )


def test_gates_or_feature_map_of_another_width_than_built_are_refused():
    layer = GatedConv2D(3, 3)
    layer([np.zeros((2, 8, 8, 4), "float32"), np.zeros((2, 4), "float32")])
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 4"):
        layer([np.zeros((2, 8, 8, 5), "float32"), np.zeros((2, 4), "float32")])
    with pytest.raises(ValueError, match="value 4"):
        layer([np.zeros((2, 8, 8, 4), "float32"), np.zeros((2, 5), "float32")])
