"""`DeepMoEModel`: a DeepMoE network with its training objective, as a functional model.

A DeepMoE (Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019) is a
base convolutional network whose convolutions are `GatedConv2D` layers (every input
channel an expert), a shallow embedding network M(x) whose softmax output `e` are latent
mixture weights over the classes, and one `ReLUGate` head per gated convolution,
`G^l(e) = ReLU(W_g^l e)` (eq. 6). The objective (eq. 7) is

    J = CE(base logits, y) + lambda * L_g + mu * CE(e, y).

`DeepMoEModel` is a functional Keras model from the images to the base network's
logits, so `model.inputs`, `summary()`, `plot_model` and every graph tool see all of its
layers. Its last layer, `DeepMoEObjective`, passes the logits through and, in training
calls, adds `lambda * L_g` with `add_loss` and keeps the embedding logits, which the
model's own `compute_loss` turns into `mu * CE(e, y)`: a plain
`compile(optimizer, loss=SparseCategoricalCrossentropy(from_logits=True))` and `fit(x, y)`
train the whole objective. `model.network` is a view of the same graph with all three
outputs (`"logits"`, `"embedding_logits"`, `"gates"`).

Its config (keras-hub's task models show the pattern) holds the architecture's name and
keywords, not the graph: `from_config` rebuilds it with the zoo's code, and loading a
`.keras` file without `keras_moe` imported fails with a short message that says so.

`GatedNetwork` is the construction helper of every DeepMoE architecture
(`keras_moe.zoo.deepmoe.resnet`, `.vgg`, `.drn`): one embedding per network, one gate
head per gated convolution; built plain (no gates, no embedding) it makes the baselines.
Design decisions (DESIGN.md, "DeepMoE (004)"): gates sit after BN+ReLU and gate a
convolution's inputs; the shortcut is never gated; `W_g` starts at about 1 (gates open).

Elsewhere: Procedure 1 (two phases) and the density controller in
`keras_moe.training.deepmoe`; FLOPs in `keras_moe.analysis.flops`; skip-channel inference
in `keras_moe.inference`.
"""

import threading

import keras
from keras import ops

from keras_moe import validation
from keras_moe.layers.gated_conv import GatedConv2D
from keras_moe.layers.gated_conv import ShallowEmbedding
from keras_moe.layers.gates import ReLUGate
from keras_moe.layers.replica_losses import ReplicaLocalLossesMixin, per_thread
from keras_moe.regularizers import functional as reg_fn

DEFAULT_GATE_L1 = 0.1
_OUTPUT_KEYS = ("logits", "embedding_logits", "gates")
LOAD_HINT = "a keras_moe model: run `import keras_moe` before loading it"


# The embedding loss ----------------------------------------------------------------------


def _pixel_histograms(y, num_classes, sample_weight):
    """Per-image class histograms `(batch, num_classes)` of per-pixel labels, and the
    per-image weights `(batch,)` (None without sample weights)."""
    batch = ops.shape(y)[0]
    if y.shape[-1] == num_classes and num_classes != 1 and len(y.shape) == 4:
        onehot = ops.cast(y, "float32")  # one-hot / soft per-pixel labels
        valid = ops.ones(ops.shape(onehot)[:-1], "float32")
    else:
        labels = ops.cast(y, "int32")
        if len(labels.shape) == 4:
            labels = ops.squeeze(labels, axis=-1)
        in_range = (labels >= 0) & (labels < num_classes)
        valid = ops.cast(in_range, "float32")
        onehot = ops.one_hot(ops.where(in_range, labels, 0), num_classes) * valid[..., None]
    onehot = ops.reshape(onehot, (batch, -1, num_classes))
    valid = ops.reshape(valid, (batch, -1))
    image_weight = None
    if sample_weight is not None:
        weights = ops.cast(sample_weight, "float32")
        if len(weights.shape) >= 2:  # per-pixel weights weigh the pixels of the histogram
            weights = ops.reshape(weights, (batch, -1)) * valid
            labelled = ops.maximum(ops.sum(valid, axis=1), 1.0)
            image_weight = ops.sum(weights, axis=1) / labelled
            valid = weights
        else:
            image_weight = ops.reshape(weights, (-1,))
    counts = ops.sum(onehot * valid[..., None], axis=1)
    total = ops.sum(counts, axis=1, keepdims=True)
    return counts / ops.maximum(total, 1e-12), image_weight


