"""The `keras-moe` command line: list, train, evaluate, export, predict, tune, bench, info.

    keras-moe list [PATTERN]                    zoo models and recipes, one line each
    keras-moe train [MODEL_OR_RECIPE] [...]     train into a new run directory, report, export
    keras-moe evaluate RUN_OR_MODEL [...]       test metrics and expert use of a trained model
    keras-moe export RUN_OR_MODEL [--gates]     SavedModel with a serving signature
    keras-moe predict SAVED_MODEL [...]         classify test images with TensorFlow alone
    keras-moe tune MODEL_OR_RECIPE [...]        keras-tuner search; writes the best recipe
    keras-moe bench [MODEL_OR_RECIPE] [...]     training throughput and batch-1 latency
    keras-moe info                              versions, devices, where the data is

`train` takes a recipe (a TOML file, or the name of one in the zoo; see
`keras_moe.recipes`) or a zoo model name (then the model's family's default phases on
the embedded Fashion-MNIST: DeepMoE's two phases for DeepMoE models). Errors in what the
user gave (unknown names, recipe keys, strategies, occupied run directories, missing
data, flags that contradict a resumed run) end with exit status 2 and one message that
says what is wrong and what is allowed.

Modules: `common` (recipes from the command line, user errors), `train`, `models`
(evaluate, export, predict), `commands` (info, list, tune, bench), and here the parser.
"""

import argparse
import os
import sys

from keras_moe.cli import commands as other_commands
from keras_moe.cli import models
from keras_moe.cli import train as train_cmd
from keras_moe.cli.common import (  # noqa: F401 (the package's interface)
    DEFAULT_CLASSIFY,
    DEFAULT_RECIPE,
    DEFAULT_SEED,
    UsageError,
    add_recipe_flags,
    recipe_for_model,
    resolve_recipe,
    user_errors,
)

