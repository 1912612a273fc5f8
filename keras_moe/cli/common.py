"""What every `keras-moe` command shares: the recipe a target names with the command's
overrides, user errors, the recipe flags, and the fresh-process serving client."""

import os
import sys

DEFAULT_RECIPE = "sparse_moe_fashion_mnist"
DEFAULT_SEED = 0
DEFAULT_CLASSIFY = 8


class UsageError(Exception):
    """An error in the user's input; printed without a traceback."""


def user_errors():
    from keras_moe.data import DataNotFoundError
    from keras_moe.recipes import RecipeError
    from keras_moe.training.run_dir import RunDirectoryError

    return (UsageError, RecipeError, RunDirectoryError, DataNotFoundError)


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


def flag_assignments(args):
    """`[(flag, assignment)]` of the recipe flags given on the command line."""
    found = []
    for flag, key in _RECIPE_FLAGS:
        value = getattr(args, flag, None)
        if value is not None:
            found.append((flag, f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"))
    found.extend(("set", assignment) for assignment in (getattr(args, "set", None) or []))
    return found


def flag_name(flag, assignment):
    return f"--set {assignment}" if flag == "set" else f"--{flag.replace('_', '-')} " + (
        assignment.partition("=")[2])


def with_epochs(recipe, epochs):
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
        recipe = with_epochs(recipe, getattr(args, "epochs", None))
    overrides = [assignment for _, assignment in flag_assignments(args)]
    return recipe.override(overrides) if overrides else recipe


def strategy_named(name, mesh=None):
    """`get_strategy(name, mesh=...)`, its errors (unknown name, malformed `TF_CONFIG`, no
    TPU, a mesh the devices cannot hold, JAX's distribution on another backend) as usage
    errors. `"multi_worker"` trains with `fit_distributed` (see
    `keras_moe.training.runner`), and must be created before any other TensorFlow op."""
    from keras_moe.distribute import get_strategy

    if mesh is not None and name != "expert_parallel":
        raise UsageError(f"--mesh {mesh}: only for --strategy expert_parallel (got "
                         f"--strategy {name})")
    try:
        return get_strategy(name, mesh=mesh)
    except (ValueError, RuntimeError) as error:
        flag = f"--strategy {name}" + (f" --mesh {mesh}" if mesh else "")
        raise UsageError(f"{flag}: {error}") from error


def add_recipe_flags(parser, epochs=True, target_default=DEFAULT_RECIPE):
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


def run_client(saved, batch, result_path, expected=None, tolerance=1e-5):
    import json
    import subprocess

    from keras_moe import serving_client  # numpy and TensorFlow only, imported lazily

    client = serving_client.__file__
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