def embedding_cross_entropy(y, logits, sample_weight=None):
    """Mean cross-entropy of the embedding logits against the labels (DeepMoE's L_e).

    Image labels give the paper's `CE(e, y)`. Per-pixel labels (segmentation) have no
    image label (the paper is silent): the target is then each image's class
    histogram, the fraction of its labelled pixels in each class, `CE = -sum_c h_c log
    e_c`. Pixels whose label is outside `[0, num_classes)` (e.g. CityScapes' 255
    "void") are left out; an image without a labelled pixel contributes 0.

    Args:
        y: Integer labels `(batch,)` or `(batch, 1)`, one-hot / soft labels
            `(batch, num_classes)`, or per-pixel labels: integers `(batch, H, W)` or
            `(batch, H, W, 1)`, one-hot / soft `(batch, H, W, num_classes)`.
        logits: `(batch, num_classes)` embedding logits.
        sample_weight: Optional `(batch,)` weights (Keras' "sum_over_batch_size"
            reduction); with per-pixel labels also `(batch, H, W)` weights, which weigh
            the pixels in the histogram and the image by their mean.

    Returns:
        Scalar float32 tensor.

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, eq. 7 (L_e).
    """
    logits = ops.cast(logits, "float32")
    y = ops.convert_to_tensor(y)
    num_classes = logits.shape[-1]
    if len(y.shape) >= 3:
        histograms, weights = _pixel_histograms(y, num_classes, sample_weight)
        ce = keras.losses.categorical_crossentropy(histograms, logits, from_logits=True)
        if weights is not None:
            ce = ce * weights
        return ops.mean(ce)
    if len(y.shape) == 2 and y.shape[-1] == num_classes and num_classes != 1:
        ce = keras.losses.categorical_crossentropy(
            ops.cast(y, "float32"), logits, from_logits=True
        )
    else:
        ce = keras.losses.sparse_categorical_crossentropy(
            ops.reshape(ops.cast(y, "int32"), (-1,)), logits, from_logits=True
        )
    if sample_weight is not None:
        ce = ce * ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
    return ops.mean(ce)


