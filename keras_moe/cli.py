"""The `keras-moe` command line: list, train, evaluate, export, predict, tune, bench, info.

    keras-moe list [PATTERN]                    zoo models and recipes, one line each
    keras-moe train [MODEL_OR_RECIPE] [...]     train into a new run directory, report, export
    keras-moe evaluate RUN_OR_MODEL [...]       test metrics and expert use of a trained model
    keras-moe export RUN_OR_MODEL [--gates]     SavedModel with a serving signature
    keras-moe predict SAVED_MODEL [...]         classify test images with TensorFlow alone
    keras-moe tune MODEL_OR_RECIPE [...]        keras-tuner search; writes the best recipe
    keras-moe bench [MODEL_OR_RECIPE] [...]     training throughput and batch-1 latency
    keras-moe info                              versions, devices, where the data is

`train` takes a recipe (a TOML file, or the name of one in the zoo folder; see
`keras_moe.recipes`) or a zoo model name (then a one-phase recipe on the embedded
Fashion-MNIST, with DeepMoE's two phases for DeepMoE models). Errors in what the user
gave (unknown names, recipe keys, strategies, occupied run directories, missing data)
end with exit status 2 and one message that says what is wrong and what is allowed.
"""

import argparse
import os
import sys

DEFAULT_RECIPE = "sparse_moe_fashion_mnist"


class UsageError(Exception):
    """An error in the user's input; printed without a traceback."""


def _user_errors():
    from keras_moe.data import DataNotFoundError
    from keras_moe.recipes import RecipeError
    from keras_moe.training.runner import RunDirectoryError

    return (UsageError, RecipeError, RunDirectoryError, DataNotFoundError)


# info / list ----------------------------------------------------------------------------


def _info(_args):
    import keras
    import tensorflow as tf

    import keras_moe
    from keras_moe.data import sources

    print(f"keras-moe {keras_moe.__version__}")
    print(f"keras {keras.__version__} (backend {keras.backend.backend()}), "
          f"tensorflow {tf.__version__}")
    devices = ", ".join(d.name for d in tf.config.list_physical_devices()) or "none"
    print(f"devices: {devices}")
    looked = []
    found = sources.find_local("fashion_mnist", looked=looked)
    if found is None:
        print("default data (fashion_mnist): not found; looked in " + ", ".join(looked))
        return 1
    print(f"default data (fashion_mnist): {found.location}")
    return 0


def _list(args):
    from keras_moe import recipes, zoo

    names = zoo.list_models(args.pattern)
    if not names:
        print("no zoo models" + (f" matching {args.pattern!r}" if args.pattern else ""))
        return 1
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {zoo.describe(name)}")
    if args.recipes:
        print()
        for name in recipes.list_recipes():
            if args.pattern is None or args.pattern in name:
                recipe = recipes.load_recipe(name)
                print(f"recipe {name}: {recipe.description}")
    return 0


# recipes from the command line ---------------------------------------------------------


