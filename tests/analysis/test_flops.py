"""keras_moe.analysis.flops: static multiply-adds, gate density, DeepMoE's effective cost.

Every expected number is a hand count written out below.
"""

import numpy as np
import pytest

import keras

from keras_moe.analysis import flops
from keras_moe.layers.gated_conv import GatedConv2D
from keras_moe.layers.gated_conv import ShallowEmbedding
from keras_moe.layers.gates import ReLUGate
from keras_moe.zoo import deepmoe


def test_static_flops_hand_count_plain_layers():
    x = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, padding="same")(x)              # 6x6x3
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(4, 1, strides=2, padding="valid")(h)  # 3x3x4
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2)(h)    # 1x1x8 (valid)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(5)(h)
    model = keras.Model(x, out)
    # conv 3x3: 3*3 * 2 in * 3 out * 6*6 = 1944; conv 1x1 s2: 1 * 3 * 4 * 3*3 = 108;
    # depthwise 3x3, x2: 3*3 * 4 * 2 * 1*1 = 72; dense: 8 * 5 = 40.
    assert flops.static_flops(model) == 1944 + 108 + 72 + 40
    by_layer = flops.static_flops(model, by_layer=True)
    assert sorted(by_layer.values()) == [40, 72, 108, 1944]


def test_static_flops_separable_and_grouped():
    x = keras.Input((5, 5, 4))
    a = keras.layers.SeparableConv2D(6, 3, padding="same")(x)   # 5x5x6
    b = keras.layers.Conv2D(6, 3, padding="same", groups=2)(x)   # 5x5x6
    model = keras.Model(x, keras.layers.Add()([a, b]))
    # separable: depthwise 3*3 * 4 * 25 = 900, pointwise 4 * 6 * 25 = 600;
    # grouped: 3*3 * (4 / 2) * 6 * 25 = 2700.
    assert flops.static_flops(model) == 900 + 600 + 2700


def test_static_flops_resnet8_hand_count():
    model = deepmoe.resnet_cifar(depth=8, input_shape=(32, 32, 3), num_classes=10)
    stem = 9 * 3 * 16 * 32 * 32                                   # 442,368
    stage1 = 2 * (9 * 16 * 16 * 32 * 32)                          # 4,718,592
    stage2 = 16 * 32 * 16 * 16 + 9 * 16 * 32 * 16 * 16 + 9 * 32 * 32 * 16 * 16
    stage3 = 32 * 64 * 8 * 8 + 9 * 32 * 64 * 8 * 8 + 9 * 64 * 64 * 8 * 8
    dense = 64 * 10
    assert flops.static_flops(model) == stem + stage1 + stage2 + stage3 + dense == 12_501_632


def _tiny_gated():
    """Embedding (1 conv, 2 classes), stem, 2 gated convs; gates set by hand.

    gate1 = ReLU(e W1), W1 columns [1, 1], [-1, 1], [2, 2]  -> [1, e1 - e0, 2]
    gate2 = ReLU(e W2), W2 columns [.5,.5], [-1,-1], [1,-1], [3, 3] -> [.5, 0, e0 - e1, 3]
    so with p = [e0 > e1], q = [e1 > e0]: open1 = 2 + q, open2 = 2 + p (a tie e0 = e1,
    e.g. an all-zero embedding feature map, closes both e-dependent gates).
    """
    keras.utils.set_random_seed(0)
    images = keras.Input((4, 4, 1), name="images")
    embedding = ShallowEmbedding(2, widths=(2,), name="embedding")
    emb = embedding(images)
    stem = keras.layers.Conv2D(3, 3, padding="same", use_bias=False, name="stem")(images)
    h1 = keras.layers.ReLU(name="relu1")(keras.layers.BatchNormalization(name="bn1")(stem))
    head1 = ReLUGate(3, name="gate1")
    g1 = head1(emb["probs"])["gates"]
    c1 = GatedConv2D(4, 3, name="conv1")([h1, g1])
    h2 = keras.layers.ReLU(name="relu2")(c1)
    head2 = ReLUGate(4, name="gate2")
    g2 = head2(emb["probs"])["gates"]
    c2 = GatedConv2D(2, 1, name="conv2")([h2, g2])
    logits = keras.layers.Dense(2, name="logits")(keras.layers.GlobalAveragePooling2D()(c2))
    network = keras.Model(
        images, {"logits": logits, "embedding_logits": emb["logits"], "gates": [g1, g2]}
    )
    head1.kernel.assign(np.array([[1, -1, 2], [1, 1, 2]], "float32"))
    head2.kernel.assign(np.array([[0.5, -1, 1, 3], [0.5, -1, -1, 3]], "float32"))
    # e0 > e1 iff the embedding's first pooled feature exceeds its second.
    embedding.dense.kernel.assign(np.array([[1, -1], [-1, 1]], "float32"))
    return deepmoe.DeepMoEModel(network)


