"""The run directory: what a run writes, written so that a crash never loses a good state.

```
recipe.toml         the recipe as run (with every --set and flag applied)
run.json            how the run was started: seed, determinism, data folder, strategy,
                    export and classify choices (`RunSettings`; `--resume` restores them)
command.txt         the command line that started it (and each resume)
logs/               TensorBoard: losses, metrics, expert utilisation, gate density
history.jsonl       one line per finished epoch: phase, epoch, logs
backup/<phase>/     epoch-<E>.weights.h5 (weights and optimizer state after E epochs) and
                    epoch-<E>.state.json (what else changes training: layer settings,
                    random generators' states, callbacks' state such as DeepMoE's
                    density controller)
checkpoints/<phase>.keras   the model (with optimizer state) after each finished phase
model.keras         the trained model
report.txt, report.json, report.png   the final report (see keras_moe.analysis.report)
saved_model/        the serving SavedModel
```

Crash safety: every file is written to a temporary name beside its target, flushed and
fsynced, then renamed over it (`atomic_write`, `save_model`), so a file at its final
name is always complete. An epoch backup keeps the previous epoch's file until the new
one is complete (`EpochBackup`), and `BackupState` picks the newest backup that reads
back whole, saying which one it skipped and why; `finished_phases` does the same for
the phase checkpoints. `history.jsonl` rows are appended and fsynced one by one; a torn
last line (a kill mid-append) is skipped by `read_history`.

Never silently overwritten: a directory that already holds a run is refused; an
unfinished one is continued only with `resume=True` (with its own `recipe.toml` and
`run.json`), a finished one never.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import time

import keras

from keras_moe import recipes as _recipes

__all__ = ["BackupState", "EpochBackup", "HistoryWriter", "RunDirectoryError", "RunSettings",
           "atomic_write", "check_finite", "default_run_dir", "finished_phases",
           "non_finite_weights", "phase_slug", "prepare_run_dir", "read_history",
           "read_settings", "restore_training_state", "save_model", "training_state",
           "write_settings"]

SETTINGS_FILE = "run.json"


class RunDirectoryError(ValueError):
    """A run directory that may not be written: the message says why and what to do."""


# Atomic writes ---------------------------------------------------------------------------


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(temporary, path):
    os.replace(temporary, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _save_then_replace(write, path, suffix):
    """`write(temporary path)`, fsync, rename to `path`: the one way every file of a run is
    written (Keras picks a model file's format by its suffix, so the temporary keeps it)."""
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.partial{suffix}")
    try:
        write(temporary)
        _fsync_file(temporary)
        _replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return pathlib.Path(path)


def atomic_write(path, data):
    """Writes `data` (str or bytes) to `path` through a fsynced temporary file and a rename."""
    return _save_then_replace(lambda temporary: _write_bytes(temporary, data), path, "")


def save_model(model, path):
    """`model.save(path)` (a `.keras` file) written atomically; the full weights even
    where they are split over processes (`expert_parallel.host_readable`)."""
    from keras_moe.expert_parallel import host_readable

    with host_readable(model):
        return _save_then_replace(model.save, path, ".keras")


def save_weights(model, path):
    """`model.save_weights(path)` (a `.weights.h5` file, optimizer state included) written
    atomically; the full weights, as `save_model`."""
    from keras_moe.expert_parallel import host_readable

    with host_readable(model):
        return _save_then_replace(model.save_weights, path, ".weights.h5")


# Run settings ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How a run was started, beside its recipe: what `--resume` restores.

    Attributes:
        seed: Seed of weights, data order, augmentation and gate noise.
        deterministic: TensorFlow op determinism (bit-identical resumes).
        data_dir: The data folder the run read (None: the default search).
        strategy: The `tf.distribute` strategy name (or `"expert_parallel"`).
        mesh: `--strategy expert_parallel`'s mesh, `"DATAxEXPERT"` (None: the default).
        export: Whether the run exports a SavedModel when it finishes.
        gates: Whether the SavedModel also returns the gates.
        classify: Test images classified with the SavedModel in a fresh process.
        learning_rate: The learning rate a resume lowered the run's to (None: the
            recipe's): the one change `--resume` accepts, for a run that diverged.
        processes: How many processes train it (`--num-processes`, expert_parallel).
    """

    seed: int = 0
    deterministic: bool = False
    data_dir: str = None
    strategy: str = "default"
    mesh: str = None
    export: bool = True
    gates: bool = False
    classify: int = 8
    learning_rate: float = None
    processes: int = 1

    @classmethod
    def from_dict(cls, table, source):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise RunDirectoryError(f"{source}: unknown run settings {unknown}")
        return cls(**table)


def write_settings(run_dir, settings):
    """Writes `run.json` (atomically)."""
    atomic_write(pathlib.Path(run_dir) / SETTINGS_FILE,
                 json.dumps(dataclasses.asdict(settings), indent=2))


def read_settings(run_dir):
    """The `RunSettings` of a run directory (None for a run started before they were kept)."""
    path = pathlib.Path(run_dir) / SETTINGS_FILE
    if not path.exists():
        return None
    try:
        return RunSettings.from_dict(json.loads(path.read_text()), str(path))
    except (ValueError, TypeError) as error:
        raise RunDirectoryError(f"{path} is not readable ({error}); the run's settings are "
                                "lost: start a new run") from None


def prepare_run_dir(run_dir, recipe, *, resume=False, settings=None):
    """Creates `run_dir` for `recipe`, or checks that an unfinished run may be resumed.

    Args:
        run_dir: The run directory.
        recipe: The recipe to run (ignored with `resume`: the run's own is read).
        resume: Continue the unfinished run in `run_dir`.
        settings: The `RunSettings` of a new run (written to `run.json`).

    Returns:
        `(recipe, settings)`: what to run (the run's own files when resuming; settings
        None for a run that has no `run.json`).

    Raises:
        RunDirectoryError: The directory holds a finished run, holds an unfinished run
            and `resume` is False, is not empty and not a run, or `resume` is True and
            there is no run to resume.
    """
    run_dir = pathlib.Path(run_dir)
    saved = run_dir / "recipe.toml"
    if resume:
        if not saved.exists():
            raise RunDirectoryError(f"--resume: {str(run_dir)!r} holds no run (no recipe.toml)")
        if (run_dir / "model.keras").exists():
            raise RunDirectoryError(
                f"{str(run_dir)!r} holds a finished run; nothing to resume (evaluate or "
                "export it, or train into a new --out)")
        return _recipes.load_recipe(saved), read_settings(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"{str(run_dir)!r} is a file; choose another --out")
    if run_dir.exists() and any(run_dir.iterdir()):
        if saved.exists():
            state = "a finished run" if (run_dir / "model.keras").exists() else (
                "an unfinished run (continue it with --resume)")
            raise RunDirectoryError(
                f"{str(run_dir)!r} already holds {state}; it is never overwritten: choose "
                "another --out or leave --out out for a fresh directory")
        raise RunDirectoryError(f"{str(run_dir)!r} exists and is not empty; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = settings or RunSettings()
    write_settings(run_dir, settings)
    _recipes.save_recipe(recipe, saved, header=f"keras-moe run of {recipe.origin}")
    return recipe, settings


def default_run_dir(recipe, root="runs"):
    """`runs/<recipe name>-<UTC time>`, with a suffix if that exists already."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = pathlib.Path(root) / f"{recipe.name}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = pathlib.Path(f"{base}-{n}")
    return candidate


def phase_slug(index, phase):
    return f"{index}-{phase.name}"


# History ---------------------------------------------------------------------------------


class HistoryWriter(keras.callbacks.Callback):
    """Appends every finished epoch's logs to `history.jsonl` (fsynced: survives resumes)."""

    def __init__(self, path, phase):
        super().__init__()
        self.path, self.phase = path, phase

    def on_train_begin(self, logs=None):
        # A kill mid-append leaves a torn last line: cut it off before appending, or the
        # next row would be glued to it and lost to `read_history` with it.
        path = pathlib.Path(self.path)
        if path.exists():
            text = path.read_bytes()
            if text and not text.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(text.rfind(b"\n") + 1)
                    f.flush()
                    os.fsync(f.fileno())

    def on_epoch_end(self, epoch, logs=None):
        row = {"phase": self.phase, "epoch": int(epoch)}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_history(run_dir):
    """The rows of `history.jsonl`, one per finished epoch, in order (a re-run epoch keeps
    its last row; a torn last line, from a kill mid-append, is skipped)."""
    path = pathlib.Path(run_dir) / "history.jsonl"
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


# Epoch backups ---------------------------------------------------------------------------

_BACKUP = re.compile(r"^epoch-(\d+)\.weights\.h5$")
# `.settings.json`: the state file of backups written before callback state was kept.
_BACKUP_FILE = re.compile(r"^epoch-(\d+)\.(?:weights\.h5|state\.json|settings\.json)$")
_SETTING_TYPES = (bool, int, float, str)


def _layer_key(layer):
    # A layer's path is unique in its model ("moe_1/gate"); names are not (every
    # MoEDense's gate is called "gate"), and keying by name once wrote one gate's
    # num_experts into another's on restore.
    return getattr(layer, "path", None) or layer.name


def _layer_settings(model):
    """`{layer path: {key: value}}`: each layer's plain config values that are attributes
    too (a gate's `temperature`), trainability aside (the phase settings set it)."""
    from keras_moe.analysis import graph

    found = {}
    for layer in graph.layers(model):
        values = {key: value for key, value in layer.get_config().items()
                  if isinstance(value, _SETTING_TYPES) and key not in ("name", "trainable")
                  and getattr(layer, key, None) == value}
        if values:
            found[_layer_key(layer)] = values
    return found


def _restore_layer_settings(model, settings):
    from keras_moe.analysis import graph

    for layer in graph.layers(model):
        for key, value in settings.get(_layer_key(layer), {}).items():
            if getattr(layer, key, value) != value:
                setattr(layer, key, value)


def _state_variables(model):
    """`{layer path:attribute: state variable}` of every random generator of the model
    (gate noise, dropout): `save_weights` leaves their states out, and a resumed run
    must continue their counters, or it would draw the noise of the run's first steps
    again. Keyed by the layer's path, not the variable's (Keras numbers generators
    per process: a second model built in one process has other variable paths)."""
    from keras_moe.analysis import graph

    found = {}
    for layer in graph.layers(model):
        for name, value in vars(layer).items():
            if isinstance(value, keras.random.SeedGenerator):
                found[f"{_layer_key(layer)}:{name}"] = value.state
    return found


def to_json_value(value):
    """A callback state's value in JSON: numpy arrays (and their scalars) kept exactly
    (their bytes in base64, with dtype and shape: a gate snapshot has 10^5 values);
    tuples as lists; everything else as JSON has it."""
    import base64

    import numpy as np

    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value)
        return {"__ndarray__": base64.b64encode(data.tobytes()).decode("ascii"),
                "dtype": data.dtype.str, "shape": list(data.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    return value


def from_json_value(value):
    """The inverse of `to_json_value` (lists stay lists)."""
    import base64

    import numpy as np

    if isinstance(value, dict):
        if set(value) == {"__ndarray__", "dtype", "shape"}:
            data = base64.b64decode(value["__ndarray__"])
            return np.frombuffer(data, dtype=value["dtype"]).reshape(value["shape"]).copy()
        return {k: from_json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json_value(v) for v in value]
    return value


def _stateful(callbacks):
    """`{key: callback}` of the callbacks that keep training state (`get_state` and
    `set_state`), keyed by class name and occurrence (`GateDensityTarget`,
    `GateDensityTarget#2`, ...) so that a resumed run's callbacks find their own."""
    found, seen = {}, {}
    for callback in callbacks:
        if not (callable(getattr(callback, "get_state", None))
                and callable(getattr(callback, "set_state", None))):
            continue
        name = type(callback).__name__
        seen[name] = seen.get(name, 0) + 1
        found[name if seen[name] == 1 else f"{name}#{seen[name]}"] = callback
    return found


def training_state(model, callbacks=()):
    """Everything that changes training and is not in `save_weights`' file, as JSON:
    layer settings (a t-SNE gate's temperature), the random generators' states and the
    state of every callback that has `get_state()` (a density controller's counters)."""
    import numpy as np

    return {
        "layers": _layer_settings(model),
        "random": {path: to_json_value(np.asarray(keras.ops.convert_to_numpy(v)))
                   for path, v in _state_variables(model).items()},
        "callbacks": {key: to_json_value(callback.get_state())
                      for key, callback in _stateful(callbacks).items()},
    }


def restore_training_state(model, state, callbacks=()):
    """Puts a `training_state` back (a state written before callback state was kept is
    `{layer path: settings}` alone).

    Raises:
        RunDirectoryError: A callback has state and the backup has none for it: the
            backup is of another run's callbacks. (State without its callback is left:
            a phase restored whole from its last backup trains no further epoch.)
    """
    if "layers" not in state:  # an older backup's .settings.json
        _restore_layer_settings(model, state)
        return
    _restore_layer_settings(model, state["layers"])
    variables = _state_variables(model)
    if set(variables) != set(state["random"]):
        raise RunDirectoryError(
            f"the backup's random generators {sorted(state['random'])} are not the "
            f"model's {sorted(variables)}: it is another model's backup")
    for key, value in state["random"].items():
        variables[key].assign(from_json_value(value))
    stateful = _stateful(callbacks)
    saved = state["callbacks"]
    missing = sorted(set(stateful) - set(saved))
    if missing:
        raise RunDirectoryError(
            f"the backup holds no state for the callbacks {missing} (it has "
            f"{sorted(saved) or 'none'}): it was written by another run's callbacks")
    for key, callback in stateful.items():
        callback.set_state(from_json_value(saved[key]))


def _state_path(weights_path):
    return pathlib.Path(str(weights_path).replace(".weights.h5", ".state.json"))


def _readable_state(weights_path):
    """`(state, None)` for a backup's state file that reads back, else `(None, why)`; an
    older backup's `.settings.json` (layer settings alone) counts, and a backup of that
    age without it has an empty state."""
    path = _state_path(weights_path)
    if not path.exists():
        older = pathlib.Path(str(weights_path).replace(".weights.h5", ".settings.json"))
        if older.exists():
            path = older
        else:
            return None, f"its state file {path.name} is missing"
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as error:
        return None, f"its state file {path.name} does not read ({type(error).__name__}: {error})"


def _readable_weights(path):
    """None if `path` is a complete HDF5 weights file, else why not."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            def read(name, obj):
                if isinstance(obj, h5py.Dataset):
                    obj[()]
            f.visititems(read)
    except Exception as error:  # h5py raises OSError, KeyError, RuntimeError on torn files
        return f"{type(error).__name__}: {error}"
    return None


@dataclasses.dataclass
class BackupState:
    """The newest epoch backup of a phase that reads back whole (None: start the phase
    afresh): its weights file and its state file.

    Attributes:
        path: The `.weights.h5` file to restore, or None.
        epoch: The epoch to continue at (epochs done), or None.
        skipped: `[(path, why)]` of newer backups that did not read back whole.
    """

    path: pathlib.Path = None
    epoch: int = None
    skipped: list = dataclasses.field(default_factory=list)

    @classmethod
    def find(cls, backup_dir):
        folder = pathlib.Path(backup_dir)
        found = []
        if folder.is_dir():
            for item in folder.iterdir():
                match = _BACKUP.match(item.name)
                if match:
                    found.append((int(match.group(1)), item))
        state = cls()
        for epoch, path in sorted(found, reverse=True):
            why = _readable_weights(path) or _readable_state(path)[1]
            if why is None:
                state.path, state.epoch = path, epoch
                break
            state.skipped.append((path, why))
        return state

    def describe(self, default_epoch):
        """What a resume does, for the user (one line per fallback)."""
        lines = [f"backup {p.name} is not readable ({why}); falling back to an older one"
                 for p, why in self.skipped]
        if self.path is not None:
            lines.append(f"resuming at epoch {self.epoch + 1} from {self.path}")
        elif self.skipped:
            lines.append(f"no readable backup left: the phase restarts at epoch "
                         f"{default_epoch + 1}")
        return lines


def non_finite_weights(model):
    """Paths of the model's variables (weights and optimizer state) that hold a NaN or
    an infinity."""
    import numpy as np

    from keras_moe.expert_parallel import host_readable

    variables = list(model.weights)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    with host_readable(model):  # weights split over processes read whole
        return [v.path for v in variables
                if np.issubdtype(np.dtype(v.dtype), np.floating)
                and not np.all(np.isfinite(keras.ops.convert_to_numpy(v)))]


def check_finite(model, what):
    """Refuses to write `what` from a model with non-finite weights.

    Raises:
        TrainingDiverged: Naming the first such variables.
    """
    from keras_moe.training.callbacks import TrainingDiverged

    bad = non_finite_weights(model)
    if bad:
        raise TrainingDiverged(
            f"not writing {what}: {len(bad)} variable(s) hold NaN or infinity "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); the last good backup "
            "is kept")


class EpochBackup(keras.callbacks.Callback):
    """Saves the training state after every epoch, atomically; restores a backup.

    After epoch E (0-based) it writes `epoch-<E+1>.state.json` (`training_state`: layer
    settings, random generators, and the `get_state()` of every callback in `stateful`)
    and `epoch-<E+1>.weights.h5` (weights and optimizer state), each through a
    temporary file and a rename; the weights file is written last and marks the backup
    complete. Only then are the backups older than the one before it deleted: at every
    moment the last complete backup, and the one before it, are on disk. A model whose
    weights are not finite is never written (`TrainingDiverged`). With `restore` (a
    `BackupState.path`) it loads that backup when training begins, and hands each
    stateful callback its state (`set_state`) after that callback's own
    `on_train_begin` when the callback comes before this one in `fit`'s list (the
    runner puts every other callback before it).

    A callback opts in by defining `get_state()` (a JSON-able dict; numpy arrays are
    kept exactly) and `set_state(state)`.

    Args:
        backup_dir: The phase's backup folder.
        restore: A backup file to restore in `on_train_begin`, or None.
        stateful: The run's other callbacks (those without `get_state` are ignored).
        after_restore: `after_restore(model)`, called once a backup is restored (the
            runner sets a resume's lowered learning rate there).
    """

    def __init__(self, backup_dir, restore=None, stateful=(), after_restore=None):
        super().__init__()
        self.backup_dir = pathlib.Path(backup_dir)
        self.restore = restore
        self.stateful = [c for c in stateful if c is not self]
        self.after_restore = after_restore

    def on_train_begin(self, logs=None):
        if self.restore is None:
            return
        state, why = _readable_state(self.restore)
        if why is not None:
            raise RunDirectoryError(f"backup {self.restore}: {why}")
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self.model.load_weights(self.restore)
        restore_training_state(self.model, state, self.stateful)
        if self.after_restore is not None:
            self.after_restore(self.model)

    def on_epoch_end(self, epoch, logs=None):
        check_finite(self.model, f"the backup of epoch {epoch + 1}")
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        done = epoch + 1
        atomic_write(self.backup_dir / f"epoch-{done}.state.json",
                     json.dumps(training_state(self.model, self.stateful)))
        save_weights(self.model, self.backup_dir / f"epoch-{done}.weights.h5")
        for item in self.backup_dir.iterdir():
            match = _BACKUP_FILE.match(item.name)
            if match and int(match.group(1)) < done - 1:
                item.unlink()


# Phase checkpoints -----------------------------------------------------------------------


def finished_phases(run_dir, phases, load=None):
    """The last finished phase whose checkpoint loads, and that model.

    Args:
        run_dir: The run directory.
        phases: The recipe's phases.
        load: `load(path) -> model` (default: `keras.saving.load_model`, safe mode).

    Returns:
        `(done, model, notes)`: phases done (0: none), the model restored from the last
        of them (None if none) and one line per unreadable checkpoint skipped.
    """
    load = load or (lambda path: keras.saving.load_model(path, safe_mode=True))
    folder = pathlib.Path(run_dir) / "checkpoints"
    notes = []
    for index in reversed(range(len(phases))):
        path = folder / f"{phase_slug(index, phases[index])}.keras"
        if not path.exists():
            continue
        try:
            return index + 1, load(path), notes
        except Exception as error:  # a torn zip, a missing member, a bad config
            notes.append(f"checkpoint {path} is not readable ({type(error).__name__}: "
                         f"{str(error)[:200]}); falling back to an earlier phase")
    return 0, None, notes
