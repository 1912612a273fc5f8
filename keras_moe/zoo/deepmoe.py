"""DeepMoE (Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019) and its
baselines.

A DeepMoE is a base convolutional network whose convolutions are `GatedConv2D` layers
(every input channel an expert), a shallow embedding network M(x) whose softmax output
`e` are latent mixture weights over the classes, and one `ReLUGate` head per gated
convolution, `G^l(e) = ReLU(W_g^l e)` (eq. 6). The objective (eq. 7) is

    J = CE(base logits, y) + lambda * L_g + mu * CE(e, y),

wrapped by `DeepMoEModel` so that a plain `compile(optimizer, loss=..., metrics=...)` and
`fit(x, y)` train it: the compile loss is the base cross-entropy, and the model adds the
gate term and the embedding term itself (see `DeepMoEModel`).

Builders (all registered in the zoo; DeepMoE ones return a `DeepMoEModel`, baselines a
plain functional `keras.Model` built from the same code without gates or embedding):

- `deepmoe_resnet56`, `deepmoe_resnet110` / `resnet56`, `resnet110`: CIFAR ResNets
  (basic blocks, 16/32/64 channels); `deepmoe_resnet_cifar(depth=6n+2)` /
  `resnet_cifar(depth=...)` for any depth (tests use depth 8).
- `deepmoe_resnet18`, `deepmoe_resnet34` (basic blocks, Fig. 2a), `deepmoe_resnet50`
  (`bottleneck="A"`, Fig. 2b, default, or `"B"`, Fig. 2c) / `resnet18`, `resnet34`,
  `resnet50`: ImageNet ResNets.
- `deepmoe_vgg16` / `vgg16`: VGG-16 with batch norm for CIFAR-100.
- `deepmoe_drn_a50` / `drn_a50`: DRN-A-50 (Yu et al. 2017) for CityScapes semantic
  segmentation (section 5.4): the ResNet-50 trunk with conv4_x / conv5_x at stride 1,
  dilation 2 / 4 (output stride 8), a 1x1 convolution to the classes and bilinear
  upsampling x8, per-pixel logits `(batch, H, W, num_classes)`.

Every builder takes `wide=False` (wide-DeepMoE: doubles the channels of the gated layers,
see below) and `width_multiplier=1.0` (scales every layer's channels; for small test
models). All models end in logits: compile with
`keras.losses.SparseCategoricalCrossentropy(from_logits=True)` (the paper's softmax is in
the loss), per-pixel for the segmentation models (labels `(batch, H, W)`). Inputs are
float images already normalised (no rescaling inside the model).

Design decisions (DESIGN.md, "DeepMoE (004)") and choices where the paper is silent:

- Gates sit after BN+ReLU: each gated convolution scales the post-BN-ReLU activation it
  reads (gating before a train-mode batch norm would be undone by the batch statistics).
  Every convolution of a residual block is gated on its input channels (basic blocks
  and bottleneck-A), the shortcut (identity or 1x1 projection) never. The stem
  convolution (input: the RGB image) and the classifier are not gated. In VGG-16 every
  convolution but the first is gated ("a gating header after each convolutional
  layer").
- Wide (`wide=True`): ResNets double the block-internal channels (the output of every
  convolution but the block's last, i.e. the gated channels that are not the residual
  stream), so the residual stream, the shortcuts and the classifier keep their widths.
  VGG-16 doubles every convolution ("the number of channels in each convolutional layer
  by a factor of two"). The plain baselines accept `wide` too (the widened baselines).
- CIFAR ResNets use 1x1-convolution + BN projection shortcuts when the shape changes (He
  et al.'s option B; ResNet-56 has 0.86M parameters with them, 0.85M with option A).
  ImageNet ResNet-50 puts the stride on the 3x3 convolution (torchvision's "v1.5").
- Bottleneck-A / -B (Fig. 2b / 2c; the figure's drawing is all the paper says, the text
  only that B is "more memory efficient": wide-DeepMoE-50 with B has 6% fewer parameters
  than ResNet-101). A: the three convolutions are gated (inputs: block input, conv1
  output, conv2 output; 3 gate heads per block, 48 in ResNet-50) and wide doubles conv1
  and conv2 outputs (WRN-50-2-like, 68.9M parameters). B: only the 3x3 convolution is a
  `GatedConv2D` (its input, conv1's output, are the experts; 1 head per block, 16), the
  1x1 convolutions are plain, and wide doubles conv1's output only (base network 41.2M
  parameters, 0.93 x ResNet-101's 44.5M; the paper: 6% fewer). Our reading: B's one MoE
  layer is the 3x3 convolution, and an MoE convolution gates its inputs (eq. 3-5); the
  public PyTorch port gates the same convolution's output instead (same parameters and
  skippable MACs). Gate heads and embedding come on top (num_classes x gated channels).
- DRN-A-50: dilation as DRN's section 2 (the first block of conv4_x keeps dilation 1,
  of conv5_x dilation 2; the rest 2 and 4; DRN's code uses 1 for both first blocks);
  bilinear `UpSampling2D` (half-pixel centres; DRN uses a fixed bilinear transposed
  convolution); default input 832x832 crops (section 5.4), height and width multiples
  of 8. The segmentation embedding loss has no image label: `embedding_cross_entropy`
  takes the image's class histogram of labelled pixels as the target, and mu defaults
  to 0 (the paper's ImageNet setting; it is silent for segmentation).
- VGG-16 (CIFAR): 13 3x3 convolutions with BN+ReLU, 5 max-pools, global average pooling,
  one dense layer to the classes (the common CIFAR variant; 14.8M parameters).
- Embedding network (`keras_moe.layers.ShallowEmbedding`): 4 (CIFAR builders) or 5
  (ImageNet builders) 3x3 stride-2 convolutions of widths `embedding_widths`.
- L_g is the paper's sum of the gates' L1 norms over every gated channel of every
  layer (eq. 8), averaged over the batch and divided by the number of gated channels
  `sum_l C_l`: every channel is pushed alike, as in the paper, and L_g is 1.0 with all
  gates at 1, so `gate_l1` has a scale independent of depth and width. A paper lambda
  is `gate_l1 = lambda_paper * sum_l C_l` here. (Until 2026-11-23 L_g was the mean
  over layers of each layer's mean gate, which pushed a channel of a 16-channel layer
  4x harder than one of a 64-channel layer; `zoo/deepmoe.md` has the comparison.)
- Defaults: `gate_l1 = DEFAULT_GATE_L1 = 0.1` (the paper gives only a range, [0.001, 8]
  in its normalisation); `embedding_loss_weight` (mu) 1.0 for CIFAR and 0.0 for ImageNet
  (paper, section 5), 0.0 for DRN-A-50. Default `num_classes` follow the paper's tables:
  ResNet-56 on CIFAR-10, ResNet-110 and VGG-16 on CIFAR-100, ImageNet models 1000,
  DRN-A-50 19 (CityScapes).

Elsewhere: Procedure 1 (two phases) and a density-targeting lambda in
`keras_moe.training.deepmoe`; FLOPs in `keras_moe.analysis.flops`; the skip-channel
inference path in `keras_moe.inference`.
"""

