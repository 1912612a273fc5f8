"""DeepMoE's training procedure (Procedure 1) and a gate-density controller.

Wang et al. train the embedding network, the gate heads and the base network jointly on
`J = CE + lambda L_g + mu CE(e, y)` for n0 epochs, then "freeze EmbeddingNetwork and
G^l, lambda <- 0, mu <- 0" and train n1 more epochs to refine the base network (CIFAR:
270 + 80 epochs). `train_deepmoe_two_phase` runs both phases on a compiled
`keras_moe.zoo.deepmoe.DeepMoEModel`.

Choices where the paper is silent:

- Freezing sets `trainable = False` on the `ShallowEmbedding` and on every `ReLUGate`
  head inside `model.network`. A frozen embedding runs its batch norms in inference
  mode (Keras' rule for non-trainable batch norm), so its moving statistics stop
  changing too: the gate function is fixed, weights and statistics.
- The model is then recompiled with the *same optimizer instance* and the same loss,
  metrics and other compile arguments (Keras captures the trainable variables when it
  builds the train function, so a trainable change needs a recompile). Keeping the
  instance keeps its configuration, its iteration count (a learning-rate schedule on
  iterations goes on where it was: the paper's /10 at 150 and 250 epochs spans both
  phases) and its slots (momentum) of the still-trainable base weights. Pass
  `finetune_optimizer` to use another one.
- `GateDensityTarget`, a callback to reach a gate density (wide-DeepMoE aims at "on
  average half of the convolutional channels ... selected at the inference time"; the
  paper tunes lambda by hand): every few batches it measures the fraction of open gates
  (> 0) on a fixed sample of training inputs in inference mode and moves log(lambda)
  in proportion to the gap between the density predicted a few batches ahead and the
  target, with bounded steps, so lambda grows while the gates are open and falls as the
  density approaches the target.
- `spread_gate_heads`: redraws the gate-head kernels W_g uniformly in [0, 2] (the paper
  does not give their initialisation; `ReLUGate`'s 1 +- 0.01 makes every gate of a
  layer close at the same step under the L1 term).

Example:

>>> model = keras_moe.zoo.deepmoe_resnet_cifar(depth=20, wide=True)
>>> model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
...               keras.losses.SparseCategoricalCrossentropy(from_logits=True),
...               metrics=["accuracy"])
>>> result = train_deepmoe_two_phase(model, train_ds, joint_epochs=270,
...                                  finetune_epochs=80, validation_data=test_ds)
>>> result.phases[-1], model.gate_l1, model.embedding_loss_weight
('finetune', 0.0, 0.0)

Reference:
    Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, Procedure 1
    and section 5 ("Training").
"""

import collections
import dataclasses

import keras
import numpy as np

from keras_moe import validation
from keras_moe.layers.gates import ReLUGate
from keras_moe.recipes import Phase
from keras_moe.training.phases import recompile, run_phases
from keras_moe.zoo.deepmoe import DEEPMOE, DeepMoEModel
from keras_moe.zoo.registry import PhaseSetting, register_phase_settings

__all__ = ["DeepMoEHistory", "DensityRecord", "GateDensityTarget", "density_ahead",
           "gating_layers", "recompile", "set_gating_trainable", "spread_gate_heads",
           "train_deepmoe_two_phase"]


def _require_deepmoe(model):
    if not isinstance(model, DeepMoEModel):
        raise ValueError(
            "model must be a DeepMoEModel (e.g. keras_moe.zoo.deepmoe_resnet_cifar()), "
            f"got {model!r}"
        )
    return model


def gating_layers(model):
    """The embedding network and the gate heads of a DeepMoE model.

    Args:
        model: A `DeepMoEModel`.

    Returns:
        Its `ShallowEmbedding` and `ReLUGate` layers, in graph order.

    Example:

    >>> [layer.name for layer in gating_layers(model)][:2]
    ['embedding', 'stage1_block1_conv1_gate']
    """
    found = _require_deepmoe(model).gating_layers()
    if not found:
        raise ValueError(f"{model.name!r} has no ShallowEmbedding or ReLUGate layer")
    return found


def set_gating_trainable(model, trainable):
    """Sets `trainable` of the embedding network and every gate head (recompile after).

    Args:
        model: A `DeepMoEModel`.
        trainable: False to freeze the gating (Procedure 1, line 10), True to unfreeze.

    Returns:
        The layers changed.
    """
    return _require_deepmoe(model).set_gating_trainable(trainable)


