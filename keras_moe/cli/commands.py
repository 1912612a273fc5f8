"""`keras-moe info`, `list`, `tune` and `bench`."""

from keras_moe.cli.common import DEFAULT_SEED, UsageError, resolve_recipe, user_errors

def info(_args):
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


def list_models(args):
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


def tune(args):
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


def bench(args):
    from keras_moe import benchmarking

    try:
        if args.suite:
            import shlex

            return benchmarking.run_suite(args.suite, shlex.split(args.suite_args))
        recipe = resolve_recipe(args.target, args)
        result = benchmarking.benchmark_recipe(recipe, batch_size=args.batch_size,
                                               steps=args.steps, data_dir=args.data_dir)
    except ValueError as error:
        if isinstance(error, user_errors()):
            raise
        raise UsageError(str(error)) from error
    print(result)
    return 0
