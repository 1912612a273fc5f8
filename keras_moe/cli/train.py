"""`keras-moe train`: a recipe into a run directory; `--resume` continues one as started
(or, for a run that diverged, with a lower learning rate: the one change it accepts)."""

import dataclasses
import sys

from keras_moe.cli.common import (
    DEFAULT_CLASSIFY,
    DEFAULT_SEED,
    UsageError,
    flag_assignments,
    flag_name,
    resolve_recipe,
    run_client,
    strategy_named,
    with_epochs,
)

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
    if args.mesh is not None:
        given["mesh"] = (args.mesh, f"--mesh {args.mesh}")
    if args.no_export:
        given["export"] = (False, "--no-export")
    if args.gates:
        given["gates"] = (True, "--gates")
    if args.classify is not None:
        given["classify"] = (args.classify, f"--classify {args.classify}")
    # Always: a resume with another process count is refused, one process included.
    count, _, flag = _processes(args)
    given["processes"] = (count, flag)
    return given


def _processes(args):
    """`(num_processes, process_id, flag text)` from --coordinator, --num-processes,
    --process-id or Keras's environment variables for them; checked."""
    from keras_moe.expert_parallel import process_settings

    try:
        _, count, index = process_settings(
            getattr(args, "coordinator", None), getattr(args, "num_processes", None),
            getattr(args, "process_id", None), names=_PROCESS_FLAGS)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return count, index, (f"--num-processes {count}" if count > 1 else "one process")


_PROCESS_FLAGS = ("--coordinator", "--num-processes", "--process-id")


def _start_processes(args, settings):
    """Joins the other processes of a multi-process run (before any JAX computation:
    the mesh counts every process's devices); nothing for one process."""
    from keras_moe.expert_parallel import initialize

    count, index, flag = _processes(args)
    if count == 1:
        return
    if settings.strategy != "expert_parallel":
        raise UsageError(
            f"{flag}: several processes are for --strategy expert_parallel (JAX); "
            f"--strategy {settings.strategy} "
            + ("takes its workers from TF_CONFIG, and tf.distribute's multi-worker "
               "strategy replicates every variable on every worker, so experts cannot "
               "be split across machines there"
               if settings.strategy == "multi_worker" else "runs in one process"))
    try:
        timeout = getattr(args, "process_timeout", 60)
        if timeout < 1:
            raise ValueError(f"--process-timeout must be >= 1 second; got {timeout}")
        initialize(args.coordinator, count, index, timeout=timeout,
                   names=_PROCESS_FLAGS)
    except ValueError as error:
        raise UsageError(str(error)) from None


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
    current = recipe if settings.learning_rate is None else recipe.override(
        [f"optimizer.learning_rate={settings.learning_rate!r}"])
    for flag, assignment in flag_assignments(args):
        try:
            changed = current.override([assignment])
        except recipes.RecipeError as error:
            raise UsageError(f"--resume: {flag_name(flag, assignment)}: {error}") from None
        if changed.to_dict() == current.to_dict():
            continue
        lowered = changed.optimizer.learning_rate
        if changed.override([f"optimizer.learning_rate={current.optimizer.learning_rate!r}"]
                            ).to_dict() == current.to_dict():
            # The one change a resume takes: a lower learning rate, for a run that
            # diverged (kept in run.json; command.txt records the command).
            if lowered < current.optimizer.learning_rate:
                settings = dataclasses.replace(settings, learning_rate=lowered)
                continue
            contradictions.append(
                f"{flag_name(flag, assignment)} (a resume may only lower the learning "
                f"rate; the run's is {current.optimizer.learning_rate:g})")
            continue
        contradictions.append(f"{flag_name(flag, assignment)} (not what the run's "
                              "recipe.toml has)")
    if getattr(args, "epochs", None) is not None:
        if with_epochs(recipe, args.epochs).to_dict() != recipe.to_dict():
            contradictions.append(f"--epochs {args.epochs} (the run's recipe.toml differs)")
    if contradictions:
        raise UsageError(
            f"--resume continues the run in {out} as it was started (recipe.toml, "
            f"run.json); these flags contradict it: {'; '.join(contradictions)}. Leave "
            "them out, or train into a new --out")
    assert isinstance(settings, RunSettings)
    return recipe, settings


def train(args):
    import pathlib

    from keras_moe.training import run_dir as run_dir_lib
    from keras_moe.training import runner

    if args.resume and not args.out:
        raise UsageError("--resume needs --out, the run directory to continue")
    if args.classify is not None and args.classify < 0:
        raise UsageError(f"--classify must be >= 0 (0: none), got {args.classify}")
    _processes(args)  # malformed process flags first, before any file is read
    if args.resume:
        recipe, settings = _resumed_run(args, pathlib.Path(args.out))
    else:
        recipe, settings = None, _new_run_settings(args)
    _start_processes(args, settings)
    # First: MultiWorkerMirroredStrategy must be created before any other TensorFlow op.
    strategy = strategy_named(settings.strategy, settings.mesh)
    if recipe is None:
        recipe = resolve_recipe(args.target, args)
    out = pathlib.Path(args.out) if args.out else run_dir_lib.default_run_dir(recipe)
    from keras_moe.expert_parallel import ExpertParallel

    if isinstance(strategy, ExpertParallel):
        try:
            runner.check_batch_fits_mesh(recipe, strategy)
        except ValueError as error:
            raise UsageError(str(error)) from None
    if settings.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    chief = runner.is_chief(strategy)
    if chief:
        print(f"run directory: {out}")
    elif isinstance(strategy, ExpertParallel):
        print(f"process {strategy.process_id} of {strategy.num_processes}: process 0 writes "
              f"the run directory ({out}); this process's files go to a temporary directory")
    else:
        print(f"non-chief worker of a multi-worker run: the chief writes the run directory "
              f"({out}); this worker's files go to a temporary directory")
    from keras_moe.training.callbacks import TrainingDiverged

    try:
        result = runner.train_recipe(
            recipe, out, strategy=strategy, resume=args.resume, data_dir=settings.data_dir,
            seed=settings.seed, verbose=args.verbose, command=["keras-moe"] + args.argv,
            settings=settings)
    except TrainingDiverged as error:
        print(f"keras-moe train: error: {error}", file=sys.stderr)
        return 1
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
    return run_client(saved, batch, out / "classify_output.json", expected)
