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
"""

import argparse
import os
import sys

DEFAULT_RECIPE = "sparse_moe_fashion_mnist"
DEFAULT_SEED = 0
DEFAULT_CLASSIFY = 8


class UsageError(Exception):
    """An error in the user's input; printed without a traceback."""


def _user_errors():
    from keras_moe.data import DataNotFoundError
    from keras_moe.recipes import RecipeError
    from keras_moe.training.run_dir import RunDirectoryError

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

_RECIPE_FLAGS = (("dataset", "data.dataset"), ("batch_size", "data.batch_size"),
                 ("train_size", "data.train_size"), ("test_size", "data.test_size"),
                 ("learning_rate", "optimizer.learning_rate"))


def recipe_for_model(name, epochs=None):
    """A recipe for a bare zoo model: its builder's defaults on the embedded Fashion-MNIST.

    Its family's default phases (`keras_moe.zoo.ModelFamily.phases_for`; DeepMoE:
    Procedure 1) over `epochs` (default 5), Adam 1e-3 and batch 128. Builders whose
    default input has 3 channels get the images zero-padded to 32x32 and tiled to 3
    channels.
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
    table = {"recipe": {"name": name, "description": f"{name} with its builder's defaults"},
             "model": {"name": name}, "data": data,
             "phases": zoo.get_family(name).phases_for(epochs)}
    return recipes.Recipe.from_dict(table, source=f"zoo model {name}")


def _flag_assignments(args):
    """`[(flag, assignment)]` of the recipe flags given on the command line."""
    found = []
    for flag, key in _RECIPE_FLAGS:
        value = getattr(args, flag, None)
        if value is not None:
            found.append((flag, f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"))
    found.extend(("set", assignment) for assignment in (getattr(args, "set", None) or []))
    return found


def _flag_name(flag, assignment):
    return f"--set {assignment}" if flag == "set" else f"--{flag.replace('_', '-')} " + (
        assignment.partition("=")[2])


def _with_epochs(recipe, epochs):
    if epochs is None:
        return recipe
    if len(recipe.phases) != 1:
        spans = ", ".join(f"{p.name} {p.epochs}" for p in recipe.phases)
        raise UsageError(
            f"--epochs: recipe {recipe.name!r} has {len(recipe.phases)} phases ({spans}); "
            "set each with --set phases.N.epochs=E (N counts from 0)")
    return recipe.override([f"phases.0.epochs={epochs}"])


def resolve_recipe(target, args):
    """The recipe named or given by `target` (a recipe, a file or a zoo model), with the
    command line's overrides applied."""
    from keras_moe import recipes, zoo

    target = DEFAULT_RECIPE if target is None else target
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
        recipe = _with_epochs(recipe, getattr(args, "epochs", None))
    overrides = [assignment for _, assignment in _flag_assignments(args)]
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


def _add_recipe_flags(parser, epochs=True, target_default=DEFAULT_RECIPE):
    from keras_moe.data import NAMES

    parser.add_argument("target", nargs="?", default=None,
                        help=f"zoo model, recipe name or recipe file (default {target_default})")
    parser.add_argument("--dataset", help=f"data set: {', '.join(NAMES)}")
    if epochs:
        parser.add_argument("--epochs", type=int, help="epochs of a one-phase recipe")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--train-size", type=int, help="first N training examples (0: all)")
    parser.add_argument("--test-size", type=int, help="first N test examples (0: all)")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="any recipe value, e.g. model.num_experts=16 or "
                             "phases.1.epochs=2 (phases count from 0; repeatable)")
    parser.add_argument("--data-dir", help="where data files are (see keras-moe info)")
    parser.add_argument("--seed", type=int, default=None, help=f"default {DEFAULT_SEED}")


# train ----------------------------------------------------------------------------------


def _given_settings(args):
    """`{RunSettings field: (value, flag text)}` of the run flags given on the command line."""
    given = {}
    if args.seed is not None:
        given["seed"] = (args.seed, f"--seed {args.seed}")
    if args.deterministic:
        given["deterministic"] = (True, "--deterministic")
    if args.data_dir is not None:
        given["data_dir"] = (args.data_dir, f"--data-dir {args.data_dir}")
    if args.strategy is not None:
        given["strategy"] = (args.strategy, f"--strategy {args.strategy}")
    if args.no_export:
        given["export"] = (False, "--no-export")
    if args.gates:
        given["gates"] = (True, "--gates")
    if args.classify is not None:
        given["classify"] = (args.classify, f"--classify {args.classify}")
    return given


