"""`keras-moe train / evaluate / export / predict` on tiny recipes over the real default data."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe import cli, recipes
from keras_moe.training import datasets, run_dir, runner

from conftest import TINY_TWO_DOMAIN_RECIPE

TINY = """
[recipe]
name = "tiny_sparse"
description = "tiny"
paper = "test"

[model]
name = "sparse_moe_classifier"
num_experts = 4
top_k = 2
units = 16

[losses]
importance_weight = 0.1
load_weight = 0.1

[data]
dataset = "fashion_mnist"
batch_size = 64
train_size = 512
test_size = 256

[[phases]]
name = "train"
epochs = 2
"""

EIGEN_TWO_PHASE = """
[recipe]
name = "tiny_eigen"

[model]
name = "dmoe_mnist"
experts = [3, 2]
units = [16, 8]
gate_hidden_units = [8, 4]
assignment_margin = 20.0

[data]
dataset = "fashion_mnist"
batch_size = 32
train_size = 1024
test_size = 128
normalize = "none"

[optimizer]
name = "adam"
learning_rate = 0.002

[[phases]]
name = "constrained"
epochs = 2
assignment_constraint = true

[[phases]]
name = "free"
epochs = 2
assignment_constraint = false
"""


def _recipe_file(tmp_path, text, name="recipe.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    out = tmp / "run"
    recipe = _recipe_file(tmp, TINY)
    code = cli.main(["train", recipe, "--out", str(out), "--verbose", "0", "--classify", "4",
                     "--gates"])
    return code, out


def test_train_writes_a_complete_run_directory(trained_run):
    code, out = trained_run
    assert code == 0
    for name in ("recipe.toml", "command.txt", "model.keras", "report.txt", "report.json",
                 "report.png", "history.jsonl", "saved_model/saved_model.pb",
                 "checkpoints/0-train.keras"):
        assert (out / name).exists(), name
    assert (out / "report.png").stat().st_size > 10_000
    history = run_dir.read_history(out)
    assert [(row["phase"], row["epoch"]) for row in history] == [("train", 0), ("train", 1)]
    assert all(np.isfinite(row["loss"]) and "val_accuracy" in row for row in history)
    # TensorBoard: losses and metrics, and the expert utilisation of the MoE layer.
    events = {os.path.relpath(root, out / "logs") for root, _, files in os.walk(out / "logs")
              if any(f.startswith("events.out.tfevents") for f in files)}
    assert {"train", "validation", "moe"} <= events
    tags = set()
    for root, _, files in os.walk(out / "logs" / "moe"):
        for f in files:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, f)):
                tags.update(v.tag for v in event.summary.value)
    assert "moe_0/load_cv" in tags and "moe_0/expert_3/share" in tags
    # The recorded recipe is the one run, and reloads.
    assert recipes.load_recipe(out / "recipe.toml").model.args["num_experts"] == 4


def test_report_numbers_are_the_models_own(trained_run):
    _, out = trained_run
    report = json.loads((out / "report.json").read_text())
    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    recipe = recipes.load_recipe(out / "recipe.toml")
    data = datasets.build_datasets(recipe)
    x = np.concatenate([b[0].numpy() for b in data.test])
    y = np.concatenate([b[1].numpy() for b in data.test])
    accuracy = float(np.mean(model.predict(x, verbose=0).argmax(-1) == y))
    assert report["test"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert report["test_examples"] == 256 and report["train_examples"] == 512
    share = np.array(report["moe"]["moe_0"]["share"])
    assert share.shape == (4,) and share.sum() == pytest.approx(1.0)
    assert report["parameters"] == model.count_params()
    text = (out / "report.txt").read_text()
    assert f"accuracy {report['test']['accuracy']:.4f}" in text


def test_saved_model_classifies_in_a_fresh_process_without_keras_moe(trained_run):
    _, out = trained_run
    result = json.loads((out / "classify_output.json").read_text())
    assert result["keras_moe_imported"] is False
    assert result["max_abs_diff"] <= 1e-5
    batch = np.load(out / "classify_input.npz")
    assert np.asarray(result["probabilities"]).shape == (4, 10)
    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(model.predict(batch["images"],
                                                                          verbose=0)))
    np.testing.assert_allclose(result["probabilities"], expected, atol=1e-5)


def test_a_run_directory_is_never_overwritten(trained_run, tmp_path, capsys):
    _, out = trained_run
    recipe = _recipe_file(tmp_path, TINY)
    before = (out / "model.keras").stat().st_mtime_ns
    assert cli.main(["train", recipe, "--out", str(out)]) == 2
    assert "already holds a finished run; it is never overwritten" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(out), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert (out / "model.keras").stat().st_mtime_ns == before
    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli.main(["train", recipe, "--out", str(other)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert os.listdir(other) == ["notes.txt"]
    # Without --out every run gets a directory of its own.
    parsed = recipes.load_recipe(recipe)
    first, second = run_dir.default_run_dir(parsed, tmp_path), run_dir.default_run_dir(parsed,
                                                                                      tmp_path)
    assert first == second  # nothing created yet
    first.mkdir(parents=True)
    assert run_dir.default_run_dir(parsed, tmp_path) != first


def test_evaluate_export_and_predict_a_finished_run(trained_run, tmp_path, capsys):
    _, out = trained_run
    report = json.loads((out / "report.json").read_text())
    assert cli.main(["evaluate", str(out), "--json", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["test"]["accuracy"] == pytest.approx(report["test"]["accuracy"], abs=1e-6)
    capsys.readouterr()

    assert cli.main(["export", str(out)]) == 2  # train already exported there
    assert "never overwritten silently: pass --overwrite" in capsys.readouterr().err
    target = tmp_path / "exported"
    assert cli.main(["export", str(out), "--out", str(target), "--gates"]) == 0
    printed = capsys.readouterr().out
    assert "'gates_moe_0': (None, 4)" in printed and "'probabilities': (None, 10)" in printed

    assert cli.main(["predict", str(out / "saved_model"), "--count", "3"]) == 0
    printed = capsys.readouterr()
    assert cli.main(["predict", str(tmp_path)]) == 2
    assert "not a SavedModel directory" in capsys.readouterr().err


def test_phases_apply_their_settings_and_number_epochs_on(tmp_path):
    recipe = recipes.load_recipe(_recipe_file(tmp_path, EIGEN_TWO_PHASE))
    result = runner.train_recipe(recipe, tmp_path / "run", verbose=0)
    assert [(r["phase"], r["epoch"]) for r in result.history] == [
        ("constrained", 0), ("constrained", 1), ("free", 2), ("free", 3)]
    from keras_moe.training import eigen as phases

    layers = phases.constrained_moe_layers(result.model)
    assert layers and not any(float(layer.assignment_constraint_active.numpy()) > 0.5 for layer in layers)
    phase0 = keras.saving.load_model(tmp_path / "run/checkpoints/0-constrained.keras",
                                     safe_mode=True)
    assert all(float(layer.assignment_constraint_active.numpy()) > 0.5
               for layer in phases.constrained_moe_layers(phase0))
    assert int(result.model.optimizer.iterations.numpy()) == 4 * 32  # 1024 / 32 per epoch


def _train_process(recipe, out, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "keras_moe.cli", "train", recipe, "--out", str(out),
         "--deterministic", "--verbose", "0", "--no-export", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_killed_cli_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL in the second phase, after its first epoch's backup: --resume finishes with
    exactly the weights of a run that was never interrupted."""
    recipe = _recipe_file(tmp_path, EIGEN_TWO_PHASE)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = _train_process(recipe, whole)
    process = _train_process(recipe, killed)
    metadata = killed / "backup" / "1-free" / "training_metadata.json"
    deadline = time.time() + 300
    while not metadata.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed:\n" + (
        process.stdout.read())
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "model.keras").exists()
    assert (killed / "checkpoints" / "0-constrained.keras").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "keras_moe.cli", "train", "--out", str(killed), "--resume",
         "--deterministic", "--verbose", "0", "--no-export"],
        capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stdout.read()
    a = keras.saving.load_model(whole / "model.keras", safe_mode=True).get_weights()
    b = keras.saving.load_model(killed / "model.keras", safe_mode=True).get_weights()
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    epochs = [row["epoch"] for row in run_dir.read_history(killed)]
    assert epochs == [0, 1, 2, 3]
    assert (killed / "command.txt").read_text().count("keras-moe train") == 2