def spread_gate_heads(model, low=0.0, high=2.0, seed=0):
    """Redraws every `ReLUGate` kernel of a DeepMoE model uniformly in `[low, high]`.

    The paper does not say how `W_g` is initialised; `ReLUGate` draws it around 1
    (stddev 0.01), so every gate starts at about 1. The L1 term lowers every open gate
    of a layer by the same amount per step, so with that initialisation all gates of a
    layer reach zero within a few steps of each other and a density between 1 and 0 is
    crossed in one jump (what made the old `GateDensityTarget` overshoot). Drawn in
    `[0, 2]` (mean 1: the gates start open, at the same mean scale), the open fraction
    falls smoothly as the L1 term lowers the gates, and a controller can stop it at a
    target. Every gated convolution is followed by a batch norm, so the per-channel
    scales this gives at the start are absorbed like any other random weight scale.
    Our choice, not the paper's; call it after building, before training.

    Args:
        model: A `DeepMoEModel`.
        low: Lower bound of the kernel entries (>= 0 keeps every gate open at the start).
        high: Upper bound, > low.
        seed: Seed of the draw.

    Returns:
        The `ReLUGate` layers changed.

    Example:

    >>> model = keras_moe.zoo.deepmoe_resnet_cifar(depth=20)
    >>> heads = spread_gate_heads(model)   # W_g ~ U(0, 2)
    """
    low = validation.number("low", low)
    high = validation.number("high", high)
    if not high > low:
        raise ValueError(f"high must be > low, got low={low!r}, high={high!r}")
    rng = np.random.default_rng(seed)
    heads = [layer for layer in gating_layers(model) if isinstance(layer, ReLUGate)]
    for head in heads:
        head.kernel.assign(rng.uniform(low, high, size=tuple(head.kernel.shape)).astype("float32"))
    return heads


@dataclasses.dataclass
class DeepMoEHistory:
    """What `train_deepmoe_two_phase` returns.

    Attributes:
        joint: The `History` of the joint phase (None with 0 epochs).
        finetune: The `History` of the fine-tuning phase (None with 0 epochs).
        history: Per-metric lists over both phases, epoch by epoch (a key logged in one
            phase only, e.g. `gate_density` from `GateDensityTarget`, has that phase's
            entries only).
        phases: `"joint"` or `"finetune"` for each epoch of `history`.
    """

    joint: object
    finetune: object
    history: dict
    phases: list


def train_deepmoe_two_phase(
    model,
    train_data,
    *,
    joint_epochs,
    finetune_epochs,
    validation_data=None,
    callbacks=None,
    finetune_callbacks=None,
    finetune_optimizer=None,
    **fit_kwargs,
):
    """DeepMoE's Procedure 1: joint training, then frozen gating with lambda = mu = 0.

    Phase 1 (`joint_epochs`): `model.fit` with the model's own `gate_l1` (lambda) and
    `embedding_loss_weight` (mu). Phase 2 (`finetune_epochs`, epochs numbered on): the
    embedding network and every gate head are frozen (`set_gating_trainable(model,
    False)`), lambda and mu are set to 0, the model is recompiled (same optimizer
    instance unless `finetune_optimizer`; see the module docstring) and fit again. The
    model is left frozen with lambda = mu = 0.

    Args:
        model: A compiled `DeepMoEModel`.
        train_data: Training data for `model.fit`: a `tf.data.Dataset` of `(x, y)` or an
            `(x, y)` tuple of arrays.
        joint_epochs: Epochs of the joint phase (paper, CIFAR: 270), >= 0.
        finetune_epochs: Epochs of the fine-tuning phase (paper, CIFAR: 80), >= 0.
        validation_data: Passed to `model.fit`.
        callbacks: Callbacks of the joint phase (and of the fine-tuning phase when
            `finetune_callbacks` is None). A `GateDensityTarget` is dropped from the
            fine-tuning phase (lambda stays 0 there).
        finetune_callbacks: Callbacks of the fine-tuning phase, if different.
        finetune_optimizer: None to keep the optimizer instance, or an optimizer for
            phase 2.
        **fit_kwargs: Other `model.fit` arguments (`batch_size` for arrays, `verbose`,
            `steps_per_epoch`, ...); not `epochs`, `initial_epoch`, `x`, `y`.

    Returns:
        A `DeepMoEHistory`.

    Example:

    >>> result = train_deepmoe_two_phase(model, train_ds, joint_epochs=2,
    ...                                  finetune_epochs=1, verbose=0)
    >>> result.phases
    ['joint', 'joint', 'finetune']

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019,
        Procedure 1.
    """
    _require_deepmoe(model)
    joint_epochs = validation.integer("joint_epochs", joint_epochs, minimum=0)
    finetune_epochs = validation.integer("finetune_epochs", finetune_epochs, minimum=0)
    for key in ("epochs", "initial_epoch", "x", "y"):
        if key in fit_kwargs:
            raise ValueError(
                f"{key} must not be passed to train_deepmoe_two_phase; use train_data, "
                "joint_epochs and finetune_epochs"
            )
    if getattr(model, "optimizer", None) is None:
        raise ValueError("model must be compiled before train_deepmoe_two_phase")
    if isinstance(train_data, tuple) and len(train_data) in (2, 3):
        x, y = train_data[0], train_data[1]
        if len(train_data) == 3:
            fit_kwargs["sample_weight"] = train_data[2]
    else:
        x, y = train_data, None
    callbacks = list(callbacks or [])
    if finetune_callbacks is None:
        finetune_callbacks = [c for c in callbacks if not isinstance(c, GateDensityTarget)]
    per_phase = (callbacks, list(finetune_callbacks))

    def fit(index, phase, start, stop, phase_callbacks):
        return model.fit(x, y, initial_epoch=start, epochs=stop,
                         validation_data=validation_data, callbacks=phase_callbacks,
                         **fit_kwargs)

    phases = [Phase("joint", joint_epochs),
              Phase("finetune", finetune_epochs, freeze_gating=True, gate_l1=0.0,
                    embedding_loss_weight=0.0)]
    record = run_phases(
        model, phases, fit, family=DEEPMOE, phase_callbacks=lambda i, p: per_phase[i],
        recompile_with=lambda i, p: finetune_optimizer if i == 1 else None)
    return DeepMoEHistory(record.histories["joint"], record.histories["finetune"],
                          record.history, record.phases)


