"""DeepMoE skip-channel inference (paper 004): equal to the masked model, and skipping."""

import keras
import numpy as np
import pytest

from keras_moe.inference import SkipChannelRunner
from keras_moe.inference import compile_skip_inference
from keras_moe.layers.gates import ReLUGate
from keras_moe.zoo import deepmoe

NUM_CLASSES = 5
SHAPE = (16, 16, 3)
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(autouse=True)
def _seeded():
    """Every test builds its models from the same weights, run after run."""
    keras.utils.set_random_seed(0)


def tiny(wide=False):
    """A DeepMoE ResNet-8 with 8/16/32 channels (16/32/64 inner when wide)."""
    return deepmoe.deepmoe_resnet_cifar(
        depth=8, input_shape=SHAPE, num_classes=NUM_CLASSES, width_multiplier=0.5,
        embedding_widths=(4, 4, 4, 4), wide=wide,
    )


def images(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n,) + SHAPE).astype("float32")


def randomize_norms(model, seed=1):
    """Non-trivial batch-norm statistics, so that folding them is tested."""
    rng = np.random.default_rng(seed)
    for layer in model.network.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.5, n).astype("float32"))


def gate_heads(model):
    return [l for l in model.network.layers if isinstance(l, ReLUGate)]


def close_gates(model, closed_fraction=0.5, all_closed=(), seed=2):
    """Closes a random part of every head's channels for every image: W = -1 there.

    Open columns are positive but image-dependent (e = softmax is on the simplex), and
    the heads named in `all_closed` close every channel.
    """
    rng = np.random.default_rng(seed)
    for head in gate_heads(model):
        kernel = rng.uniform(0.2, 2.0, size=head.kernel.shape).astype("float32")
        channels = kernel.shape[1]
        closed = rng.permutation(channels)[: int(closed_fraction * channels)]
        kernel[:, closed] = -1.0
        if head.name in all_closed:
            kernel[:] = -1.0
        head.kernel.assign(kernel)