def _new_run_settings(args):
    from keras_moe.training.run_dir import RunSettings

    given = {key: value for key, (value, _) in _given_settings(args).items()}
    defaults = {"seed": DEFAULT_SEED, "classify": DEFAULT_CLASSIFY}
    return RunSettings(**{**defaults, **given})


def _resumed_run(args, out):
    """The stored recipe and settings of the run in `out`; refuses contradicting flags."""
    from keras_moe import recipes
    from keras_moe.training.run_dir import RunSettings, prepare_run_dir

    recipe, settings = prepare_run_dir(out, None, resume=True)
    contradictions = []
    if settings is None:  # a run started before run.json was written
        print(f"keras-moe train: {out} has no run.json (an older run): its seed, "
              "determinism and export choices come from this command's flags",
              file=sys.stderr)
        settings = _new_run_settings(args)
    else:
        for key, (value, flag) in _given_settings(args).items():
            stored = getattr(settings, key)
            if value != stored:
                contradictions.append(f"{flag} (the run has {key} = {stored!r})")
    if args.target is not None and args.target not in (recipe.name, recipe.source):
        contradictions.append(f"{args.target!r} (the run trains recipe {recipe.name!r})")
    for flag, assignment in _flag_assignments(args):
        try:
            changed = recipe.override([assignment]).to_dict() != recipe.to_dict()
        except recipes.RecipeError as error:
            raise UsageError(f"--resume: {_flag_name(flag, assignment)}: {error}") from None
        if changed:
            contradictions.append(f"{_flag_name(flag, assignment)} (not what the run's "
                                  "recipe.toml has)")
    if getattr(args, "epochs", None) is not None:
        if _with_epochs(recipe, args.epochs).to_dict() != recipe.to_dict():
            contradictions.append(f"--epochs {args.epochs} (the run's recipe.toml differs)")
    if contradictions:
        raise UsageError(
            f"--resume continues the run in {out} as it was started (recipe.toml, "
            f"run.json); these flags contradict it: {'; '.join(contradictions)}. Leave "
            "them out, or train into a new --out")
    assert isinstance(settings, RunSettings)
    return recipe, settings


def _train(args):
    import pathlib

    from keras_moe.training import run_dir as run_dir_lib
    from keras_moe.training import runner

    if args.resume and not args.out:
        raise UsageError("--resume needs --out, the run directory to continue")
    if args.classify is not None and args.classify < 0:
        raise UsageError(f"--classify must be >= 0 (0: none), got {args.classify}")
    if args.resume:
        recipe, settings = _resumed_run(args, pathlib.Path(args.out))
    else:
        recipe, settings = None, _new_run_settings(args)
    # First: MultiWorkerMirroredStrategy must be created before any other TensorFlow op.
    strategy = _strategy(settings.strategy)
    if recipe is None:
        recipe = resolve_recipe(args.target, args)
    out = pathlib.Path(args.out) if args.out else run_dir_lib.default_run_dir(recipe)
    if settings.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    chief = runner.is_chief(strategy)
    if chief:
        print(f"run directory: {out}")
    else:
        print(f"non-chief worker of a multi-worker run: the chief writes the run directory "
              f"({out}); this worker's files go to a temporary directory")
    result = runner.train_recipe(
        recipe, out, strategy=strategy, resume=args.resume, data_dir=settings.data_dir,
        seed=settings.seed, verbose=args.verbose, command=["keras-moe"] + sys.argv[1:],
        settings=settings)
    if not result.chief:
        print("training finished; the chief writes the report and the SavedModel")
        return 0
    return _finish_run(result, out, settings)


