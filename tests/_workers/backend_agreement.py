"""Cases computed on two Keras backends for `tests/test_backend_agreement.py`.

Each case builds a layer or a zoo model on the current backend, takes its inputs from
a fixed numpy generator and its weights from `state` (the other backend's, when given),
and returns numpy results: forward outputs and gradients of a fixed objective for the
layer families, the losses of a few SGD steps for the zoo models. Gate noise and
dropout are off, so that both backends compute the same function.

Run as a script, it loads the states of every case from an `.npz` file, computes each
case on this process's backend (set `KERAS_BACKEND` before starting it) and writes the
results to another `.npz` file: `python backend_agreement.py STATES.npz RESULTS.npz`.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
from keras import ops  # noqa: E402

from keras_moe import regularizers, zoo  # noqa: E402
from keras_moe.layers import (  # noqa: E402
    ExpertClusters,
    ExpertMixture,
    GatedConv2D,
    MoEDense,
    NoisyTopKGate,
    ParametricTSNEMap,
    ReLUGate,
    ShallowEmbedding,
    SoftmaxGate,
    TSNEGate,
)
from testing_utils import gradients, to_numpy  # noqa: E402


def _rng(seed):
    return np.random.default_rng(seed)


def _set_or_get_weights(target, state):
    """Loads `state["weights"]` into `target`, or records its freshly made weights."""
    if state is not None:
        target.set_weights(list(state["weights"]))
        return state
    return {"weights": [to_numpy(w) for w in target.get_weights()]}


def _objective(outputs):
    """Sum of every float output times fixed pseudo-random weights (one scalar)."""
    total = 0.0
    for index, out in enumerate(keras.tree.flatten(outputs)):
        if "float" not in str(out.dtype):
            continue
        weights = np.cos(np.arange(np.prod(out.shape)) * 0.37 + index).reshape(out.shape)
        total = total + ops.sum(out * weights.astype("float32"))
    return total


def _layer_case(layer, inputs, state, training=True, random_init=True):
    """Forward outputs, added losses and gradients of a built layer on `inputs`."""
    layer(inputs, training=training)  # builds it
    if state is None and random_init:
        rng = _rng(100)
        for w in layer.trainable_weights:  # zero-initialised gates would route uniformly
            w.assign(rng.normal(0.0, 0.4, w.shape).astype("float32"))
    state = _set_or_get_weights(layer, state)
    outputs = layer(inputs, training=training)
    losses = [to_numpy(v) for v in layer.losses]

    def objective():
        out = layer(inputs, training=training)
        return _objective(out) + sum(layer.losses)

    value, _, grads = gradients(objective, variables=layer.trainable_weights)
    results = {f"output_{i}": to_numpy(o) for i, o in enumerate(keras.tree.flatten(outputs))}
    results.update({f"loss_{i}": v for i, v in enumerate(losses)})
    results.update({f"grad_{i}": g for i, g in enumerate(grads)})
    results["objective"] = value
    return results, state


def moe_soft(state):
    x = _rng(1).normal(size=(24, 7)).astype("float32")
    layer = MoEDense(6, num_experts=4, gate_hidden_units=5, activation="relu")
    return _layer_case(layer, x, state)


def _deterministic_top_k(dispatch, capacity_factor=1.25):
    return MoEDense(
        6, num_experts=5, top_k=2, expert_hidden_units=8, dispatch=dispatch,
        capacity_factor=capacity_factor,
        gate=NoisyTopKGate(5, top_k=2, noisy=False, name="gate"),
        balance_loss=[regularizers.ImportanceLoss(0.3), regularizers.SwitchLoadBalanceLoss(0.2),
                      regularizers.RouterZLoss(0.1)],
    )


def moe_top_k_sparse(state):
    x = _rng(2).normal(size=(40, 7)).astype("float32")
    return _layer_case(_deterministic_top_k("sparse"), x, state)


def moe_top_k_capacity_with_drops(state):
    x = _rng(3).normal(size=(40, 7)).astype("float32")
    results, state = _layer_case(_deterministic_top_k("capacity", 0.6), x, state)
    return results, state


def moe_eigen_constraint(state):
    """Eigen's running-assignment constraint: two constrained training calls in a row."""
    rng = _rng(4)
    x = rng.normal(size=(2, 32, 7)).astype("float32")
    layer = MoEDense(5, num_experts=4, gate_hidden_units=6, activation="relu",
                     assignment_margin=1.0, return_gates=True)
    layer(x[0])
    if state is None:
        layer.gate.bias.assign([3.0, 0.0, 0.0, 0.0])  # so that the constraint binds
    state = _set_or_get_weights(layer, state)
    results = {}
    for step in range(2):
        outputs, gates = layer(x[step], training=True)
        results[f"gates_{step}"] = to_numpy(gates)
        results[f"output_{step}"] = to_numpy(outputs)
        results[f"totals_{step}"] = to_numpy(layer.assignment_totals)
    return results, state


