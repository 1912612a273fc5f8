"""`keras_moe.cli`: the `keras-moe` command (every test that trains is slow-marked).

A tiny recipe is trained once into a run directory; its files, report numbers and
fresh-process classification are checked, then the commands that read it. The errors a
new user met end in one line that names the argument (item 7), and the noise is gone
(item 12).
"""

import json
import os
import shutil
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe import cli, recipes
from keras_moe.training import datasets, run_dir

from conftest import TINY_SPARSE_RECIPE, write_recipe


@pytest.mark.slow
def test_version_and_info_report_the_installation(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == keras_moe.__version__
    assert cli.main(["info"]) == 0  # .ci/run installs the default data set
    out = capsys.readouterr().out
    assert "keras-moe " + keras_moe.__version__ in out
    assert "fashion-mnist" in out


@pytest.mark.slow
def test_no_command_prints_help_and_fails():
    result = subprocess.run([sys.executable, "-m", "keras_moe.cli"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage: keras-moe" in result.stdout


@pytest.mark.slow
def test_list_prints_every_registered_model_with_its_description(monkeypatch, capsys):
    from keras_moe.zoo import registry

    def alpha_moe():
        """Alpha model."""

    def beta_net():
        """Beta model."""

    monkeypatch.setattr(registry, "_BUILDERS", {"alpha_moe": alpha_moe, "beta_net": beta_net})
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["alpha_moe", "beta_net"]
    assert lines[0].endswith("Alpha model.")
    assert cli.main(["list", "moe"]) == 0
    assert capsys.readouterr().out.split() == ["alpha_moe", "Alpha", "model."]
    assert cli.main(["list", "zzz"]) == 1


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    out = tmp / "run"
    recipe = write_recipe(tmp, TINY_SPARSE_RECIPE)
    code = cli.main(["train", recipe, "--out", str(out), "--verbose", "0", "--classify", "4",
                     "--gates"])
    return code, out


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_run_directory_is_never_overwritten(trained_run, tmp_path, capsys):
    _, out = trained_run
    recipe = write_recipe(tmp_path, TINY_SPARSE_RECIPE)
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


# What a new user met: errors as tracebacks (item 7) and noise (item 12) ----------------

DEEPMOE = ["train", "deepmoe_resnet_cifar", "--set", "model.depth=8", "--set",
           "model.width_multiplier=0.25", "--set", "model.embedding_widths=[4, 4, 4, 4]",
           "--train-size", "96", "--test-size", "32", "--batch-size", "32", "--epochs", "1",
           "--no-export", "--verbose", "0"]


@pytest.fixture(scope="module")
def deepmoe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepmoe") / "run"
    assert cli.main(DEEPMOE + ["--out", str(out)]) == 0
    return out


def _optimizer_skips(caught):
    return [str(w.message) for w in caught if "Skipping variable loading" in str(w.message)]


@pytest.mark.slow
def test_a_deepmoe_model_outside_its_run_is_evaluated_on_images_shaped_for_it(
        deepmoe_run, tmp_path, capsys):
    """A bare `.keras` of a DeepMoE trained on padded Fashion-MNIST used to die with a
    shape error from inside Keras; the report then said "trained 0 epochs"."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy2(deepmoe_run / "model.keras", elsewhere / "model.keras")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["evaluate", str(elsewhere / "model.keras"), "--test-size", "32"]) == 0
    printed = capsys.readouterr().out
    assert "trained for an unknown number of epochs" in printed and "test: accuracy" in printed
    assert _optimizer_skips(caught) == []  # no "Skipping variable loading for optimizer"
    assert cli.main(["evaluate", str(deepmoe_run)]) == 0  # in its run: the history is known
    assert "trained 2 epochs (joint epoch 1, finetune epoch 2)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_deepmoe_export_to_a_new_folder_serves_with_predict(deepmoe_run, tmp_path, capfd):
    """`export --out a/b` with a missing parent named a temporary folder; predict on the
    export fed 1-channel images to a 3-channel model ("1 vs 3")."""
    target = tmp_path / "a" / "b"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["export", str(deepmoe_run), "--out", str(target)]) == 0
    assert (target / "saved_model.pb").exists() and _optimizer_skips(caught) == []
    capfd.readouterr()
    assert cli.main(["predict", str(target), "--count", "3"]) == 0
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("image ")]
    assert len(lines) == 3 and all("true: " in line for line in lines)


@pytest.mark.slow
def test_bad_input_gets_one_line_that_names_it(deepmoe_run, tmp_path, capsys):
    from keras_moe.export import export_saved_model

    assert cli.main(["predict", str(tmp_path), "--count", "3"]) == 2
    assert "not a SavedModel directory" in capsys.readouterr().err
    assert cli.main(["export", str(deepmoe_run), "--out", str(tmp_path / "sm")]) == 0
    capsys.readouterr()
    assert cli.main(["predict", str(tmp_path / "sm"), "--count", "0"]) == 2
    assert "--count must be >= 1" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"not a zip archive" * 10)
    assert cli.main(["evaluate", str(corrupt)]) == 2
    error = capsys.readouterr().err
    assert "is not a .keras file" in error and "File not found" not in error
    with pytest.raises(ValueError, match="model must be a keras.Model.*got str"):
        export_saved_model("not a model", tmp_path / "x")


@pytest.mark.slow
def test_help_says_what_is_allowed(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "phases count from 0" in text
    assert "fashion_mnist, cifar10" in text and "keras_moe.data.NAMES" not in text
