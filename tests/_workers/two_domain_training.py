"""Training of a tiny zoo model with a balancing loss, shared by the distribution tests.

The model is `two_domain_moe(gate="dense", gate_loss=...)`: two conv experts mixed by a
dense softmax gate, with the paper-002 entropy (or variance) loss, a non-linear function
of the batch mean gate. It has no randomness in training (no dropout, no gate noise, no
batch norm), so a data-parallel run and a one-device run on the same global batches
must reach the same weights up to float rounding. (`sparse_moe_classifier` is not used:
its noisy top-k gate draws different noise on each replica.)

Run as a script, it is one worker of a `MultiWorkerMirroredStrategy` cluster:

    TF_CONFIG=... python two_domain_training.py DATA.npz OUT.npz

DATA.npz holds `x`, `y` and the initial weights `w0`, `w1`, ...; OUT.npz gets the
per-epoch losses (`loss`) and final weights (`w0`, ...).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

GLOBAL_BATCH = 16
EPOCHS = 2
CONFIG = dict(input_shape=(8, 8, 1), num_classes=4, gate="dense", expert_filters=3,
              expert_units=6, gate_units=5, alpha=0.5, beta=0.2)


def build_model(gate_loss="entropy"):
    from keras_moe import zoo

    return zoo.two_domain_moe(gate_loss=gate_loss, **CONFIG)


def make_data(count=64, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(count,) + CONFIG["input_shape"]).astype("float32")
    y = rng.integers(0, CONFIG["num_classes"], size=count).astype("int32")
    return x, y


def train(strategy, initial_weights, x, y, gate_loss="entropy"):
    """Trains from `initial_weights` under `strategy`; returns (losses, weights).

    The data are one deterministic `tf.data` pipeline of global batches
    (`GLOBAL_BATCH`, no shuffling); `model.fit` distributes it, so each replica (each
    worker, in a multi-worker cluster) gets its share of every global batch.
    """
    import keras
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    with strategy.scope():
        model = build_model(gate_loss)
        model.set_weights(initial_weights)
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    history = model.fit(dataset, epochs=EPOCHS, verbose=0)
    return history.history["loss"], model.get_weights()


def train_custom_loop(strategy, initial_weights, x, y, gate_loss="entropy"):
    """As `train`, with a custom loop: `strategy.run` of one step per global batch.

    Keras 3.15's `model.fit` cannot run under `MultiWorkerMirroredStrategy` (see the
    test module), so the multi-worker test trains with this loop, the way the
    `tf.distribute` guide does: each replica's loss is its shard's mean cross-entropy
    plus the model's added losses (computed over the global batch by
    `keras_moe.regularizers.reduction`), both divided by the replica count (the
    Keras loss object does it itself, `reduction.scale_for_replicas` for the added
    losses); the optimizer sums the replicas' gradients.
    Returns (mean loss per epoch, weights), the loss reported as `fit` reports it.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_moe.regularizers.reduction import scale_for_replicas

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    with strategy.scope():
        model = build_model(gate_loss)
        model.set_weights(initial_weights)
        optimizer = keras.optimizers.SGD(0.5)
        optimizer.build(model.trainable_variables)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    distributed = strategy.experimental_distribute_dataset(dataset)

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            # A Keras loss object already divides by the replica count inside a
            # strategy (keras.src.losses.loss.scale_loss_for_distribution); the added
            # losses, global values on every replica, are divided here.
            loss = cross_entropy(labels, logits) + scale_for_replicas(tf.add_n(model.losses))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def step(batch):
        per_replica = strategy.run(replica_step, args=batch)
        return strategy.reduce("SUM", per_replica, axis=None)

    losses = []
    for _ in range(EPOCHS):
        losses.append(np.mean([float(step(batch)) for batch in distributed]))
    return losses, model.get_weights()


def main(data_path, out_path):
    import numpy as np

    from keras_moe.distribute import get_strategy

    strategy = get_strategy("multi_worker")  # first: before any other TensorFlow op
    with np.load(data_path) as data:
        x, y = data["x"], data["y"]
        initial = [data[f"w{i}"] for i in range(len(data.files) - 2)]
    losses, weights = train_custom_loop(strategy, initial, x, y)
    np.savez(out_path, loss=np.array(losses), replicas=strategy.num_replicas_in_sync,
             **{f"w{i}": w for i, w in enumerate(weights)})
    print("TRAINED", strategy.num_replicas_in_sync)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
