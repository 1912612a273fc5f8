"""`keras_moe.training.run_dir`: atomic writes, epoch backups and their fallback, the
history, the run settings, refusals."""

import json
import os

import h5py
import keras
import numpy as np
import pytest

from keras_moe.training import run_dir


def _model():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile("adam", "mse")
    model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)  # optimizer state to back up
    return model


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    run_dir.atomic_write(path, "old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        run_dir.atomic_write(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]


def test_backups_keep_the_previous_one_and_a_damaged_newest_falls_back(tmp_path):
    model = _model()
    backup = run_dir.EpochBackup(tmp_path / "b")
    backup.set_model(model)
    for epoch in range(3):
        backup.on_epoch_end(epoch)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "epoch-2.state.json", "epoch-2.weights.h5", "epoch-3.state.json",
        "epoch-3.weights.h5"]
    state = run_dir.BackupState.find(tmp_path / "b")
    assert state.epoch == 3 and not state.skipped
    newest = tmp_path / "b" / "epoch-3.weights.h5"
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    state = run_dir.BackupState.find(tmp_path / "b")
    assert state.epoch == 2 and state.skipped[0][0] == newest
    lines = state.describe(default_epoch=0)
    assert "epoch-3.weights.h5 is not readable" in lines[0] and "falling back" in lines[0]
    assert lines[1].startswith("resuming at epoch 3 from")
    # The restored backup holds weights and optimizer state.
    other = _model()
    restore = run_dir.EpochBackup(tmp_path / "b", restore=state.path)
    restore.set_model(other)
    restore.on_train_begin()
    for a, b in zip(other.get_weights() + [v.numpy() for v in other.optimizer.variables],
                    model.get_weights() + [v.numpy() for v in model.optimizer.variables]):
        np.testing.assert_array_equal(a, b)
    with h5py.File(state.path, "r") as f:
        assert "optimizer" in f


