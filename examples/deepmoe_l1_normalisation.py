"""Experiment: DeepMoE's gate L1 term weighted per channel, as in the paper.

`DeepMoEModel` today averages the layers' mean gates, L_g = (1/L) sum_l mean_c |g^l_c|,
which pushes each channel of a 16-channel layer 4x harder than one of a 64-channel
layer. The paper's term is the sum of the gates' L1 norms over all gated channels;
divided by their number it is still 1.0 with every gate open:

    L_g = sum_l sum_c |g^l_c| / sum_l C_l

This script trains the `deepmoe_resnet8_fashion_mnist` recipe (the same as
`keras-moe train deepmoe_resnet8_fashion_mnist --seed S`) with that term swapped in,
and prints the same report. Compare with `zoo/deepmoe.md` ("Recipes").

    python examples/deepmoe_channel_weighted_l1.py --seed 0 --out runs/l1_channel_s0
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_moe import recipes  # noqa: E402
from keras_moe.analysis import report as report_lib  # noqa: E402
from keras_moe.training import runner  # noqa: E402
from keras_moe.zoo import deepmoe  # noqa: E402


def channel_weighted(widths, layer_mean_l1):
    """A replacement for `l1_gate_sparsity` inside `DeepMoEModel.call`, which averages
    the per-layer terms: scaling layer l's term by L * C_l / sum C turns that average
    into the channel-weighted mean."""
    total, layers = sum(widths), len(widths)

    def l1(gates):
        return layer_mean_l1(gates) * (int(gates.shape[-1]) * layers / total)

    return l1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="a new run directory")
    parser.add_argument("--recipe", default="deepmoe_resnet8_fashion_mnist")
    args = parser.parse_args()

    recipe = recipes.load_recipe(args.recipe)
    build = runner.build_model

    def build_channel_weighted(recipe, data=None):
        model = build(recipe, data)
        widths = [int(g.shape[-1]) for g in model.network.output["gates"]]
        deepmoe.reg_fn.l1_gate_sparsity = channel_weighted(widths, layer_mean_l1)
        return model

    layer_mean_l1 = deepmoe.reg_fn.l1_gate_sparsity
    runner.build_model = build_channel_weighted
    result = runner.train_recipe(recipe, args.out, seed=args.seed, verbose=2)
    report = report_lib.make_report(result.model, result.data, result.history, recipe=recipe,
                                    seconds=result.seconds)
    print(report_lib.write_report(report, result.history, args.out))


if __name__ == "__main__":
    main()