def _open_counts(model, x):
    """(open1, open2) per example from the embedding e, by the rule of `_tiny_gated`."""
    from keras_moe.analysis.shuffling import embedding_model

    e = keras.ops.convert_to_numpy(embedding_model(model)(x, training=False))
    p = (e[:, 0] > e[:, 1]).astype(float)
    q = (e[:, 1] > e[:, 0]).astype(float)
    assert 0 < p.mean() < 1  # both cases occur, so the averaging is exercised
    return 2 + q, 2 + p


def test_tiny_static_count():
    model = _tiny_gated()
    # embedding conv 3*3 * 1 * 2 * 2*2 = 72, its dense 2 * 2 = 4; stem 3*3 * 1 * 3 * 16 = 432;
    # conv1 3*3 * 3 * 4 * 16 = 1728; conv2 1 * 4 * 2 * 16 = 128; dense 2 * 2 = 4;
    # gate heads 2 * 3 = 6 and 2 * 4 = 8.
    assert flops.static_flops(model) == 72 + 4 + 432 + 1728 + 128 + 4 + 6 + 8


def test_gate_density_hand_count():
    model = _tiny_gated()
    x = np.random.default_rng(0).normal(size=(64, 4, 4, 1)).astype("float32")
    open1, open2 = _open_counts(model, x)
    density = flops.gate_density(model, x, batch_size=16)
    assert density["conv1"] == pytest.approx(np.mean(open1) / 3)
    assert density["conv2"] == pytest.approx(np.mean(open2) / 4)
    overall = flops.gate_density(model, x, overall=True)
    assert overall == pytest.approx(np.mean(open1 + open2) / 7)


def test_effective_flops_hand_count():
    model = _tiny_gated()
    x = np.random.default_rng(1).normal(size=(64, 4, 4, 1)).astype("float32")
    open1, open2 = _open_counts(model, x)
    report = flops.effective_flops(model, x, batch_size=16)
    # stem: ungated input (1 channel), output -> BN -> ReLU -> conv1's gate: 3*3*16*1*open1.
    assert report.by_layer["stem"] == pytest.approx(np.mean(144 * open1))
    # conv1: 3*3*16 * open1 * open2 per example: 144 * 6 unless tied (144 * 4); the mean
    # of the products, which differs from the product of the means here.
    conv1 = np.mean(144 * open1 * open2)
    assert conv1 != pytest.approx(144 * np.mean(open1) * np.mean(open2))
    assert report.by_layer["conv1"] == pytest.approx(conv1)
    # conv2: output feeds pooling -> all 2 outputs: 1*16 * open2 * 2.
    assert report.by_layer["conv2"] == pytest.approx(np.mean(32 * open2))
    expected = np.mean(144 * open1) + conv1 + np.mean(32 * open2) + (72 + 4) + 6 + 8 + 4
    assert report.total == pytest.approx(expected)
    assert report.gating == 72 + 4 + 6 + 8
    assert report.static == 2382
    assert report.ratio == pytest.approx(expected / 2382)


