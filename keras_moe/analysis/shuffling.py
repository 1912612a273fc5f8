"""DeepMoE's gate-embedding shuffling analysis (section 5.3.1, Fig. 4).

For a target class A, every test input of class A keeps its image but gets the gate
embedding `e` of a randomly drawn example of another class, from the same coarse group
as A ("in-group shuffling") or from another group ("out-of-group"); the accuracy of
class A under each donor class shows whether semantically related classes share gate
embeddings. The paper (VGG-16, CIFAR-100, target "dolphin", 20 draws per input) finds
in-group accuracy 20-60 points above out-of-group.

How the network runs with a substituted `e`: `substituted_embedding_model(model)`
rebuilds the functional graph of `model.network` on two new inputs, the images and an
`e` of shape `(batch, num_classes)`: every layer call of the network is replayed in
order on the new tensors (the layers, hence the weights, are shared), except the
`ShallowEmbedding` call, whose `probs` output (what every gate head reads) is replaced
by the `e` input. The result is a `keras.Model([images, e], logits)`; with each input's
own `e` it computes exactly what the model computes. It needs a flat functional network
with one `ShallowEmbedding` call, as the zoo's DeepMoE builders make.

Choices where the paper is silent: `e` is the softmax output of the embedding in
inference mode (the gates' input); the donor examples are drawn uniformly with
replacement from the donor class of the data given, independently for every input and
repeat; a group's accuracy is the mean over its donor classes.

Reference:
    Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, sec. 5.3.1.
"""

import dataclasses

import keras
import numpy as np

from keras_moe import validation
from keras_moe.analysis import graph
from keras_moe.layers.gated_conv import ShallowEmbedding

# A coarse grouping of the Fashion-MNIST classes (our choice, for the offline stand-in):
# 0 garments worn on the upper body (T-shirt, pullover, dress, coat, shirt), 1 footwear
# (sandal, sneaker, ankle boot), 2 trouser, 3 bag.
FASHION_MNIST_GROUPS = (0, 2, 0, 0, 0, 1, 0, 1, 3, 1)


def _network(model):
    """The graph with the logits as an output: a DeepMoE's `network` view, or `model`."""
    network = getattr(model, "network", model)
    if not graph.has_graph(network):
        raise ValueError(f"{model!r} is not a DeepMoE model with a functional network")
    return graph.functional(network)


def _embedding_node(network):
    found = [n for n in graph.call_nodes(network)
             if isinstance(graph.operation(n), ShallowEmbedding)]
    if len(found) != 1:
        raise ValueError(
            f"the network must call exactly one ShallowEmbedding, found {len(found)}"
        )
    return found[0]


def _named_outputs(node):
    """{"probs": tensor, "logits": tensor} of a ShallowEmbedding call node."""
    return graph.named_outputs(node, {"probs": 0, "logits": 0})


def _logits_tensor(network):
    output = network.output
    return output["logits"] if isinstance(output, dict) else output


def embedding_model(model):
    """A model from the images to the embedding `e` (softmax probabilities).

    Args:
        model: A `DeepMoEModel` (or its functional `network`).

    Returns:
        `keras.Model(images, e)` sharing the model's layers.

    Example:

    >>> e = embedding_model(model).predict(x_test)   # (N, num_classes)
    """
    network = _network(model)
    probs = _named_outputs(_embedding_node(network))["probs"]
    return keras.Model(network.input, probs, name=f"{network.name}_embedding")


def substituted_embedding_model(model):
    """A model `[images, e] -> logits` that runs the network with `e` given.

    See the module docstring (the graph is replayed on new inputs, the embedding's
    `probs` replaced by the `e` input; weights shared).

    Args:
        model: A `DeepMoEModel` (or its functional `network`) built by the zoo.

    Returns:
        `keras.Model([images, e], logits)`.

    Example:

    >>> sub = substituted_embedding_model(model)
    >>> e = embedding_model(model).predict(x)
    >>> np.allclose(sub.predict([x, e]), model.predict(x))
    True

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, sec.
        5.3.1.
    """
    network = _network(model)
    embedding_node = _embedding_node(network)
    num_classes = graph.operation(embedding_node).num_classes
    images = keras.Input(tuple(network.input.shape[1:]), name="images")
    e = keras.Input((num_classes,), name="embedding")
    tensors = {id(network.input): images}
    for node in graph.call_nodes(network):
        if node is embedding_node:
            # Only `probs` feeds the gates; `logits` (the loss input) is left unmapped.
            tensors[id(_named_outputs(node)["probs"])] = e
            continue
        if any(id(t) not in tensors for t in graph.call_inputs(node)):
            continue  # depends on the embedding logits only
        for old, new in zip(graph.call_outputs(node), graph.run_node(node, tensors)):
            tensors[id(old)] = new
    logits = tensors.get(id(_logits_tensor(network)))
    if logits is None:
        raise ValueError("could not rebuild the logits from the images and e")
    return keras.Model([images, e], logits, name=f"{network.name}_substituted_e")


