"""A run that diverges stops, keeps its last good state, and resumes with a lower rate.

`keras-moe train` used to finish a run whose loss was NaN from its first epoch with
exit 0, a NaN `model.keras` and NaN phase checkpoint, and `history.jsonl` rows that strict
JSON readers reject. Now the first non-finite batch stops the run (exit 1, one line
naming the phase, epoch, batch, the first non-finite term and the hint), nothing of the
diverged state is written, and `--resume --set optimizer.learning_rate=...` (the one
change a resume accepts, and only downwards) continues from the last good backup.
"""

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_moe import cli
from keras_moe.training import run_dir

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_workers", "killed_train.py")
TINY = ["sparse_moe_fashion_mnist", "--train-size", "256", "--test-size", "64",
        "--batch-size", "32", "--set", "model.units=16", "--no-export", "--classify", "0",
        "--verbose", "0", "--deterministic", "--seed", "1"]


def _strict_rows(path):
    """history.jsonl read as strict JSON: NaN and Infinity are refused."""
    def refuse(constant):
        raise ValueError(f"non-finite {constant} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _all_finite(path):
    return all(np.all(np.isfinite(w)) for w in
               keras.saving.load_model(path, safe_mode=True).get_weights())


def test_a_diverging_run_stops_at_once_and_a_lower_learning_rate_finishes_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--epochs", "2", "--learning-rate", "1e35",
                     "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("keras-moe train: error: training diverged in phase 'train', "
                            "epoch 1, batch "), error
    assert "the loss is nan" in error and "first non-finite term: " in error
    assert f"keras-moe train --out {out} --resume --set optimizer.learning_rate=1e+34" in error
    # Nothing of the diverged state: no model, checkpoint, backup or history row.
    assert not (out / "model.keras").exists() and not list(out.glob("checkpoints/*"))
    assert not list(out.glob("backup/*/*")) and not run_dir.read_history(out)

    # A resume may lower the learning rate, and only that.
    assert cli.main(["train", "--out", str(out), "--resume", "--learning-rate", "1e36"]) == 2
    assert "a resume may only lower the learning rate; the run's is 1e+35" in \
        capsys.readouterr().err
    assert cli.main(["train", "--out", str(out), "--resume", "--learning-rate", "0.001",
                     "--set", "data.batch_size=16"]) == 2
    assert "--set data.batch_size=16 (not what the run's recipe.toml has)" in \
        capsys.readouterr().err
    assert run_dir.read_settings(out).learning_rate is None  # refused: nothing recorded

    assert cli.main(["train", "--out", str(out), "--resume",
                     "--set", "optimizer.learning_rate=0.001"]) == 0
    assert run_dir.read_settings(out).learning_rate == 0.001
    assert "optimizer.learning_rate=0.001" in (out / "command.txt").read_text().splitlines()[-1]
    assert [row["epoch"] for row in _strict_rows(out / "history.jsonl")] == [0, 1]
    assert _all_finite(out / "model.keras")
    report = json.loads((out / "report.json").read_text())
    assert math.isfinite(report["test"]["loss"])


def test_a_run_that_diverges_after_a_good_epoch_keeps_that_epoch(tmp_path):
    """Made to diverge in epoch 2 (every weight set infinite after its 3rd batch, 8 batches
    an epoch): the stop names epoch 2 and batch 4, epoch 1's backup and history row stay
    as they were, and a resume continues from that backup."""
    out = tmp_path / "run"
    process = subprocess.run(
        [sys.executable, WORKER, "poison-weights", "11", "--", *TINY, "--epochs", "3",
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert process.returncode == 1, process.stdout[-2000:] + process.stderr[-3000:]
    assert "training diverged in phase 'train', epoch 2, batch 4: the loss is" in process.stderr
    backups = sorted(p.name for p in out.glob("backup/*/*"))
    assert backups == ["epoch-1.state.json", "epoch-1.weights.h5"], backups
    model = keras_model_from_backup(out)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert [row["epoch"] for row in _strict_rows(out / "history.jsonl")] == [0]
    assert not (out / "model.keras").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "keras_moe", "train", "--out", str(out), "--resume",
         "--learning-rate", "0.0005"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch 2 from" in resumed.stderr
    assert [row["epoch"] for row in _strict_rows(out / "history.jsonl")] == [0, 1, 2]
    assert _all_finite(out / "model.keras")


def keras_model_from_backup(out):
    """The run's model with its epoch backup's weights (built from its recipe)."""
    from keras_moe import recipes
    from keras_moe.training import runner
    from keras_moe.training.datasets import build_datasets

    recipe = recipes.load_recipe(out / "recipe.toml")
    data = build_datasets(recipe, seed=1)
    model = runner.build_model(recipe, data)
    runner.compile_model(model, recipe, data.steps_per_epoch)
    model.optimizer.build(model.trainable_variables)
    model.load_weights(next(out.glob("backup/*/epoch-1.weights.h5")))
    return model
