"""DeepMoE's saved compute, measured: skip-channel latency and training throughput.

Two measurements, each side by side in one process (issue 4's targets are printed with
the ratios):

1. Batch-1 inference latency (the serving case) on 32x32x3 images of
   - wide-DeepMoE-56 (`deepmoe_resnet56(wide=True)`) through the skip-channel path
     (`keras_moe.inference.SkipChannelRunner`), with about 50% of the channels of every
     gated layer open;
   - the same, with `skip_stream_inputs=False` (convolutions reading the residual stream
     read all of its channels; only their output channels are skipped);
   - the same wide-DeepMoE-56 through `model(x)` (the masked computation: every channel
     computed, closed ones multiplied by 0), for reference;
   - ResNet-56 (`resnet56()`) and the dense wide ResNet-56 (`resnet56(wide=True)`), each
     both as Keras runs it (`model(x)` under `tf.function`) and through the skip path's
     own executor (`SkipChannelRunner` on a model without gates: weights as constants,
     batch norms folded), the like-for-like baseline: part of the skip path's speed comes
     from that folding, not from skipping;
   - ResNet-56 at 1/16 of its width (1, 2 and 4 channels per stage: about 1/256 of its
     multiply-adds, the same ops), both ways: what batch-1 inference costs on this CPU
     when the arithmetic is next to nothing, the per-layer floor that no channel skipping
     can go below.
   Targets: wide-DeepMoE-56 (skip) <= 1.2x ResNet-56 and <= 0.6x dense wide ResNet-56,
   printed against both baselines.
2. Training throughput (images/s, batch 128, SGD with momentum, `train_on_batch`) of
   narrow DeepMoE-56 (`deepmoe_resnet56()`, gates, embedding and both loss terms) against
   ResNet-56. Target: >= 0.85x ResNet-56.

How the density is forced (the models are untrained): every `ReLUGate` head of the
wide-DeepMoE gets a kernel `W` (classes x channels) whose columns are `-1` for a random
half of its channels (chosen per layer with a fixed seed; `floor(C / 2)` closed, the rest
open) and uniform in [0.5, 1.5] for the others. The embedding output `e` is on the
simplex, so `G = ReLU(e W)` is exactly 0 for the closed channels and in [0.5, 1.5] for the
open ones, for every image: 50% of every gated layer's channels open (the residual
stream's gates included), the paper's wide-DeepMoE operating point ("half of the
convolutional channels are selected at inference"). A trained model varies its open set
by image; the cost of one image depends only on how many channels are open.

Every model runs under `tf.function` (traced and warmed up before timing), all in one
process under the same TensorFlow threading settings (printed in the header). Timings are
medians over interleaved repetitions (each candidate timed once per round), so load on this
shared machine hits all candidates alike; read the ratios rather than the absolute times.

    python benchmarks/deepmoe.py
    python benchmarks/deepmoe.py --latency-reps 50 --train-reps 3   # quicker
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_moe.benchmarking import interleaved_medians  # noqa: E402
from keras_moe.inference import SkipChannelRunner  # noqa: E402
from keras_moe.layers.gates import ReLUGate  # noqa: E402
from keras_moe.zoo import deepmoe  # noqa: E402

SHAPE = (32, 32, 3)


def force_density(model, open_fraction, seed=0):
    """Sets every gate head so that `open_fraction` of its channels are open for any image.

    Returns the measured mean open fraction over the gated layers.
    """
    rng = np.random.default_rng(seed)
    for layer in model.network.layers:
        if not isinstance(layer, ReLUGate):
            continue
        classes, channels = layer.kernel.shape
        kernel = rng.uniform(0.5, 1.5, size=(classes, channels)).astype("float32")
        num_closed = channels - int(round(open_fraction * channels))
        kernel[:, rng.permutation(channels)[:num_closed]] = -1.0
        layer.kernel.assign(kernel)
    return model


def open_fraction(model, images):
    gates = model.network(images, training=False)["gates"]
    return float(np.mean([np.mean(np.asarray(g) > 0) for g in gates]))


def forward_fn(model, images):
    compiled = tf.function(lambda x: model(x, training=False), jit_compile=False)
    images = tf.constant(images)
    return lambda: compiled(images).numpy()


def train_fn(model, images, labels):
    model.compile(
        keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    return lambda: model.train_on_batch(images, labels)


def verdict(ok):
    return "MET" if ok else "NOT MET"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--density", type=float, default=0.5,
                        help="open fraction of every gated layer of wide-DeepMoE-56")
    parser.add_argument("--latency-reps", type=int, default=100)
    parser.add_argument("--train-reps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    image = tf.constant(rng.normal(size=(1,) + SHAPE).astype("float32"))

    wide_moe = force_density(deepmoe.deepmoe_resnet56(wide=True), args.density)
    runner = SkipChannelRunner(wide_moe)
    density = open_fraction(wide_moe, image)
    max_error = float(np.max(np.abs(np.asarray(runner(image)) - np.asarray(wide_moe(image)))))
    resnet, wide_resnet = deepmoe.resnet56(), deepmoe.resnet56(wide=True)
    resnet_runner, wide_resnet_runner = SkipChannelRunner(resnet), SkipChannelRunner(wide_resnet)
    image = tf.constant(image)
    stream_runner = SkipChannelRunner(wide_moe, skip_stream_inputs=False)
    sliver = deepmoe.resnet56(width_multiplier=1 / 16)
    sliver_runner = SkipChannelRunner(sliver)
    candidates = {
        "wide-DeepMoE-56, skip path": lambda: runner(image).numpy(),
        "wide-DeepMoE-56, skip path, stream read whole": lambda: stream_runner(image).numpy(),
        "wide-DeepMoE-56, masked model(x)": forward_fn(wide_moe, image),
        "ResNet-56": forward_fn(resnet, image),
        "dense wide ResNet-56": forward_fn(wide_resnet, image),
        "ResNet-56, same executor": lambda: resnet_runner(image).numpy(),
        "dense wide ResNet-56, same executor": lambda: wide_resnet_runner(image).numpy(),
        "ResNet-56 at 1/16 width": forward_fn(sliver, image),
        "ResNet-56 at 1/16 width, same executor": lambda: sliver_runner(image).numpy(),
    }
    times = interleaved_medians(candidates, args.latency_reps, warmup=5)
    base = times["ResNet-56"]
    dense_wide = times["dense wide ResNet-56"]
    skip = times["wide-DeepMoE-56, skip path"]
    print(
        f"Batch-1 latency, 32x32x3, median of {args.latency_reps} interleaved rounds "
        f"(TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs, "
        f"intra-/inter-op threads {tf.config.threading.get_intra_op_parallelism_threads()}/"
        f"{tf.config.threading.get_inter_op_parallelism_threads()} for all, 0 = default); "
        f"wide-DeepMoE-56 open channels {density:.1%} (mean over "
        f"{wide_moe.num_gated_layers} gated layers), skip path vs model(x) max |diff| "
        f"{max_error:.1e}"
    )
    print()
    print("| model | ms / image | / ResNet-56 | / dense wide ResNet-56 |")
    print("| --- | --- | --- | --- |")
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / base:.2f} | "
              f"{seconds / dense_wide:.2f} |")
    print()
    for suffix in ("", ", same executor"):
        base = times["ResNet-56" + suffix]
        dense_wide = times["dense wide ResNet-56" + suffix]
        against = "Keras model(x)" if not suffix else "same executor, batch norms folded"
        print(f"target: wide-DeepMoE-56 (skip) <= 1.2x ResNet-56 ({against}): "
              f"{skip / base:.2f}x -> {verdict(skip / base <= 1.2)}")
        print(f"target: wide-DeepMoE-56 (skip) <= 0.6x dense wide ResNet-56 ({against}): "
              f"{skip / dense_wide:.2f}x -> {verdict(skip / dense_wide <= 0.6)}")
        floor = times["ResNet-56 at 1/16 width" + suffix]
        print(f"  per-layer floor ({against}): ResNet-56 at 1/16 width takes "
              f"{floor / dense_wide:.2f}x dense wide ResNet-56")
    if args.skip_train:
        return

    images = tf.constant(rng.normal(size=(args.batch,) + SHAPE).astype("float32"))
    labels = tf.constant(rng.integers(0, 10, size=(args.batch,)))
    train = {
        "narrow DeepMoE-56": train_fn(deepmoe.deepmoe_resnet56(), images, labels),
        "ResNet-56": train_fn(deepmoe.resnet56(), images, labels),
    }
    times = interleaved_medians(train, args.train_reps, warmup=2)
    rate = {name: args.batch / seconds for name, seconds in times.items()}
    ratio = rate["narrow DeepMoE-56"] / rate["ResNet-56"]
    print()
    print(f"Training throughput, batch {args.batch}, SGD momentum, train_on_batch, median of "
          f"{args.train_reps} interleaved steps")
    print()
    print("| model | step s | images/s | / ResNet-56 |")
    print("| --- | --- | --- | --- |")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.3f} | {rate[name]:.1f} | "
              f"{rate[name] / rate['ResNet-56']:.2f} |")
    print()
    print(f"target: narrow DeepMoE-56 training throughput >= 0.85x ResNet-56: {ratio:.2f}x -> "
          f"{verdict(ratio >= 0.85)}")


if __name__ == "__main__":
    main()