def gated_conv_network(state):
    """ShallowEmbedding -> ReLUGate -> GatedConv2D, with DeepMoE's L1 term."""
    rng = _rng(5)
    images = keras.Input((8, 8, 3))
    embedding = ShallowEmbedding(4, widths=(4, 6))(images)
    gates = ReLUGate(3)(embedding["probs"])["gates"]
    features = GatedConv2D(5, 3, use_bias=True)([images, gates])
    model = keras.Model(images, [features, embedding["logits"], gates])
    x = rng.normal(size=(6, 8, 8, 3)).astype("float32")
    state = _set_or_get_weights(model, state)
    l1 = regularizers.L1GateLoss(0.5)

    def objective():
        features, logits, gates = model(x, training=True)
        return _objective([features, logits]) + l1({"gates": gates})

    value, _, grads = gradients(objective, variables=model.trainable_weights)
    outputs = model(x, training=True)
    results = {f"output_{i}": to_numpy(o) for i, o in enumerate(outputs)}
    results.update({f"grad_{i}": g for i, g in enumerate(grads)})
    results["objective"] = value
    return results, state


def tsne_gated_moe(state):
    """A parametric t-SNE map (its KL added in training) gating a top-2 MoEDense."""
    rng = _rng(6)
    x = (rng.normal(size=(32, 6)) + np.repeat(rng.normal(0, 3, (4, 6)), 8, axis=0)).astype(
        "float32"
    )
    gate = TSNEGate(4, top_k=2, temperature=0.5, name="gate",
                    mapping=ParametricTSNEMap(hidden_units=(8,), perplexity=5.0, loss_weight=0.3))
    layer = MoEDense(5, num_experts=4, top_k=2, gate=gate, dispatch="sparse")
    return _layer_case(layer, x, state)


def expert_mixture(state):
    x = _rng(7).normal(size=(12, 5)).astype("float32")
    layer = ExpertMixture(
        [keras.layers.Dense(4), keras.layers.Dense(4)],
        gate=keras.Sequential([keras.layers.Dense(2, activation="softmax")]),
        balance_loss=[regularizers.EntropyGateLoss(0.3, 0.1), regularizers.VarianceGateLoss()],
    )
    return _layer_case(layer, x, state)


def expert_clusters(state):
    rng = _rng(8)
    x = rng.normal(size=(10, 12)).astype("float32")
    gates = rng.dirichlet(np.ones(3), size=10).astype("float32")
    layer = ExpertClusters(3, 4, local_density=0.8, remote_density=0.2, seed=3)
    layer(x, gates)
    state = _set_or_get_weights(layer, state)

    def objective():
        return _objective(layer(x, gates))

    value, _, grads = gradients(objective, variables=layer.trainable_weights)
    results = {"output": to_numpy(layer(x, gates)), "objective": value}
    results.update({f"grad_{i}": g for i, g in enumerate(grads)})
    return results, state