DensityRecord = collections.namedtuple("DensityRecord", ["batch", "density", "gate_l1", "target"])
DensityRecord.__doc__ = """One `GateDensityTarget` measurement: batches seen, measured density, lambda
after the update, and the (ramped) target the update aimed at."""


def density_ahead(previous, current, batches, lookahead):
    """The gate density predicted `lookahead` batches ahead from two gate snapshots.

    The L1 term lowers every open gate of a layer at about the same rate (the batch
    norm after each gated convolution leaves the cross-entropy indifferent to a layer's
    common scale), so each layer's open gates drift down together and close in bulk
    when they reach zero: the density stays flat and then falls off a cliff. Watching
    the gate values sees the cliff coming. For each layer,

        drift_l = mean over entries open in both snapshots of (previous - current) / batches
        ahead_l = entries with current > max(drift_l, 0) * lookahead

    and the prediction is the fraction of all entries (examples x gated channels) in
    `ahead`. A layer whose gates rise predicts no closing (and no reopening).

    Args:
        previous: `{layer name: (examples, channels) gate values}` at the earlier
            measurement (as `keras_moe.analysis.gates.gate_values` returns).
        current: The same, now (same examples).
        batches: Batches between the two measurements, > 0.
        lookahead: Batches ahead, >= 0.

    Returns:
        The predicted density (float in [0, 1]).
    """
    kept = total = 0
    for name, gates in current.items():
        earlier = previous[name]
        both = (gates > 0) & (earlier > 0)
        drift = float((earlier[both] - gates[both]).mean()) / batches if both.any() else 0.0
        kept += int((gates > max(drift, 0.0) * lookahead).sum())
        total += gates.size
    return kept / total


