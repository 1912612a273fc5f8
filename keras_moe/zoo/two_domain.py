"""Paper 002's two-domain mixture of two conv experts (MNIST + CIFAR-10, 20 classes).

Builders:

- `two_domain_moe(gate="conv" | "dense" | "oracle", gate_loss=None | "entropy" |
  "variance", alpha=0.1, beta=0.01)`: two experts of the paper's conv net mixed by an
  `ExpertMixture`; the oracle gate (the paper's baseline, two distinct experts) reads
  each example's domain.

The gates of a built model: `keras_moe.analysis.gates.gate_model(model, "mixture")` (a
model from the same inputs to the gates); the paper's [domain x expert] table is
`keras_moe.analysis.activation_rates(gates, domain)`.
"""

import keras

from keras_moe import regularizers
from keras_moe import validation
from keras_moe.layers.expert_mixture import ExpertMixture
from keras_moe.zoo.registry import ModelFamily, register_family, register_model

GATES = ("conv", "dense", "oracle")
GATE_LOSSES = (None, "entropy", "variance")
MIXTURE_NAME = "mixture"

TWO_DOMAIN = register_family(ModelFamily(
    name="two_domain",
    description="paper 002: two conv experts on MNIST + CIFAR-10, gate losses",
    search_space=(("alpha", "decade"), ("beta", "decade")),
))


def _conv_expert(input_shape, num_classes, filters, units, name):
    """conv-pool-conv-pool-dense(relu)-dense: the paper's expert `NN_i` (logits out)."""
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2, 2, padding="same"),
            keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2, 2, padding="same"),
            keras.layers.Flatten(),
            keras.layers.Dense(units, activation="relu"),
            keras.layers.Dense(num_classes),
        ],
        name=name,
    )


def _conv_gate(input_shape, num_experts, filters, units):
    """The paper's convolutional gate; its two convs have no activation (as printed)."""
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(filters, 3, padding="same"),
            keras.layers.MaxPooling2D(2, 2, padding="same"),
            keras.layers.Conv2D(filters, 3, padding="same"),
            keras.layers.MaxPooling2D(2, 2, padding="same"),
            keras.layers.Flatten(),
            keras.layers.Dense(units, activation="relu"),
            keras.layers.Dense(num_experts, activation="softmax", dtype="float32"),
        ],
        name="conv_gate",
    )


def _dense_gate(input_shape, num_experts, units):
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(units, activation="relu"),
            keras.layers.Dense(num_experts, activation="softmax", dtype="float32"),
        ],
        name="dense_gate",
    )


