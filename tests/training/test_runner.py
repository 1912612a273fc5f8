"""`keras_moe.training.runner`: a recipe into a run directory, killed and resumed.

A tiny two-phase Eigen recipe (the constraint on, then off: a phase setting and running
totals in the model) is trained once uninterrupted, and once per kill point with SIGKILL
at that point (`tests/_workers/killed_train.py`): mid-write of an epoch backup,
mid-append of a history row, mid-write of a phase checkpoint and of `model.keras`,
between a checkpoint and its backups' deletion. Every run is started with `--seed 3
--deterministic --no-export --classify 0` and resumed with `--out RUN --resume` alone:
each resume must end with exactly the uninterrupted run's weights, having restored the
seed, determinism and export choices from the run directory (it used to start over with
seed 0, lose determinism, export and classify), and a resume whose newest backup was
damaged on disk must fall back to the previous one and say so.
"""

import os
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest

from keras_moe import cli, recipes
from keras_moe.training import run_dir, runner

from conftest import TINY_EIGEN_RECIPE, TINY_TWO_DOMAIN_RECIPE, write_recipe

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_workers", "killed_train.py")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

RECIPE = TINY_EIGEN_RECIPE
STARTED_WITH = ["--seed", "3", "--deterministic", "--no-export", "--classify", "0",
                "--verbose", "0"]
# (point, occurrence): 4 epoch backups (epochs 1-2 in phase 0, 3-4 in phase 1), 4 history
# rows, 3 .keras files (the two phase checkpoints, then model.keras).
KILLS = [("backup-mid-write", 3), ("history-mid-line", 2),
         ("checkpoint-mid-write", 1), ("checkpoint-mid-write", 2),
         ("before-backup-cleanup", 1), ("checkpoint-mid-write", 3)]
DAMAGED = ("checkpoint-mid-write", 2)  # two backups of phase 1 on disk: damage the newer


def _start(args):
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)


def _weights(path):
    return keras.saving.load_model(path, safe_mode=True).get_weights()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    recipe = tmp / "recipe.toml"
    recipe.write_text(RECIPE)
    whole = tmp / "whole"
    processes = {"whole": _start(["-m", "keras_moe", "train", str(recipe), "--out",
                                  str(whole), *STARTED_WITH])}
    for point, n in KILLS:
        out = tmp / f"{point}-{n}"
        processes[(point, n)] = _start([WORKER, point, str(n), "--", str(recipe), "--out",
                                        str(out), *STARTED_WITH])
    outputs = {key: p.communicate(timeout=900)[0] for key, p in processes.items()}
    assert processes["whole"].returncode == 0, outputs["whole"][-3000:]
    for key in KILLS:
        assert processes[key].returncode == -9, (key, outputs[key][-3000:])
    return tmp, recipe, whole


def test_nothing_at_a_final_name_is_ever_torn(runs):
    tmp, _, _ = runs
    for point, n in KILLS:
        out = tmp / f"{point}-{n}"
        assert not (out / "model.keras").exists(), (point, n)
        for backup in out.glob("backup/*/epoch-*.weights.h5"):
            with h5py.File(backup, "r") as f:  # opens: complete
                assert len(f.keys()) > 0
        for checkpoint in out.glob("checkpoints/[!.]*.keras"):
            keras.saving.load_model(checkpoint, safe_mode=True)
        settings = run_dir.read_settings(out)
        assert (settings.seed, settings.deterministic, settings.export, settings.classify) \
            == (3, True, False, 0)


def test_resume_refuses_flags_that_contradict_the_run(runs, capsys):
    tmp, _, _ = runs
    out = tmp / "backup-mid-write-3"
    listing = sorted(p.name for p in out.rglob("*"))
    assert cli.main(["train", "--out", str(out), "--resume", "--seed", "0", "--classify",
                     "8", "--train-size", "100", "--deterministic"]) == 2
    error = capsys.readouterr().err
    assert "--seed 0 (the run has seed = 3)" in error
    assert "--classify 8 (the run has classify = 0)" in error
    assert "--train-size 100" in error
    assert "--deterministic" not in error.split("contradict it:")[1]  # agrees with the run
    assert sorted(p.name for p in out.rglob("*")) == listing  # nothing touched