def test_effective_equals_static_when_all_gates_open():
    model = deepmoe.deepmoe_resnet_cifar(
        depth=8, input_shape=(16, 16, 3), num_classes=4, width_multiplier=0.5,
        embedding_widths=(4, 4, 4, 4),
    )
    x = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype("float32")
    assert flops.gate_density(model, x, overall=True) == 1.0  # W ~ 1 at initialisation
    report = flops.effective_flops(model, x)
    assert report.total == pytest.approx(report.static)
    assert report.static == flops.static_flops(model)


def test_effective_flops_closed_gate_layer_skips_previous_outputs():
    model = deepmoe.deepmoe_resnet_cifar(
        depth=8, input_shape=(16, 16, 3), num_classes=4, width_multiplier=0.5,
        embedding_widths=(4, 4, 4, 4),
    )
    x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype("float32")
    before = flops.effective_flops(model, x)
    # Close every gate of stage1's second conv: it costs 0, and so do stage1 conv1's
    # outputs (conv1 -> BN -> ReLU -> conv2's gate); nothing else changes.
    head = model.network.get_layer("stage1_block1_conv2_gate")
    head.kernel.assign(-np.ones(head.kernel.shape, "float32"))
    after = flops.effective_flops(model, x)
    assert after.by_layer["stage1_block1_conv2"] == 0
    assert after.by_layer["stage1_block1_conv1"] == 0
    changed = {k for k in before.by_layer if before.by_layer[k] != after.by_layer[k]}
    assert changed == {"stage1_block1_conv1", "stage1_block1_conv2"}


def test_errors():
    with pytest.raises(ValueError, match="no GatedConv2D"):
        flops.effective_flops(deepmoe.resnet_cifar(depth=8, input_shape=(16, 16, 3)),
                              np.zeros((2, 16, 16, 3), "float32"))


def test_moe_layers_count_the_gate_and_the_experts_each_token_runs():
    from keras_moe import zoo

    d, experts, k, units, hidden = 784, 8, 2, 32, 24
    sparse = zoo.sparse_moe_classifier(num_experts=experts, top_k=k, units=units,
                                       expert_hidden_units=hidden)
    # Noisy top-k gate at inference: the clean logits only; k experts of two layers.
    assert flops.static_flops(sparse, by_layer=True) == {
        "moe_0": d * experts + k * (d * hidden + hidden * units), "logits": units * 10}

    eigen = zoo.dmoe_mnist(experts=(3, 2), units=(16, 8), gate_hidden_units=(5, 4))
    pixels = 36 * 36
    # Soft gating: every expert runs; two-layer softmax gates.
    assert flops.static_flops(eigen, by_layer=True) == {
        "moe_1": pixels * 5 + 5 * 3 + 3 * pixels * 16,
        "moe_2": 16 * 4 + 4 * 2 + 2 * 16 * 8,
        "classifier": 8 * 10,
    }


def test_expert_mixture_counts_every_expert_and_the_gate():
    from keras_moe import zoo

    model = zoo.two_domain_moe(input_shape=(8, 8, 1), num_classes=4, gate="dense",
                               expert_filters=4, expert_units=6, gate_units=5)
    # Expert: conv 3x3 (1 -> 4, same) on 8x8, pool, conv 3x3 (4 -> 4) on 4x4, pool,
    # dense 2*2*4 -> 6, dense 6 -> 4. Dense gate: flatten 64 -> 5 -> 2.
    expert = 9 * 1 * 4 * 64 + 9 * 4 * 4 * 16 + 16 * 6 + 6 * 4
    counts = flops.static_flops(model, by_layer=True)
    assert counts == {"mixture/expert_0": expert, "mixture/expert_1": expert,
                      "mixture/gate": 64 * 5 + 5 * 2}