def test_a_torn_history_line_is_skipped_and_a_re_run_epoch_keeps_its_last_row(tmp_path):
    rows = [{"phase": "a", "epoch": 0, "loss": 1.0}, {"phase": "a", "epoch": 1, "loss": 0.9},
            {"phase": "a", "epoch": 1, "loss": 0.8}]
    (tmp_path / "history.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"phase": "a", "epo')
    assert run_dir.read_history(tmp_path) == [rows[0], rows[2]]


def test_a_resumed_history_cuts_the_torn_line_before_appending(tmp_path):
    """The row written after a kill mid-append must start on a line of its own (glued
    to the torn one, it was lost: a resumed run's history missed that epoch)."""
    path = tmp_path / "history.jsonl"
    path.write_text(json.dumps({"phase": "a", "epoch": 0, "loss": 1.0}) + "\n"
                    + '{"phase": "a", "epo')
    writer = run_dir.HistoryWriter(path, "a")
    writer.on_train_begin()
    writer.on_epoch_end(1, {"loss": 0.5})
    assert [row["epoch"] for row in run_dir.read_history(tmp_path)] == [0, 1]
    assert path.read_text().count("\n") == 2


def test_run_settings_are_written_with_the_run_and_read_back(tmp_path):
    from keras_moe.recipes import load_recipe

    recipe = load_recipe("sparse_moe_fashion_mnist").override(["data.train_size=64",
                                                                "model.units=8"])
    settings = run_dir.RunSettings(seed=3, deterministic=True, export=False, classify=0)
    run_dir.prepare_run_dir(tmp_path / "run", recipe, settings=settings)
    assert run_dir.read_settings(tmp_path / "run") == settings
    header = (tmp_path / "run" / "recipe.toml").read_text().splitlines()[0]
    # The origin once, with each assignment once (it used to read "(with --set) (with --set)").
    assert header.endswith("sparse_moe_fashion_mnist.toml with --set data.train_size=64 "
                           "model.units=8") and "(with --set)" not in header
    again, stored = run_dir.prepare_run_dir(tmp_path / "run", None, resume=True)
    assert stored == settings and again.data.train_size == 64
    with pytest.raises(run_dir.RunDirectoryError, match="unfinished run.*--resume"):
        run_dir.prepare_run_dir(tmp_path / "run", recipe)


def test_a_backup_restores_layer_settings_that_are_not_weights(tmp_path):
    """The t-SNE phase sets the gate's temperature at its start; a resume inside the
    phase does not redo that start, so the backup must carry it."""
    from keras_moe import zoo

    def build():
        model = zoo.tsne_moe(num_experts=4, top_k=2, expert_units=2, map_hidden_units=(4,),
                             input_shape=(4, 4, 1))
        model.compile("adam", "sparse_categorical_crossentropy")
        return model

    model = build()
    model.get_layer("gate").temperature = 0.37
    backup = run_dir.EpochBackup(tmp_path / "b")
    backup.set_model(model)
    backup.on_epoch_end(0)
    other = build()
    assert other.get_layer("gate").temperature == 1.0
    restore = run_dir.EpochBackup(tmp_path / "b",
                                  restore=run_dir.BackupState.find(tmp_path / "b").path)
    restore.set_model(other)
    restore.on_train_begin()
    assert other.get_layer("gate").temperature == 0.37


def test_restored_settings_stay_with_their_own_layer(tmp_path):
    """Every MoEDense's gate is named "gate": the settings of one must never be written
    into another (a restore once gave the first gate the second's num_experts, and the
    resumed run's model.keras then failed to load)."""
    from keras_moe import zoo

    def build():
        model = zoo.dmoe_mnist(experts=[3, 2], units=[8, 4], gate_hidden_units=[6, 4])
        model.compile("adam", "sparse_categorical_crossentropy")
        return model

    model = build()
    backup = run_dir.EpochBackup(tmp_path / "b")
    backup.set_model(model)
    backup.on_epoch_end(0)
    other = build()
    restore = run_dir.EpochBackup(tmp_path / "b",
                                  restore=run_dir.BackupState.find(tmp_path / "b").path)
    restore.set_model(other)
    restore.on_train_begin()
    moe = [layer for layer in other.layers if hasattr(layer, "gate")]
    assert [(m.gate.num_experts, m.gate.hidden_units) for m in moe] == [(3, 6), (2, 4)]
    other.save(tmp_path / "m.keras")
    keras.saving.load_model(tmp_path / "m.keras")


class _Counter(keras.callbacks.Callback):
    """A callback with training state: batches seen and a float32 array."""

    def __init__(self):
        super().__init__()
        self.seen, self.values = 0, np.zeros(3, "float32")

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        self.values = self.values + np.float32(np.pi)

    def get_state(self):
        return {"seen": self.seen, "values": self.values, "nested": [(1, 2.5)]}

    def set_state(self, state):
        self.seen, self.values = state["seen"], state["values"]
        self.nested = state["nested"]


class _Noisy(keras.layers.Layer):
    """Adds gate-like noise from its own random generator in training."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.noise = keras.random.SeedGenerator(7)

    def call(self, x, training=None):
        return x + keras.random.normal(keras.ops.shape(x), seed=self.noise) if training else x


def test_a_backup_carries_callback_state_and_random_generators_exactly(tmp_path):
    """Callbacks opt in with get_state/set_state; the random generators' states, which
    save_weights leaves out, are kept too: a resumed run draws the noise the
    uninterrupted one would have drawn next, not its first again."""
    def build():
        inputs = keras.Input((3,))
        noisy = _Noisy(name="noisy")  # paths of one model, built twice in one process
        model = keras.Model(inputs, keras.layers.Dense(2, name="out")(noisy(inputs)))
        model.compile("sgd", "mse")
        return model

    x, y = np.ones((8, 3), "float32"), np.zeros((8, 2), "float32")
    model, counter = build(), _Counter()
    backup = run_dir.EpochBackup(tmp_path / "b", stateful=[counter, keras.callbacks.History()])
    model.fit(x, y, batch_size=4, epochs=2, callbacks=[counter, backup], verbose=0,
              shuffle=False)
    state = json.loads((tmp_path / "b" / "epoch-2.state.json").read_text())
    assert sorted(state) == ["callbacks", "layers", "random"]
    assert list(state["callbacks"]) == ["_Counter"]  # History has no state to keep
    noisy = model.layers[1]
    next_noise = keras.ops.convert_to_numpy(noisy(x, training=True))

    other, fresh = build(), _Counter()
    restore = run_dir.EpochBackup(tmp_path / "b", stateful=[fresh],
                                  restore=run_dir.BackupState.find(tmp_path / "b").path)
    restore.set_model(other)
    restore.on_train_begin()
    assert fresh.seen == 4 and fresh.nested == [[1, 2.5]]
    np.testing.assert_array_equal(fresh.values, counter.values)  # float32, bit for bit
    assert fresh.values.dtype == np.float32
    for a, b in zip(other.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # The same noise the first model draws next (a fresh generator starts elsewhere).
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(other.layers[1](x, training=True)),
                                  next_noise)

    # A run whose callbacks have state the backup lacks is refused, named.
    class Other(_Counter):
        pass

    stranger = run_dir.EpochBackup(tmp_path / "b", stateful=[Other()],
                                   restore=run_dir.BackupState.find(tmp_path / "b").path)
    stranger.set_model(build())
    with pytest.raises(run_dir.RunDirectoryError, match=r"no state for the callbacks \['Other'\]"):
        stranger.on_train_begin()


def test_a_backup_whose_state_file_is_missing_or_damaged_is_skipped_with_the_reason(tmp_path):
    model = _model()
    backup = run_dir.EpochBackup(tmp_path / "b")
    backup.set_model(model)
    for epoch in range(2):
        backup.on_epoch_end(epoch)
    folder = tmp_path / "b"
    (folder / "epoch-2.state.json").write_text('{"layers": {')  # damaged on disk
    state = run_dir.BackupState.find(folder)
    assert state.epoch == 1
    assert "state file epoch-2.state.json does not read" in state.skipped[0][1]
    (folder / "epoch-2.state.json").unlink()
    state = run_dir.BackupState.find(folder)
    assert state.epoch == 1 and "epoch-2.state.json is missing" in state.skipped[0][1]
    # A kill between the two files of a backup leaves the state file alone: the backup
    # before it is the one restored, whole.
    (folder / "epoch-2.weights.h5").unlink()
    run_dir.atomic_write(folder / "epoch-2.state.json", "{}")
    state = run_dir.BackupState.find(folder)
    assert state.epoch == 1 and not state.skipped


def test_non_finite_weights_are_never_written(tmp_path):
    from keras_moe.training.callbacks import TrainingDiverged

    model = _model()
    backup = run_dir.EpochBackup(tmp_path / "b")
    backup.set_model(model)
    backup.on_epoch_end(0)
    kernel = model.layers[1].kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    with pytest.raises(TrainingDiverged, match=r"not writing the backup of epoch 2: 1 "
                                               r"variable\(s\) hold NaN or infinity \(dense"):
        backup.on_epoch_end(1)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "epoch-1.state.json", "epoch-1.weights.h5"]
