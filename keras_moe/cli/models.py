"""`keras-moe evaluate`, `export` and `predict`: a trained model or its SavedModel."""

import argparse
import os

from keras_moe.cli.common import DEFAULT_RECIPE, DEFAULT_SEED, UsageError, resolve_recipe, run_client

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


def evaluate(args):
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


def export(args):
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


def predict(args):
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
        return run_client(saved, batch, pathlib.Path(tmp) / "result.json")
