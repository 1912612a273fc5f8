"""The stacked expert weights of `MoEDense`: creation, placement, files and compute.

`StackedExperts` is the part of `MoEDense` that holds its experts: every expert weight is
one variable with a leading expert axis (`(experts, in, out)`), or one variable per
device with `expert_devices` (TensorFlow placement), split over a device mesh under
`keras_moe.expert_parallel`; files always hold the stacked weights, so a layer trained
placed loads unplaced and back. It also holds the shared experts (DeepSeekMoE): experts
of the same shape that every token passes through, stacked the same way but never
split over devices.

The experts run two ways: `_batched_experts` (`(experts, n, features)` blocks, for
dense, capacity and expert-choice dispatch: a batched matmul, or on TensorFlow the grouped
FFN over equal blocks) and `_grouped_experts` (rows sorted by expert, for sparse dispatch).
"""

import keras
import numpy as np
from keras import ops

from keras_moe import validation
from keras_moe.layers import dispatch as dispatch_lib

EXPERT_WEIGHTS = ("hidden_kernel", "hidden_bias", "gate_kernel", "gate_bias", "kernel", "bias")

GATED_EXPERTS = ("swiglu", "geglu", "geglu_tanh", "clamped_swiglu")
# GPT-OSS's clamped GLU (its reference implementation's constants).
CLAMPED_SWIGLU_ALPHA = 1.702
CLAMPED_SWIGLU_LIMIT = 7.0


def _halves(h, up):
    """`(gate, up)`: given apart, or the two halves of `h = [gate | up]`."""
    if up is not None:
        return h, up
    half = h.shape[-1] // 2
    return h[..., :half], h[..., half:]


def swiglu(h, up=None):
    """`silu(gate) * up` of `h = [gate | up]` (last axis, two equal halves), or of
    `gate = h` and `up` given apart (the grouped FFN's parts)."""
    gate, up = _halves(h, up)
    return ops.silu(gate) * up


def geglu(h, up=None):
    """`gelu(gate) * up` of `h = [gate | up]`, exact (erf) GELU."""
    gate, up = _halves(h, up)
    return keras.activations.gelu(gate, approximate=False) * up


def geglu_tanh(h, up=None):
    """`gelu(gate) * up` of `h = [gate | up]`, GELU's tanh approximation (Gemma)."""
    gate, up = _halves(h, up)
    return keras.activations.gelu(gate, approximate=True) * up


def clamped_swiglu(h, up=None):
    """GPT-OSS's GLU of `h = [gate | up]`: with `gate = min(gate, 7)` and `up =
    clip(up, -7, 7)`, `(up + 1) * gate * sigmoid(1.702 gate)`."""
    gate, up = _halves(h, up)
    gate = ops.minimum(gate, CLAMPED_SWIGLU_LIMIT)
    up = ops.clip(up, -CLAMPED_SWIGLU_LIMIT, CLAMPED_SWIGLU_LIMIT)
    return (up + 1.0) * gate * ops.sigmoid(CLAMPED_SWIGLU_ALPHA * gate)


GLU_FUNCTIONS = {"swiglu": swiglu, "geglu": geglu, "geglu_tanh": geglu_tanh,
                 "clamped_swiglu": clamped_swiglu}


def check_expert_devices(devices, num_experts):
    if devices is None:
        return None
    if isinstance(devices, str) or not isinstance(devices, (list, tuple)) or not devices or not all(
        isinstance(d, str) for d in devices
    ):
        raise ValueError(
            "expert_devices must be None or a non-empty list of TensorFlow device names "
            f"(e.g. ['/GPU:0', '/GPU:1']), got {devices!r}"
        )
    if num_experts % len(devices):
        raise ValueError(
            f"expert_devices: {len(devices)} devices must divide num_experts "
            f"({num_experts}) so that each holds as many experts."
        )
    validation.require_tensorflow(
        "expert_devices (TensorFlow's device scopes)",
        "Use keras_moe.expert_parallel.expert_parallel() instead.")
    return tuple(devices)



