"""The routers of current MoE models on Shazeer's classifier, over several seeds.

    python examples/routing.py                    # train what is missing, table, timings
    python examples/routing.py --print-only --markdown
    python examples/routing.py --time-only [--reps 20]

`sparse_moe_classifier` (the default recipe, `zoo/sparse_moe_fashion_mnist.toml`) with
32 experts and k = 2 on Fashion-MNIST, 6 epochs, for each way of balancing the experts:

- `none`: Shazeer's noisy top-2 gate without a balancing loss;
- `importance_load`: the same with the importance and load losses (0.1 each; the paper's);
- `switch_z`: a softmax top-2 router with the Switch loss (0.01) and the z-loss (0.001);
- `aux_free`: a softmax top-2 router with auxiliary-loss-free balancing (rate 0.001);
- `expert_choice`: the experts choose their images, capacity factor 2;
- `sigmoid_aux_free_shared`: DeepSeek-V3's sigmoid top-2 router with the balancing bias
  (rate 0.001) and one shared expert.

The runs are `examples/study.py`'s `routing` study: each seed of each arm is one
`keras-moe train` run, one row appended to `zoo/results/routing.jsonl` when it ends (a
killed study resumes), and the table (means, spreads, 95% intervals, paired differences
to `importance_load`) is computed from that file alone. The study rows' time per step is
wall time on a shared machine; so this script then builds every arm's model and times
one training step of each side by side (`keras_moe.benchmarking.interleaved_medians`,
the same batch of 128 images), and prints the ratios to `importance_load`.
"""

import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import study  # noqa: E402
from studies import routing as routing_study  # noqa: E402


def arm_models(x_shape):
    """Each arm's compiled model, built from the recipe with the arm's settings."""
    import keras

    from keras_moe import recipes, zoo

    base = recipes.load_recipe("sparse_moe_fashion_mnist")
    models = {}
    for arm in routing_study.routing_arms():
        sets = [arm.args[i + 1] for i in range(0, len(arm.args), 2)]
        sets += [f"model.num_experts={routing_study.ROUTING_EXPERTS}",
                 f"model.top_k={routing_study.ROUTING_TOP_K}"]
        recipe = base.override(sets)
        model = zoo.get_model(recipe.model.name, input_shape=x_shape, num_classes=10,
                              **recipe.model.builder_kwargs())
        model.compile(keras.optimizers.Adam(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        models[arm.name] = model
    return models


def time_arms(reps):
    """Median seconds of one training step of every arm's model, interleaved."""
    import numpy as np

    from keras_moe import data
    from keras_moe.benchmarking import interleaved_medians

    images, labels = next(iter(data.load("fashion_mnist", "train", batch_size=128,
                                         shuffle=False, augment=False, download=False)))
    x, y = np.asarray(images), np.asarray(labels)
    models = arm_models(x.shape[1:])
    medians = interleaved_medians(
        {name: (lambda m=model: m.train_on_batch(x, y)) for name, model in models.items()},
        reps)
    base = medians["importance_load"]
    print(f"\none training step, batch 128, {routing_study.ROUTING_EXPERTS} experts, "
          f"top-{routing_study.ROUTING_TOP_K} (median of {reps}, interleaved):\n")
    print("| arm | ms | / importance_load |\n| --- | --- | --- |")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / base:.2f} |")
    return medians


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="full", help="full (3 seeds) or tiny")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the budget's)")
    parser.add_argument("--print-only", action="store_true", help="train nothing")
    parser.add_argument("--markdown", action="store_true", help="the model card's block")
    parser.add_argument("--time-only", action="store_true", help="only the timings")
    parser.add_argument("--no-time", action="store_true", help="skip the timings")
    parser.add_argument("--reps", type=int, default=20, help="timed rounds")
    parser.add_argument("--results", help="results file (default zoo/results/routing.jsonl)")
    parser.add_argument("--runs-dir", help="where the run directories go")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not args.time_only:
        forwarded = ["routing", "--budget", args.budget]
        for flag in ("seeds", "results", "runs_dir"):
            if getattr(args, flag) is not None:
                forwarded += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        forwarded += ["--print-only"] * args.print_only + ["--markdown"] * args.markdown
        code = study.main(forwarded)
        if code:
            return code
    if not args.no_time:
        time_arms(args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