def build_parser():
    from keras_moe.training.run_dir import RunSettings

    parser = argparse.ArgumentParser(
        prog="keras-moe", description="Mixture-of-experts models for Keras.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command")

    info = commands.add_parser("info", help="versions, devices and where the default data is")
    info.set_defaults(handler=other_commands.info)

    listing = commands.add_parser("list", help="zoo models (and recipes), one line each")
    listing.add_argument("pattern", nargs="?", default=None, help="only names containing this")
    listing.add_argument("--recipes", action="store_true", help="also list the zoo's recipes")
    listing.set_defaults(handler=other_commands.list_models)

    train = commands.add_parser(
        "train", help="train a zoo model or recipe into a new run directory",
        description="Trains, writes TensorBoard logs and a report (text and PNG), saves "
                    "model.keras, exports a SavedModel and classifies test images with it "
                    "in a fresh process. Run directories are never overwritten. With "
                    "--resume, the run continues exactly as it was started (its "
                    "recipe.toml and run.json); a flag that contradicts them is refused.")
    add_recipe_flags(train)
    from keras_moe.distribute import STRATEGIES

    train.add_argument("--strategy", default=None, choices=STRATEGIES,
                       help=f"tf.distribute strategy, or expert_parallel: experts over "
                            f"devices with Keras's distribution API on JAX (default "
                            f"{RunSettings.strategy})")
    train.add_argument("--mesh", default=None, metavar="DATAxEXPERT",
                       help="--strategy expert_parallel's device mesh, e.g. 2x4 (default: "
                            "every device on the expert axis)")
    train.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="--strategy expert_parallel over several processes (one "
                            "command each): process 0's address (default "
                            "$KERAS_DISTRIBUTION_JOB_ADDRESSES)")
    train.add_argument("--num-processes", default=None, metavar="N",
                       help="how many processes train together (default "
                            "$KERAS_DISTRIBUTION_NUM_PROCESSES, else 1)")
    train.add_argument("--process-id", default=None, metavar="I",
                       help="this process's index, 0 to N-1; process 0 writes the run "
                            "directory (default $KERAS_DISTRIBUTION_PROCESS_ID)")
    train.add_argument("--process-timeout", type=int, default=60, metavar="SECONDS",
                       help="several processes: how long to wait for one that has not "
                            "arrived or stopped answering before the others exit with an "
                            "error naming it (default 60)")
    train.add_argument("--out", help="run directory (default runs/<recipe>-<time>)")
    train.add_argument("--resume", action="store_true",
                       help="continue the unfinished run in --out from its last backup")
    train.add_argument("--deterministic", action="store_true", default=None,
                       help="TensorFlow op determinism (bit-identical resumes; slower)")
    train.add_argument("--no-export", action="store_true", default=None,
                       help="skip the SavedModel")
    train.add_argument("--gates", action="store_true", default=None,
                       help="the SavedModel also returns every MoE layer's gates")
    train.add_argument("--classify", type=int, default=None,
                       help=f"test images to classify with the SavedModel (0: none; "
                            f"default {DEFAULT_CLASSIFY})")
    train.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2],
                       help="Keras progress: 1 bars, 2 a line per epoch, 0 none")
    train.set_defaults(handler=train_cmd.train)

    evaluate = commands.add_parser("evaluate", help="test metrics and expert use of a model")
    evaluate.add_argument("run", help="run directory or .keras file")
    evaluate.add_argument("--recipe", help="recipe whose data to use for a bare .keras file "
                                           "(default: the run's, else the default recipe's, "
                                           "padded and tiled to the model's input)")
    evaluate.add_argument("--dataset")
    evaluate.add_argument("--test-size", type=int)
    evaluate.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--seed", type=int, default=None)
    evaluate.add_argument("--json", help="also write the report as JSON here")
    evaluate.set_defaults(handler=models.evaluate)

    export = commands.add_parser("export", help="write a SavedModel with a serving signature")
    export.add_argument("run", help="run directory or .keras file")
    export.add_argument("--out", help="SavedModel directory (default RUN/saved_model; missing "
                                      "parent folders are created)")
    export.add_argument("--gates", action="store_true",
                        help="also return every MoE layer's gates")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing SavedModel at --out")
    export.set_defaults(handler=models.export)

    predict = commands.add_parser(
        "predict", help="classify test images with a SavedModel, in a fresh process")
    predict.add_argument("saved_model")
    predict.add_argument("--dataset", help="default: the run's, else fashion_mnist")
    predict.add_argument("--count", type=int, default=8, help="test images, >= 1")
    predict.add_argument("--data-dir")
    predict.set_defaults(handler=models.predict)

    tune = commands.add_parser("tune", help="keras-tuner search; writes the best recipe")
    add_recipe_flags(tune, epochs=False)
    tune.add_argument("--tuner", default="random", choices=["random", "hyperband"])
    tune.add_argument("--max-trials", type=int, default=10)
    tune.add_argument("--max-minutes", type=float, default=None,
                      help="time budget: no trial starts after it (the first always runs)")
    tune.add_argument("--trial-epochs", type=int, default=None,
                      help="epochs per trial, the phases scaled in proportion "
                           "(default: the recipe's)")
    tune.add_argument("--validation", type=float, default=None,
                      help="training examples held out for selecting the best trial: a "
                           "fraction in (0, 1) or a count (default 0.1); the test split is "
                           "measured once, for the best trial")
    tune.add_argument("--search", action="append", metavar="SECTION.KEY=CHOICES",
                      help="override the search space (repeatable): v1,v2,... a choice, "
                           "lo:hi a range (log scale if lo > 0), e.g. "
                           "model.num_experts=4,8,16 or optimizer.learning_rate=1e-4:1e-2")
    tune.add_argument("--out", help="tuning directory (default tuning/<recipe>-<time>)")
    tune.add_argument("--overwrite", action="store_true",
                      help="search again in an existing --out (keras-tuner's overwrite)")
    tune.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2],
                      help="1 keras-tuner's trial reports, 2 also a line per epoch and each "
                           "failed trial's traceback, 0 none")
    tune.set_defaults(handler=other_commands.tune)

    from keras_moe.benchmarking import SUITES

    bench = commands.add_parser("bench", help="training throughput and batch-1 latency")
    add_recipe_flags(bench, epochs=False)
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--suite", choices=SUITES,
                       help="run one of the benchmark suites (the repository's benchmarks/, "
                            "shipped in the package) instead")
    bench.add_argument("--suite-args", default="",
                       help="arguments for the --suite script, as one quoted string")
    bench.set_defaults(handler=other_commands.bench)
    return parser


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    # What the run directory's command.txt records: this call's arguments (sys.argv is
    # another program's when main is called from Python).
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.version:
        import keras_moe

        print(keras_moe.__version__)
        return 0
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    if args.command not in ("info", "list"):
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # retracing notices from the probe passes
    try:
        return args.handler(args)
    except user_errors() as error:
        print(f"keras-moe {args.command}: error: {error}", file=sys.stderr)
        return 2