class GateDensityTarget(keras.callbacks.Callback):
    """Callback: steers lambda (`model.gate_l1`) smoothly down to a target gate density.

    Every `every` batches (or at each epoch end with `every="epoch"`) it measures the
    density `d`, the fraction of open gates (> 0) over all gated channels and the
    examples of `data` (a fixed sample of training inputs; only the embedding and the
    gate heads run, in inference mode: what the FLOPs count sees), and updates lambda in
    log space with a bounded step, proportional to the error of the density `p`
    predicted `lookahead` batches ahead:

        t      = max(target, 1 - (1 - target) * batches / ramp)    (t = target if ramp = 0)
        p      = density_ahead(gates_prev, gates, batches - batches_prev, lookahead)
                 with `data`; with `density_fn` (no gate values):
                 d + lookahead * (d - d_prev) / (batches - batches_prev)
                 (p = d at the first update)
        err    = p - t,   0 when |err| <= tolerance
        step   = clip(g * err, -log(down_factor), log(factor)),  g = gain if err > 0
                                                                   else down_gain
        lambda <- clip(lambda * exp(step), min_gate_l1, max_gate_l1)

    (`lambda` on the right is the model's current lambda, raised to `min_gate_l1`; with
    `latch` no step > 0 once `d <= target` has been seen, with `hold_while_falling` no
    step > 0 while `d < d_prev`). lambda starts at `initial_gate_l1` (None: the model's
    own). Each measurement is appended to `self.records` as a `DensityRecord(batch,
    density, gate_l1, target)`; the last density and lambda are added to the epoch logs
    as `gate_density` and `gate_l1`, and the lowest density measured during the epoch
    as `gate_density_min` (so a run's `history.jsonl` shows a dip that recovers within
    the epoch; an epoch without a reading of its own reports the last one).

    Why this shape (the paper sets lambda by hand; all of this is our choice):

    - Every gated convolution is followed by a batch norm, so the classification loss
      does not resist lowering all gates of a layer together, while the L1 term lowers
      every open gate at the same rate: at a fixed lambda > 0 the gates keep closing and
      there is no density at which they settle. lambda sets the *speed* of closing, so
      the controller has to bring lambda back down as the density reaches the target,
      not find a "right" value and hold it.
    - The density lags lambda (it stays at 1 while the gates shrink, and SGD momentum
      keeps them moving about 1 / (1 - momentum) steps after lambda drops). The
      `lookahead` prediction cuts lambda while the gates are falling fast enough to
      reach the target anyway; without it the density overshoots by tens of points.
      It is made from the gate values (`density_ahead`), not from the density's own
      slope: a layer's gates fall together, so the density is flat until they reach
      zero and then drops within a few updates (the card's "Choices" has a measured
      case). `factor` bounds how fast lambda grows while the gates are all open.
    - Gates are measured in inference mode on a fixed probe, so the measurement is
      deterministic between updates but moves with the embedding's batch-norm
      statistics (a few points of noise on the CIFAR-scale runs); keep `gain *
      lookahead / every` moderate.
    - A ReLU gate with `W_g e < 0` for every `e` gets no gradient. In practice, gates
      reopened when the embedding moved (e is a softmax over classes), so the rule may
      raise lambda again above the target; `latch=True` forbids that.
    - With `ReLUGate`'s default initialisation (W_g = 1 +- 0.01) every gate of a layer
      reaches zero at the same moment whatever lambda does; use `spread_gate_heads`
      first (the example does) so that the density falls smoothly.

    Raising and lowering lambda have separate gains (`gain` 2, `down_gain` 5) because
    closing is fast and hard to undo while reopening is slow: the controller should be
    quick to cut lambda and slow to raise it. How the rule and its defaults were found,
    and the ablation that made fixed lambda the recipes' default (the controller cost
    accuracy at more MACs), are in the model card (`zoo/deepmoe.md`, "Choices").

    Args:
        target_density: Wanted fraction of open gates, in (0, 1] (wide-DeepMoE: 0.5).
        data: Training images `(N, H, W, C)` (or an `(images, labels)` tuple) on which
            the density is measured; a few hundred examples suffice. Required unless
            `density_fn` is given.
        every: `"epoch"` or a number of batches >= 1.
        factor: Largest multiplier of lambda per update, > 1.
        tolerance: Dead band around the (ramped) target, >= 0.
        min_gate_l1: Lower bound of lambda, > 0.
        max_gate_l1: Upper bound of lambda, >= min_gate_l1.
        density_fn: Optional `density_fn(model) -> float` replacing the measurement.
        hold_while_falling: No raise of lambda while the density falls.
        batch_size: Batch size of the measurement.
        gain: Proportional gain of the steps that raise lambda (density above the
            target), in log(lambda) per unit of density error, > 0 (`float("inf")`:
            every step at its bound).
        down_gain: Proportional gain of the steps that lower lambda, > 0 (None: `gain`).
        down_factor: Largest divisor of lambda per update, > 1 (None: `factor ** 2`).
        initial_gate_l1: lambda when training starts (None: the model's own).
        ramp: Batches over which the target falls linearly from 1 to `target_density`
            (0: the final target from the start).
        latch: Once the density has been at or below `target_density`, lambda only
            goes down.
        lookahead: Batches ahead at which the density is predicted (from the gate
            values with `data`, from the density's last change with `density_fn`),
            >= 0 (0: proportional rule on the measured density).

    Example:

    >>> spread_gate_heads(model)
    >>> model.fit(x, y, epochs=10,
    ...           callbacks=[GateDensityTarget(0.5, data=x[:512], every=4)])

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, sec.
        5.1.1 (wide-DeepMoE: "on average half of the convolutional channels ... selected").
    """

    def __init__(self, target_density, data=None, every=10, factor=1.25, tolerance=0.0,
                 min_gate_l1=1e-3, max_gate_l1=1e4, density_fn=None,
                 hold_while_falling=False, batch_size=256, *, gain=2.0, down_factor=None,
                 initial_gate_l1=None, ramp=0, latch=False, lookahead=30, down_gain=5.0):
        super().__init__()
        self.target_density = validation.number(
            "target_density", target_density, minimum=0, maximum=1, exclusive_minimum=True
        )
        if every != "epoch":
            every = validation.positive_int("every", every)
        self.every = every
        self.factor = validation.number("factor", factor, minimum=1, exclusive_minimum=True)
        self.down_factor = self.factor ** 2 if down_factor is None else validation.number(
            "down_factor", down_factor, minimum=1, exclusive_minimum=True
        )
        self.tolerance = validation.non_negative_float("tolerance", tolerance)
        self.min_gate_l1 = validation.positive_float("min_gate_l1", min_gate_l1)
        self.max_gate_l1 = validation.number(
            "max_gate_l1", max_gate_l1, minimum=self.min_gate_l1
        )
        self.gain = validation.number("gain", gain, minimum=0, exclusive_minimum=True)
        self.down_gain = self.gain if down_gain is None else validation.number(
            "down_gain", down_gain, minimum=0, exclusive_minimum=True
        )
        self.initial_gate_l1 = None if initial_gate_l1 is None else validation.non_negative_float(
            "initial_gate_l1", initial_gate_l1
        )
        self.ramp = validation.integer("ramp", ramp, minimum=0)
        self.lookahead = validation.non_negative_float("lookahead", lookahead)
        if data is None and density_fn is None:
            raise ValueError("GateDensityTarget needs data (training images) or density_fn")
        if data is not None and isinstance(data, tuple):
            data = data[0]
        self.data = None if data is None else np.asarray(data)
        self.density_fn = density_fn
        self.hold_while_falling = bool(hold_while_falling)
        self.latch = bool(latch)
        self.batch_size = validation.positive_int("batch_size", batch_size)
        self.records = []
        self.reached = False
        self._seen = 0
        self._epoch_start = 0  # index in `records` of the epoch's first measurement
        self._gates = self._previous_gates = None  # gate values at the last two measurements

    def measure(self):
        """The current density (float in [0, 1]); keeps the gate values for `predicted`."""
        if self.density_fn is not None:
            return float(self.density_fn(self.model))
        from keras_moe.analysis.gates import densities, gate_values

        self._previous_gates, self._gates = self._gates, gate_values(
            self.model, self.data, kinds=("gated_conv",), batch_size=self.batch_size
        )
        return densities(self._gates)[1]

    def current_target(self):
        """The ramped target after `self._seen` batches."""
        if not self.ramp:
            return self.target_density
        progress = min(1.0, self._seen / self.ramp)
        return max(self.target_density, 1.0 - (1.0 - self.target_density) * progress)

    def predicted(self, density):
        """The density `lookahead` batches ahead: from the last two gate snapshots
        (`density_ahead`), or without them along the density's last change."""
        if not self.lookahead or not self.records or self._seen <= self.records[-1].batch:
            return density
        batches = self._seen - self.records[-1].batch
        if self._gates is not None and self._previous_gates is not None:
            return density_ahead(self._previous_gates, self._gates, batches, self.lookahead)
        slope = (density - self.records[-1].density) / batches
        return density + self.lookahead * slope

    def step(self, density, target):
        """The change of log(lambda) for a measured `density` and a `target` (no state change)."""
        error = self.predicted(density) - target
        if abs(error) <= self.tolerance:
            return 0.0
        gain = self.gain if error > 0 else self.down_gain
        step = gain * error if np.isfinite(gain) else np.sign(error) * np.inf
        step = float(np.clip(step, -np.log(self.down_factor), np.log(self.factor)))
        if step > 0 and self.latch and self.reached:
            return 0.0
        if (step > 0 and self.hold_while_falling and self.records
                and density < self.records[-1].density):
            return 0.0
        return step

    def update(self):
        """Measures the density and updates lambda once; returns `(density, lambda)`."""
        density = self.measure()
        target = self.current_target()
        self.reached = self.reached or density <= self.target_density
        step = self.step(density, target)
        gate_l1 = max(self.model.gate_l1, self.min_gate_l1)
        gate_l1 = float(np.clip(gate_l1 * np.exp(step), self.min_gate_l1, self.max_gate_l1))
        self.model.gate_l1 = gate_l1
        self.records.append(DensityRecord(self._seen, density, gate_l1, target))
        return density, gate_l1

    def get_state(self):
        """The controller's state for an epoch backup (`keras_moe.training.run_dir`):
        its readings, batch count, latch and the last two gate snapshots, without which
        a resumed run would restart the ramp, shift the reading schedule and lose the
        lookahead."""
        return {"records": [list(record) for record in self.records],
                "reached": self.reached, "seen": self._seen,
                "gates": self._gates, "previous_gates": self._previous_gates}

    def set_state(self, state):
        """Restores `get_state()` (lambda itself is a model variable, restored with the
        weights)."""
        self.records = [DensityRecord(*record) for record in state["records"]]
        self.reached = bool(state["reached"])
        self._seen = int(state["seen"])
        self._gates, self._previous_gates = state["gates"], state["previous_gates"]

    def on_train_begin(self, logs=None):
        _require_deepmoe(self.model)
        if self.initial_gate_l1 is not None and not self.records:
            self.model.gate_l1 = self.initial_gate_l1

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = len(self.records)

    def on_train_batch_end(self, batch, logs=None):
        self._seen += 1
        if self.every != "epoch" and self._seen % self.every == 0:
            self.update()

    def on_epoch_end(self, epoch, logs=None):
        if self.every == "epoch":
            self.update()
        if logs is not None and self.records:
            logs["gate_density"] = self.records[-1].density
            logs["gate_l1"] = self.records[-1].gate_l1
            # An epoch without a reading of its own (shorter than `every` batches)
            # reports the reading still in force, as `gate_density` does: the logs
            # keep one value per epoch.
            this_epoch = self.records[self._epoch_start:] or self.records[-1:]
            logs["gate_density_min"] = min(record.density for record in this_epoch)


