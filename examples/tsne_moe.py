"""t-SNE-gated spatially sparse MoE on Fashion-MNIST (paper 000), with its baselines.

1. Trains a 2-D parametric t-SNE map of the pixels on its own (the paper's first stage)
   and reports its quality on the test set: trustworthiness (sklearn, 12 neighbours)
   and kNN accuracy in the plane, beside a 2-D PCA for scale.
2. Places the experts on the map (k-means centres of the training points) and trains
   the t-SNE-gated sparse MoE (`keras_moe.zoo.tsne_moe`) with the map frozen; then the
   same model with the map fine-tuned jointly (t-SNE term as add_loss), the same sparse
   experts behind a top-k softmax gate, and dense MLPs with the same number of weights
   used per example (expert + classifier weights; and including the gate's cost).
3. Prints an accuracy table, the expert activation rate per class, and saves the map as
   a scatter plot coloured by class with the expert positions (PNG).

    nice -n 10 python examples/tsne_moe.py       # about 5 min on 2 shared cores (10k images)
    python examples/tsne_moe.py --train-size 20000 --epochs 15   # about 15 min
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_moe import data  # noqa: E402
from keras_moe.layers.tsne_gate import (  # noqa: E402
    ParametricTSNEMap,
    expert_positions,
    fit_parametric_tsne,
    nearest_neighbour_sq_distance,
)

from keras_moe.analysis import gates as gate_reader  # noqa: E402
from keras_moe.zoo import spatially_sparse as zoo_tsne

CLASS_NAMES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--map-epochs", type=int, default=30)
    p.add_argument("--map-batch-size", type=int, default=500)
    p.add_argument("--map-hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-units", type=int, default=64)
    p.add_argument("--local-density", type=float, default=0.5)
    p.add_argument("--remote-density", type=float, default=0.05)
    p.add_argument("--input-density", type=float, default=0.5)
    p.add_argument("--positions", choices=["kmeans", "grid"], default="kmeans")
    p.add_argument("--temperature-scale", type=float, default=1.0,
                   help="temperature = scale x mean squared nearest-expert distance")
    p.add_argument("--tsne-weight", type=float, default=0.1)
    p.add_argument("--no-joint", action="store_true", help="skip the joint-map run")
    p.add_argument("--output-dir", default="runs/tsne_moe")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def dataset(x, y, batch_size, seed):
    return (tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size, drop_remainder=True))


def train(model, train_ds, x_test, y_test, epochs):
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    start = time.time()
    history = model.fit(train_ds, epochs=epochs, verbose=0, shuffle=False)
    seconds = time.time() - start
    logits = model.predict(x_test, batch_size=1000, verbose=0)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == y_test))
    return accuracy, seconds, history.history["loss"]


def kernel_count(layers):
    return int(sum(np.prod(w.shape) for layer in layers for w in layer.weights
                   if "kernel" in w.path))


def main():
    args = parse_args()
    keras.utils.set_random_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    from sklearn.decomposition import PCA
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import KNeighborsClassifier

    x_train, y_train, source = data.load_numpy(
        "fashion_mnist", "train", data_dir=args.data_dir, return_source=True)
    x_test, y_test = data.load_numpy("fashion_mnist", "test", data_dir=args.data_dir)
    order = np.random.RandomState(args.seed).permutation(len(x_train))[: args.train_size]
    x_train, y_train = x_train[order], y_train[order]
    flat_train = x_train.reshape(len(x_train), -1).astype("float32") / 255.0
    flat_test = x_test.reshape(len(x_test), -1).astype("float32") / 255.0
    print(f"data: {source}; train {len(x_train)}, test {len(x_test)}")

    # 1. The map, trained on its own.
    tsne_map = ParametricTSNEMap(hidden_units=tuple(args.map_hidden),
                                 perplexity=args.perplexity, name="tsne_map")
    start = time.time()
    history = fit_parametric_tsne(tsne_map, flat_train, batch_size=args.map_batch_size,
                                  epochs=args.map_epochs, seed=args.seed)
    kl = history.history["loss"]
    map_model = keras.Sequential([keras.Input((784,)), tsne_map])
    z_train = map_model.predict(flat_train, batch_size=1000, verbose=0)
    z_test = map_model.predict(flat_test, batch_size=1000, verbose=0)
    print(f"map: {args.map_epochs} epochs, batch {args.map_batch_size}, perplexity "
          f"{args.perplexity:g}, KL {kl[0]:.3f} -> {kl[-1]:.3f} ({time.time() - start:.0f} s)")
    sub = np.random.RandomState(1).permutation(len(flat_test))[:2000]
    pca = PCA(2, random_state=0).fit(flat_train)
    p_train, p_test = pca.transform(flat_train), pca.transform(flat_test)
    print("| map | trustworthiness (12 nn, 2000 test) | 1-NN acc | 5-NN acc |")
    print("| --- | --- | --- | --- |")
    for name, a, b in (("parametric t-SNE", z_train, z_test), ("PCA (2-D)", p_train, p_test)):
        trust = trustworthiness(flat_test[sub], b[sub], n_neighbors=12)
        knn = [KNeighborsClassifier(k).fit(a, y_train).score(b, y_test) for k in (1, 5)]
        print(f"| {name} | {trust:.4f} | {knn[0]:.4f} | {knn[1]:.4f} |")

    # 2. Experts on the map; the models.
    positions = expert_positions(z_train, args.experts, args.positions, seed=args.seed)
    temperature = args.temperature_scale * nearest_neighbour_sq_distance(positions)
    print(f"experts: {args.experts} at {args.positions} positions, top-{args.top_k}, "
          f"temperature {temperature:.3g}")
    common = dict(input_shape=(28, 28, 1), num_classes=10, num_experts=args.experts,
                  top_k=args.top_k, expert_units=args.expert_units,
                  input_density=args.input_density, local_density=args.local_density,
                  remote_density=args.remote_density, perplexity=args.perplexity,
                  seed=args.seed)
    train_ds = dataset(x_train, y_train, args.batch_size, args.seed)
    rows, gate_models = [], {}

    def run(label, model, gate_cost):
        acc, seconds, losses = train(model, train_ds, x_test, y_test, args.epochs)
        if any(layer.name == "gate" for layer in model.layers):
            gm = gate_reader.gate_model(model, "gate", outputs="all")
            outs = gm.predict(x_test, batch_size=1000, verbose=0)
            gate_models[label] = (model, outs)
            used = float(zoo_tsne.weights_per_example(model, outs["dispatch_mask"]).mean())
        else:
            used = float(kernel_count(model.layers))
        rows.append((label, acc, used, gate_cost, seconds, losses[0], losses[-1]))

    frozen = zoo_tsne.tsne_moe(gate="tsne", mapping=tsne_map, map_training="frozen",
                               temperature=temperature, **common)
    frozen.get_layer("gate").set_positions(positions)
    map_cost = kernel_count([tsne_map]) + 2 * args.experts
    # Weights used per example at the initial routing, to size the dense baselines.
    init_mask = gate_reader.gate_model(frozen, "gate", outputs="all").predict(x_train, batch_size=1000,
                                                    verbose=0)["dispatch_mask"]
    used0 = float(zoo_tsne.weights_per_example(frozen, init_mask).mean())
    run("t-SNE gate, map frozen (paper)", frozen, map_cost)

    if not args.no_joint:
        joint_map = ParametricTSNEMap.from_config(tsne_map.get_config())
        joint_map.build((None, 784))
        joint_map.set_weights(tsne_map.get_weights())
        joint = zoo_tsne.tsne_moe(gate="tsne", mapping=joint_map, map_training="joint",
                                  tsne_weight=args.tsne_weight, temperature=temperature,
                                  **common)
        joint.get_layer("gate").set_positions(positions)
        run(f"t-SNE gate, map joint (weight {args.tsne_weight:g})", joint, map_cost)

    softmax = zoo_tsne.tsne_moe(gate="softmax", **common)
    run("softmax top-k gate", softmax, 784 * args.experts + args.experts)

    for label, target in (("dense MLP, = expert weights", used0),
                          ("dense MLP, = expert + gate weights", used0 + map_cost)):
        width = zoo_tsne.matched_dense_width(target, 784, 10)
        mlp = zoo_tsne.tsne_moe_dense_mlp(input_shape=(28, 28, 1), num_classes=10,
                                          hidden_units=(width, width))
        run(f"{label} ({width}-{width})", mlp, 0)

    print(f"\nclassifiers: {len(x_train)} training images, {args.epochs} epochs, batch "
          f"{args.batch_size}, Adam 1e-3; test on {len(x_test)}")
    print("| model | test acc | weights used / example | gate weights | train s | "
          "loss first -> last epoch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, acc, used, gate_cost, seconds, l0, l1 in rows:
        print(f"| {label} | {acc:.4f} | {used:,.0f} | {gate_cost:,} | {seconds:.0f} | "
              f"{l0:.3f} -> {l1:.3f} |")

    # 3. Specialisation: activation rate of each expert per class (t-SNE gate, frozen).
    for label, (model, outs) in gate_models.items():
        mask = outs["dispatch_mask"]
        load = mask.sum(axis=0)
        cv = float(load.std() / load.mean())
        rates = np.stack([mask[y_test == c].mean(axis=0) for c in range(10)])
        purity = float(np.mean(rates.max(axis=0) / np.maximum(rates.sum(axis=0), 1e-9)))
        print(f"\n{label}: CV of load {cv:.3f}, mean share of an expert's activations "
              f"from its top class {purity:.3f}")
        if not label.startswith("t-SNE gate, map frozen"):
            continue
        print("activation rate (%) of each expert per class")
        print("| class | " + " | ".join(
            f"E{e}" for e in range(args.experts)) + " |")
        print("| --- " * (args.experts + 1) + "|")
        for c in range(10):
            print(f"| {CLASS_NAMES[c]} | " + " | ".join(
                f"{100 * r:.0f}" for r in rates[c]) + " |")

    # PNG: the map with the expert positions (after training) of the frozen-map model.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = frozen.get_layer("gate").positions.numpy()
    fig, ax = plt.subplots(figsize=(8, 8))
    scatter = ax.scatter(z_test[:, 0], z_test[:, 1], c=y_test, cmap="tab10", s=2, alpha=0.6)
    ax.scatter(positions[:, 0], positions[:, 1], marker="x", c="grey", s=60,
               label="expert (initial)")
    ax.scatter(final[:, 0], final[:, 1], marker="X", c="black", s=90,
               label="expert (trained)")
    for e, (px, py) in enumerate(final):
        ax.annotate(str(e), (px, py), textcoords="offset points", xytext=(5, 5), fontsize=9)
    handles = scatter.legend_elements()[0]
    legend = ax.legend(handles, CLASS_NAMES, loc="upper right", fontsize=8, markerscale=1.5)
    ax.add_artist(legend)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("Parametric t-SNE map of Fashion-MNIST test images and expert positions")
    path = os.path.join(args.output_dir, "tsne_map.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"\nmap figure: {path}")


if __name__ == "__main__":
    main()