def _finish_run(result, out, settings):
    """Report, SavedModel and the fresh-process classification of a finished run."""
    import numpy as np

    from keras_moe.analysis import report as report_lib
    from keras_moe.training.datasets import class_names

    model, data, history, recipe = result.model, result.data, result.history, result.recipe
    report = report_lib.make_report(model, data, history, recipe=recipe,
                                    seconds=result.seconds)
    text = report_lib.write_report(report, history, out)
    print()
    print(text)
    print(f"\nreport: {out / 'report.txt'}, {out / 'report.png'}; TensorBoard: "
          f"tensorboard --logdir {out / 'logs'}")
    if not settings.export:
        return 0
    from keras_moe.export import export_saved_model

    saved = export_saved_model(model, out / "saved_model", return_gates=settings.gates)
    print(f"SavedModel: {saved} (serving_default: images -> probabilities"
          + (", gates_<layer>" if settings.gates else "") + ")")
    images = data.probe if not isinstance(data.probe, dict) else None
    if images is None or settings.classify <= 0:
        return 0
    count = min(settings.classify, len(images))
    expected = report_lib.probabilities(model, images[:count])
    names = class_names(recipe.data.dataset, data.num_classes, data.source)
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


def _run_of(path):
    """The run directory of a run directory or of a `.keras` file inside one (or None)."""
    import pathlib

    path = pathlib.Path(path)
    folder = path if path.is_dir() else path.parent
    return folder if (folder / "recipe.toml").exists() else None


def _load_trained(path):
    """The model of a run directory or `.keras` file (for evaluating or exporting: its
    optimizer state is not read)."""
    import pathlib

    from keras_moe.training import runner

    path = pathlib.Path(path)
    if not path.exists():
        raise UsageError(f"{str(path)!r} does not exist (give a run directory or a .keras file)")
    return runner.load_run_model(path, compile=False)


def _evaluate(args):
    from keras_moe.analysis import report as report_lib
    from keras_moe.training import runner
    from keras_moe.training.datasets import build_datasets, fit_recipe_to_input
    from keras_moe.training.run_dir import read_history

    model = _load_trained(args.run)
    run = _run_of(args.run)
    if run is not None and args.recipe is None:
        recipe = resolve_recipe(str(run / "recipe.toml"), args)
    else:
        recipe = resolve_recipe(args.recipe or DEFAULT_RECIPE, args)
        recipe = fit_recipe_to_input(recipe, model.input_shape[1:], data_dir=args.data_dir,
                                     what=f"{args.run}'s model")
    data = build_datasets(recipe, data_dir=args.data_dir,
                          seed=DEFAULT_SEED if args.seed is None else args.seed)
    runner.compile_model(model, recipe, data.steps_per_epoch)
    history = read_history(run) if run is not None else None
    report = report_lib.make_report(model, data, history, recipe=recipe)
    print(report_lib.format_report(report))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _export(args):
    from keras_moe.export import export_saved_model

    model = _load_trained(args.run)
    out = args.out or (os.path.join(args.run, "saved_model") if os.path.isdir(args.run)
                       else os.path.splitext(args.run)[0] + "_saved_model")
    if os.path.lexists(out) and not args.overwrite:
        raise UsageError(f"{out!r} already exists; it is never overwritten silently: pass "
                         "--overwrite to replace it, or choose another --out")
    try:
        export_saved_model(model, out, return_gates=args.gates, overwrite=args.overwrite)
    except (ValueError, OSError) as error:
        raise UsageError(f"export to {out!r}: {error}") from error
    import tensorflow as tf

    signature = tf.saved_model.load(out).signatures["serving_default"]
    inputs = {k: (v.dtype.name, tuple(v.shape)) for k, v in
              signature.structured_input_signature[1].items()}
    outputs = {k: tuple(v.shape) for k, v in signature.structured_outputs.items()}
    print(f"SavedModel written to {out}")
    print(f"serving_default inputs: {inputs}")
    print(f"serving_default outputs: {outputs}")
    return 0


