"""`keras_moe.tuning.search` and `keras-moe tune`: real keras-tuner searches on a slice of
the embedded Fashion-MNIST (512 training examples, a tenth held out, 256 test examples,
1 epoch per trial)."""

import json

import numpy as np
import pytest

from keras_moe import cli, data, tuning
from keras_moe.recipes import load_recipe
from keras_moe.training.run_dir import RunDirectoryError

TINY = ["data.train_size=512", "data.test_size=256", "data.batch_size=64", "model.units=32"]
# k's choices exceed the smallest number of experts: k is then conditional on it.
SEARCH = ["model.num_experts=2,4", "model.top_k=1,2,4"]


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("sparse_moe_fashion_mnist").override(TINY)


@pytest.fixture(scope="module")
def search(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "search"
    result = tuning.tune_recipe(recipe, tuner="random", max_trials=3, epochs=1, out=out,
                                search_space=SEARCH, seed=0, verbose=0)
    return result, out


@pytest.mark.slow
def test_random_search_writes_the_best_trial_as_a_recipe(recipe, search):
    result, out = search
    assert result.trials == 3 and result.stopped_by == "max_trials"
    assert result.best_recipe_path == out / "best_recipe.toml"
    assert (out / recipe.name / "oracle.json").exists()  # keras-tuner's project
    assert (out / "summary.txt").read_text().strip() == result.summary().strip()

    tuned = load_recipe(result.best_recipe_path)
    assert tuned.name == "sparse_moe_fashion_mnist_tuned"
    assert "keras-moe tune" in tuned.description
    # The original recipe's full phases, not the trials' single epoch.
    assert [(p.name, p.epochs) for p in tuned.phases] == [("train", 6)]
    assert result.best_hyperparameters.keys() == set(result.keys)
    for key, value in result.best_hyperparameters.items():
        section, name = key.split(".")
        actual = (getattr(tuned.optimizer, name) if section == "optimizer"
                  else tuned.model.builder_kwargs()[name])
        assert actual == value, key
    # Everything not searched is the original's.
    assert tuned.data == recipe.data and tuned.model.args["units"] == 32

    best = max((r for r in result.rows if r["value"] is not None), key=lambda r: r["value"])
    assert best["trial"] == result.best_trial and best["value"] == result.best_value
    assert best["values"] == result.best_hyperparameters

    text = result.best_recipe_path.read_text()
    header = text[:text.index("\n\n")]
    assert "random search" in header and "trials run: 3" in header
    assert f"{result.best_value:.4f}" in header
    for key in result.best_hyperparameters:
        assert key in header


@pytest.mark.slow
def test_the_summary_tables_every_trial(search):
    result, _ = search
    summary = result.summary()
    assert "3 trial(s)" in summary and "val_accuracy" in summary
    for row in result.rows:
        assert row["status"] == "COMPLETED"
        assert any(line.startswith(row["trial"]) for line in summary.splitlines())
    assert "model.num_experts" in summary and "optimizer.learning_rate" in summary


@pytest.mark.slow
def test_top_k_never_exceeds_the_number_of_experts(search):
    result, out = search
    for row in result.rows:
        assert 1 <= row["values"]["model.top_k"] <= row["values"]["model.num_experts"]
    # The sampled (keras-tuner) values too: k lives in one conditional scope per count.
    for trial_file in (out / "sparse_moe_fashion_mnist").glob("trial_*/trial.json"):
        values = json.loads(trial_file.read_text())["hyperparameters"]["values"]
        count = values["model.num_experts"]
        scoped = {k: v for k, v in values.items() if k.startswith("model.top_k|")}
        assert list(scoped) == [f"model.top_k|model.num_experts={count}"]
        assert list(scoped.values())[0] <= count


@pytest.mark.slow
def test_the_winner_is_chosen_on_held_out_training_data_and_tested_once(search):
    """The objective is measured on the last tenth of the training examples, which no
    trial trains on; the test split is measured once, on the winner (it used to be the
    objective, which biased the reported accuracy)."""
    result, out = search
    assert result.validation_examples == 51  # a tenth of the 512 training examples
    x, y = data.load_numpy("fashion_mnist", "train")
    held_x, held_y = x[461:512].astype("float32") / 255.0, y[461:512]
    predicted = result.best_model.predict(held_x, verbose=0).argmax(-1)
    assert result.best_value == pytest.approx(np.mean(predicted == held_y), abs=1e-6)
    x, y = data.load_numpy("fashion_mnist", "test")
    test_accuracy = np.mean(
        result.best_model.predict(x[:256].astype("float32") / 255.0, verbose=0).argmax(-1)
        == y[:256])
    assert result.test_metrics["accuracy"] == pytest.approx(test_accuracy, abs=1e-6)
    assert result.test_examples == 256
    summary = result.summary()
    assert "held out from the training data (51 examples)" in summary
    assert "measured once, for the best trial's model only" in summary
    header = result.best_recipe_path.read_text().split("\n\n")[0]
    assert f"accuracy {result.test_metrics['accuracy']:.4f}" in header



def test_bad_arguments_are_refused_up_front(recipe, tmp_path):
    for kwargs, word in [({"tuner": "grid"}, "tuner"), ({"max_trials": 0}, "max_trials"),
                         ({"epochs": 0}, "epochs"), ({"max_seconds": -1}, "max_seconds"),
                         ({"seed": -1}, "seed")]:
        with pytest.raises(tuning.TuningError, match=word):
            tuning.tune_recipe(recipe, out=tmp_path / "never", **kwargs)
    assert not (tmp_path / "never").exists()


def test_an_existing_out_is_refused(recipe, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="never reused.*--overwrite"):
        tuning.tune_recipe(recipe, max_trials=1, epochs=1, out=out, verbose=0)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_the_time_budget_lets_only_the_first_trial_run(recipe, tmp_path):
    out = tmp_path / "budget"
    out.mkdir()
    (out / "best_recipe.toml").write_text("# an earlier search's\n")
    result = tuning.tune_recipe(recipe, max_trials=3, max_seconds=0.0, epochs=1, out=out,
                                overwrite=True, search_space=["model.num_experts=4"],
                                verbose=0)
    assert result.trials == 1 and result.stopped_by == "time budget"
    assert load_recipe(out / "best_recipe.toml").model.args["num_experts"] == 4


def test_hyperband_runs_with_its_own_schedule(recipe, tmp_path):
    # max_epochs = 1 epoch per trial: Hyperband's single bracket holds one trial.
    result = tuning.tune_recipe(recipe, tuner="hyperband", max_trials=3, epochs=1,
                                out=tmp_path / "hb", verbose=0)
    assert result.trials == 1 and result.stopped_by == "tuner"
    assert "Hyperband" in result.summary()
    assert load_recipe(result.best_recipe_path).name == "sparse_moe_fashion_mnist_tuned"




@pytest.mark.slow
def test_the_tune_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["tune", "--set", "data.train_size=256", "--set", "data.test_size=128",
            "--set", "model.units=16", "--search", "model.num_experts=2,4",
            "--max-trials", "2", "--trial-epochs", "1", "--out", str(out), "--verbose", "0"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert (out / "best_recipe.toml").exists()
    assert "best recipe: " + str(out / "best_recipe.toml") in printed
    assert load_recipe(out / "best_recipe.toml").model.args["num_experts"] in (2, 4)
    # Refused again without --overwrite; a bad key names itself; both exit 2.
    assert cli.main(argv) == 2
    assert "never reused" in capsys.readouterr().err
    assert cli.main(["tune", "--search", "model.num_expert=4", "--out",
                     str(tmp_path / "bad")]) == 2
    assert "'num_expert'" in capsys.readouterr().err
    assert cli.main(["tune", "--max-trials", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "max_trials" in capsys.readouterr().err


@pytest.mark.slow
def test_tuning_the_tsne_recipe_runs_its_map_phase_and_stays_quiet(tmp_path, capsys):
    """The new user's command: every trial used to fail ("tsne_map_epochs needs the
    data"), printing a traceback each even with --verbose 0."""
    out = tmp_path / "tsne"
    assert cli.main(["tune", "tsne_moe_fashion_mnist", "--train-size", "512", "--test-size",
                     "256", "--max-trials", "2", "--trial-epochs", "1", "--out", str(out),
                     "--verbose", "0"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    rows = json.loads((out / "tsne_moe_fashion_mnist" / "oracle.json").read_text())
    assert len(rows["end_order"]) == 2
    assert "2 trial(s)" in captured.out and "COMPLETED" in captured.out
    assert "FAILED" not in captured.out and "INVALID" not in captured.out


@pytest.mark.slow
def test_failed_trials_print_no_traceback_and_one_error_prefix(tmp_path, capsys):
    # units = 0 passes the recipe checks (a keyword of the builder) and fails every build.
    argv = ["tune", "--train-size", "256", "--test-size", "64", "--max-trials", "2",
            "--trial-epochs", "1", "--search", "model.units=0", "--out", str(tmp_path / "f"),
            "--verbose", "0"]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert captured.err.count("keras-moe tune") == 1
    assert "keras-moe tune: error: no trial of 'sparse_moe_fashion_mnist' finished" in captured.err
    assert "units" in captured.err


def test_phase_settings_of_another_family_are_refused_before_any_data(recipe, tmp_path):
    bad = recipe.override(["phases.0.tsne_map_epochs=3"])
    with pytest.raises(Exception, match="tsne_map_epochs applies to models of the tsne "
                                        "family.*shazeer model"):
        tuning.tune_recipe(bad, out=tmp_path / "never", verbose=0)
    assert not (tmp_path / "never").exists()