def test_mirrored_run_matches_one_device(tmp_path, mirrored_strategy):
    """A zoo model with a gate loss (two-domain MoE, entropy loss) through train_recipe:
    two replicas give one device's losses and weights."""
    text = TINY_TWO_DOMAIN_RECIPE
    recipe = recipes.load_recipe(_recipe_file(tmp_path, text))
    one = runner.train_recipe(recipe, tmp_path / "one", verbose=0)
    two = runner.train_recipe(recipe, tmp_path / "two", verbose=0, strategy=mirrored_strategy)
    assert mirrored_strategy.num_replicas_in_sync == 2
    np.testing.assert_allclose([r["loss"] for r in two.history],
                               [r["loss"] for r in one.history], rtol=1e-5)
    for a, b in zip(one.model.get_weights(), two.model.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)



def test_tsne_phase_fits_the_map_then_places_the_experts_on_it(tmp_path):
    from keras_moe.layers.tsne_gate import TSNEGate, nearest_neighbour_sq_distance

    text = """
[model]
name = "tsne_moe"
num_experts = 4
top_k = 2
expert_units = 4
map_hidden_units = [8]
perplexity = 5.0

[data]
dataset = "fashion_mnist"
batch_size = 64
train_size = 256
test_size = 64
normalize = "none"

[[phases]]
epochs = 1
tsne_map_epochs = 2
"""
    recipe = recipes.load_recipe(_recipe_file(tmp_path, text))
    keras.utils.set_random_seed(0)
    data = datasets.build_datasets(recipe)
    model = runner.build_model(recipe, data)
    runner.compile_model(model, recipe, data.steps_per_epoch)
    gate = next(layer for layer in model.layers if isinstance(layer, TSNEGate))
    before = [w.copy() for w in gate.mapping.get_weights()]
    from keras_moe import zoo
    from keras_moe.training.phases import apply_phase
    from keras_moe.zoo.registry import PhaseContext

    apply_phase(model, recipe.phases[0], zoo.get_family(recipe.model.name),
                PhaseContext(recipe.phases[0], data=data))
    after = gate.mapping.get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(before, after))  # the map was fitted
    assert not gate.mapping.trainable  # and stays frozen for the classifier (the paper's)
    features = keras.Model(model.inputs, gate.input).predict(data.train_inputs(), verbose=0)
    points = keras.ops.convert_to_numpy(gate.mapping(features))
    positions = keras.ops.convert_to_numpy(gate.positions)
    # k-means centres: each expert sits at the mean of the mapped points nearest to it.
    nearest = np.argmin(((points[:, None] - positions[None]) ** 2).sum(-1), axis=1)
    for e in np.unique(nearest):
        np.testing.assert_allclose(positions[e], points[nearest == e].mean(0), rtol=1e-3,
                                   atol=1e-3)
    assert gate.temperature == pytest.approx(nearest_neighbour_sq_distance(positions))
    with pytest.raises(recipes.RecipeError, match="tsne_map_epochs must be >= 1"):
        recipe.override(["phases.0.tsne_map_epochs=0"])


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
    recipe = recipes.load_recipe(_recipe_file(tmp_path, text))
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


