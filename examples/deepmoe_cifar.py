"""DeepMoE on CIFAR (Wang et al., UAI 2019): the paper's recipe, every setting a flag.

Trains any of three models on the same data and budget and prints, for each, the test
accuracy, the gate density and the effective multiply-adds against the plain ResNet's
static count:

- `baseline`: `keras_moe.zoo.resnet_cifar(depth=...)` for joint + fine-tune epochs;
- `narrow`: `deepmoe_resnet_cifar(depth=...)`, the baseline's channels, gated;
- `wide`: `deepmoe_resnet_cifar(depth=..., wide=True)`, block-internal channels doubled,
  with `GateDensityTarget` steering lambda toward `--wide-density` (paper: about half of
  the channels open at inference).

Gate heads are redrawn uniformly in `--gate-init-range` (default 0,2:
`keras_moe.training.deepmoe.spread_gate_heads`; the paper does not give W_g's
initialisation) so that the open fraction falls smoothly under the L1 term, and lambda
starts at `--gate-l1` and is steered by `GateDensityTarget` (see its docstring).

DeepMoE models follow Procedure 1 (`train_deepmoe_two_phase`): `--joint-epochs` with
lambda and mu, then `--finetune-epochs` with the embedding and gate heads frozen and
lambda = mu = 0.

Paper recipe (the defaults): SGD, learning rate 0.1 divided by 10 at epochs 150 and 250,
momentum 0.9, 270 joint + 80 fine-tune epochs (350 for the baseline), mu = 1, lambda in
[0.001, 8] in the paper's sum normalisation, batch 128, pad-crop-flip augmentation.
Choices: weight decay 1e-4 (He et al.'s CIFAR value; the paper cites their practice),
applied as Keras' decoupled `SGD(weight_decay=...)` to every trainable variable; lambda
here is `DeepMoEModel.gate_l1` (mean normalisation; see its docstring).

Data: `--dataset cifar10` / `cifar100` read local CIFAR python archives (`--data-dir`)
or TFDS; without them (this machine) the default is Fashion-MNIST (Debian's
`dataset-fashion-mnist`), zero-padded from 28x28 to 32x32 and tiled to 3 channels, with
the same pipeline. The full recipe does not fit a 2-core CPU: use `--train-size`,
`--joint-epochs`, ... for a scaled run, and say so when quoting its numbers.

Example (the scaled comparison of zoo/deepmoe.md):

    nice -n 10 python examples/deepmoe_cifar.py --depth 8 --train-size 8000 \
        --test-size 2000 --joint-epochs 3 --finetune-epochs 1 --lr-drops 3 \
        --embedding-widths 8,16,32,64 --gate-l1 1 --narrow-density 0.75 --wide-density 0.5

Reference:
    Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, section 5.
"""

import argparse
import time

import keras
import numpy as np

from keras_moe import data as kd
from keras_moe import zoo
from keras_moe.analysis import flops
from keras_moe.analysis import shuffling
from keras_moe.training.deepmoe import GateDensityTarget
from keras_moe.training.deepmoe import spread_gate_heads
from keras_moe.training.deepmoe import train_deepmoe_two_phase