def recipe_for_model(name, epochs=None):
    """A recipe for a bare zoo model: its builder's defaults on the embedded Fashion-MNIST.

    One phase of `epochs` (default 5) with Adam 1e-3 and batch 128; DeepMoE models get
    Procedure 1 (a joint phase of `epochs`, then `max(1, epochs // 3)` fine-tuning epochs
    with frozen gating and lambda = mu = 0). Builders whose default input has 3 channels
    get the images zero-padded to 32x32 and tiled to 3 channels.
    """
    import inspect

    from keras_moe import recipes, zoo

    builder = zoo.get_builder(name)
    epochs = 5 if epochs is None else epochs
    data = {"dataset": "fashion_mnist"}
    default_shape = inspect.signature(builder).parameters.get("input_shape")
    if default_shape is not None and default_shape.default is not inspect.Parameter.empty:
        shape = tuple(default_shape.default)
        if len(shape) == 3 and shape[-1] == 3:
            data.update(pad_to=32, channels=3)
    if name.startswith("deepmoe_"):
        phases = [{"name": "joint", "epochs": epochs},
                  {"name": "finetune", "epochs": max(1, epochs // 3), "freeze_gating": True,
                   "gate_l1": 0.0, "embedding_loss_weight": 0.0}]
    else:
        phases = [{"name": "train", "epochs": epochs}]
    table = {"recipe": {"name": name, "description": f"{name} with its builder's defaults"},
             "model": {"name": name}, "data": data, "phases": phases}
    return recipes.Recipe.from_dict(table, source=f"zoo model {name}")


def resolve_recipe(target, args):
    """The recipe named or given by `target` (a recipe, a file or a zoo model), with the
    command line's overrides applied."""
    from keras_moe import recipes, zoo

    is_file = str(target).endswith(".toml") or os.sep in str(target)
    if not is_file and target in zoo.list_models() and target not in recipes.list_recipes():
        recipe = recipe_for_model(target, getattr(args, "epochs", None))
    else:
        try:
            recipe = recipes.load_recipe(target)
        except recipes.RecipeError as error:
            if is_file:
                raise
            import difflib

            known = zoo.list_models() + recipes.list_recipes()
            close = difflib.get_close_matches(target, known, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UsageError(
                f"{target!r} is neither a zoo model nor a recipe.{hint} See `keras-moe list "
                f"--recipes`.") from error
        if getattr(args, "epochs", None) is not None:
            if len(recipe.phases) != 1:
                spans = ", ".join(f"{p.name} {p.epochs}" for p in recipe.phases)
                raise UsageError(
                    f"--epochs: recipe {recipe.name!r} has {len(recipe.phases)} phases "
                    f"({spans}); set each with --set phases.N.epochs=E")
            recipe = recipe.override([f"phases.0.epochs={args.epochs}"])
    overrides = []
    for flag, key in (("dataset", "data.dataset"), ("batch_size", "data.batch_size"),
                      ("train_size", "data.train_size"), ("test_size", "data.test_size"),
                      ("learning_rate", "optimizer.learning_rate")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    overrides.extend(getattr(args, "set", None) or [])
    return recipe.override(overrides) if overrides else recipe


def _strategy(name):
    """`get_strategy(name)`, its errors (unknown name, malformed `TF_CONFIG`, no TPU) as
    usage errors. `"multi_worker"` trains with `fit_distributed` (see
    `keras_moe.training.runner`), and must be created before any other TensorFlow op."""
    from keras_moe.distribute import get_strategy

    try:
        return get_strategy(name)
    except (ValueError, RuntimeError) as error:
        raise UsageError(f"--strategy {name}: {error}") from error


def _add_recipe_flags(parser, epochs=True):
    parser.add_argument("target", nargs="?", default=DEFAULT_RECIPE,
                        help=f"zoo model, recipe name or recipe file (default {DEFAULT_RECIPE})")
    parser.add_argument("--dataset", help="data set (keras_moe.data.NAMES)")
    if epochs:
        parser.add_argument("--epochs", type=int, help="epochs of a one-phase recipe")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--train-size", type=int, help="first N training examples (0: all)")
    parser.add_argument("--test-size", type=int, help="first N test examples (0: all)")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="any recipe value, e.g. model.num_experts=16 or "
                             "phases.1.epochs=2 (repeatable)")
    parser.add_argument("--data-dir", help="where data files are (see keras-moe info)")
    parser.add_argument("--seed", type=int, default=0)


# train ----------------------------------------------------------------------------------


def _train(args):
    import pathlib

    import numpy as np

    from keras_moe.analysis import report as report_lib
    from keras_moe.training import runner

    if args.resume and not args.out:
        raise UsageError("--resume needs --out, the run directory to continue")
    # First: MultiWorkerMirroredStrategy must be created before any other TensorFlow op.
    strategy = _strategy(args.strategy)
    recipe = None if args.resume else resolve_recipe(args.target, args)
    out = pathlib.Path(args.out) if args.out else runner.default_run_dir(recipe)
    if args.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    chief = runner.is_chief(strategy)
    if chief:
        print(f"run directory: {out}")
    else:
        print(f"non-chief worker of a multi-worker run: the chief writes the run directory "
              f"({out}); this worker's files go to a temporary directory")
    result = runner.train_recipe(
        recipe, out, strategy=strategy, resume=args.resume, data_dir=args.data_dir,
        seed=args.seed, verbose=args.verbose, command=["keras-moe"] + sys.argv[1:])
    if not result.chief:
        print("training finished; the chief writes the report and the SavedModel")
        return 0
    model, data, history, recipe = result.model, result.data, result.history, result.recipe
    seconds = result.seconds
    report = report_lib.make_report(model, data, history, recipe=recipe, seconds=seconds)
    text = report_lib.write_report(report, history, out)
    print()
    print(text)
    print(f"\nreport: {out / 'report.txt'}, {out / 'report.png'}; TensorBoard: "
          f"tensorboard --logdir {out / 'logs'}")
    if args.no_export:
        return 0
    from keras_moe.export import export_saved_model

    saved = export_saved_model(model, out / "saved_model", return_gates=args.gates)
    print(f"SavedModel: {saved} (serving_default: images -> probabilities"
          + (", gates_<layer>" if args.gates else "") + ")")
    images = data.probe if not isinstance(data.probe, dict) else None
    if images is None or args.classify <= 0:
        return 0
    count = min(args.classify, len(images))
    expected = report_lib.probabilities(model, images[:count])
    names = runner.class_names(recipe.data.dataset, data.num_classes, data.source)
    batch = out / "classify_input.npz"
    np.savez(batch, images=images[:count].astype("float32"),
             labels=data.probe_labels[:count], class_names=np.array(names),
             expected=expected)
    print(f"\nreloading {saved} in a fresh Python process (TensorFlow only) to classify "
          f"{count} test images:")
    return _run_client(saved, batch, out / "classify_output.json", expected)


def _run_client(saved, batch, result_path, expected=None, tolerance=1e-5):
    import json
    import subprocess

    client = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serving_client.py")
    completed = subprocess.run([sys.executable, client, str(saved), str(batch),
                                str(result_path)], text=True)
    if completed.returncode != 0:
        print(f"the fresh process failed (exit {completed.returncode})", file=sys.stderr)
        return 1
    if expected is not None:
        with open(result_path) as f:
            result = json.load(f)
        if result.get("max_abs_diff", 0.0) > tolerance:
            print(f"the SavedModel's probabilities differ from the Keras model's by "
                  f"{result['max_abs_diff']:.2e} (> {tolerance:g})", file=sys.stderr)
            return 1
    return 0


# evaluate / export / predict ------------------------------------------------------------


def _load_trained(path):
    """The model of a run directory or `.keras` file, and the run's recipe file (or None)."""
    import pathlib

    from keras_moe.training import runner

    path = pathlib.Path(path)
    if not path.exists():
        raise UsageError(f"{str(path)!r} does not exist (give a run directory or a .keras file)")
    recipe_file = path / "recipe.toml" if path.is_dir() else None
    if recipe_file is not None and not recipe_file.exists():
        recipe_file = None
    return runner.load_run_model(path), recipe_file


def _evaluate(args):
    from keras_moe.analysis import report as report_lib
    from keras_moe.training import runner

    model, recipe_file = _load_trained(args.run)
    recipe = resolve_recipe(str(recipe_file or args.recipe or DEFAULT_RECIPE), args)
    data = runner.build_datasets(recipe, data_dir=args.data_dir, seed=args.seed)
    if model.optimizer is None or not getattr(model, "compiled", True):
        runner.compile_model(model, recipe, data.steps_per_epoch)
    report = report_lib.make_report(model, data, runner.read_history(args.run)
                                    if os.path.isdir(args.run) else (), recipe=recipe)
    print(report_lib.format_report(report))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _export(args):
    from keras_moe.export import export_saved_model

    model, _ = _load_trained(args.run)
    out = args.out or (os.path.join(args.run, "saved_model") if os.path.isdir(args.run)
                       else os.path.splitext(args.run)[0] + "_saved_model")
    if os.path.lexists(out) and not args.overwrite:
        raise UsageError(f"{out!r} already exists; it is never overwritten silently: pass "
                         "--overwrite to replace it, or choose another --out")
    export_saved_model(model, out, return_gates=args.gates, overwrite=args.overwrite)
    import tensorflow as tf

    signature = tf.saved_model.load(out).signatures["serving_default"]
    inputs = {k: (v.dtype.name, tuple(v.shape)) for k, v in
              signature.structured_input_signature[1].items()}
    outputs = {k: tuple(v.shape) for k, v in signature.structured_outputs.items()}
    print(f"SavedModel written to {out}")
    print(f"serving_default inputs: {inputs}")
    print(f"serving_default outputs: {outputs}")
    return 0


def _predict(args):
    import pathlib
    import tempfile

    import numpy as np

    from keras_moe import recipes
    from keras_moe.training import runner

    saved = pathlib.Path(args.saved_model)
    if not (saved / "saved_model.pb").exists():
        raise UsageError(f"{str(saved)!r} is not a SavedModel directory (no saved_model.pb)")
    recipe_path = saved.parent / "recipe.toml"
    if args.dataset is None and recipe_path.exists():
        recipe = recipes.load_recipe(recipe_path)
    else:
        recipe = resolve_recipe(DEFAULT_RECIPE, argparse.Namespace(dataset=args.dataset))
    recipe = recipe.override([f"data.test_size={args.count}"])
    data = runner.build_datasets(recipe, data_dir=args.data_dir, probe_size=args.count)
    if isinstance(data.probe, dict):
        raise UsageError("predict serves single-input models; this one takes "
                         f"{sorted(data.probe)}")
    with tempfile.TemporaryDirectory() as tmp:
        batch = pathlib.Path(tmp) / "images.npz"
        names = runner.class_names(recipe.data.dataset, data.num_classes, data.source)
        np.savez(batch, images=data.probe.astype("float32"), labels=data.probe_labels,
                 class_names=np.array(names))
        return _run_client(saved, batch, pathlib.Path(tmp) / "result.json")


# tune / bench ---------------------------------------------------------------------------


def _tune(args):
    from keras_moe import tuning

    if args.max_minutes is not None and not args.max_minutes >= 0:
        raise UsageError(f"--max-minutes must be >= 0, got {args.max_minutes}")
    recipe = resolve_recipe(args.target, args)
    try:
        result = tuning.tune_recipe(
            recipe, tuner=args.tuner, max_trials=args.max_trials,
            max_seconds=None if args.max_minutes is None else args.max_minutes * 60,
            epochs=args.trial_epochs, out=args.out, overwrite=args.overwrite,
            data_dir=args.data_dir, seed=args.seed, search_space=args.search,
            verbose=args.verbose,
        )
    except tuning.TuningError as error:
        raise UsageError(str(error)) from error
    print(result.summary())
    return 0


def _bench(args):
    from keras_moe import benchmarking

    try:
        if args.suite:
            import shlex

            return benchmarking.run_suite(args.suite, shlex.split(args.suite_args))
        recipe = resolve_recipe(args.target, args)
        result = benchmarking.benchmark_recipe(recipe, batch_size=args.batch_size,
                                               steps=args.steps, data_dir=args.data_dir)
    except ValueError as error:
        if isinstance(error, _user_errors()):
            raise
        raise UsageError(str(error)) from error
    print(result)
    return 0


# parser ---------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-moe", description="Mixture-of-experts models for Keras.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command")

    info = commands.add_parser("info", help="versions, devices and where the default data is")
    info.set_defaults(handler=_info)

    listing = commands.add_parser("list", help="zoo models (and recipes), one line each")
    listing.add_argument("pattern", nargs="?", default=None, help="only names containing this")
    listing.add_argument("--recipes", action="store_true", help="also list the zoo's recipes")
    listing.set_defaults(handler=_list)

    train = commands.add_parser(
        "train", help="train a zoo model or recipe into a new run directory",
        description="Trains, writes TensorBoard logs and a report (text and PNG), saves "
                    "model.keras, exports a SavedModel and classifies test images with it "
                    "in a fresh process. Run directories are never overwritten.")
    _add_recipe_flags(train)
    train.add_argument("--strategy", default="default",
                       choices=["default", "mirrored", "multi_worker", "tpu"])
    train.add_argument("--out", help="run directory (default runs/<recipe>-<time>)")
    train.add_argument("--resume", action="store_true",
                       help="continue the unfinished run in --out from its last backup")
    train.add_argument("--deterministic", action="store_true",
                       help="TensorFlow op determinism (bit-identical resumes; slower)")
    train.add_argument("--no-export", action="store_true", help="skip the SavedModel")
    train.add_argument("--gates", action="store_true",
                       help="the SavedModel also returns every MoE layer's gates")
    train.add_argument("--classify", type=int, default=8,
                       help="test images to classify with the SavedModel (0: none)")
    train.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2],
                       help="Keras progress: 1 bars, 2 a line per epoch, 0 none")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("evaluate", help="test metrics and expert use of a model")
    evaluate.add_argument("run", help="run directory or .keras file")
    evaluate.add_argument("--recipe", help="recipe whose data to use for a bare .keras file")
    evaluate.add_argument("--dataset")
    evaluate.add_argument("--test-size", type=int)
    evaluate.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--json", help="also write the report as JSON here")
    evaluate.set_defaults(handler=_evaluate)

    export = commands.add_parser("export", help="write a SavedModel with a serving signature")
    export.add_argument("run", help="run directory or .keras file")
    export.add_argument("--out", help="SavedModel directory (default RUN/saved_model)")
    export.add_argument("--gates", action="store_true",
                        help="also return every MoE layer's gates")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing SavedModel at --out")
    export.set_defaults(handler=_export)

    predict = commands.add_parser(
        "predict", help="classify test images with a SavedModel, in a fresh process")
    predict.add_argument("saved_model")
    predict.add_argument("--dataset", help="default: the run's, else fashion_mnist")
    predict.add_argument("--count", type=int, default=8)
    predict.add_argument("--data-dir")
    predict.set_defaults(handler=_predict)

    tune = commands.add_parser("tune", help="keras-tuner search; writes the best recipe")
    _add_recipe_flags(tune, epochs=False)
    tune.add_argument("--tuner", default="random", choices=["random", "hyperband"])
    tune.add_argument("--max-trials", type=int, default=10)
    tune.add_argument("--max-minutes", type=float, default=None,
                      help="time budget: no trial starts after it (the first always runs)")
    tune.add_argument("--trial-epochs", type=int, default=None,
                      help="epochs per trial, the phases scaled in proportion "
                           "(default: the recipe's)")
    tune.add_argument("--search", action="append", metavar="SECTION.KEY=CHOICES",
                      help="override the search space (repeatable): v1,v2,... a choice, "
                           "lo:hi a range (log scale if lo > 0), e.g. "
                           "model.num_experts=4,8,16 or optimizer.learning_rate=1e-4:1e-2")
    tune.add_argument("--out", help="tuning directory (default tuning/<recipe>-<time>)")
    tune.add_argument("--overwrite", action="store_true",
                      help="search again in an existing --out (keras-tuner's overwrite)")
    tune.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2],
                      help="1 keras-tuner's trial reports, 2 also a line per epoch, 0 none")
    tune.set_defaults(handler=_tune)

    from keras_moe.benchmarking import SUITES

    bench = commands.add_parser("bench", help="training throughput and batch-1 latency")
    _add_recipe_flags(bench, epochs=False)
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--suite", choices=SUITES,
                       help="run one of the repository's benchmarks/ scripts instead")
    bench.add_argument("--suite-args", default="",
                       help="arguments for the --suite script, as one quoted string")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
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
    except _user_errors() as error:
        print(f"keras-moe {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
