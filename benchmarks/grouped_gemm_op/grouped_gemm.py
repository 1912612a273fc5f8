"""Would a grouped-GEMM custom op make sparse dispatch faster on this CPU? Measured.

Builds `grouped_gemm.cc` (g++ and TensorFlow's headers; `-O3 -march=native`), checks
both ops against a float64 numpy reference on random inputs, and times, side by side
(interleaved medians), the layer-1 forward shape and the layer-2 weight gradient of the
issue's 64-expert MoE (tokens 4096, k 2, d 256, hidden 512):

- TensorFlow, one matmul over all rows: the floor's work;
- TensorFlow, one matmul per expert (what `keras_moe.layers.dispatch.grouped_ffn` runs),
  for the weight gradient packed into the (experts, in, out) tensor the optimizer needs;
- the custom op: each expert (cut into 128-row or 128-column blocks) on one thread with
  Eigen's GEMM, the blocks spread over TensorFlow's intra-op pool;
- the custom op with every row in one expert: Eigen's GEMM against TensorFlow's
  (oneDNN-backed) one matmul on the same work.

    python benchmarks/grouped_gemm_op/grouped_gemm.py [--experts 64] [--reps 15]

The op is an experiment kept for the record, not used by keras_moe: a SavedModel
holding it would need the compiled library wherever it is served.
"""

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_moe.benchmarking import interleaved_medians  # noqa: E402

SOURCE = pathlib.Path(__file__).with_name("grouped_gemm.cc")


def build(directory):
    library = pathlib.Path(directory) / "grouped_gemm.so"
    command = [
        "g++", "-shared", "-fPIC", "-O3", "-DNDEBUG", "-march=native", "-w",
        *tf.sysconfig.get_compile_flags(), str(SOURCE), "-o", str(library),
        *tf.sysconfig.get_link_flags(),
    ]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        sys.exit("g++ not found: this benchmark compiles a TensorFlow custom op.")
    except subprocess.CalledProcessError as error:
        sys.exit(f"building {SOURCE.name} failed:\n{error.stderr[-3000:]}")
    return tf.load_op_library(str(library))


def check(ops, rows, kernels, grads, group_sizes):
    """Both ops against a float64 reference, expert block by expert block."""
    bounds = np.cumsum(group_sizes)[:-1]
    row_blocks = np.split(rows.numpy().astype(np.float64), bounds)
    grad_blocks = np.split(grads.numpy().astype(np.float64), bounds)
    w = kernels.numpy().astype(np.float64)
    expected = np.concatenate([r @ w[e] for e, r in enumerate(row_blocks)])
    expected_dw = np.stack([r.T @ g for r, g in zip(row_blocks, grad_blocks)])
    sizes = tf.constant(group_sizes)
    np.testing.assert_allclose(
        ops.keras_moe_grouped_mat_mul(rows, kernels, sizes).numpy(), expected,
        rtol=1e-4, atol=1e-3,
    )
    np.testing.assert_allclose(
        ops.keras_moe_grouped_weight_grad(rows, grads, sizes).numpy(), expected_dw,
        rtol=1e-4, atol=1e-3,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--rows", type=int, default=8192, help="k * tokens")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        ops = build(directory)
        rng = np.random.default_rng(0)
        group_sizes = np.bincount(
            rng.integers(0, args.experts, args.rows), minlength=args.experts
        ).astype(np.int32)
        rows = tf.constant(rng.normal(size=(args.rows, args.dim)).astype(np.float32))
        kernels = tf.constant(
            rng.normal(size=(args.experts, args.dim, args.hidden)).astype(np.float32)
        )
        hidden = tf.constant(rng.normal(size=(args.rows, args.hidden)).astype(np.float32))
        grads = tf.constant(rng.normal(size=(args.rows, args.dim)).astype(np.float32))
        check(ops, rows, kernels, grads, group_sizes)

        sizes = tf.constant(group_sizes)
        one_group = tf.constant([args.rows], tf.int32)
        first_kernel = kernels[:1]

        def split(tensor):
            return tf.split(tensor, sizes, num=args.experts)

        def per_expert_forward():
            return [tf.matmul(r, w) for r, w in zip(split(rows), tf.unstack(kernels))]

        def per_expert_weight_grads():
            return [
                tf.matmul(h, g, transpose_a=True) for h, g in zip(split(hidden), split(grads))
            ]

        candidates = {
            "forward, TF one matmul (floor)": lambda: tf.reduce_sum(
                tf.matmul(rows, first_kernel[0])),
            "forward, TF per expert": lambda: tf.add_n(
                [tf.reduce_sum(t) for t in per_expert_forward()]),
            "forward, grouped op": lambda: tf.reduce_sum(
                ops.keras_moe_grouped_mat_mul(rows, kernels, sizes)),
            "forward, grouped op, all rows one expert": lambda: tf.reduce_sum(
                ops.keras_moe_grouped_mat_mul(rows, first_kernel, one_group)),
            "weight grad, TF one matmul (floor)": lambda: tf.reduce_sum(
                tf.matmul(hidden, grads, transpose_a=True)),
            "weight grad, TF per expert, stacked": lambda: tf.reduce_sum(
                tf.stack(per_expert_weight_grads())),
            "weight grad, grouped op": lambda: tf.reduce_sum(
                ops.keras_moe_grouped_weight_grad(hidden, grads, sizes)),
        }
        seconds = interleaved_medians(
            {name: tf.function(fn) for name, fn in candidates.items()}, args.reps
        )
        times = {name: 1e3 * s for name, s in seconds.items()}

    print(f"{args.experts} experts, {args.rows} rows ({group_sizes.min()}-"
          f"{group_sizes.max()} per expert), d {args.dim}, hidden {args.hidden}; "
          f"outputs match float64 numpy; median of {args.reps}")
    print()
    print("| candidate | ms | / TF one matmul |")
    print("| --- | --- | --- |")
    for name, ms in times.items():
        floor = times[name.split(",")[0] + ", TF one matmul (floor)"]
        print(f"| {name} | {ms:.2f} | {ms / floor:.2f} |")


if __name__ == "__main__":
    main()
