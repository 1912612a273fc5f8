"""One MoE block of each keras-hub MoE family: keras-hub's, sparsified, and the dense floor.

For each family and number of experts, the family's MoE block (keras-hub 0.32, its
default top-k) runs a prefill forward and a training step (loss and the gradient of
every weight) on `--tokens` tokens, compiled (tf.function or jax.jit), three ways:

- `hub`: keras-hub's block, which runs every expert on every token;
- `sparse`: the same block as `keras_moe.hub.sparsify` converts it
  (`keras_moe.hub.sparse_block`: a `HubMoEBlock` around `MoEDense`, dropless sparse
  dispatch, weights copied);
- `floor`: the least work any top-k block can do: one dense SwiGLU network of the
  expert's sizes over the `k * tokens` assignments (plus the shared expert's network
  over the tokens, for the families that have one), plus the router's matmul.

Gemma4's MoE block is its decoder's router (`Gemma4Router`, kept as it is) feeding its
expert bank (`Gemma4MoEBlock`, which `sparsify` converts to a `HubExpertBank`); both
`hub` and `sparse` run that pair, the same router object in each.

Timings are medians over interleaved rounds (`keras_moe.benchmarking.
interleaved_medians`), each timed call right after an untimed one of the same step
(`--settle 1`): read the ratios, not the absolute times.

    python benchmarks/keras_hub_moe.py                       # 8, 64, 128 experts
    python benchmarks/keras_hub_moe.py --dim 128 --width 128 --tokens 2048  # small blocks
    python benchmarks/keras_hub_moe.py --experts 64 --reps 3 --families mixtral
    KERAS_BACKEND=jax python benchmarks/keras_hub_moe.py     # on JAX (CPU: ragged_dot
                                                             # is a masked dense product)
"""

import argparse
import inspect
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402  (KERAS_BACKEND comes from the environment)

# Family -> (block class path, constructor arguments at hidden `d`, width `f`, experts
# `e`), top-k: each backbone's default (Qwen3.5-MoE has none: 4 here).
TOP_K = {"mixtral": 2, "qwen_moe": 4, "qwen3_moe": 4, "qwen3_5_moe": 4, "gpt_oss": 2,
         "gemma4": 8}
SHARED = {"qwen_moe", "qwen3_5_moe"}


def make_block(family, d, f, e):
    from keras_hub.src.models.gpt_oss.gpt_oss_decoder import GptOssSparseMoeBlock
    from keras_hub.src.models.mixtral.mixtral_decoder import MixtralSparseMoeBlock
    from keras_hub.src.models.qwen3_5_moe.qwen3_5_moe_decoder import Qwen3_5MoeSparseMoeBlock
    from keras_hub.src.models.qwen3_moe.qwen3_moe_decoder import Qwen3SparseMoeBlock
    from keras_hub.src.models.qwen_moe.qwen_moe_decoder import QwenSparseMoeBlock

    k = min(TOP_K[family], e)
    if family == "gemma4":
        from keras_hub.src.models.gemma4.gemma4_moe import Gemma4MoEBlock, Gemma4Router

        router, bank = Gemma4Router(e, k), Gemma4MoEBlock(e, d, f)
        router.build((None, d))
        bank.build((None, d))
        return RoutedBank(router, bank), k
    if family == "mixtral":
        block = MixtralSparseMoeBlock(d, f, e, top_k=k)
    elif family == "qwen_moe":
        block = QwenSparseMoeBlock(d, f, 2 * f, e, k, norm_top_k_prob=False)
    elif family == "qwen3_moe":
        block = Qwen3SparseMoeBlock(d, f, e, k, norm_top_k_prob=True)
    elif family == "qwen3_5_moe":
        block = Qwen3_5MoeSparseMoeBlock(d, f, 2 * f, e, k)
    else:
        block = GptOssSparseMoeBlock(d, f, e, top_k=k)
    block.build((None, None, d))
    return block, k


class RoutedBank(keras.layers.Layer):
    """Gemma4's MoE path as its decoder runs it: the router on `x`, the bank on the
    flattened tokens with the router's (tokens, experts) dispatch weights."""

    def __init__(self, router, bank, **kwargs):
        super().__init__(**kwargs)
        self.router, self.bank = router, bank
        self.built = router.built and bank.built  # stateless_call (JAX) needs it

    def call(self, x, training=None):
        tokens = keras.ops.reshape(x, (-1, x.shape[-1]))
        return self.bank(tokens, self.router(x))


def sparse_block(family, block, k):
    from keras_moe import hub

    if family == "gemma4":
        return RoutedBank(block.router, hub.sparse_block(block.bank, top_k=k))
    return hub.sparse_block(block, balance_loss=None)