@dataclasses.dataclass
class ShufflingResult:
    """What `gate_embedding_shuffling` returns.

    Attributes:
        target_class: Class A.
        own_accuracy: Accuracy on class A with each input's own `e`.
        accuracy: `{donor class: accuracy of class A with e drawn from that class}`.
        in_group: Donor classes in A's coarse group.
        out_group: Donor classes in other groups.
        in_group_accuracy: Mean of `accuracy` over `in_group` (NaN if empty).
        out_group_accuracy: Mean of `accuracy` over `out_group` (NaN if empty).
        num_examples: Inputs of class A used.
    """

    target_class: int
    own_accuracy: float
    accuracy: dict
    in_group: list
    out_group: list
    in_group_accuracy: float
    out_group_accuracy: float
    num_examples: int


def _predict(model, inputs, batch_size):
    return np.argmax(model.predict(inputs, batch_size=batch_size, verbose=0), axis=-1)


def gate_embedding_shuffling(model, images, labels, target_class, groups, *,
                             donor_classes=None, repeats=20, seed=0, batch_size=256):
    """Accuracy of a target class when its gate embeddings come from other classes.

    Args:
        model: A trained `DeepMoEModel` (or its functional network).
        images: Preprocessed test images `(N, H, W, C)` (as the model expects them).
        labels: Integer labels `(N,)`.
        target_class: Class A (must occur in `labels`).
        groups: Coarse group of every class: a sequence indexed by class (e.g. CIFAR-100's
            coarse labels, or `FASHION_MNIST_GROUPS`).
        donor_classes: Classes to draw embeddings from (default: every other class in
            `labels`); the paper uses 5 in-group and 5 out-of-group classes.
        repeats: Draws per input and donor class (paper: 20), >= 1.
        seed: Seed of the draws.
        batch_size: Prediction batch size.

    Returns:
        A `ShufflingResult`.

    Example:

    >>> r = gate_embedding_shuffling(model, x_test, y_test, target_class=0,
    ...                              groups=FASHION_MNIST_GROUPS, repeats=5)
    >>> r.in_group_accuracy, r.out_group_accuracy

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, sec.
        5.3.1 and Fig. 4.
    """
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(
            f"images and labels must have the same length, got {len(images)} and {len(labels)}"
        )
    repeats = validation.positive_int("repeats", repeats)
    groups = np.asarray(groups).reshape(-1)
    present = sorted(int(c) for c in np.unique(labels))
    target_class = int(target_class)
    if target_class not in present:
        raise ValueError(f"target_class must occur in labels, got {target_class}")
    if max(present) >= len(groups):
        raise ValueError(
            f"groups must give a group for every class (at least {max(present) + 1} "
            f"entries), got {len(groups)}"
        )
    if donor_classes is None:
        donor_classes = [c for c in present if c != target_class]
    donor_classes = [int(c) for c in donor_classes]
    bad = [c for c in donor_classes if c not in present or c == target_class]
    if bad or not donor_classes:
        raise ValueError(
            "donor_classes must be a non-empty list of classes other than target_class "
            f"that occur in labels; invalid: {bad}"
        )

    e_all = embedding_model(model).predict(images, batch_size=batch_size, verbose=0)
    substituted = substituted_embedding_model(model)
    rows = np.flatnonzero(labels == target_class)
    x_a = images[rows]
    own = _predict(substituted, [x_a, e_all[rows]], batch_size)
    rng = np.random.default_rng(seed)
    accuracy = {}
    for donor in donor_classes:
        pool = np.flatnonzero(labels == donor)
        draws = rng.choice(pool, size=(repeats, len(rows)), replace=True).reshape(-1)
        x_rep = np.concatenate([x_a] * repeats)
        predicted = _predict(substituted, [x_rep, e_all[draws]], batch_size)
        accuracy[donor] = float(np.mean(predicted == target_class))
    in_group = [c for c in donor_classes if groups[c] == groups[target_class]]
    out_group = [c for c in donor_classes if groups[c] != groups[target_class]]

    def mean(classes):
        return float(np.mean([accuracy[c] for c in classes])) if classes else float("nan")

    return ShufflingResult(
        target_class=target_class,
        own_accuracy=float(np.mean(own == target_class)),
        accuracy=accuracy,
        in_group=in_group,
        out_group=out_group,
        in_group_accuracy=mean(in_group),
        out_group_accuracy=mean(out_group),
        num_examples=len(rows),
    )