# The objective layer ---------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_moe")
class DeepMoEObjective(ReplicaLocalLossesMixin, keras.layers.Layer):
    """DeepMoE's extra training terms, as the last layer of its graph.

    Called on `[logits, embedding_logits, gates_1, ..., gates_L]`, it returns the logits
    unchanged. In a training call it adds

        gate_l1 * L_g,  L_g = mean_x sum_l sum_c |g^l_c(x)| / sum_l C_l

    (eq. 8 divided by the number of gated channels: every channel weighs alike and L_g
    is 1.0 with every gate at 1, so `gate_l1` has a scale independent of depth and
    width; the paper's lambda is `gate_l1 / sum_l C_l`, e.g. / 288 for wide ResNet-8
    and / 176 for narrow, so its [0.001, 8] is [0.29, 2304] there) with `add_loss`, and keeps the embedding logits of this replica for
    `DeepMoEModel.compute_loss`, which adds `embedding_loss_weight * CE(e, y)`.

    Both coefficients are non-trainable weights (saved with the model): setting them
    changes the objective without recompiling or retracing.

    Args:
        gate_l1: lambda, a finite number >= 0.
        embedding_loss_weight: mu, a finite number >= 0.
        **kwargs: Base layer arguments.
    """

    def __init__(self, gate_l1=DEFAULT_GATE_L1, embedding_loss_weight=1.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self._gate_l1 = self.add_weight(
            shape=(), name="gate_l1", trainable=False, dtype="float32",
            initializer=keras.initializers.Constant(
                validation.non_negative_float("gate_l1", gate_l1)))
        self._embedding_loss_weight = self.add_weight(
            shape=(), name="embedding_loss_weight", trainable=False, dtype="float32",
            initializer=keras.initializers.Constant(validation.non_negative_float(
                "embedding_loss_weight", embedding_loss_weight)))
        self._layer_weights = None

    def build(self, input_shape):
        widths = [int(shape[-1]) for shape in input_shape[2:]]
        if not widths:
            raise ValueError("DeepMoEObjective needs at least one gate tensor after the "
                             "logits and the embedding logits")
        # Layer l's mean gate weighs C_l / sum C: the channel-weighted mean of eq. 8.
        self._layer_weights = [w / sum(widths) for w in widths]

    @property
    def gate_l1(self):
        """lambda (float; settable, >= 0)."""
        return float(keras.ops.convert_to_numpy(self._gate_l1))

    @gate_l1.setter
    def gate_l1(self, value):
        self._gate_l1.assign(validation.non_negative_float("gate_l1", value))

    @property
    def embedding_loss_weight(self):
        """mu (float; settable, >= 0)."""
        return float(keras.ops.convert_to_numpy(self._embedding_loss_weight))

    @embedding_loss_weight.setter
    def embedding_loss_weight(self, value):
        self._embedding_loss_weight.assign(
            validation.non_negative_float("embedding_loss_weight", value))

    def _pending(self):
        # Per thread (= per replica under MirroredStrategy), as the losses are.
        return per_thread(self, "_embedding_logits_by_thread")

    def pop_embedding_logits(self):
        """The embedding logits of this replica's last training call (None if none)."""
        return self._pending().pop(threading.get_ident(), None)

    def call(self, inputs, training=None):
        logits, embedding_logits, *gates = inputs
        if training:
            gate_term = ops.sum(ops.stack([
                weight * reg_fn.l1_gate_sparsity(g)
                for weight, g in zip(self._layer_weights, gates)
            ]))
            self.add_loss(self._gate_l1 * gate_term)
            self._pending()[threading.get_ident()] = embedding_logits
        else:
            self._pending().pop(threading.get_ident(), None)
        return logits

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        config = super().get_config()
        config.update({"gate_l1": self.gate_l1,
                       "embedding_loss_weight": self.embedding_loss_weight})
        return config


# Network construction --------------------------------------------------------------------


class GatedNetwork:
    """Makes the (gated or plain) convolutions of one network and collects its gates.

    With `gated=True` the network gets one `ShallowEmbedding` on the images, and every
    `conv(..., gated=True)` becomes a `GatedConv2D` with its own `ReLUGate` head on the
    embedding's probabilities; `finish` returns the graph's tensors for `DeepMoEModel`.
    With `gated=False` every convolution is a plain `Conv2D` and `finish` returns a
    functional `keras.Model` (the baselines).
    """

    def __init__(self, inputs, num_classes, gated, embedding_widths):
        self.inputs = inputs
        self.gated = gated
        self.gates = []
        self.embedding = None
        if gated:
            self.embedding = ShallowEmbedding(
                num_classes, widths=tuple(embedding_widths), name="embedding"
            )(inputs)

    def conv(self, x, filters, kernel_size, strides, name, gated=True, dilation=1):
        if self.gated and gated:
            gates = ReLUGate(x.shape[-1], name=f"{name}_gate")(self.embedding["probs"])["gates"]
            self.gates.append(gates)
            return GatedConv2D(
                filters, kernel_size, strides=strides, dilation_rate=dilation, name=name
            )([x, gates])
        return keras.layers.Conv2D(
            filters, kernel_size, strides=strides, padding="same", dilation_rate=dilation,
            use_bias=False, kernel_initializer="he_normal", name=name,
        )(x)

    def finish(self, logits, name):
        """A plain network's `keras.Model`, or a gated one's `(inputs, logits,
        embedding logits, gates)`."""
        if not self.gated:
            return keras.Model(self.inputs, logits, name=name)
        return self.inputs, logits, self.embedding["logits"], list(self.gates)


_ARCHITECTURES = {}


def register_architecture(name):
    """Decorator: files a gated network function (keywords -> `GatedNetwork.finish()`'s
    tuple) under `name`, the `architecture` a `DeepMoEModel` config names."""

    def register(function):
        _ARCHITECTURES[name] = function
        return function

    return register


def _network_parts(network):
    """The tensors of a functional network with DeepMoE's dict outputs."""
    outputs = getattr(network, "output", None)
    if not isinstance(network, keras.Model) or not isinstance(outputs, dict) or any(
            k not in outputs for k in _OUTPUT_KEYS):
        raise ValueError(
            "network must be a functional keras.Model whose outputs are a dict with keys "
            f"{_OUTPUT_KEYS}, got {network!r}")
    if not isinstance(outputs["gates"], (list, tuple)) or not outputs["gates"]:
        raise ValueError("network's 'gates' output must be a non-empty list of gate tensors")
    return network.input, outputs["logits"], outputs["embedding_logits"], list(outputs["gates"])


# The model -------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_moe")
class DeepMoEModel(keras.Model):
    """A DeepMoE network with its training objective (eq. 7) built into `fit`.

    A functional model from the images to the base network's logits whose last layer is
    `DeepMoEObjective` (see the module docstring). `compute_loss` adds `mu * CE(e, y)`
    (`embedding_cross_entropy`) to the compile loss and the gate term; both terms are
    training objectives only (`evaluate` reports the compile loss alone).

    Args:
        architecture: The name of a registered DeepMoE architecture (`"resnet_cifar"`,
            `"resnet_imagenet"`, `"drn_a50"`, `"vgg16"`; the zoo's builders pass it), or
            a functional `keras.Model` with a dict of outputs `"logits"`,
            `"embedding_logits"` and `"gates"` (a list of gate tensors).
        gate_l1: lambda, a finite number >= 0.
        embedding_loss_weight: mu, a finite number >= 0.
        name: The model's name.
        **kwargs: The architecture's keywords (`depth`, `input_shape`, ...), and base
            model arguments (`trainable`, `dtype`).

    Example:

    >>> model = keras_moe.zoo.deepmoe_resnet_cifar(depth=8, num_classes=10)
    >>> model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> model.fit(x, y)
    >>> model.gate_l1 = 0.0; model.embedding_loss_weight = 0.0   # phase 2

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, eq. 7-8.
    """

    def __init__(self, architecture, *, gate_l1=DEFAULT_GATE_L1, embedding_loss_weight=1.0,
                 name=None, **kwargs):
        base = {key: kwargs.pop(key) for key in ("trainable", "dtype") if key in kwargs}
        kwargs.pop("load_hint", None)
        if isinstance(architecture, dict):  # a custom network, serialized
            architecture = keras.saving.deserialize_keras_object(architecture)
        if isinstance(architecture, str):
            if architecture not in _ARCHITECTURES:
                raise ValueError(f"architecture must be one of {sorted(_ARCHITECTURES)} or "
                                 f"a functional network, got {architecture!r}")
            parts = _ARCHITECTURES[architecture](**kwargs)
        else:
            if kwargs:
                raise ValueError(f"unexpected keywords {sorted(kwargs)} with a network")
            parts = _network_parts(architecture)
        images, logits, embedding_logits, gates = parts
        objective = DeepMoEObjective(gate_l1, embedding_loss_weight, name="objective")
        outputs = objective([logits, embedding_logits, *gates])
        super().__init__(inputs=images, outputs=outputs, name=name, **base)
        # Plain attributes (not tracked as sub-layers or saved as state).
        object.__setattr__(self, "_architecture", architecture)
        object.__setattr__(self, "_architecture_kwargs", dict(kwargs))
        object.__setattr__(self, "_parts", (logits, embedding_logits, gates))
        object.__setattr__(self, "_network_view", None)

    @property
    def objective(self):
        """The `DeepMoEObjective` layer (holds lambda and mu)."""
        return self.get_layer("objective")

    @property
    def gate_l1(self):
        """lambda, the weight of the gate L1 term (float; settable, >= 0)."""
        return self.objective.gate_l1

    @gate_l1.setter
    def gate_l1(self, value):
        self.objective.gate_l1 = value

    @property
    def embedding_loss_weight(self):
        """mu, the weight of the embedding cross-entropy (float; settable, >= 0)."""
        return self.objective.embedding_loss_weight

    @embedding_loss_weight.setter
    def embedding_loss_weight(self, value):
        self.objective.embedding_loss_weight = value

    @property
    def network(self):
        """The same graph with all its outputs: a functional model from the images to
        `{"logits", "embedding_logits", "gates"}` (shares every layer)."""
        if self._network_view is None:
            logits, embedding_logits, gates = self._parts
            view = keras.Model(self.input, {"logits": logits,
                                            "embedding_logits": embedding_logits,
                                            "gates": list(gates)},
                               name=f"{self.name}_network")
            object.__setattr__(self, "_network_view", view)
        return self._network_view

    @property
    def num_gated_layers(self):
        return len(self._parts[2])

    def gating_layers(self):
        """The embedding network and the gate heads, in graph order."""
        return [layer for layer in self.layers if isinstance(layer, (ShallowEmbedding, ReLUGate))]

    def set_gating_trainable(self, trainable):
        """Freezes (False) or unfreezes the embedding and every gate head (recompile
        after: Keras captures the trainable variables when it builds its train step).

        A frozen embedding runs its batch norms in inference mode (Keras' rule for
        non-trainable batch norm), so the gate function is fixed, weights and statistics.

        Returns:
            The layers changed.
        """
        layers = self.gating_layers()
        for layer in layers:
            layer.trainable = bool(trainable)
        return layers

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Compile loss + `self.losses` (gate term) + mu * CE(e, y) after a training call."""
        loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        embedding_logits = self.objective.pop_embedding_logits()
        if training and embedding_logits is not None and y is not None:
            term = embedding_cross_entropy(y, embedding_logits, sample_weight)
            loss = ops.cast(loss, "float32") + ops.cast(
                self.objective._embedding_loss_weight, "float32") * term
        return loss

    def get_config(self):
        config = super().get_config()
        architecture = self._architecture
        if not isinstance(architecture, str):
            architecture = keras.saving.serialize_keras_object(architecture)
        config.update({
            "load_hint": LOAD_HINT,
            "architecture": architecture,
            **_plain(self._architecture_kwargs),
            "gate_l1": self.gate_l1,
            "embedding_loss_weight": self.embedding_loss_weight,
        })
        return config


def _plain(values):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
