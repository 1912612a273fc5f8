"""Shazeer et al.'s noisy top-k classifier on Fashion-MNIST: expert balance and scaling.

Two measurements with `keras_moe.zoo.sparse_moe_classifier`:

1. Expert load with and without the balancing losses (importance + load CV^2, coefficient
   `--balance`, 0.1 in the paper, against 0): test accuracy, the coefficient of variation
   (std / mean) of the importance (summed gates) and of the load (tokens routed per
   expert) on the test set, and the per-expert token counts.
2. Growing the number of experts at fixed k: parameters, forward FLOPs per example
   (analytic), test accuracy, the median time of a training step (`fit`'s own steps, first
   5 excluded) and of a step on one larger batch (`--timing-batch`, after training; at
   batch 128 each of many experts gets a few rows and per-op overhead dominates). With sparse
   dispatch only the k chosen experts run per example, so parameters grow linearly with
   the experts while the compute per example stays flat.

Shazeer et al. report language modelling and translation, not Fashion-MNIST: there is no
paper number to compare with. Data: Debian's Fashion-MNIST (the embedded default).

    nice -n 10 python examples/sparse_moe.py --epochs 1 --train-limit 20000   # small budget
    python examples/sparse_moe.py --epochs 10 --train-limit 0                 # full data
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_moe import data  # noqa: E402
from keras_moe.training.callbacks import gate_statistics  # noqa: E402
from keras_moe.zoo.shazeer import sparse_moe_classifier  # noqa: E402


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step (batch begin to batch end)."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def time_steps(model, x, y, batch_size, steps=10):
    """Median wall time (ms) of `steps` training steps on one fixed batch, after 2 warm-up."""
    xb, yb = x[:batch_size], y[:batch_size]
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        model.train_on_batch(xb, yb)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def flops_per_example(input_dim, units, num_experts, top_k, num_layers, num_classes):
    """Multiply-adds x 2 of one forward pass: top_k single-layer experts, the gate's W_g
    and W_noise, the output layer (dispatch bookkeeping not counted)."""
    flops, width = 0, input_dim
    for _ in range(num_layers):
        flops += 2 * top_k * width * units + 2 * 2 * width * num_experts
        width = units
    return flops + 2 * width * num_classes


def train(args, x, y, xt, yt, num_experts, balance):
    keras.utils.set_random_seed(args.seed)
    model = sparse_moe_classifier(
        num_layers=args.layers, units=args.units, num_experts=num_experts, top_k=args.top_k,
        importance_weight=balance, load_weight=balance, rescale=1 / 255.0,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    timer = StepTimer()
    model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=0,
              callbacks=[timer])
    _, accuracy = model.evaluate(xt, yt, batch_size=512, verbose=0)
    steps = np.asarray(timer.seconds[5:] or timer.seconds)
    return model, accuracy, 1000 * float(np.median(steps))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1, help="MoE hidden layers")
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--stats-experts", type=int, default=32,
                        help="experts per layer in the balance comparison")
    parser.add_argument("--experts", default="4,16,64",
                        help="comma-separated expert counts for the scaling table")
    parser.add_argument("--balance", type=float, default=0.1,
                        help="importance and load loss coefficient (0.1 in the paper)")
    parser.add_argument("--timing-batch", type=int, default=2048,
                        help="batch of the extra step timing after training (the paper: large "
                        "batches keep every expert's share of the batch large)")
    parser.add_argument("--train-limit", type=int, default=0, help="training subset (0: all)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    x, y = data.load_numpy("fashion_mnist", "train", data_dir=args.data_dir)
    xt, yt = data.load_numpy("fashion_mnist", "test", data_dir=args.data_dir)
    if args.train_limit and args.train_limit < len(x):
        keep = np.random.default_rng(args.seed).choice(len(x), args.train_limit, replace=False)
        x, y = x[keep], y[keep]
    x, xt = x.astype("float32"), xt.astype("float32")
    print(f"Fashion-MNIST: {len(x)} train, {len(xt)} test images; epochs {args.epochs}, "
          f"batch {args.batch_size}, {args.layers} MoE layer(s) of {args.units} units, "
          f"top-{args.top_k}")

    print(f"\n1. expert load on the test set, {args.stats_experts} experts, top-{args.top_k}")
    print("| balancing losses | layer | test acc | CV importance | CV load | min / max tokens |")
    print("| --- | --- | --- | --- | --- | --- |")
    counts_rows = []
    for balance in (args.balance, 0.0):
        model, accuracy, _ = train(args, x, y, xt, yt, args.stats_experts, balance)
        for name, stats in gate_statistics(model, xt).items():
            counts = stats["counts"].astype(int)
            print(f"| {balance:g} | {name} | {accuracy:.4f} | {stats['importance_cv']:.3f} | "
                  f"{stats['load_cv']:.3f} | {counts.min()} / {counts.max()} |")
            counts_rows.append((balance, name, counts))
    print("tokens per expert (test set, each token counted once per chosen expert):")
    for balance, name, counts in counts_rows:
        print(f"  balance {balance:g} {name}: {' '.join(str(c) for c in counts)}")

    print(f"\n2. growing the experts at top-{args.top_k} (balance {args.balance:g})")
    big = args.timing_batch
    print(f"| experts | parameters | MFLOP / example (forward) | test acc | "
          f"ms / train step, batch {args.batch_size} (fit median) | "
          f"ms / train step, batch {big} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for num_experts in [int(e) for e in args.experts.split(",")]:
        model, accuracy, step_ms = train(args, x, y, xt, yt, num_experts, args.balance)
        big_ms = time_steps(model, x, y, big)
        mflops = flops_per_example(784, args.units, num_experts, args.top_k, args.layers, 10) / 1e6
        print(f"| {num_experts} | {model.count_params():,} | {mflops:.3f} | {accuracy:.4f} | "
              f"{step_ms:.1f} | {big_ms:.1f} |")


if __name__ == "__main__":
    main()