import threading

import keras
from keras import ops

from keras_moe import validation
from keras_moe.layers.gated_conv import CIFAR_EMBEDDING_WIDTHS
from keras_moe.layers.gated_conv import IMAGENET_EMBEDDING_WIDTHS
from keras_moe.layers.gated_conv import GatedConv2D
from keras_moe.layers.gated_conv import ShallowEmbedding
from keras_moe.layers.gates import ReLUGate
from keras_moe.layers.replica_losses import ReplicaLocalLossesMixin
from keras_moe.regularizers import functional as reg_fn
from keras_moe.zoo.registry import register_model

DEFAULT_GATE_L1 = 0.1

# Published parameter counts of the baselines (He et al. 2016, rounded to two digits for
# CIFAR; torchvision for ImageNet, 1000 classes). Trainable parameters here: ResNet-56
# 855,770 (853,018 without the two projection shortcuts), ResNet-110 1,736,564, ResNet-18
# 11,689,512, ResNet-34 21,797,672, ResNet-50 25,557,032, VGG-16 (CIFAR-100) 14,770,212.
PUBLISHED_PARAMS = {
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
    "resnet18": 11.7e6,
    "resnet34": 21.8e6,
    "resnet50": 25.6e6,
}

# The paper's top-1 error rates (%), Tables 1 and 2: {model: (baseline, wide-DeepMoE)}.
PAPER_ERRORS = {
    ("cifar10", "resnet56"): (6.55, 6.03),
    ("cifar100", "resnet56"): (31.46, 29.77),
    ("cifar100", "resnet110"): (29.45, 26.14),
    ("imagenet", "resnet18"): (30.24, 29.05),
    ("imagenet", "resnet34"): (26.70, 25.87),
    ("imagenet", "resnet50"): (23.85, 22.88),
}

IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")

_OUTPUT_KEYS = ("logits", "embedding_logits", "gates")