MODELS = ("baseline", "narrow", "wide")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion_mnist",
                   choices=("fashion_mnist", "cifar10", "cifar100"))
    p.add_argument("--data-dir", default=None, help="directory with the data files")
    p.add_argument("--source", default="auto", choices=("auto", "files", "tfds"))
    p.add_argument("--models", default="baseline,narrow,wide",
                   help="comma-separated subset of baseline,narrow,wide")
    p.add_argument("--depth", type=int, default=56, help="ResNet depth 6n+2")
    p.add_argument("--width-multiplier", type=float, default=1.0)
    p.add_argument("--embedding-widths", default="32,64,128,256",
                   help="channels of the embedding's 4 stride-2 convolutions")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--lr-drops", default="150,250",
                   help="epochs at which the learning rate is divided by 10, or 'none'")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--joint-epochs", type=int, default=270)
    p.add_argument("--finetune-epochs", type=int, default=80)
    p.add_argument("--baseline-epochs", type=int, default=None,
                   help="default: joint + fine-tune epochs (same budget)")
    p.add_argument("--gate-l1", type=float, default=0.1, help="lambda (mean normalisation)")
    p.add_argument("--mu", type=float, default=1.0, help="embedding loss weight")
    p.add_argument("--narrow-density", type=float, default=None,
                   help="target gate density for narrow (default: fixed lambda)")
    p.add_argument("--wide-density", type=float, default=0.5,
                   help="target gate density for wide (0 for a fixed lambda)")
    p.add_argument("--density-every", type=int, default=4,
                   help="batches between lambda updates of GateDensityTarget")
    p.add_argument("--density-factor", type=float, default=1.2,
                   help="GateDensityTarget's largest multiplier of lambda per update")
    p.add_argument("--density-gain", type=float, default=2.0,
                   help="GateDensityTarget's gain (log lambda per unit density error)")
    p.add_argument("--density-lookahead", type=float, default=20,
                   help="GateDensityTarget's lookahead in batches (0: no rate term)")
    p.add_argument("--density-ramp", type=int, default=0,
                   help="batches over which GateDensityTarget's target falls from 1")
    p.add_argument("--gate-init-range", default="0,2",
                   help="draw the gate-head kernels W_g uniformly in LOW,HIGH "
                        "(spread_gate_heads), or 'none' for ReLUGate's 1 +- 0.01")
    p.add_argument("--train-size", type=int, default=None, help="first N training examples")
    p.add_argument("--test-size", type=int, default=None, help="first N test examples")
    p.add_argument("--shuffle-target", type=int, default=None,
                   help="also run the gate-embedding shuffling analysis (sec. 5.3.1) for "
                        "this class (Fashion-MNIST groups: keras_moe.analysis.shuffling)")
    p.add_argument("--shuffle-repeats", type=int, default=5)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=2)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in MODELS:
            p.error(f"--models entries must be in {MODELS}, got {m!r}")
    args.embedding_widths = tuple(int(w) for w in args.embedding_widths.split(","))
    args.gate_init_range = (None if args.gate_init_range == "none" else
                            tuple(float(v) for v in args.gate_init_range.split(",")))
    args.lr_drops = [] if args.lr_drops == "none" else [int(e) for e in args.lr_drops.split(",")]
    return args


def to_32x32x3(x):
    """uint8 (N, H, W, C) -> (N, 32, 32, 3): zero-pad 28x28 to 32x32, tile 1 channel to 3."""
    if x.shape[1:3] == (28, 28):
        x = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def load(args):
    def split(name, size):
        x, y, source = kd.load_numpy(args.dataset, name, data_dir=args.data_dir,
                                     source=args.source, return_source=True)
        x = to_32x32x3(x)[:size]
        return x, y[:size].astype("int64"), source

    x_train, y_train, source = split("train", args.train_size)
    x_test, y_test, _ = split("test", args.test_size)
    mean, std = kd.MEAN_STD[args.dataset]
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    train = kd.cifar_pipeline((x_train, y_train), training=not args.no_augment,
                              batch_size=args.batch_size, seed=args.seed, mean=mean, std=std,
                              shuffle=True)
    test = kd.cifar_pipeline((x_test, y_test), training=False, batch_size=256,
                             mean=mean, std=std)
    def standardise(x):
        return ((x.astype("float32") / 255.0 - np.array(mean)) / np.array(std)).astype("float32")

    num_classes = int(max(y_train.max(), y_test.max())) + 1
    test_arrays = (standardise(x_test), y_test)
    return (train, test, standardise(x_train[:512]), num_classes, source, len(x_train),
            test_arrays)


def optimizer(args, steps_per_epoch):
    lr = args.lr
    if args.lr_drops:
        boundaries = [e * steps_per_epoch for e in args.lr_drops]
        values = [args.lr / 10 ** i for i in range(len(boundaries) + 1)]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    return keras.optimizers.SGD(lr, momentum=args.momentum,
                                weight_decay=args.weight_decay or None)


