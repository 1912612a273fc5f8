"""Speed of MoEDense's dispatch modes against the dense floor, measured side by side.

For each number of experts, a top-2 MoEDense with feed-forward experts (d -> hidden -> d)
runs forward and a training step (loss and gradients of every weight) under
`tf.function`, once per dispatch mode. The floor is one dense two-layer feed-forward network of the same sizes
over the same k * tokens token-assignments: the least work any top-k MoE layer can do.
Timings are medians over interleaved repetitions (every candidate is timed once per round)
so that load on this shared machine hits all candidates alike; read the ratios, not the
absolute times.

    python benchmarks/moe_dense.py                 # the issue's sizes
    python benchmarks/moe_dense.py --experts 4 64 --reps 5

Every candidate runs under the same TensorFlow settings (default thread pools: as many
intra- and inter-op threads as CPUs). With 64 experts each stacked expert weight is
exactly 32 MiB, and so is its gradient: glibc's malloc serves every block of that size
with a fresh mmap, so each training step page-faults 64 MiB of new gradient memory in
(~17,000 faults, ~50 ms of CPU time on the 2-core machine) that smaller tensors, and the
floor's, never pay. TensorFlow's own pooling
allocator avoids it, and so does telling glibc to keep freed memory for reuse; to measure
without that cost, for every candidate alike:

    TF_CPU_ALLOCATOR_USE_BFC=true python benchmarks/moe_dense.py
    python benchmarks/moe_dense.py --keep-freed-memory
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_moe.benchmarking import interleaved_medians  # noqa: E402
from keras_moe.layers import MoEDense  # noqa: E402


def keep_freed_memory():
    """Makes glibc's malloc keep freed memory for reuse rather than unmapping it.

    `mallopt(M_MMAP_MAX, 0)`: no block is served by its own mmap (glibc caps the mmap
    threshold at 32 MiB, so a 32 MiB gradient always would be); `mallopt(M_TRIM_THRESHOLD,
    1 GiB)`: freed memory is not returned to the system. Affects the whole process, from
    the call on; only for glibc (raises SystemExit elsewhere).
    """
    import ctypes

    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError) as error:
        raise SystemExit(f"--keep-freed-memory needs glibc's mallopt: {error}")
    if not (mallopt(m_trim_threshold, 1 << 30) and mallopt(m_mmap_max, 0)):
        raise SystemExit("--keep-freed-memory: mallopt refused the settings.")


def make_moe(num_experts, args, dispatch):
    layer = MoEDense(
        args.dim, num_experts=num_experts, top_k=args.k, gate="noisy_top_k",
        expert_hidden_units=args.hidden, dispatch=dispatch, capacity_factor=1.25,
    )
    layer.build((None, args.dim))
    # A trained router spreads tokens; W_g = 0 (the paper's init) would tie every logit.
    layer.gate.kernel.assign(
        np.random.default_rng(0).normal(0, 0.1, layer.gate.kernel.shape).astype("float32")
    )
    return layer


def make_floor(args):
    return keras.Sequential(
        [keras.Input((args.dim,)), keras.layers.Dense(args.hidden, activation="relu"),
         keras.layers.Dense(args.dim)]
    )


def compiled_steps(layer, inputs):
    """A forward pass, and a training step: loss and the gradient of every weight.

    Both return a scalar computed in the graph from everything they produce (the outputs;
    every gradient, read whole), so timing never includes copying tensors to the host and
    nothing can be pruned. The optimizer update is left out: its cost scales with the
    parameter count, which is the point of a MoE, not a cost of its dispatch.
    """

    @tf.function(jit_compile=False)
    def forward():
        return tf.reduce_sum(layer(inputs, training=False))

    @tf.function(jit_compile=False)
    def train_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(inputs, training=True)))
        grads = tape.gradient(loss, layer.trainable_weights)
        return tf.add_n([tf.reduce_sum(g) for g in grads])

    return forward, train_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--modes", nargs="+", default=["sparse", "capacity", "dense"])
    parser.add_argument(
        "--keep-freed-memory", action="store_true",
        help="glibc keeps freed memory for reuse (see keep_freed_memory), for every candidate",
    )
    args = parser.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()

    tf.random.set_seed(0)
    inputs = tf.random.normal((args.tokens, args.dim))
    floor_inputs = tf.random.normal((args.k * args.tokens, args.dim))
    floor_forward, floor_train = compiled_steps(make_floor(args), floor_inputs)

    candidates = {("floor", 0, "forward"): floor_forward, ("floor", 0, "train"): floor_train}
    for num_experts in args.experts:
        for mode in args.modes:
            forward, train = compiled_steps(make_moe(num_experts, args, mode), inputs)
            candidates[(mode, num_experts, "forward")] = forward
            candidates[(mode, num_experts, "train")] = train
    times = interleaved_medians(candidates, args.reps)

    floor_f, floor_t = times[("floor", 0, "forward")], times[("floor", 0, "train")]
    print(
        f"tokens {args.tokens}, d {args.dim}, expert hidden {args.hidden}, k {args.k}; "
        f"floor = dense FFN over {args.k * args.tokens} assignments: "
        f"forward {floor_f * 1e3:.1f} ms, train step {floor_t * 1e3:.1f} ms "
        f"(median of {args.reps}, TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, "
        f"TF_CPU_ALLOCATOR_USE_BFC={os.environ.get('TF_CPU_ALLOCATOR_USE_BFC', 'unset')}, "
        f"keep-freed-memory {args.keep_freed_memory})"
    )
    print()
    print("| experts | dispatch | forward ms | forward / floor | train step ms | train / floor |")
    print("| --- | --- | --- | --- | --- | --- |")
    for num_experts in args.experts:
        for mode in args.modes:
            f = times[(mode, num_experts, "forward")]
            t = times[(mode, num_experts, "train")]
            print(
                f"| {num_experts} | {mode} | {f * 1e3:.1f} | {f / floor_f:.2f} | "
                f"{t * 1e3:.1f} | {t / floor_t:.2f} |"
            )
    if "sparse" in args.modes and len(args.experts) > 1:
        lo, hi = min(args.experts), max(args.experts)
        fwd_scale = times[("sparse", hi, "forward")] / times[("sparse", lo, "forward")]
        train_scale = times[("sparse", hi, "train")] / times[("sparse", lo, "train")]
        print()
        print(f"sparse {hi} experts / sparse {lo} experts: forward {fwd_scale:.2f}, "
              f"train step {train_scale:.2f} (target <= 1.5)")
        print(f"sparse forward at {hi} experts / floor: "
              f"{times[('sparse', hi, 'forward')] / floor_f:.2f} (target <= 1.3)")
        print(f"sparse train step at {hi} experts / floor train step: "
              f"{times[('sparse', hi, 'train')] / floor_t:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
