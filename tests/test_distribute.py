"""MoEDense under tf.distribute: two replicas train exactly like one device.

The balancing losses are non-linear in batch statistics, so they only match the
single-device objective when those statistics are taken over the global batch.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe import regularizers
from keras_moe.layers import MoEDense

from conftest import LOGICAL_CPUS


def _build_model(dispatch):
    inputs = keras.Input((10,))
    hidden = MoEDense(
        12, num_experts=4, top_k=2, gate_hidden_units=8, activation="relu",
        dispatch=dispatch,
        balance_loss=[
            # (LoadLoss needs the noisy gate, whose noise differs per replica.)
            regularizers.ImportanceLoss(0.5),
            regularizers.SwitchLoadBalanceLoss(0.2),
            regularizers.RouterZLoss(0.01),
        ],
    )(inputs)
    soft = MoEDense(
        6, num_experts=3, gate_hidden_units=4,
        balance_loss=regularizers.EntropyGateLoss(alpha=0.3, beta=0.1),
    )(hidden)
    return keras.Model(inputs, keras.layers.Dense(3)(soft))


def _train(strategy, initial_weights, x, y, dispatch):
    with strategy.scope():
        model = _build_model(dispatch)
        model.set_weights(initial_weights)
        model.compile(
            optimizer=keras.optimizers.SGD(0.2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    return history.history["loss"], model.get_weights()


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_mirrored_strategy_matches_single_device(dispatch, mirrored_strategy):
    assert len(LOGICAL_CPUS) >= 2, "conftest must create two logical CPU devices"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 10)).astype("float32")
    y = rng.integers(0, 3, size=128).astype("int32")
    keras.utils.set_random_seed(1)
    initial = _build_model(dispatch).get_weights()

    single_loss, single_weights = _train(tf.distribute.get_strategy(), initial, x, y, dispatch)
    mirrored = mirrored_strategy
    assert mirrored.num_replicas_in_sync == 2
    mirrored_loss, mirrored_weights = _train(mirrored, initial, x, y, dispatch)

    np.testing.assert_allclose(mirrored_loss, single_loss, rtol=1e-5)
    for got, want in zip(mirrored_weights, single_weights):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # The balancing terms moved the gates: training was not a no-op.
    assert any(np.abs(w - i).max() > 1e-3 for w, i in zip(single_weights, initial))


@pytest.mark.multi_backend
@pytest.mark.skipif(keras.backend.backend() == "tensorflow",
                    reason="the refusals on other backends")
def test_tensorflow_only_parts_refuse_other_backends(tmp_path, capsys):
    """tf.distribute's strategies, the multi-worker loop and the channel-skipping runner
    say that they need TensorFlow (instead of a strategy scope that JAX ignores, or a
    symbolic-tensor error from inside the graph)."""
    from conftest import TINY_SPARSE_RECIPE, write_recipe
    from keras_moe import cli, distribute, zoo
    from keras_moe.inference import SkipChannelRunner
    from keras_moe.training.custom_loop import fit_distributed

    for name in ("mirrored", "multi_worker", "tpu"):
        with pytest.raises(ValueError, match=f"'{name}' strategy .* needs the TensorFlow"):
            distribute.get_strategy(name)
    distribute.get_strategy("default")  # no distribution: valid everywhere
    assert cli.main(["train", write_recipe(tmp_path, TINY_SPARSE_RECIPE), "--strategy",
                     "mirrored", "--out", str(tmp_path / "run")]) == 2
    assert "--strategy mirrored: the 'mirrored' strategy" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="fit_distributed .* needs the TensorFlow backend"):
        fit_distributed(keras.Sequential([keras.layers.Dense(2)]), None,
                        strategy=tf.distribute.get_strategy(), steps_per_epoch=1,
                        initial_epoch=0, epochs=1)
    with pytest.raises(ValueError, match="SkipChannelRunner .* needs the TensorFlow"):
        SkipChannelRunner(zoo.deepmoe_resnet_cifar(depth=8))