def _serving_input_shape(saved):
    """The `images` input shape (without the batch axis) of a SavedModel's signature."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(saved)).signatures["serving_default"]
    spec = signature.structured_input_signature[1].get("images")
    return None if spec is None else tuple(int(d) for d in spec.shape[1:])


def _predict(args):
    import pathlib
    import tempfile

    import numpy as np

    from keras_moe.training.datasets import build_datasets, class_names, fit_recipe_to_input

    if args.count < 1:
        raise UsageError(f"--count must be >= 1 (test images to classify), got {args.count}")
    saved = pathlib.Path(args.saved_model)
    if not (saved / "saved_model.pb").exists():
        raise UsageError(f"{str(saved)!r} is not a SavedModel directory (no saved_model.pb)")
    run = _run_of(saved.parent) if args.dataset is None else None
    recipe = resolve_recipe(str(run / "recipe.toml") if run is not None else DEFAULT_RECIPE,
                            argparse.Namespace(dataset=args.dataset))
    recipe = recipe.override([f"data.test_size={args.count}"])
    shape = _serving_input_shape(saved)
    if shape is not None:
        recipe = fit_recipe_to_input(recipe, shape, data_dir=args.data_dir,
                                     what=f"the SavedModel {saved}")
    data = build_datasets(recipe, data_dir=args.data_dir, probe_size=args.count)
    if isinstance(data.probe, dict):
        raise UsageError("predict serves single-input models; this one takes "
                         f"{sorted(data.probe)}")
    with tempfile.TemporaryDirectory() as tmp:
        batch = pathlib.Path(tmp) / "images.npz"
        names = class_names(recipe.data.dataset, data.num_classes, data.source)
        np.savez(batch, images=data.probe.astype("float32"), labels=data.probe_labels,
                 class_names=np.array(names))
        return _run_client(saved, batch, pathlib.Path(tmp) / "result.json")


# tune / bench ---------------------------------------------------------------------------


def _tune(args):
    from keras_moe import tuning

    if args.max_minutes is not None and not args.max_minutes >= 0:
        raise UsageError(f"--max-minutes must be >= 0, got {args.max_minutes}")
    recipe = resolve_recipe(args.target, args)
    validation = args.validation
    if validation is not None and validation >= 1 and float(validation).is_integer():
        validation = int(validation)
    try:
        result = tuning.tune_recipe(
            recipe, tuner=args.tuner, max_trials=args.max_trials,
            max_seconds=None if args.max_minutes is None else args.max_minutes * 60,
            epochs=args.trial_epochs, out=args.out, overwrite=args.overwrite,
            data_dir=args.data_dir, seed=DEFAULT_SEED if args.seed is None else args.seed,
            search_space=args.search, verbose=args.verbose,
            validation=tuning.DEFAULT_VALIDATION if validation is None else validation,
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
    from keras_moe.training.run_dir import RunSettings

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
                    "in a fresh process. Run directories are never overwritten. With "
                    "--resume, the run continues exactly as it was started (its "
                    "recipe.toml and run.json); a flag that contradicts them is refused.")
    _add_recipe_flags(train)
    strategies = ["default", "mirrored", "multi_worker", "tpu"]
    train.add_argument("--strategy", default=None, choices=strategies,
                       help=f"tf.distribute strategy (default {RunSettings.strategy})")
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
    train.set_defaults(handler=_train)

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
    evaluate.set_defaults(handler=_evaluate)

    export = commands.add_parser("export", help="write a SavedModel with a serving signature")
    export.add_argument("run", help="run directory or .keras file")
    export.add_argument("--out", help="SavedModel directory (default RUN/saved_model; missing "
                                      "parent folders are created)")
    export.add_argument("--gates", action="store_true",
                        help="also return every MoE layer's gates")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing SavedModel at --out")
    export.set_defaults(handler=_export)

    predict = commands.add_parser(
        "predict", help="classify test images with a SavedModel, in a fresh process")
    predict.add_argument("saved_model")
    predict.add_argument("--dataset", help="default: the run's, else fashion_mnist")
    predict.add_argument("--count", type=int, default=8, help="test images, >= 1")
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
    tune.set_defaults(handler=_tune)

    from keras_moe.benchmarking import SUITES

    bench = commands.add_parser("bench", help="training throughput and batch-1 latency")
    _add_recipe_flags(bench, epochs=False)
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--suite", choices=SUITES,
                       help="run one of the benchmark suites (the repository's benchmarks/, "
                            "shipped in the package) instead")
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
