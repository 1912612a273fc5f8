"""Experiment: how DeepMoE's gate L1 term is normalised, and what it does to accuracy.

`DeepMoEModel` uses the paper's term (eq. 8, the sum of the gates' L1 norms over every
gated channel) divided by the number of gated channels, so every channel is pushed
alike and L_g is 1.0 with every gate at 1:

    channel:     L_g = sum_l sum_c |g^l_c| / sum_l C_l               (the model's, since 2026-11-23)
    layer_mean:  L_g = (1 / L) sum_l mean_c |g^l_c|                    (the model's before)

`layer_mean` pushes each channel of a 16-channel layer 4x harder than one of a
64-channel layer. This script trains the `deepmoe_resnet8_fashion_mnist` recipe (the
same as `keras-moe train deepmoe_resnet8_fashion_mnist --seed S`) with either term and
prints the same report, per-layer gate densities included. Compare with
`zoo/deepmoe.md` ("Recipes").

    python examples/deepmoe_l1_normalisation.py --term layer_mean --seed 0 --out runs/l1_layer_s0

It takes `keras-moe train`'s flags that change what is trained (`--set`, `--train-size`,
`--test-size`, `--deterministic`; `--no-export` is accepted and a no-op: this script
never exports), so `examples/study.py deepmoe` runs its `wide_layer_mean` arm with the
same settings as the `keras-moe train` arms.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_moe import recipes  # noqa: E402
from keras_moe.analysis import report as report_lib  # noqa: E402
from keras_moe.training import runner  # noqa: E402


def set_l1_term(model, term):
    """Sets the per-layer weights of `model`'s gate L1 term (`DeepMoEObjective`, the last
    layer of a `DeepMoEModel`, weighs layer l's mean gate by them)."""
    widths = [int(g.shape[-1]) for g in model.network.output["gates"]]
    if term == "channel":
        weights = [w / sum(widths) for w in widths]
    else:
        weights = [1 / len(widths)] * len(widths)
    # A private attribute on purpose: the model has one term; this experiment swaps it.
    # It must exist: an earlier version set one that nothing read, and its runs trained
    # the model's own term under this script's name.
    objective = model.objective
    if not isinstance(getattr(objective, "_layer_weights", None), list) or len(
            objective._layer_weights) != len(weights):
        raise RuntimeError("DeepMoEObjective no longer keeps its per-layer weights in "
                           "`_layer_weights`: update this experiment")
    objective._layer_weights = weights
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--term", choices=["channel", "layer_mean"], required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="a new run directory")
    parser.add_argument("--recipe", default="deepmoe_resnet8_fashion_mnist")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any recipe value, as keras-moe train --set (repeatable)")
    parser.add_argument("--train-size", type=int, help="first N training examples (0: all)")
    parser.add_argument("--test-size", type=int, help="first N test examples (0: all)")
    parser.add_argument("--deterministic", action="store_true",
                        help="TensorFlow op determinism, as keras-moe train --deterministic")
    parser.add_argument("--no-export", action="store_true",
                        help="accepted for keras-moe train's flags; nothing is exported")
    args = parser.parse_args()

    overrides = [f"data.{key}={value}" for key, value in
                 (("train_size", args.train_size), ("test_size", args.test_size))
                 if value is not None] + args.set
    recipe = recipes.load_recipe(args.recipe)
    if overrides:
        recipe = recipe.override(overrides)
    if args.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    build = runner.build_model
    runner.build_model = lambda recipe, data=None: set_l1_term(build(recipe, data), args.term)
    result = runner.train_recipe(recipe, args.out, seed=args.seed, verbose=2)
    report = report_lib.make_report(result.model, result.data, result.history, recipe=recipe,
                                    seconds=result.seconds)
    print(report_lib.write_report(report, result.history, args.out))


if __name__ == "__main__":
    main()
