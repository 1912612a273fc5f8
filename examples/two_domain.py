"""Paper 002's two-domain experiment: accuracy curves and activation-rate tables.

Trains `keras_moe.zoo.two_domain_moe` with the conv gate, the dense gate and the oracle
gate (the paper's baseline: two distinct experts), for each gate loss (none, entropy,
variance; alpha 0.1, beta 0.01, batch 128), and prints per epoch the training and test
accuracy, then the activation-rate tables [domain x expert] on the training and test
sets, in the paper's layout. Saves the 6 accuracy curves per gate loss as one PNG.

How accuracy is measured (the paper's definitions):

- training accuracy: Keras's `accuracy` metric as `fit` reports it at the end of an epoch.
  In each training step Keras computes the predictions, updates the metric with them and
  only then applies the gradient, and the metric accumulates over the epoch: it is the
  accuracy of the predictions made before each batch's update, cumulative over the epoch.
  (The models have no dropout or noise, so training-mode and inference predictions agree.)
- test accuracy: `val_accuracy`, evaluated on the whole test set when the epoch ends.

Data: MNIST + CIFAR-10 (20 classes, 32x32 gray) from `keras_moe.data.load_two_domain`;
offline, its documented stand-in (scikit-learn digits + Fashion-MNIST, balanced), which
the output says.

    nice -n 10 python examples/two_domain.py --epochs 2          # small budget
    python examples/two_domain.py --epochs 20 --train-limit 0    # full data, 20 epochs
"""

import argparse
import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_moe import data  # noqa: E402
from keras_moe.analysis import activation_rates  # noqa: E402
from keras_moe.analysis import gates as gate_reader  # noqa: E402
from keras_moe.zoo.two_domain import two_domain_moe  # noqa: E402

GATE_LABELS = {"conv": "cnngate", "dense": "fcgate", "oracle": "baseline"}


def _inputs(gate, images, domain):
    return {"image": images, "domain": domain} if gate == "oracle" else images


def _subset(td, limit, seed):
    if not limit or limit >= len(td):
        return td.images, td.labels, td.domain
    keep = np.sort(np.random.default_rng(seed).choice(len(td), limit, replace=False))
    return td.images[keep], td.labels[keep], td.domain[keep]


def train_one(gate, loss, args, train, test):
    keras.utils.set_random_seed(args.seed)
    model = two_domain_moe(gate=gate, gate_loss=None if loss == "none" else loss,
                           alpha=args.alpha, beta=args.beta)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    (x, y, d), (xt, yt, dt) = train, test
    start = time.perf_counter()
    history = model.fit(_inputs(gate, x, d), y, batch_size=args.batch_size, epochs=args.epochs,
                        validation_data=(_inputs(gate, xt, dt), yt), shuffle=True, verbose=0)
    seconds = time.perf_counter() - start
    gate_model = gate_reader.gate_model(model, "mixture")
    rates = [
        activation_rates(
            gate_model.predict(_inputs(gate, xs, ds), batch_size=512, verbose=0), ds,
            num_groups=2,
        )
        for xs, ds in ((x, d), (xt, dt))
    ]
    return {
        "train_acc": history.history["accuracy"],
        "test_acc": history.history["val_accuracy"],
        "rates": rates,
        "seconds": seconds,
    }


def print_tables(loss, results, gates, domain_names):
    print(f"\n== gate loss: {loss} ==")
    print("accuracy per epoch (train = cumulative before each step, test = at epoch end)")
    print("| gate | " + " | ".join(f"ep{e + 1} train / test" for e in
                                   range(len(results[gates[0]]["train_acc"]))) + " | seconds |")
    print("| --- " * (len(results[gates[0]]["train_acc"]) + 2) + "|")
    for gate in gates:
        r = results[gate]
        cells = " | ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(r["train_acc"], r["test_acc"]))
        print(f"| {gate} | {cells} | {r['seconds']:.0f} |")
    print("activation rates [domain x expert]:")
    print(f"{'':<22}{'trainNN0':>12}{'trainNN1':>12}{'testNN0':>12}{'testNN1':>12}")
    for gate in gates:
        train_rates, test_rates = results[gate]["rates"]
        for row, name in enumerate(domain_names):
            label = f"{GATE_LABELS[gate]}{name}"
            values = list(train_rates[row]) + list(test_rates[row])
            print(f"{label:<22}" + "".join(f"{v:>12.4g}" for v in values))


def plot(all_results, gates, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = list(all_results)
    fig, axes = plt.subplots(1, len(losses), figsize=(5 * len(losses), 4), squeeze=False)
    for ax, loss in zip(axes[0], losses):
        for gate in gates:
            r = all_results[loss][gate]
            epochs = np.arange(1, len(r["train_acc"]) + 1)
            line, = ax.plot(epochs, r["train_acc"], "-o", label=f"{gate} train")
            ax.plot(epochs, r["test_acc"], "--s", color=line.get_color(), label=f"{gate} test")
        ax.set_title(f"gate loss: {loss}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10,
                        help="epochs per model (the paper does not state its count)")
    parser.add_argument("--batch-size", type=int, default=128, help="128 in the paper")
    parser.add_argument("--learning-rate", type=float, default=1e-3,
                        help="Adam learning rate (the paper does not state its optimiser)")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--beta", type=float, default=0.01)
    parser.add_argument("--gates", default="conv,dense,oracle")
    parser.add_argument("--losses", default="none,entropy,variance")
    parser.add_argument("--train-limit", type=int, default=0,
                        help="random training subset size (0: all)")
    parser.add_argument("--test-limit", type=int, default=0, help="test subset size (0: all)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--download", action="store_true",
                        help="let TFDS download MNIST and CIFAR-10 when they are not on disk")
    parser.add_argument("--out", default="runs/two_domain", help="folder for the PNG")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gates = args.gates.split(",")
    losses = args.losses.split(",")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_set = data.load_two_domain("train", data_dir=args.data_dir, seed=args.seed,
                                          download=args.download)
        test_set = data.load_two_domain("test", data_dir=args.data_dir, seed=args.seed,
                                         download=args.download)
    print(f"data: {train_set.source}")
    if train_set.stand_in:
        print("NOTE: offline stand-in, not the paper's MNIST + CIFAR-10: domain 0 = "
              f"{train_set.domain_names[0]}, domain 1 = {train_set.domain_names[1]}")
    train = _subset(train_set, args.train_limit, args.seed)
    test = _subset(test_set, args.test_limit, args.seed + 1)
    train = (train[0].astype("float32") / 255.0, train[1], train[2].astype("int32"))
    test = (test[0].astype("float32") / 255.0, test[1], test[2].astype("int32"))
    print(f"train {len(train[1])} images, test {len(test[1])} images; epochs {args.epochs}, "
          f"batch {args.batch_size}, Adam {args.learning_rate}, alpha {args.alpha}, "
          f"beta {args.beta}")

    all_results = {}
    for loss in losses:
        results = {}
        for gate in gates:
            if gate == "oracle" and loss != "none" and "none" in all_results:
                # The oracle's gate is fixed: a gate loss adds a constant, no gradient, so
                # training is the same as without it (same seed): reuse that run.
                results[gate] = all_results["none"][gate]
                continue
            results[gate] = train_one(gate, loss, args, train, test)
        all_results[loss] = results
        print_tables(loss, results, gates, train_set.domain_names)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "two_domain_accuracy.png")
    plot(all_results, gates, path)
    print(f"\naccuracy curves: {path}")


if __name__ == "__main__":
    main()