def build(kind, args, num_classes):
    common = dict(input_shape=(32, 32, 3), num_classes=num_classes, depth=args.depth,
                  width_multiplier=args.width_multiplier)
    if kind == "baseline":
        return zoo.resnet_cifar(**common)
    model = zoo.deepmoe_resnet_cifar(
        wide=kind == "wide", gate_l1=args.gate_l1, embedding_loss_weight=args.mu,
        embedding_widths=args.embedding_widths, **common)
    if args.gate_init_range is not None:
        spread_gate_heads(model, *args.gate_init_range, seed=args.seed)
    return model


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    train, test, probe, num_classes, source, n_train, test_arrays = load(args)
    steps = -(-n_train // args.batch_size)
    baseline_flops = flops.static_flops(build("baseline", args, num_classes))
    print(f"data: {args.dataset} from {source}; {n_train} training examples, "
          f"{num_classes} classes, 32x32x3")
    print(f"baseline ResNet-{args.depth} static MACs per example: {baseline_flops / 1e6:.2f}M")
    results = []
    for kind in args.models:
        keras.utils.set_random_seed(args.seed)
        model = build(kind, args, num_classes)
        model.compile(optimizer(args, steps),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        start = time.time()
        target = args.narrow_density if kind == "narrow" else args.wide_density
        if kind == "baseline":
            epochs = args.baseline_epochs or args.joint_epochs + args.finetune_epochs
            model.fit(train, epochs=epochs, verbose=args.verbose)
        else:
            callbacks = []
            if target:
                callbacks.append(GateDensityTarget(
                    target, data=probe, every=args.density_every, factor=args.density_factor,
                    gain=args.density_gain, lookahead=args.density_lookahead,
                    ramp=args.density_ramp))
            train_deepmoe_two_phase(model, train, joint_epochs=args.joint_epochs,
                                    finetune_epochs=args.finetune_epochs, callbacks=callbacks,
                                    verbose=args.verbose)
            for c in callbacks:
                densities = [r.density for r in c.records]
                print(f"{kind}: GateDensityTarget({c.target_density}) {len(densities)} updates, "
                      f"probe density min {min(densities):.3f}, last {densities[-1]:.3f}, "
                      f"lambda peak {max(r.gate_l1 for r in c.records):.3g}, "
                      f"last {c.records[-1].gate_l1:.3g}")
        seconds = time.time() - start
        _, accuracy = model.evaluate(test, verbose=0)
        if kind == "baseline":
            density, effective = 1.0, float(baseline_flops)
            static = baseline_flops
        else:
            density = flops.gate_density(model, test, overall=True)
            report = flops.effective_flops(model, test)
            effective, static = report.total, report.static
        results.append((kind, accuracy, density, effective, static, seconds))
        print(f"{kind}: test accuracy {accuracy:.4f}, gate density {density:.3f}, "
              f"effective MACs {effective / 1e6:.2f}M (static {static / 1e6:.2f}M), "
              f"{effective / baseline_flops:.2f}x the baseline; {seconds:.0f} s training")
        if kind != "baseline" and args.shuffle_target is not None:
            if args.dataset != "fashion_mnist":
                print("shuffling: coarse groups are only built in for fashion_mnist "
                      "(use keras_moe.analysis.shuffling with CIFAR-100's coarse labels)")
            else:
                r = shuffling.gate_embedding_shuffling(
                    model, *test_arrays, target_class=args.shuffle_target,
                    groups=shuffling.FASHION_MNIST_GROUPS, repeats=args.shuffle_repeats,
                    seed=args.seed)
                donors = ", ".join(f"{c}: {a:.3f}" for c, a in r.accuracy.items())
                print(f"{kind} shuffling, class {r.target_class} ({r.num_examples} inputs): "
                      f"own e {r.own_accuracy:.3f}; in-group {r.in_group_accuracy:.3f}, "
                      f"out-of-group {r.out_group_accuracy:.3f}; by donor class {donors}")
    print()
    print("| model | test accuracy | gate density | effective MACs | x baseline | train s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, accuracy, density, effective, static, seconds in results:
        print(f"| {kind} | {accuracy:.4f} | {density:.3f} | {effective / 1e6:.2f}M | "
              f"{effective / baseline_flops:.2f} | {seconds:.0f} |")
    return results


if __name__ == "__main__":
    main()
