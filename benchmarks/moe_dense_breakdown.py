"""Where sparse MoEDense's time goes beyond the floor, part by part, measured side by side.

`moe_dense.py` compares whole steps; this script times the parts a top-k MoE layer adds
to the floor (one dense feed-forward network over the same k * tokens assignments) in
one interleaved run, so their sizes can be compared with each other and with the
targets. Rows (for the largest `--experts`, the issue's sizes by default):

- reading every expert weight once (a sum over them): the memory traffic a forward pass
  over all experts cannot avoid (64 MiB at 64 experts; the floor's weights are 1 MiB and
  stay in cache).
- router: the gate's logits matmul and top-k selection alone. The floor has no router.
- routing: router, sort by expert, dispatch gather and gate-weighted combine, with
  identity experts: the whole layer minus the experts' matmuls.
- per-expert GEMMs of each layer shape (rows split by the routing the gate really makes)
  next to the same work as one matmul: the cost of running many small matmuls.
- a stacked weight gradient: per-expert `x_e^T dy_e` matmuls, alone and packed into
  the (experts, in, out) tensor the optimizer needs, next to the floor's one matmul.
  At 64 experts the packed tensor is 32 MiB, which glibc's malloc maps afresh on every
  step (page faults); `--keep-freed-memory` (see `moe_dense.py`) removes that part.

    python benchmarks/moe_dense_breakdown.py
    python benchmarks/moe_dense_breakdown.py --experts 16 --reps 15
"""

import argparse
import os

from moe_dense import keep_freed_memory, make_floor, make_moe

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from keras_moe.benchmarking import interleaved_medians  # noqa: E402
from keras_moe.layers import dispatch  # noqa: E402


def reduced(*tensors):
    """A scalar that reads every tensor whole, so no part of the work can be pruned."""
    return tf.add_n([tf.reduce_sum(t) for t in tensors])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--keep-freed-memory", action="store_true")
    args = parser.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()

    tf.random.set_seed(0)
    num_experts, rows = args.experts, args.k * args.tokens
    tokens = tf.random.normal((args.tokens, args.dim))
    floor_inputs = tf.random.normal((rows, args.dim))
    hidden_rows = tf.random.normal((rows, args.hidden))
    output_grads = tf.random.normal((rows, args.dim))
    layer = make_moe(num_experts, args, "sparse")
    floor = make_floor(args)

    routing = layer.gate(tokens, training=False)
    tokens_per_expert = tf.math.bincount(
        tf.reshape(routing["top_k_indices"], (-1,)), minlength=num_experts,
        maxlength=num_experts, dtype=tf.int32,
    )
    hidden_kernels = tf.convert_to_tensor(layer.hidden_kernel)  # (experts, dim, hidden)
    output_kernels = tf.convert_to_tensor(layer.kernel)  # (experts, hidden, dim)

    def split(rows_):
        return tf.split(rows_, tokens_per_expert, num=num_experts)

    def per_expert(rows_, kernels):
        return [tf.matmul(r, w) for r, w in zip(split(rows_), tf.unstack(kernels))]

    def weight_grads(inputs_, grads_):
        return [
            tf.matmul(x, g, transpose_a=True) for x, g in zip(split(inputs_), split(grads_))
        ]

    def router():
        gate = layer.gate(tokens, training=False)
        return reduced(gate["top_k_gates"], tf.cast(gate["top_k_indices"], tf.float32))

    def routing_only():
        gate = layer.gate(tokens, training=False)
        return reduced(dispatch.sparse_dispatch(
            tokens, gate["top_k_indices"], gate["top_k_gates"], num_experts,
            lambda expert_inputs, _: expert_inputs,
        ))

    parts = {
        "floor forward": lambda: reduced(floor(floor_inputs)),
        "sparse forward": lambda: reduced(layer(tokens, training=False)),
        "reading every expert weight once": lambda: reduced(hidden_kernels, output_kernels),
        "router (gate matmul + top-k)": router,
        "routing (router, sort, gathers, combine)": routing_only,
        "layer 1 GEMM, one matmul": lambda: reduced(tf.matmul(floor_inputs, hidden_kernels[0])),
        "layer 1 GEMM, per expert": lambda: reduced(*per_expert(floor_inputs, hidden_kernels)),
        "layer 2 GEMM, one matmul": lambda: reduced(tf.matmul(hidden_rows, output_kernels[0])),
        "layer 2 GEMM, per expert": lambda: reduced(*per_expert(hidden_rows, output_kernels)),
        "layer 2 weight grad, one matmul": lambda: reduced(
            tf.matmul(hidden_rows, output_grads, transpose_a=True)
        ),
        "layer 2 weight grad, per expert": lambda: reduced(
            *weight_grads(hidden_rows, output_grads)
        ),
        "layer 2 weight grad, per expert, stacked": lambda: reduced(
            tf.stack(weight_grads(hidden_rows, output_grads))
        ),
    }
    times = interleaved_medians(
        {name: tf.function(fn, jit_compile=False) for name, fn in parts.items()}, args.reps
    )

    floor_ms = times["floor forward"]
    print(
        f"{num_experts} experts, tokens {args.tokens}, k {args.k}, d {args.dim}, hidden "
        f"{args.hidden}; rows per expert {int(tf.reduce_min(tokens_per_expert))}-"
        f"{int(tf.reduce_max(tokens_per_expert))} (median of {args.reps}, "
        f"keep-freed-memory {args.keep_freed_memory})"
    )
    print()
    print("| part | ms | / floor forward |")
    print("| --- | --- | --- |")
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / floor_ms:.2f} |")
    gemm_excess = sum(
        times[f"layer {i} GEMM, per expert"] - times[f"layer {i} GEMM, one matmul"]
        for i in (1, 2)
    )
    print()
    print(
        "floor forward + routing + per-expert GEMM excess = "
        f"{(floor_ms + times['routing (router, sort, gathers, combine)'] + gemm_excess) / floor_ms:.2f}"
        f" x floor (sparse forward measured: {times['sparse forward'] / floor_ms:.2f} x; "
        "target <= 1.3)"
    )
    stack = (
        times["layer 2 weight grad, per expert, stacked"]
        - times["layer 2 weight grad, per expert"]
    )
    print(
        f"packing one stacked weight gradient: {stack * 1e3:.1f} ms "
        f"= {stack / floor_ms:.2f} x floor forward (a training step packs two)"
    )


if __name__ == "__main__":
    main()