def make_floor(family, d, f, e, k, tokens):
    import keras
    from keras import ops

    class Floor(keras.layers.Layer):
        def build(self, _):
            self.router = self.add_weight(shape=(d, e), name="router")
            self.w = [self.add_weight(shape=s, name=f"w{i}")
                      for i, s in enumerate([(d, 2 * f), (f, d)])]
            if family in SHARED:
                self.s = [self.add_weight(shape=s, name=f"s{i}")
                          for i, s in enumerate([(d, 4 * f), (2 * f, d)])]

        def glu(self, x, w_in, w_out):
            h = ops.matmul(x, w_in)
            half = h.shape[-1] // 2
            return ops.matmul(ops.silu(h[:, :half]) * h[:, half:], w_out)

        def call(self, x, training=None):
            x = ops.reshape(x, (-1, d))
            out = ops.sum(ops.matmul(x, self.router)) * 0.0
            rows = ops.tile(x, (k, 1))  # the k * tokens assignments
            out = out + ops.sum(self.glu(rows, *self.w))
            if family in SHARED:
                out = out + ops.sum(self.glu(x, *self.s))
            return out

    layer = Floor()
    layer.build((None, d))
    return layer


def steps(layer, inputs):
    """(forward, train step) compiled; each returns a scalar computed from all it made."""
    import keras

    def first(result):
        return result[0] if isinstance(result, (tuple, list)) else result

    if keras.backend.backend() == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        # Keras passes `training` on only to a call that takes it; stateless_call passes
        # what it is given (GPT-OSS's block takes none).
        takes_training = "training" in inspect.signature(layer.call).parameters

        def run(tr, nt, x, training):
            kwargs = {"training": training} if takes_training else {}
            out, _ = layer.stateless_call(tr, nt, x, **kwargs)
            return jnp.mean(jnp.square(first(out)))

        forward = jax.jit(lambda tr, nt, x: run(tr, nt, x, False))
        grad = jax.jit(lambda tr, nt, x: sum(jnp.sum(g) for g in jax.grad(
            lambda t: run(t, nt, x, True))(tr)))
        return (lambda: forward(trainable, non_trainable, inputs).block_until_ready(),
                lambda: grad(trainable, non_trainable, inputs).block_until_ready())
    import tensorflow as tf

    @tf.function
    def forward():
        return tf.reduce_mean(tf.square(first(layer(inputs, training=False))))

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(first(layer(inputs, training=True))))
        grads = tape.gradient(loss, layer.trainable_weights)
        return tf.add_n([tf.reduce_sum(g) for g in grads if g is not None])

    return forward, train_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(TOP_K), choices=list(TOP_K))
    parser.add_argument("--experts", nargs="+", type=int, default=[8, 64, 128])
    # The defaults are benchmarks/moe_dense.py's sizes: large enough that the experts'
    # matmuls, not TensorFlow's per-op cost, make the time (at d = f = 128 and 2,048
    # tokens a 64-expert block's 64-row matmuls are overhead-bound; see the card).
    parser.add_argument("--dim", type=int, default=256, help="hidden size d")
    parser.add_argument("--width", type=int, default=512, help="expert width f")
    parser.add_argument("--tokens", type=int, default=4096, help="batch x sequence (prefill)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--settle", type=int, default=1, help=(
        "untimed calls of a step right before each timed one (1: the step after "
        "keras-hub's block is not charged for the memory that block freed; 0: back to "
        "back)"))
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    from keras_moe.benchmarking import interleaved_medians

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(1, args.tokens, args.dim)).astype("float32")
    inputs = keras.ops.convert_to_tensor(x)
    print(f"keras-hub MoE blocks, {keras.backend.backend()}: d={args.dim}, f={args.width}, "
          f"{args.tokens} tokens; medians of {args.reps} interleaved rounds "
          f"(settle={args.settle}), ms")
    print(f"{'family':12s} {'E':>4s} {'k':>2s} | {'step':7s} {'hub':>8s} {'sparse':>8s} "
          f"{'floor':>8s} | {'hub/sparse':>10s} {'sparse/floor':>12s}")
    for family in args.families:
        for e in args.experts:
            block, k = make_block(family, args.dim, args.width, e)
            layers = {"hub": block, "sparse": sparse_block(family, block, k),
                      "floor": make_floor(family, args.dim, args.width, e, k, args.tokens)}
            candidates = {}
            for name, layer in layers.items():
                forward, train = steps(layer, inputs)
                candidates[("forward", name)] = forward
                candidates[("train", name)] = train
            times = interleaved_medians(candidates, args.reps, settle=args.settle)
            for step in ("forward", "train"):
                hub_t, sparse_t, floor_t = (times[(step, n)] for n in ("hub", "sparse", "floor"))
                print(f"{family:12s} {e:4d} {k:2d} | {step:7s} {hub_t * 1e3:8.2f} "
                      f"{sparse_t * 1e3:8.2f} {floor_t * 1e3:8.2f} | {hub_t / sparse_t:10.1f} "
                      f"{sparse_t / floor_t:12.2f}", flush=True)


if __name__ == "__main__":
    main()