def softmax_top_k_gate(state):
    x = _rng(9).normal(size=(20, 6)).astype("float32")
    return _layer_case(SoftmaxGate(5, top_k=3, hidden_units=4), x, state)


# Zoo models: a few SGD steps from the same weights and batches ------------------------


def _sgd_losses(model, x, y, state, steps=3, learning_rate=0.05):
    state = _set_or_get_weights(model, state)
    model.compile(keras.optimizers.SGD(learning_rate),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batch = len(x) // steps
    losses = [
        float(model.train_on_batch(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]))
        for i in range(steps)
    ]
    return {"losses": np.asarray(losses)}, state


def dmoe_mnist_sgd(state):
    rng = _rng(10)
    x = rng.integers(0, 256, size=(48, 12, 12, 1)).astype("float32")
    y = rng.integers(0, 5, size=48)
    model = zoo.dmoe_mnist(input_shape=(12, 12, 1), num_classes=5, experts=(3, 3),
                           units=(8, 8), gate_hidden_units=(5, 5), assignment_margin=1.0)
    return _sgd_losses(model, x, y, state, learning_rate=0.2)


def sparse_moe_classifier_sgd(state):
    rng = _rng(11)
    x = rng.normal(size=(48, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 4, size=48)
    # Sparse dispatch on both (JAX's CPU default, capacity, would drop assignments).
    model = zoo.sparse_moe_classifier(input_shape=(6, 6, 1), num_classes=4, num_experts=6,
                                      top_k=2, units=8, dropout=0.0, dispatch="sparse")
    for layer in model.layers:
        if isinstance(layer, MoEDense):
            layer.gate.noisy = False  # noise off: the backends draw different noise
    if state is None:
        rng_w = _rng(12)
        for w in model.trainable_weights:
            if "gate" in w.path:
                w.assign(rng_w.normal(0, 0.5, w.shape).astype("float32"))
    return _sgd_losses(model, x, y, state)


def deepmoe_resnet8_sgd(state):
    rng = _rng(13)
    x = rng.normal(size=(24, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 4, size=24)
    model = zoo.deepmoe_resnet_cifar(depth=8, input_shape=(16, 16, 3), num_classes=4,
                                     width_multiplier=0.5, embedding_widths=(4, 4, 8, 8))
    return _sgd_losses(model, x, y, state)


LAYER_CASES = {
    case.__name__: case
    for case in (moe_soft, moe_top_k_sparse, moe_top_k_capacity_with_drops,
                 moe_eigen_constraint, gated_conv_network, tsne_gated_moe, expert_mixture,
                 expert_clusters, softmax_top_k_gate)
}
MODEL_CASES = {
    case.__name__: case for case in (dmoe_mnist_sgd, sparse_moe_classifier_sgd, deepmoe_resnet8_sgd)
}
CASES = {**LAYER_CASES, **MODEL_CASES}


def save_states(states, path):
    arrays = {}
    for name, state in states.items():
        for i, w in enumerate(state["weights"]):
            arrays[f"{name}/{i}"] = w
    np.savez(path, **arrays)


def load_states(path):
    states = {}
    with np.load(path) as data:
        for key in data.files:
            name, index = key.split("/")
            states.setdefault(name, {}).setdefault("pairs", []).append((int(index), data[key]))
    return {
        name: {"weights": [w for _, w in sorted(value["pairs"], key=lambda p: p[0])]}
        for name, value in states.items()
    }


def main(states_path, results_path):
    states = load_states(states_path)
    arrays = {"backend": np.asarray(keras.backend.backend())}
    for name, case in CASES.items():
        results, _ = case(states.get(name, {"weights": []}))
        for key, value in results.items():
            arrays[f"{name}/{key}"] = np.asarray(value)
    np.savez(results_path, **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