def _per_expert(initializer, num_experts):
    """`initializer` for a stack of `num_experts` expert weights, each scaled as alone.

    Keras's variance-scaling initializers (Glorot, He, LeCun) read a leading axis as a
    receptive field and divide the variance by it: drawn on an (experts, in, out) shape,
    every expert would start `sqrt(experts)` times smaller than the same weight of a
    `Dense` layer. Scaling the variance back by the number of experts gives each expert
    the fans of its own (in, out) matrix, in one draw.
    """
    if (
        not isinstance(initializer, keras.initializers.VarianceScaling)
        or num_experts == 1
        or getattr(initializer, "input_axes", None) is not None
        or getattr(initializer, "output_axes", None) is not None
    ):
        return initializer  # no fans, or fans the user chose
    return keras.initializers.VarianceScaling(
        scale=initializer.scale * num_experts,
        mode=initializer.mode,
        distribution=initializer.distribution,
        seed=initializer.seed,
    )


class StackedExperts:
    """Mixin of `MoEDense`: its routed and shared experts (see the module docstring).

    The layer sets `num_experts`, `num_shared_experts`, `shared_expert_gate`, `units`,
    `expert_hidden_units`, `gated_experts`, `use_bias`, `activation`,
    `expert_hidden_activation`, `kernel_initializer`,
    `bias_initializer` and `expert_devices`, and lists its non-weight variables in
    `_bookkeeping_variables()` (saved after the weights).
    """

    def _expert_weight_specs(self, input_dim):
        """(name, shape of one expert's weight, initializer) of each stacked weight."""
        specs = []
        width = input_dim
        if self.expert_hidden_units is not None:
            specs.append(("hidden_kernel", (input_dim, self.expert_hidden_units),
                          self.kernel_initializer))
            if self.use_bias:
                specs.append(("hidden_bias", (self.expert_hidden_units,), self.bias_initializer))
            if self.gated_experts is not None:
                specs.append(("gate_kernel", (input_dim, self.expert_hidden_units),
                              self.kernel_initializer))
                if self.use_bias:
                    specs.append(("gate_bias", (self.expert_hidden_units,),
                                  self.bias_initializer))
            width = self.expert_hidden_units
        specs.append(("kernel", (width, self.units), self.kernel_initializer))
        if self.use_bias:
            specs.append(("bias", (self.units,), self.bias_initializer))
        return specs

    def _build_experts(self, input_dim):
        """The stacked expert weights (leading expert axis), in one piece, or in one
        piece per device of `expert_devices`; split over devices under
        `keras_moe.expert_parallel`."""
        for name in EXPERT_WEIGHTS:
            setattr(self, name, None)
        specs = self._expert_weight_specs(input_dim)
        if self.expert_devices is None:
            for name, shape, initializer in specs:
                setattr(self, name, self.add_weight(
                    name=name, shape=(self.num_experts,) + shape,
                    initializer=_per_expert(initializer, self.num_experts),
                ))
            self._expert_shards = [(None, {name: getattr(self, name) for name, _, _ in specs})]
            return
        import tensorflow as tf

        per_device = self.num_experts // len(self.expert_devices)
        self._expert_shards = [(device, {}) for device in self.expert_devices]
        for name, shape, initializer in specs:
            # One draw for all experts, then sliced, so that a placed layer starts from
            # the values an unplaced one with the same seed would.
            full = _per_expert(initializer, self.num_experts)((self.num_experts,) + shape)
            for index, (device, weights) in enumerate(self._expert_shards):
                piece = full[index * per_device:(index + 1) * per_device]
                with tf.device(device):
                    weights[name] = self.add_weight(
                        name=f"{name}_{index}", shape=(per_device,) + shape,
                        initializer=lambda shape, dtype=None, piece=piece: ops.cast(piece, dtype),
                    )

    def stacked_expert_weights(self):
        """Each stacked expert weight as one (experts, ...) tensor, placed or not.

        Returns:
            Dict of name (`"hidden_kernel"`, `"hidden_bias"`, `"gate_kernel"`,
            `"gate_bias"`, `"kernel"`, `"bias"`, those present) to tensor, in that
            order. With gated experts `hidden_*` is the up projection and `gate_*` the
            gate projection.
        """
        names = [name for name in EXPERT_WEIGHTS if name in self._expert_shards[0][1]]
        if len(self._expert_shards) == 1:
            return {name: self._expert_shards[0][1][name] for name in names}
        return {
            name: ops.concatenate(
                [ops.convert_to_tensor(weights[name]) for _, weights in self._expert_shards],
                axis=0,
            )
            for name in names
        }


    def _build_shared_experts(self, input_dim):
        """The shared experts' stacked weights (replicated under expert parallelism:
        created outside `expert_weights()`), named `shared_<weight>`."""
        self._shared_weights = {}
        self._shared_gate_kernel = None
        if not self.num_shared_experts:
            return
        for name, shape, initializer in self._expert_weight_specs(input_dim):
            self._shared_weights[name] = self.add_weight(
                name=f"shared_{name}", shape=(self.num_shared_experts,) + shape,
                initializer=_per_expert(initializer, self.num_shared_experts),
            )
        if self.shared_expert_gate:
            # Saved after the shared experts' weights (see `save_own_variables`).
            self._shared_gate_kernel = self.add_weight(
                name="shared_expert_gate_kernel", shape=(input_dim, 1),
                initializer=self.kernel_initializer,
            )

    def _shared_expert_outputs(self, tokens):
        """(tokens, units): the sum of every shared expert's output on every token, times
        `sigmoid(x w)` with `shared_expert_gate` (Qwen-MoE)."""
        outputs = ops.sum(self._expert(ops.expand_dims(tokens, 0), self._shared_weights),
                          axis=0)
        if self._shared_gate_kernel is not None:
            gate = ops.matmul(tokens, ops.cast(self._shared_gate_kernel, tokens.dtype))
            outputs = outputs * ops.sigmoid(gate)
        return outputs

    def _first_layer_parts(self, weights):
        """`(kernels, biases)` of the experts' first layer from a dict of their weights:
        one kernel (and bias), or for gated experts the gate and up projections as two
        parts, `(gate, up)`, which every path multiplies apart and the GLU functions take
        as two arguments (no per-call copy of the kernels side by side); biases None
        when the experts have none."""
        kernel, bias = weights["hidden_kernel"], weights.get("hidden_bias")
        if self.gated_experts is None:
            return (kernel,), None if bias is None else (bias,)
        return (weights["gate_kernel"], kernel), (
            None if bias is None else (weights["gate_bias"], bias))

    @property
    def _hidden_activation(self):
        if self.gated_experts is not None:
            return GLU_FUNCTIONS[self.gated_experts]
        return self.expert_hidden_activation

    def _shared_variables(self):
        gate = [] if self._shared_gate_kernel is None else [self._shared_gate_kernel]
        return list(self._shared_weights.values()) + gate

    def save_own_variables(self, store):
        # The stacked expert weights first, then the shared experts', then the
        # bookkeeping: the order Keras uses for an unplaced layer, whatever the
        # placement, so that files stay device-agnostic (a layer trained placed loads
        # unplaced, and back).
        values = list(self.stacked_expert_weights().values())
        values += self._shared_variables() + self._bookkeeping_variables()
        for index, value in enumerate(values):
            store[str(index)] = ops.convert_to_numpy(value)

    def load_own_variables(self, store):
        names = list(self.stacked_expert_weights())
        shared = self._shared_variables()
        others = shared + self._bookkeeping_variables()
        if len(store.keys()) != len(names) + len(others):
            raise ValueError(
                f"MoEDense '{self.name}' has {len(names) + len(others)} variables to load "
                f"({names}, {len(shared)} shared expert weights and "
                f"{len(others) - len(shared)} counters), the file has "
                f"{len(store.keys())}."
            )
        for index, name in enumerate(names):
            value = store[str(index)]
            pieces = len(self._expert_shards)
            for part, (_, weights) in zip(np.split(np.asarray(value), pieces), self._expert_shards):
                weights[name].assign(part)
        for offset, variable in enumerate(others):
            variable.assign(store[str(len(names) + offset)])


    def _expert(self, x, weights):
        """The experts of `weights` (a dict of stacked weights) on a batched
        (experts or 1, tokens, features) x: expert e on slice e (a leading 1 broadcasts)."""
        if weights.get("hidden_kernel") is not None:
            kernels, biases = self._first_layer_parts(weights)
            parts = [ops.matmul(x, k) for k in kernels]
            if biases is not None:
                parts = [p + b[:, None, :] for p, b in zip(parts, biases)]
            x = self._hidden_activation(*parts)
        y = ops.matmul(x, weights["kernel"])
        bias = weights.get("bias")
        if bias is not None:
            y = y + bias[:, None, :]
        return self.activation(y)

    def _on_each_device(self, compute):
        """`compute(weights)` for each piece of the experts, on the piece's device."""
        if self.expert_devices is None:
            return [compute(self._expert_shards[0][1])]
        import tensorflow as tf

        results = []
        for device, weights in self._expert_shards:
            with tf.device(device):
                results.append(compute(weights))
        return results

    def _batched_experts(self, expert_inputs):
        """(experts or 1, n, features) -> (experts, n, units), expert e on slice e (a
        leading 1 broadcasts the same rows to every expert)."""
        if keras.backend.backend() == "tensorflow" and expert_inputs.shape[0] != 1:
            # Equal blocks through sparse dispatch's grouped FFN: one matmul per expert
            # with its hand-written gradient (capacity dispatch's forward at 64 experts
            # took 1.30x sparse dispatch's through the batched matmul, 1.05x so; see
            # the README's speed section).
            experts, features = expert_inputs.shape[0], expert_inputs.shape[-1]
            rows = ops.shape(expert_inputs)[1]
            flat = ops.reshape(expert_inputs, (-1, features))
            counts = ops.full((experts,), rows, dtype="int32")
            outputs = self._grouped_experts(flat, counts)
            return ops.reshape(outputs, (experts, rows, outputs.shape[-1]))
        pieces = len(self._expert_shards)
        if expert_inputs.shape[0] == 1 or pieces == 1:
            inputs = [expert_inputs] * pieces
        else:
            inputs = ops.split(expert_inputs, pieces, axis=0)
        inputs = iter(inputs)

        outputs = self._on_each_device(lambda weights: self._expert(next(inputs), weights))
        return outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, axis=0)

    def _grouped_experts(self, expert_inputs, tokens_per_expert):
        """(n, features) rows sorted by expert -> (n, units), each row through its expert."""
        dtype = expert_inputs.dtype
        pieces = len(self._expert_shards)
        if pieces == 1:
            rows, counts = [expert_inputs], [tokens_per_expert]
        else:
            import tensorflow as tf

            counts = tf.split(tokens_per_expert, pieces)
            rows = tf.split(expert_inputs, [tf.reduce_sum(c) for c in counts])
        work = iter(zip(rows, counts))

        def cast(weight):
            return None if weight is None else ops.cast(weight, dtype)

        def compute(weights):
            piece_rows, piece_counts = next(work)
            layers = []
            if self.expert_hidden_units is not None:
                kernels, biases = self._first_layer_parts(weights)
                layers.append((tuple(cast(k) for k in kernels),
                               None if biases is None else tuple(cast(b) for b in biases)))
            layers.append((cast(weights["kernel"]), cast(weights.get("bias"))))
            return dispatch_lib.grouped_ffn(
                piece_rows, piece_counts, layers, hidden_activation=self._hidden_activation
            )

        outputs = self._on_each_device(compute)
        outputs = outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, axis=0)
        return self.activation(outputs)
