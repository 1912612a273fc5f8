"""Train a sparse top-2 MoEDense classifier on Fashion-MNIST; report accuracy and expert use.

The README's main job. Loads the embedded default data (Debian's dataset-fashion-mnist,
or files named by --data-dir / KERAS_MOE_DATA_DIR), trains a classifier whose hidden layer
is a noisy top-k mixture of experts (Shazeer et al.) with importance and load balancing
losses, and prints test accuracy, the share of tokens each expert receives, the CV of
importance and load, and the expert activation rate per class.

    python examples/fashion_mnist_moe.py                # about 2 minutes on 2 cores
    python examples/fashion_mnist_moe.py --epochs 1 --experts 16
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_moe import data, regularizers  # noqa: E402
from keras_moe.layers import MoEDense  # noqa: E402
from keras_moe.training.callbacks import StopOnNonFiniteLoss  # noqa: E402

CLASS_NAMES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]


def build_model(num_experts, top_k, units, balance_coefficient):
    inputs = keras.Input((28, 28, 1), name="image")
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Rescaling(1 / 255.0)(x)
    moe = MoEDense(
        units, num_experts=num_experts, top_k=top_k, gate="noisy_top_k",
        activation="relu",
        balance_loss=[regularizers.ImportanceLoss(balance_coefficient),
                      regularizers.LoadLoss(balance_coefficient)],
        return_gates=True, name="moe",
    )
    hidden, gates = moe(x)
    hidden = keras.layers.Dropout(0.2)(hidden)
    logits = keras.layers.Dense(10, name="logits")(hidden)
    return keras.Model(inputs, logits), keras.Model(inputs, gates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--balance", type=float, default=0.1,
                        help="coefficient of the importance and load CV^2 losses (0.1 as in the paper)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="runs/fashion_mnist_moe",
                        help="where the trained model is saved (.keras)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    x_train, y_train = data.load_numpy("fashion_mnist", "train", data_dir=args.data_dir)
    x_test, y_test = data.load_numpy("fashion_mnist", "test", data_dir=args.data_dir)
    print(f"Fashion-MNIST: {len(x_train)} train, {len(x_test)} test images")

    model, gate_model = build_model(args.experts, args.top_k, args.units, args.balance)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    # A diverging run stops at its first non-finite batch with the term that went first
    # (TrainingDiverged), instead of finishing with NaN weights.
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
              validation_split=0.05, verbose=2,
              callbacks=[StopOnNonFiniteLoss(probe=x_train[:256])])
    train_seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=512, verbose=0)

    gates = gate_model.predict(x_test, batch_size=512, verbose=0)
    routed = (gates > 0).astype(np.float64)
    share = routed.sum(0) / routed.sum()
    importance = gates.sum(0)
    load = routed.sum(0)

    def cv(v):
        return float(np.std(v) / (np.mean(v) + 1e-10))

    print()
    print(f"test accuracy: {accuracy:.4f}  (training {train_seconds:.0f} s, "
          f"{args.epochs} epochs, {args.experts} experts, top-{args.top_k})")
    print(f"CV of importance {cv(importance):.3f}, CV of load {cv(load):.3f} on the test set")
    print()
    print("expert activation rate: fraction of test images routed to each expert")
    print("class      " + " ".join(f"e{e:<4d}" for e in range(args.experts)))
    for c, name in enumerate(CLASS_NAMES):
        rates = routed[y_test == c].mean(0)
        print(f"{name:<10} " + " ".join(f"{r:5.2f}" for r in rates))
    print(f"{'all':<10} " + " ".join(f"{r:5.2f}" for r in routed.mean(0)))
    print("share of assignments: " + " ".join(f"{s:.3f}" for s in share))

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    same = np.allclose(restored.predict(x_test[:256], verbose=0),
                       model.predict(x_test[:256], verbose=0), atol=1e-5)
    print(f"\nsaved {path}; reloaded with safe_mode=True, same predictions: {same}")


if __name__ == "__main__":
    main()