@register_model(family=TWO_DOMAIN)
def two_domain_moe(
    *,
    input_shape=(32, 32, 1),
    num_classes=20,
    gate="conv",
    gate_loss=None,
    alpha=0.1,
    beta=0.01,
    num_experts=2,
    expert_filters=128,
    expert_units=128,
    gate_filters=64,
    gate_units=64,
    output="logits",
):
    """Paper 002's two-domain MoE: two conv experts mixed by a conv, dense or oracle gate.

    `Y'(X) = softmax(g_1(X) NN_1(X) + g_2(X) NN_2(X))` with each expert
    conv128-pool-conv128-pool-dense128-dense20 (3x3 "same" convs with ReLU, 2x2
    max-pooling) on 32x32x1 images of 20 classes (MNIST 0-9, CIFAR-10 10-19). Gates:

    - `"conv"`: conv64-pool-conv64-pool-dense64(relu)-dense2(softmax); the paper's code
      gives its two convs no activation, and so do we.
    - `"dense"`: flatten-dense64(relu)-dense2(softmax).
    - `"oracle"`: the paper's baseline, `g = [1, 0]` for domain 0 (digits) and
      `[0, 1]` for domain 1 (natural images): two distinct experts. The model then has
      two inputs, `{"image": (32, 32, 1) float, "domain": () int32}`, the format of
      `keras_moe.data.load("two_domain", with_extras=True)`.

    The conv and dense models have one input named `"image"`. Images are expected in
    [0, 1] (`keras_moe.data.load("two_domain")`'s default `"unit"` normalisation); the
    paper does not say how it scaled them.

    The model outputs the mixed logits (`output="logits"`, compile with
    `SparseCategoricalCrossentropy(from_logits=True)`; the paper's `Y'` is their
    softmax) or `Y'` itself (`output="probabilities"`). `analysis.gates.gate_model(model,
    "mixture")` gives the gates.

    Gate losses (added in training only, batch 128 in the paper):

    - `"entropy"`: `alpha * (-Entropy(mean_batch g)) + beta * mean_batch Entropy(g)`
      (`regularizers.EntropyGateLoss`);
    - `"variance"`: `alpha * Var(mean_batch g) - beta * mean_batch Var(g)`
      (`regularizers.VarianceGateLoss`; the paper says only "defined similarly", the
      signs are the regularizer's documented choice).

    Args:
        input_shape: Image shape, (32, 32, 1) in the paper.
        num_classes: Number of classes, 20 in the paper.
        gate: `"conv"`, `"dense"` or `"oracle"`.
        gate_loss: None, `"entropy"` or `"variance"`.
        alpha: Weight of the batch term of the gate loss, >= 0 (0.1 in the paper).
        beta: Weight of the sample term of the gate loss, >= 0 (0.01 in the paper).
        num_experts: Number of experts, 2 in the paper (the oracle needs as many
            experts as domains).
        expert_filters: Filters of each expert conv (128 in the paper).
        expert_units: Hidden dense width of each expert (128 in the paper).
        gate_filters: Filters of the conv gate's convs (64 in the paper).
        gate_units: Hidden dense width of the conv and dense gates (64 in the paper).
        output: `"logits"` or `"probabilities"`.

    Returns:
        A `keras.Model` (not compiled).

    Example:

    >>> model = two_domain_moe(gate="dense", gate_loss="entropy")
    >>> model.output.shape
    (None, 20)
    >>> gates = keras_moe.analysis.gates.gate_model(model, "mixture")

    Reference:
        "Mixture of Experts - Experiment 1" (`shared/papers/002`).
    """
    validation.one_of("gate", gate, GATES)
    validation.one_of("gate_loss", gate_loss, GATE_LOSSES)
    alpha = validation.non_negative_float("alpha", alpha)
    beta = validation.non_negative_float("beta", beta)
    num_classes = validation.integer("num_classes", num_classes, minimum=2)
    num_experts = validation.positive_int("num_experts", num_experts)
    for name, value in (
        ("expert_filters", expert_filters),
        ("expert_units", expert_units),
        ("gate_filters", gate_filters),
        ("gate_units", gate_units),
    ):
        validation.positive_int(name, value)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape}")

    experts = [
        _conv_expert(input_shape, num_classes, expert_filters, expert_units, f"expert_{i}")
        for i in range(num_experts)
    ]
    if gate == "conv":
        gate_layer = _conv_gate(input_shape, num_experts, gate_filters, gate_units)
    elif gate == "dense":
        gate_layer = _dense_gate(input_shape, num_experts, gate_units)
    else:
        gate_layer = "oracle"
    loss = None
    if gate_loss == "entropy":
        loss = regularizers.EntropyGateLoss(alpha=alpha, beta=beta)
    elif gate_loss == "variance":
        loss = regularizers.VarianceGateLoss(alpha=alpha, beta=beta)

    mixture = ExpertMixture(
        experts,
        gate=gate_layer,
        balance_loss=loss,
        output=output,
        return_gates=True,
        name=MIXTURE_NAME,
    )
    image = keras.Input(input_shape, name="image")
    if gate == "oracle":
        domain = keras.Input((), dtype="int32", name="domain")
        outputs, _ = mixture([image, domain])
        inputs = {"image": image, "domain": domain}
    else:
        outputs, _ = mixture(image)
        inputs = image
    suffix = f"_{gate_loss}" if gate_loss else ""
    return keras.Model(inputs, outputs, name=f"two_domain_moe_{gate}{suffix}")