# The model -----------------------------------------------------------------------------


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
    e_c` (a soft-label cross-entropy; its minimum is the histogram's entropy, at
    `e = h`). Pixels whose label is outside `[0, num_classes)` (e.g. CityScapes'
    255 "void") are left out; an image without a labelled pixel contributes 0.

    Args:
        y: Integer labels `(batch,)` or `(batch, 1)`, one-hot / soft labels
            `(batch, num_classes)`, or per-pixel labels: integers `(batch, H, W)` or
            `(batch, H, W, 1)`, one-hot / soft `(batch, H, W, num_classes)`.
        logits: `(batch, num_classes)` embedding logits.
        sample_weight: Optional `(batch,)` weights; the result is
            `sum_x w(x) CE(x) / batch`, Keras' "sum_over_batch_size" reduction. With
            per-pixel labels, also per-pixel weights `(batch, H, W)`: they weigh the
            pixels in the histogram, and the image by their mean over its labelled
            pixels.

    Returns:
        Scalar float32 tensor.

    Example:

    >>> embedding_cross_entropy(np.array([0, 2]), np.zeros((2, 3), "float32"))  # log(3)
    >>> embedding_cross_entropy(np.zeros((2, 8, 8), "int32"), logits)  # CE(e, class 0)

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


@keras.saving.register_keras_serializable(package="keras_moe")
class DeepMoEModel(ReplicaLocalLossesMixin, keras.Model):
    """A DeepMoE network with its training objective (eq. 7) built into `fit`.

    Wraps `network`, a functional model mapping images to a dict with `"logits"` (base
    network class scores), `"embedding_logits"` (the shallow embedding's logits; `e` is
    their softmax) and `"gates"` (the list of gate tensors, one `(batch, C_l)` per gated
    layer). Calling the model returns the logits only, so `predict`, metrics and the
    compile loss see an ordinary classifier. In training calls the model adds

        gate_l1 * L_g,  L_g = mean_x sum_l sum_c |g^l_c(x)| / sum_l C_l

    (eq. 8 divided by the number of gated channels: every channel weighs alike and L_g
    is 1.0 with every gate at 1) with `add_loss`, and `compute_loss` adds

        embedding_loss_weight * CE(e, y)

    (`embedding_cross_entropy`, mean over the batch, sample weights applied; for
    per-pixel labels `(batch, H, W)`, a segmentation network's, the target is each
    image's class histogram) to the compile loss and `self.losses`. So `compile(opt,
    loss=SparseCategoricalCrossentropy(from_logits=True))` then `fit(x, y)` minimises
    CE + lambda L_g + mu CE(e, y).

    Both coefficients are non-trainable variables: set `model.gate_l1 = 0.0` and
    `model.embedding_loss_weight = 0.0` at any time (e.g. for the paper's second phase)
    without recompiling or retracing. Choice: both terms are training objectives only
    (as every regularizer of this package); `evaluate` reports the compile loss alone.
    The embedding term needs the labels, so it is added only by this model's own
    `compute_loss`: nested inside another model, only the gate term reaches the loss.

    Args:
        network: Functional `keras.Model` with the dict outputs above.
        gate_l1: lambda, a finite number >= 0.
        embedding_loss_weight: mu, a finite number >= 0.
        **kwargs: Base model arguments (`name`, ...).

    Example:

    >>> model = keras_moe.zoo.deepmoe_resnet_cifar(depth=8, num_classes=10)
    >>> model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> model.fit(x, y)
    >>> model.gate_l1 = 0.0; model.embedding_loss_weight = 0.0   # phase 2

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, eq. 7-8.
    """

    def __init__(self, network, gate_l1=DEFAULT_GATE_L1, embedding_loss_weight=1.0, **kwargs):
        super().__init__(**kwargs)
        outputs = getattr(network, "output", None)
        if not isinstance(network, keras.Model) or not isinstance(outputs, dict) or any(
            k not in outputs for k in _OUTPUT_KEYS
        ):
            raise ValueError(
                "network must be a functional keras.Model whose outputs are a dict with "
                f"keys {_OUTPUT_KEYS}, got {network!r}"
            )
        if not isinstance(outputs["gates"], (list, tuple)) or not outputs["gates"]:
            raise ValueError("network's 'gates' output must be a non-empty list of gate tensors")
        self.network = network
        widths = [int(g.shape[-1]) for g in outputs["gates"]]
        # Layer l's mean gate weighs C_l / sum C: the channel-weighted mean of eq. 8.
        self._gate_layer_weights = [w / sum(widths) for w in widths]
        self._gate_l1 = keras.Variable(
            validation.non_negative_float("gate_l1", gate_l1),
            trainable=False,
            dtype="float32",
            name="gate_l1",
        )
        self._embedding_loss_weight = keras.Variable(
            validation.non_negative_float("embedding_loss_weight", embedding_loss_weight),
            trainable=False,
            dtype="float32",
            name="embedding_loss_weight",
        )
        self.built = True

    @property
    def gate_l1(self):
        """lambda, the weight of the gate L1 term (float; settable, >= 0)."""
        return float(self._gate_l1.numpy())

    @gate_l1.setter
    def gate_l1(self, value):
        self._gate_l1.assign(validation.non_negative_float("gate_l1", value))

    @property
    def embedding_loss_weight(self):
        """mu, the weight of the embedding cross-entropy (float; settable, >= 0)."""
        return float(self._embedding_loss_weight.numpy())

    @embedding_loss_weight.setter
    def embedding_loss_weight(self, value):
        self._embedding_loss_weight.assign(
            validation.non_negative_float("embedding_loss_weight", value)
        )

    @property
    def num_gated_layers(self):
        return len(self.network.output["gates"])

    def _pending_embedding_logits(self):
        # Per thread (= per replica under MirroredStrategy), as ReplicaLocalLossesMixin.
        store = self.__dict__.get("_embedding_logits_by_thread")
        if store is None:
            store = {}
            object.__setattr__(self, "_embedding_logits_by_thread", store)
        return store

    def call(self, inputs, training=None):
        outputs = self.network(inputs, training=training)
        pending = self._pending_embedding_logits()
        if training:
            gate_term = ops.sum(ops.stack([
                weight * reg_fn.l1_gate_sparsity(g)
                for weight, g in zip(self._gate_layer_weights, outputs["gates"])
            ]))
            self.add_loss(ops.cast(self._gate_l1, "float32") * gate_term)
            pending[threading.get_ident()] = outputs["embedding_logits"]
        else:
            pending.pop(threading.get_ident(), None)
        return outputs["logits"]

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Compile loss + `self.losses` (gate term) + mu * CE(e, y) after a training call."""
        loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        embedding_logits = self._pending_embedding_logits().pop(threading.get_ident(), None)
        if training and embedding_logits is not None and y is not None:
            term = embedding_cross_entropy(y, embedding_logits, sample_weight)
            loss = ops.cast(loss, "float32") + ops.cast(
                self._embedding_loss_weight, "float32"
            ) * term
        return loss

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "network": keras.saving.serialize_keras_object(self.network),
            "gate_l1": self.gate_l1,
            "embedding_loss_weight": self.embedding_loss_weight,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(
            config["network"], custom_objects=custom_objects
        )
        return cls(**config)


# Argument checks -------------------------------------------------------------------------


def _check_common(input_shape, num_classes, width_multiplier, min_size, embedding_widths):
    if (
        not isinstance(input_shape, (list, tuple))
        or len(input_shape) != 3
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                   for d in input_shape)
    ):
        raise ValueError(
            f"input_shape must be (height, width, channels) of positive integers, "
            f"got {input_shape!r}"
        )
    num_classes = validation.integer("num_classes", num_classes, minimum=2)
    width_multiplier = validation.positive_float("width_multiplier", width_multiplier)
    if embedding_widths is not None:
        if not isinstance(embedding_widths, (list, tuple)) or not embedding_widths:
            raise ValueError(
                "embedding_widths must be a non-empty sequence of integers >= 1, "
                f"got {embedding_widths!r}"
            )
        min_size = max(min_size, 2 ** len(embedding_widths))
    if min(input_shape[:2]) < min_size:
        raise ValueError(
            f"input_shape must have height and width >= {min_size} (the total stride of "
            f"the network), got {tuple(input_shape)!r}"
        )
    return tuple(input_shape), num_classes, width_multiplier


def _scaled(channels, multiplier):
    return max(1, int(round(channels * multiplier)))


# Network construction -------------------------------------------------------------------


class _Builder:
    """Makes the (gated or plain) convolutions of one network and collects its gates."""

    def __init__(self, inputs, num_classes, gated, embedding_widths):
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
            filters,
            kernel_size,
            strides=strides,
            padding="same",
            dilation_rate=dilation,
            use_bias=False,
            kernel_initializer="he_normal",
            name=name,
        )(x)

    def finish(self, inputs, logits, name, gate_l1, embedding_loss_weight):
        if not self.gated:
            return keras.Model(inputs, logits, name=name)
        network = keras.Model(
            inputs,
            {
                "logits": logits,
                "embedding_logits": self.embedding["logits"],
                "gates": list(self.gates),
            },
            name=f"{name}_network",
        )
        return DeepMoEModel(
            network,
            gate_l1=gate_l1,
            embedding_loss_weight=embedding_loss_weight,
            name=name,
        )


def _bn(x, name):
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)(x)


def _relu(x, name):
    return keras.layers.ReLU(name=name)(x)


def _shortcut(b, x, filters, strides, name):
    if strides == 1 and x.shape[-1] == filters:
        return x
    # Never gated.
    shortcut = b.conv(x, filters, 1, strides, f"{name}_proj", gated=False)
    return _bn(shortcut, f"{name}_proj_bn")


def _basic_block(b, x, filters, inner, strides, name):
    shortcut = _shortcut(b, x, filters, strides, name)
    h = b.conv(x, inner, 3, strides, f"{name}_conv1")
    h = _relu(_bn(h, f"{name}_bn1"), f"{name}_relu1")
    h = b.conv(h, filters, 3, 1, f"{name}_conv2")
    h = _bn(h, f"{name}_bn2")
    h = keras.layers.Add(name=f"{name}_add")([h, shortcut])
    return _relu(h, f"{name}_out")


def _bottleneck_block(b, x, width, wide, strides, name, bottleneck="A", dilation=1):
    """1x1 (width) -> 3x3 (width, stride, dilation) -> 1x1 (4 * width) + shortcut.

    Bottleneck-A gates all three convolutions on their inputs and wide doubles both
    block-internal tensors (the outputs of conv1 and conv2); bottleneck-B gates only the
    3x3 convolution (on conv1's output) and wide doubles only that tensor. In a plain
    network (`b.gated` False) both are the ordinary ResNet bottleneck.
    """
    filters = 4 * width
    inner = width * (2 if wide else 1)
    shortcut = _shortcut(b, x, filters, strides, name)
    gate_1x1 = bottleneck == "A"
    h = b.conv(x, inner, 1, 1, f"{name}_conv1", gated=gate_1x1)
    h = _relu(_bn(h, f"{name}_bn1"), f"{name}_relu1")
    h = b.conv(h, inner if bottleneck == "A" else width, 3, strides, f"{name}_conv2",
               dilation=dilation)
    h = _relu(_bn(h, f"{name}_bn2"), f"{name}_relu2")
    h = b.conv(h, filters, 1, 1, f"{name}_conv3", gated=gate_1x1)
    h = _bn(h, f"{name}_bn3")
    h = keras.layers.Add(name=f"{name}_add")([h, shortcut])
    return _relu(h, f"{name}_out")


def _classifier(x, num_classes):
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.layers.Dense(num_classes, name="logits")(x)


def _check_cifar_depth(depth):
    depth = validation.integer("depth", depth, minimum=8)
    if (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 (8, 14, 20, ..., 56, 110), got {depth!r}")
    return depth


def _resnet_cifar(*, depth, input_shape, num_classes, gated, wide, width_multiplier,
                  gate_l1, embedding_loss_weight, embedding_widths, name):
    depth = _check_cifar_depth(depth)
    input_shape, num_classes, width_multiplier = _check_common(
        input_shape, num_classes, width_multiplier, 4, embedding_widths if gated else None
    )
    blocks = (depth - 2) // 6
    inputs = keras.Input(input_shape, name="images")
    b = _Builder(inputs, num_classes, gated, embedding_widths)
    x = b.conv(inputs, _scaled(16, width_multiplier), 3, 1, "stem_conv", gated=False)
    x = _relu(_bn(x, "stem_bn"), "stem_relu")
    for stage, base in enumerate((16, 32, 64)):
        filters = _scaled(base, width_multiplier)
        inner = filters * (2 if wide else 1)
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(b, x, filters, inner, strides, f"stage{stage + 1}_block{block + 1}")
    logits = _classifier(x, num_classes)
    return b.finish(inputs, logits, name, gate_l1, embedding_loss_weight)


BOTTLENECKS = ("A", "B")


def _check_bottleneck(bottleneck):
    return validation.one_of("bottleneck", bottleneck, BOTTLENECKS)


def _check_coefficients(gated, gate_l1, embedding_loss_weight):
    # Before the (slow, for full-size models) build; DeepMoEModel checks them again.
    if gated:
        validation.non_negative_float("gate_l1", gate_l1)
        validation.non_negative_float("embedding_loss_weight", embedding_loss_weight)


def _resnet_trunk(b, inputs, kind, stages, wide, width_multiplier, bottleneck,
                  strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1)):
    """Stem (7x7/2 conv, 3x3/2 max-pool) and the four stages of an ImageNet ResNet.

    `strides[s]` is the stride of stage s's first block, `dilations[s]` the dilation of
    the 3x3 convolutions of its other blocks; its first block uses the previous stage's
    dilation (DRN, Yu et al. 2017, sec. 2).
    """
    x = b.conv(inputs, _scaled(64, width_multiplier), 7, 2, "stem_conv", gated=False)
    x = _relu(_bn(x, "stem_bn"), "stem_relu")
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    previous_dilation = 1
    for stage, (base, blocks) in enumerate(zip((64, 128, 256, 512), stages)):
        width = _scaled(base, width_multiplier)
        for block in range(blocks):
            block_strides = strides[stage] if block == 0 else 1
            dilation = previous_dilation if block == 0 else dilations[stage]
            block_name = f"stage{stage + 1}_block{block + 1}"
            if kind == "basic":
                x = _basic_block(b, x, width, width * (2 if wide else 1), block_strides,
                                 block_name)
            else:
                x = _bottleneck_block(b, x, width, wide, block_strides, block_name,
                                      bottleneck=bottleneck, dilation=dilation)
        previous_dilation = dilations[stage]
    return x


def _resnet_imagenet(*, depth, input_shape, num_classes, gated, wide, width_multiplier,
                     gate_l1, embedding_loss_weight, embedding_widths, name,
                     bottleneck="A"):
    if depth not in IMAGENET_DEPTHS:
        raise ValueError(f"depth must be one of {sorted(IMAGENET_DEPTHS)}, got {depth!r}")
    bottleneck = _check_bottleneck(bottleneck)
    _check_coefficients(gated, gate_l1, embedding_loss_weight)
    kind, stages = IMAGENET_DEPTHS[depth]
    if kind == "basic" and bottleneck != "A":
        raise ValueError(
            f"bottleneck must be 'A' (the only value) for the basic-block ResNet-{depth}, "
            f"got {bottleneck!r}"
        )
    input_shape, num_classes, width_multiplier = _check_common(
        input_shape, num_classes, width_multiplier, 32, embedding_widths if gated else None
    )
    inputs = keras.Input(input_shape, name="images")
    b = _Builder(inputs, num_classes, gated, embedding_widths)
    x = _resnet_trunk(b, inputs, kind, stages, wide, width_multiplier, bottleneck)
    logits = _classifier(x, num_classes)
    return b.finish(inputs, logits, name, gate_l1, embedding_loss_weight)


# DRN-A (Yu et al. 2017): conv4_x and conv5_x without stride, dilated 2 and 4.
DRN_A_STRIDES = (1, 2, 1, 1)
DRN_A_DILATIONS = (1, 1, 2, 4)
DRN_OUTPUT_STRIDE = 8


def _drn_a50(*, input_shape, num_classes, gated, wide, width_multiplier, gate_l1,
             embedding_loss_weight, embedding_widths, name, bottleneck="A"):
    bottleneck = _check_bottleneck(bottleneck)
    _check_coefficients(gated, gate_l1, embedding_loss_weight)
    input_shape, num_classes, width_multiplier = _check_common(
        input_shape, num_classes, width_multiplier, DRN_OUTPUT_STRIDE,
        embedding_widths if gated else None,
    )
    if any(d % DRN_OUTPUT_STRIDE for d in input_shape[:2]):
        raise ValueError(
            f"input_shape must have height and width divisible by {DRN_OUTPUT_STRIDE} (the "
            f"output stride of DRN-A), got {input_shape!r}"
        )
    kind, stages = IMAGENET_DEPTHS[50]
    inputs = keras.Input(input_shape, name="images")
    b = _Builder(inputs, num_classes, gated, embedding_widths)
    x = _resnet_trunk(b, inputs, kind, stages, wide, width_multiplier, bottleneck,
                      strides=DRN_A_STRIDES, dilations=DRN_A_DILATIONS)
    x = keras.layers.Conv2D(num_classes, 1, name="classifier")(x)
    logits = keras.layers.UpSampling2D(
        DRN_OUTPUT_STRIDE, interpolation="bilinear", name="logits"
    )(x)
    return b.finish(inputs, logits, name, gate_l1, embedding_loss_weight)


def _vgg16(*, input_shape, num_classes, gated, wide, width_multiplier, gate_l1,
           embedding_loss_weight, embedding_widths, name):
    input_shape, num_classes, width_multiplier = _check_common(
        input_shape, num_classes, width_multiplier, 32, embedding_widths if gated else None
    )
    inputs = keras.Input(input_shape, name="images")
    b = _Builder(inputs, num_classes, gated, embedding_widths)
    x = inputs
    conv_index, pool_index = 0, 0
    for item in VGG16_CONFIG:
        if item == "M":
            pool_index += 1
            x = keras.layers.MaxPooling2D(2, name=f"pool{pool_index}")(x)
            continue
        conv_index += 1
        filters = _scaled(item, width_multiplier) * (2 if wide else 1)
        name_i = f"conv{conv_index}"
        x = b.conv(x, filters, 3, 1, name_i, gated=conv_index > 1)
        x = _relu(_bn(x, f"{name_i}_bn"), f"{name_i}_relu")
    logits = _classifier(x, num_classes)
    return b.finish(inputs, logits, name, gate_l1, embedding_loss_weight)


# Registered builders ---------------------------------------------------------------------


@register_model
def deepmoe_resnet_cifar(*, input_shape=(32, 32, 3), num_classes=10, depth=56, wide=False,
                         width_multiplier=1.0, gate_l1=DEFAULT_GATE_L1,
                         embedding_loss_weight=1.0,
                         embedding_widths=CIFAR_EMBEDDING_WIDTHS):
    """DeepMoE CIFAR ResNet of any depth 6n+2 (basic blocks, 16/32/64 channels; Wang et al. 2019).

    Args:
        input_shape: `(height, width, channels)`, height and width >= 16.
        num_classes: Number of classes (= latent experts of the embedding), >= 2.
        depth: 6n + 2 (8, 14, ..., 56, 110).
        wide: Wide-DeepMoE: double the block-internal (gated) channels.
        width_multiplier: Scales every layer's channels, > 0.
        gate_l1: lambda, weight of the channel-mean gate L1 term L_g, >= 0.
        embedding_loss_weight: mu, weight of the embedding cross-entropy, >= 0.
        embedding_widths: Channels of the embedding's stride-2 convolutions.

    Example:

    >>> model = deepmoe_resnet_cifar(depth=8, num_classes=10)

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019.
    """
    return _resnet_cifar(
        depth=depth, input_shape=input_shape, num_classes=num_classes, gated=True,
        wide=wide, width_multiplier=width_multiplier, gate_l1=gate_l1,
        embedding_loss_weight=embedding_loss_weight, embedding_widths=embedding_widths,
        name=f"deepmoe_resnet{depth}" + ("_wide" if wide else ""),
    )


@register_model
def resnet_cifar(*, input_shape=(32, 32, 3), num_classes=10, depth=56, wide=False,
                 width_multiplier=1.0):
    """CIFAR ResNet of any depth 6n+2, the DeepMoE baseline (He et al. 2016).

    Args:
        input_shape: `(height, width, channels)`, height and width >= 4.
        num_classes: Number of classes, >= 2.
        depth: 6n + 2.
        wide: Double the block-internal channels (the widened baseline).
        width_multiplier: Scales every layer's channels, > 0.

    Example:

    >>> model = resnet_cifar(depth=20)

    Reference:
        He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2.
    """
    return _resnet_cifar(
        depth=depth, input_shape=input_shape, num_classes=num_classes, gated=False,
        wide=wide, width_multiplier=width_multiplier, gate_l1=0.0,
        embedding_loss_weight=0.0, embedding_widths=None,
        name=f"resnet{depth}" + ("_wide" if wide else ""),
    )


def _cifar_pair(depth, default_classes):
    def deepmoe(*, input_shape=(32, 32, 3), num_classes=default_classes, wide=False,
                width_multiplier=1.0, gate_l1=DEFAULT_GATE_L1, embedding_loss_weight=1.0,
                embedding_widths=CIFAR_EMBEDDING_WIDTHS):
        return deepmoe_resnet_cifar(
            input_shape=input_shape, num_classes=num_classes, depth=depth, wide=wide,
            width_multiplier=width_multiplier, gate_l1=gate_l1,
            embedding_loss_weight=embedding_loss_weight, embedding_widths=embedding_widths,
        )

    def baseline(*, input_shape=(32, 32, 3), num_classes=default_classes, wide=False,
                 width_multiplier=1.0):
        return resnet_cifar(
            input_shape=input_shape, num_classes=num_classes, depth=depth, wide=wide,
            width_multiplier=width_multiplier,
        )

    return deepmoe, baseline


def _imagenet_pair(depth):
    def deepmoe(*, input_shape=(224, 224, 3), num_classes=1000, wide=False,
                width_multiplier=1.0, gate_l1=DEFAULT_GATE_L1, embedding_loss_weight=0.0,
                embedding_widths=IMAGENET_EMBEDDING_WIDTHS):
        return _resnet_imagenet(
            depth=depth, input_shape=input_shape, num_classes=num_classes, gated=True,
            wide=wide, width_multiplier=width_multiplier, gate_l1=gate_l1,
            embedding_loss_weight=embedding_loss_weight, embedding_widths=embedding_widths,
            name=f"deepmoe_resnet{depth}" + ("_wide" if wide else ""),
        )

    def deepmoe_bottleneck(*, input_shape=(224, 224, 3), num_classes=1000, wide=False,
                           width_multiplier=1.0, gate_l1=DEFAULT_GATE_L1,
                           embedding_loss_weight=0.0,
                           embedding_widths=IMAGENET_EMBEDDING_WIDTHS, bottleneck="A"):
        bottleneck = _check_bottleneck(bottleneck)
        return _resnet_imagenet(
            depth=depth, input_shape=input_shape, num_classes=num_classes, gated=True,
            wide=wide, width_multiplier=width_multiplier, gate_l1=gate_l1,
            embedding_loss_weight=embedding_loss_weight, embedding_widths=embedding_widths,
            bottleneck=bottleneck,
            name=f"deepmoe_resnet{depth}" + ("_b" if bottleneck == "B" else "")
            + ("_wide" if wide else ""),
        )

    def baseline(*, input_shape=(224, 224, 3), num_classes=1000, wide=False,
                 width_multiplier=1.0):
        return _resnet_imagenet(
            depth=depth, input_shape=input_shape, num_classes=num_classes, gated=False,
            wide=wide, width_multiplier=width_multiplier, gate_l1=0.0,
            embedding_loss_weight=0.0, embedding_widths=None,
            name=f"resnet{depth}" + ("_wide" if wide else ""),
        )

    kind, _ = IMAGENET_DEPTHS[depth]
    return (deepmoe_bottleneck if kind == "bottleneck" else deepmoe), baseline


_DEEPMOE_ARGS = """
    Args:
        input_shape: `(height, width, channels)`{size}.
        num_classes: Number of classes (= latent experts of the embedding), >= 2.
        wide: Wide-DeepMoE: double the channels of the gated layers (see module doc).
        width_multiplier: Scales every layer's channels, > 0.
        gate_l1: lambda, weight of the channel-mean gate L1 term L_g, >= 0.
        embedding_loss_weight: mu, weight of the embedding cross-entropy, >= 0{mu}.
        embedding_widths: Channels of the embedding's stride-2 convolutions.{extra}

    Example:

    >>> model = keras_moe.zoo.get_model("{name}")
    >>> model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019.
"""

_BASELINE_ARGS = """
    Args:
        input_shape: `(height, width, channels)`{size}.
        num_classes: Number of classes, >= 2.
        wide: Double the channels that DeepMoE gates (the widened baseline).
        width_multiplier: Scales every layer's channels, > 0.

    Example:

    >>> model = keras_moe.zoo.get_model("{name}")

    Reference:
        {ref}
"""

_HE = 'He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.'

_BOTTLENECK_ARG = """
        bottleneck: `"A"` (Fig. 2b, the default): all three convolutions of every
            bottleneck are gated on their inputs (block input, conv1 output, conv2
            output), and `wide` doubles conv1's and conv2's outputs. `"B"` (Fig. 2c):
            only the 3x3 convolution is gated (on conv1's output, the block's experts)
            and the two 1x1 convolutions are plain; `wide` doubles only conv1's output.
            B has a third of A's gate heads and, wide, fewer parameters."""


def _register(function, name, summary, args, **fmt):
    function.__name__ = name
    function.__qualname__ = name
    function.__doc__ = summary + "\n" + args.format(name=name, **fmt)
    return register_model(function)


def _make_builders():
    specs = {}
    cifar_size = ", height and width >= 16"
    for depth, classes, data in ((56, 10, "CIFAR-10"), (110, 100, "CIFAR-100")):
        deepmoe, baseline = _cifar_pair(depth, classes)
        specs[f"deepmoe_resnet{depth}"] = _register(
            deepmoe, f"deepmoe_resnet{depth}",
            f"DeepMoE ResNet-{depth} for {data} (basic blocks, gated on every block "
            "convolution's input; Wang et al. 2019).",
            _DEEPMOE_ARGS, size=cifar_size, mu=" (paper: 1)", extra="",
        )
        specs[f"resnet{depth}"] = _register(
            baseline, f"resnet{depth}",
            f"ResNet-{depth} for {data}, the DeepMoE baseline (He et al. 2016; "
            f"~{PUBLISHED_PARAMS[f'resnet{depth}'] / 1e6:.2f}M parameters).",
            _BASELINE_ARGS, size=", height and width >= 4", ref=_HE,
        )
    for depth, block in ((18, "basic blocks"), (34, "basic blocks"),
                         (50, "bottleneck-A or -B blocks")):
        deepmoe, baseline = _imagenet_pair(depth)
        specs[f"deepmoe_resnet{depth}"] = _register(
            deepmoe, f"deepmoe_resnet{depth}",
            f"DeepMoE ResNet-{depth} for ImageNet ({block}; Wang et al. 2019).",
            _DEEPMOE_ARGS, size=", height and width >= 32", mu=" (paper: 0 on ImageNet)",
            extra=_BOTTLENECK_ARG if IMAGENET_DEPTHS[depth][0] == "bottleneck" else "",
        )
        specs[f"resnet{depth}"] = _register(
            baseline, f"resnet{depth}",
            f"ResNet-{depth} for ImageNet, the DeepMoE baseline (He et al. 2016; "
            f"{PUBLISHED_PARAMS[f'resnet{depth}'] / 1e6:.1f}M parameters).",
            _BASELINE_ARGS, size=", height and width >= 32", ref=_HE,
        )
    return specs


_BUILDERS = _make_builders()
deepmoe_resnet56 = _BUILDERS["deepmoe_resnet56"]
deepmoe_resnet110 = _BUILDERS["deepmoe_resnet110"]
deepmoe_resnet18 = _BUILDERS["deepmoe_resnet18"]
deepmoe_resnet34 = _BUILDERS["deepmoe_resnet34"]
deepmoe_resnet50 = _BUILDERS["deepmoe_resnet50"]
resnet56 = _BUILDERS["resnet56"]
resnet110 = _BUILDERS["resnet110"]
resnet18 = _BUILDERS["resnet18"]
resnet34 = _BUILDERS["resnet34"]
resnet50 = _BUILDERS["resnet50"]


@register_model
def deepmoe_vgg16(*, input_shape=(32, 32, 3), num_classes=100, wide=False,
                  width_multiplier=1.0, gate_l1=DEFAULT_GATE_L1, embedding_loss_weight=1.0,
                  embedding_widths=CIFAR_EMBEDDING_WIDTHS):
    """DeepMoE VGG-16 with batch norm for CIFAR-100 (12 gated convs; Wang et al. 2019).

    Args:
        input_shape: `(height, width, channels)`, height and width >= 32.
        num_classes: Number of classes (= latent experts of the embedding), >= 2.
        wide: Wide-DeepMoE: double every convolution's channels.
        width_multiplier: Scales every layer's channels, > 0.
        gate_l1: lambda, weight of the channel-mean gate L1 term L_g, >= 0.
        embedding_loss_weight: mu, weight of the embedding cross-entropy, >= 0.
        embedding_widths: Channels of the embedding's stride-2 convolutions.

    Example:

    >>> model = deepmoe_vgg16(num_classes=100)

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, sec. 5.2.1.
    """
    return _vgg16(
        input_shape=input_shape, num_classes=num_classes, gated=True, wide=wide,
        width_multiplier=width_multiplier, gate_l1=gate_l1,
        embedding_loss_weight=embedding_loss_weight, embedding_widths=embedding_widths,
        name="deepmoe_vgg16" + ("_wide" if wide else ""),
    )


@register_model
def vgg16(*, input_shape=(32, 32, 3), num_classes=100, wide=False, width_multiplier=1.0):
    """VGG-16 with batch norm for CIFAR-100, the DeepMoE baseline (Simonyan & Zisserman 2014).

    Args:
        input_shape: `(height, width, channels)`, height and width >= 32.
        num_classes: Number of classes, >= 2.
        wide: Double every convolution's channels (the widened baseline).
        width_multiplier: Scales every layer's channels, > 0.

    Example:

    >>> model = vgg16(num_classes=100)

    Reference:
        Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
        Recognition", ICLR 2015 (with batch norm, CIFAR variant).
    """
    return _vgg16(
        input_shape=input_shape, num_classes=num_classes, gated=False, wide=wide,
        width_multiplier=width_multiplier, gate_l1=0.0, embedding_loss_weight=0.0,
        embedding_widths=None, name="vgg16" + ("_wide" if wide else ""),
    )


# Semantic segmentation: DRN-A-50 (section 5.4) ------------------------------------------

CITYSCAPES_CROP = (832, 832, 3)
CITYSCAPES_CLASSES = 19

# Table 5 (CityScapes val): {model: (mIoU %, FLOPs x 1e9)} as printed. The table does
# not say whether "-A" / "-B" are the bottlenecks of Fig. 2 or its "efficient" and
# "accurate" lambda settings (its caption reads the latter). `static_flops` of `drn_a50`
# at 1024x2048 is 798.6e9 MACs (wide: 2262e9).
PAPER_SEGMENTATION = {
    "drn_a50": (67.3, 703),
    "wide-deepmoe-50-A": (68.8, 804),
    "wide-drn_a50": (69.3, 2173),
    "wide-deepmoe-50-B": (71.2, 1738),
}

@register_model
def deepmoe_drn_a50(*, input_shape=CITYSCAPES_CROP, num_classes=CITYSCAPES_CLASSES,
                    wide=False, width_multiplier=1.0, gate_l1=DEFAULT_GATE_L1,
                    embedding_loss_weight=0.0, embedding_widths=IMAGENET_EMBEDDING_WIDTHS,
                    bottleneck="A"):
    """DeepMoE DRN-A-50 for CityScapes segmentation (per-pixel logits; Wang et al. 2019).

    The `deepmoe_resnet50` trunk (ImageNet-size embedding of 5 stride-2 convolutions, one
    `ReLUGate` head per gated convolution, bottleneck-A or -B) made a DRN-A: conv4_x and
    conv5_x keep stride 1 and dilate their 3x3 convolutions by 2 and 4 (the first block
    of each with the previous stage's dilation, 1 and 2, as in DRN sec. 2; DRN's code
    uses 1 for both), so the output stride is 8; then an ungated 1x1 convolution (with
    bias) to `num_classes` and bilinear upsampling x8 (`UpSampling2D`, half-pixel
    centres) give logits `(batch, H, W, num_classes)`.

    Train with `compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=
    True))` and labels `(batch, H, W)` (add `ignore_class=255` for CityScapes' void).
    The embedding loss has no image label here (the paper is silent): its target is the
    image's class histogram, the fraction of its labelled pixels in each class
    (`embedding_cross_entropy`; labels outside `[0, num_classes)` are ignored), and mu
    defaults to 0 as the paper's ImageNet setting (section 5) that the backbone follows.

    Args:
        input_shape: `(height, width, channels)`, height and width divisible by 8 and
            >= 32. Default: the paper's 832x832 training crops (section 5.4); CityScapes
            images are 1024x2048.
        num_classes: Number of classes (= latent experts of the embedding), >= 2;
            CityScapes: 19.
        wide: Wide-DeepMoE: double the channels of the gated layers (see
            `bottleneck`).
        width_multiplier: Scales every layer's channels, > 0.
        gate_l1: lambda, weight of the channel-mean gate L1 term L_g, >= 0.
        embedding_loss_weight: mu, weight of the embedding cross-entropy against the
            image's class histogram, >= 0 (default 0; the paper is silent).
        embedding_widths: Channels of the embedding's stride-2 convolutions.
        bottleneck: `"A"` (default): all three convolutions of every bottleneck gated;
            `"B"`: only the 3x3 convolutions (see `deepmoe_resnet50`).

    Example:

    >>> model = keras_moe.zoo.deepmoe_drn_a50(bottleneck="B")
    >>> model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(
    ...     from_logits=True, ignore_class=255))
    >>> model.fit(images, label_maps)          # label_maps: (batch, 832, 832) ints

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, sec. 5.4
        and Table 5; Yu, Koltun & Funkhouser, "Dilated Residual Networks", CVPR 2017.
    """
    bottleneck = _check_bottleneck(bottleneck)
    return _drn_a50(
        input_shape=input_shape, num_classes=num_classes, gated=True, wide=wide,
        width_multiplier=width_multiplier, gate_l1=gate_l1,
        embedding_loss_weight=embedding_loss_weight, embedding_widths=embedding_widths,
        bottleneck=bottleneck,
        name="deepmoe_drn_a50" + ("_b" if bottleneck == "B" else "")
        + ("_wide" if wide else ""),
    )


@register_model
def drn_a50(*, input_shape=CITYSCAPES_CROP, num_classes=CITYSCAPES_CLASSES, wide=False,
            width_multiplier=1.0):
    """DRN-A-50 for CityScapes segmentation, the DeepMoE baseline (Yu et al. 2017).

    ResNet-50 (`resnet50`'s trunk) with conv4_x and conv5_x at stride 1 and dilation 2
    and 4 (the first block of each with the previous stage's dilation), output stride 8,
    a 1x1 convolution (with bias) to `num_classes` and bilinear upsampling x8 to
    per-pixel logits `(batch, H, W, num_classes)`. Parameters: ResNet-50's minus its
    classifier plus the 1x1 convolution, 23.55M for 19 classes. Multiply-adds
    (`keras_moe.analysis.static_flops`, which counts the upsampling as 0): 263.6e9 per
    832x832 crop, 798.6e9 per 1024x2048 CityScapes image (Table 5 prints 703e9).

    Args:
        input_shape: `(height, width, channels)`, height and width divisible by 8 and
            >= 8 (default: 832x832 crops, the paper's section 5.4).
        num_classes: Number of classes, >= 2 (CityScapes: 19).
        wide: Double the channels that DeepMoE (bottleneck-A) gates (the wide baseline,
            "wide-DRN-A-50" of Table 5).
        width_multiplier: Scales every layer's channels, > 0.

    Example:

    >>> model = keras_moe.zoo.drn_a50()
    >>> model.output_shape
    (None, 832, 832, 19)

    Reference:
        Yu, Koltun & Funkhouser, "Dilated Residual Networks", CVPR 2017 (DRN-A).
    """
    return _drn_a50(
        input_shape=input_shape, num_classes=num_classes, gated=False, wide=wide,
        width_multiplier=width_multiplier, gate_l1=0.0, embedding_loss_weight=0.0,
        embedding_widths=None, name="drn_a50" + ("_wide" if wide else ""),
    )