def assert_matches(model, runner, x):
    expected = np.asarray(model(x))
    np.testing.assert_allclose(np.asarray(runner(x)), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("skip_stream_inputs", [True, False])
def test_equals_masked_model_with_closed_gates(wide, skip_stream_inputs):
    model = tiny(wide)
    randomize_norms(model)
    close_gates(model, all_closed=("stage2_block1_conv2_gate",))
    runner = SkipChannelRunner(model, skip_stream_inputs=skip_stream_inputs)
    x = images(3)
    assert_matches(model, runner, x[:1])  # the serving case
    assert_matches(model, runner, x)  # a batch: union of the open sets, per-image gates
    # The other outputs pass through unchanged.
    outputs = runner.outputs(x)
    reference = model.network(x)
    for got, want in zip(outputs["gates"], reference["gates"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(outputs["embedding_logits"]), np.asarray(reference["embedding_logits"]),
        rtol=1e-5, atol=1e-6,
    )


def test_all_open_equals_model_and_keeps_every_channel():
    model = tiny(wide=True)  # default heads: W ~ 1, every gate open
    randomize_norms(model)
    runner = compile_skip_inference(model)
    x = images(1)
    assert_matches(model, runner, x)
    shapes = runner.kernel_shapes(x)
    for layer in model.network.layers:
        if layer.__class__.__name__ in ("GatedConv2D", "Conv2D"):
            assert shapes[layer.name] == tuple(layer.kernel.shape)


def test_kernel_slices_skip_closed_inputs_and_next_closed_outputs():
    model = tiny(wide=True)
    close_gates(model, all_closed=("stage2_block1_conv2_gate",))
    runner = SkipChannelRunner(model)
    x = images(1)
    gates = {g.name: np.asarray(v)[0] > 0 for g, v in zip(
        gate_heads(model), model.network(x)["gates"])}
    shapes = runner.kernel_shapes(x)
    for stage in (1, 2, 3):
        block = f"stage{stage}_block1"
        conv1 = model.network.get_layer(f"{block}_conv1")
        conv2 = model.network.get_layer(f"{block}_conv2")
        open1 = int(gates[f"{block}_conv1_gate"].sum())
        open2 = int(gates[f"{block}_conv2_gate"].sum())
        assert 0 < open1 < conv1.kernel.shape[2]
        # conv1: open inputs x the outputs conv2's gates keep (one if all are closed).
        assert shapes[conv1.name] == (3, 3, open1, max(open2, 1))
        # conv2 feeds the residual stream: every output channel.
        assert shapes[conv2.name] == (3, 3, max(open2, 1), conv2.kernel.shape[3])
    assert not gates["stage2_block1_conv2_gate"].any()  # the all-closed edge case
    assert runner.reduced_layers == [f"stage{s}_block1_conv1" for s in (1, 2, 3)]
    assert "stage1_block1_bn2" in runner.folded_norms  # block-end norms fold too
    assert_matches(model, runner, x)


def mixed_gates(model, seed=3):
    """Heads with mixed-sign columns: which channels are open depends on the image."""
    rng = np.random.default_rng(seed)
    for head in gate_heads(model):
        head.kernel.assign(rng.normal(0.0, 3.0, size=head.kernel.shape).astype("float32"))


def test_image_dependent_open_sets_one_trace():
    keras.utils.set_random_seed(0)  # the embedding's weights decide how much e varies
    model = tiny(wide=True)
    randomize_norms(model)
    mixed_gates(model)
    runner = SkipChannelRunner(model)
    x = images(4, seed=7)
    gates = [np.asarray(g) > 0 for g in model.network(x)["gates"]]
    # The open sets differ by image (between some pair of the four).
    assert any((g[i] != g[j]).any() for g in gates for i in range(4) for j in range(i))
    for i in range(4):
        assert_matches(model, runner, x[i:i + 1])
    assert_matches(model, runner, x)  # union of different open sets
    # One trace serves every batch size and every open set.
    assert runner._forward.experimental_get_tracing_count() == 1


def test_weights_are_snapshotted_when_built():
    model = tiny()
    runner = SkipChannelRunner(model)
    x = images(1)
    before = np.asarray(runner(x))
    close_gates(model)
    np.testing.assert_allclose(np.asarray(runner(x)), before)  # the old weights
    assert_matches(model, SkipChannelRunner(model), x)  # a new runner sees the new ones


def test_plain_model_runs_with_norms_folded():
    model = deepmoe.resnet_cifar(depth=8, input_shape=SHAPE, num_classes=NUM_CLASSES,
                                 width_multiplier=0.5)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_variance.assign(np.full(layer.moving_variance.shape, 2.0, "float32"))
    runner = SkipChannelRunner(model)
    assert runner.reduced_layers == []
    assert len(runner.folded_norms) == 9  # stem, 2 per block, 2 projections
    x = images(2)
    np.testing.assert_allclose(np.asarray(runner(x)), np.asarray(model(x)), rtol=RTOL,
                               atol=ATOL)


def test_vgg_chains_through_max_pooling():
    model = deepmoe.deepmoe_vgg16(input_shape=(32, 32, 3), num_classes=NUM_CLASSES,
                                  width_multiplier=1 / 16, embedding_widths=(4, 4, 4, 4))
    randomize_norms(model)
    close_gates(model)
    runner = SkipChannelRunner(model)
    # Every convolution but the last feeds the next gated one through BN, ReLU (and a
    # max-pool after conv2, 4, 7, 10): all twelve have their outputs sliced.
    assert runner.reduced_layers == [f"conv{i}" for i in range(1, 13)]
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(runner(x)), np.asarray(model(x)), rtol=RTOL,
                               atol=ATOL)


def test_rejects_models_it_cannot_walk():
    with pytest.raises(ValueError, match="functional"):
        SkipChannelRunner(keras.Sequential([keras.layers.Dense(2)]))


def test_open_sets_of_varying_size_across_calls_one_trace_each():
    """Serving: one image per call, a different open set (and size) each time."""
    model = tiny(wide=True)
    randomize_norms(model)
    mixed_gates(model, seed=5)
    runner = SkipChannelRunner(model)
    x = images(6, seed=11)
    counts = set()
    for i in range(6):
        image = x[i:i + 1]
        assert_matches(model, runner, image)
        counts.add(sum(int((np.asarray(g) > 0).sum()) for g in model.network(image)["gates"]))
        shapes = runner.kernel_shapes(image)
        np.testing.assert_allclose(  # all outputs, through the second trace
            np.asarray(runner.outputs(image)["logits"]), np.asarray(model(image)),
            rtol=RTOL, atol=ATOL,
        )
        assert all(len(s) == 4 for s in shapes.values())
    assert len(counts) > 1  # the number of open channels changed between calls
    assert runner._forward.experimental_get_tracing_count() == 1
    assert runner._forward_all.experimental_get_tracing_count() == 1


def test_embedding_and_classifier_are_snapshotted_with_norms_folded():
    model = tiny(wide=True)
    randomize_norms(model)
    embedding = model.network.get_layer("embedding")
    rng = np.random.default_rng(4)
    for norm in embedding.norms:  # non-trivial statistics inside the embedding too
        n = norm.moving_mean.shape[0]
        norm.moving_mean.assign(rng.normal(0, 0.5, n).astype("float32"))
        norm.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
        norm.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
        norm.beta.assign(rng.normal(0, 0.5, n).astype("float32"))
    close_gates(model)
    runner = SkipChannelRunner(model)
    snapshotted = {type(s).__name__ for s in runner._snapshots.values()}
    assert snapshotted == {"SnapshotEmbedding", "SnapshotDense"}
    x = images(3, seed=9)
    assert_matches(model, runner, x[:1])
    assert_matches(model, runner, x)
    got, want = runner.outputs(x), model.network(x)
    np.testing.assert_allclose(
        np.asarray(got["embedding_logits"]), np.asarray(want["embedding_logits"]),
        rtol=1e-5, atol=1e-5,
    )
    for g, w in zip(got["gates"], want["gates"]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