def test_epochs_are_drawn_from_seed_and_epoch_alone(tmp_path):
    """Epoch e's order and augmentation depend on (seed, e) only: what resuming needs."""
    from keras_moe.data import pipelines

    recipe = recipes.load_recipe(_recipe_file(tmp_path, TINY)).override(
        ["data.train_size=96", "data.augment=true", "data.pad_to=32", "data.batch_size=32"])
    data = datasets.build_datasets(recipe, seed=5)
    first = [b[0].numpy() for b in data.train_epochs(1, 2)]
    again = [b[0].numpy() for b in datasets.build_datasets(recipe, seed=5).train_epochs(1, 2)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    # The formula: order = stateless_shuffle(range(n), [seed, e]); example i is the
    # transformed image, then pad-4 crop and flip from [seed * 1000003 + e, i].
    plain = data.train_inputs()
    order = tf.random.experimental.stateless_shuffle(
        tf.range(96, dtype=tf.int64), seed=tf.constant([5, 1], tf.int64)).numpy()
    expected = np.stack([pipelines.cifar_augment(
        tf.constant(plain[i]), tf.constant([5 * 1000003 + 1, i], tf.int64)).numpy()
        for i in order])
    np.testing.assert_array_equal(np.concatenate(first), expected)
    other = np.concatenate([b[0].numpy() for b in data.train_epochs(2, 3)])
    assert not np.array_equal(other, expected)