def test_every_resume_ends_with_the_uninterrupted_weights(runs):
    tmp, _, whole = runs
    damaged = tmp / "{}-{}".format(*DAMAGED) / "backup" / "1-free" / "epoch-4.weights.h5"
    assert damaged.exists() and (damaged.parent / "epoch-3.weights.h5").exists()
    with open(damaged, "r+b") as f:  # damage on disk: the newest backup is cut short
        f.truncate(os.path.getsize(damaged) // 2)
    processes = {key: _start(["-m", "keras_moe", "train", "--out",
                              str(tmp / "{}-{}".format(*key)), "--resume"])
                 for key in KILLS}
    outputs = {key: p.communicate(timeout=900)[0] for key, p in processes.items()}
    expected = _weights(whole / "model.keras")
    for key in KILLS:
        out = tmp / "{}-{}".format(*key)
        assert processes[key].returncode == 0, (key, outputs[key][-3000:])
        got = _weights(out / "model.keras")
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b, err_msg=str(key))
        # The run's own settings: no export, no classification (the resume gave no flag).
        assert not (out / "saved_model").exists() and not list(out.glob("classify_*"))
        assert [row["epoch"] for row in run_dir.read_history(out)] == [0, 1, 2, 3]
        assert (out / "command.txt").read_text().count("keras-moe train") == 2
        assert not list(out.rglob(".*.partial*"))
    said = outputs[DAMAGED]
    assert "epoch-4.weights.h5 is not readable" in said and "falling back" in said
    assert "resuming at epoch 4 from" in said and "epoch-3.weights.h5" in said


def test_mirrored_run_matches_one_device(tmp_path, mirrored_strategy):
    """A zoo model with a gate loss (two-domain MoE, entropy loss) through train_recipe:
    two replicas give one device's losses and weights."""
    text = TINY_TWO_DOMAIN_RECIPE
    recipe = recipes.load_recipe(write_recipe(tmp_path, text))
    one = runner.train_recipe(recipe, tmp_path / "one", verbose=0)
    two = runner.train_recipe(recipe, tmp_path / "two", verbose=0, strategy=mirrored_strategy)
    assert mirrored_strategy.num_replicas_in_sync == 2
    np.testing.assert_allclose([r["loss"] for r in two.history],
                               [r["loss"] for r in one.history], rtol=1e-5)
    for a, b in zip(one.model.get_weights(), two.model.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_deepmoe_recipe_runs_procedure_1_and_reports_gates_and_effective_macs(tmp_path):
    from keras_moe.analysis import flops
    from keras_moe.analysis import report as report_lib
    from keras_moe.training.deepmoe import gating_layers

    text = """
[model]
name = "deepmoe_resnet_cifar"
depth = 8
width_multiplier = 0.25
embedding_widths = [4, 4, 4, 4]

[losses]
gate_l1 = 0.5

[data]
dataset = "fashion_mnist"
batch_size = 64
train_size = 256
test_size = 64
pad_to = 32

[optimizer]
name = "sgd"
learning_rate = 0.05
momentum = 0.9

[[phases]]
name = "joint"
epochs = 1
gate_density_target = 0.6

[[phases]]
name = "finetune"
epochs = 1
freeze_gating = true
gate_l1 = 0.0
embedding_loss_weight = 0.0
"""
    recipe = recipes.load_recipe(write_recipe(tmp_path, text))
    result = runner.train_recipe(recipe, tmp_path / "run", verbose=0)
    model = result.model
    assert [r["phase"] for r in result.history] == ["joint", "finetune"]
    assert "gate_density" in result.history[0] and "gate_l1" in result.history[0]
    assert model.gate_l1 == 0.0 and model.embedding_loss_weight == 0.0
    assert gating_layers(model) and not any(layer.trainable for layer in gating_layers(model))
    report = report_lib.make_report(model, result.data, result.history, recipe=recipe)
    deep = report["deepmoe"]
    assert deep["gate_density"] == pytest.approx(
        flops.gate_density(model, result.data.probe, overall=True))
    assert deep["effective_macs"] == pytest.approx(
        flops.effective_flops(model, result.data.probe).total)
    assert report["static_macs"] == flops.static_flops(model)
    assert "DeepMoE gate density" in report_lib.format_report(report)
    report_lib.plot_report(report, result.history, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 10_000