# The recipe phase keys of DeepMoE models (`keras_moe.recipes` documents them), owned here
# with the procedure they configure and registered against the zoo's family: the phase
# runner finds them through `DEEPMOE.phase_settings`, and the zoo imports nothing of
# `keras_moe.training`.

def _freeze_gating(model, value, context):
    model.set_gating_trainable(not value)
    return True  # Keras captures the trainable variables when it builds the train step


def _coefficient(key):
    def apply(model, value, context):
        setattr(model, key, value)  # a variable: no recompile, no retrace
        return False

    apply.__qualname__ = f"_coefficient.{key}"
    return apply


def _density_controller(model, value, context):
    if value is False:  # lambda fixed: the paper's Procedure 1
        return []
    if context.probe is None:
        raise ValueError(f"phase {context.phase.name!r}: gate_density_target needs data to "
                         "measure the gate density on")
    return [GateDensityTarget(value, data=context.probe)]


# The model attribute that records an explicit `spread_gate_heads` choice, so that the
# controller's build step (run after it: `phase_settings` order) leaves the heads alone.
_SPREAD_CHOSEN = "_keras_moe_spread_gate_heads_chosen"


def _spread_heads_choice(model, value):
    setattr(model, _SPREAD_CHOSEN, bool(value))
    if value:
        spread_gate_heads(model)


def _spread_heads_for_controller(model, value):
    if value is False or getattr(model, _SPREAD_CHOSEN, None) is not None:
        return
    # The density controller needs gates that close one by one, not all together.
    spread_gate_heads(model)


register_phase_settings(DEEPMOE, {
    "freeze_gating": PhaseSetting(apply=_freeze_gating),
    "gate_l1": PhaseSetting(apply=_coefficient("gate_l1")),
    "embedding_loss_weight": PhaseSetting(apply=_coefficient("embedding_loss_weight")),
    # Before gate_density_target: the build steps run in this order.
    "spread_gate_heads": PhaseSetting(on_build=_spread_heads_choice),
    "gate_density_target": PhaseSetting(callbacks=_density_controller,
                                        on_build=_spread_heads_for_controller),
})
