"""`keras_moe.tuning` and `keras-moe tune`: real keras-tuner searches on a slice of the
embedded Fashion-MNIST (512 training, 256 test examples, 1 epoch per trial)."""

import json

import keras_tuner
import pytest

from keras_moe import cli, tuning
from keras_moe.recipes import RecipeError, load_recipe
from keras_moe.training import runner
from keras_moe.training.runner import RunDirectoryError

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


def test_the_summary_tables_every_trial(search):
    result, _ = search
    summary = result.summary()
    assert "3 trial(s)" in summary and "val_accuracy" in summary
    for row in result.rows:
        assert row["status"] == "COMPLETED"
        assert any(line.startswith(row["trial"]) for line in summary.splitlines())
    assert "model.num_experts" in summary and "optimizer.learning_rate" in summary


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


def test_training_the_best_recipe_reproduces_the_best_trial(search, tmp_path):
    result, _ = search
    # The trial's length (1 epoch), through `keras-moe train`'s own runner.
    rerun = runner.train_recipe(result.best_recipe.override(["phases.0.epochs=1"]),
                                tmp_path / "run", seed=0, verbose=0)
    assert rerun.history[-1]["val_accuracy"] == pytest.approx(result.best_value, abs=1e-6)


def test_search_strings_become_choices_and_log_ranges(recipe):
    space = tuning.build_search_space(recipe, [
        "model.num_experts=4,8", "optimizer.learning_rate=1e-4:1e-2",
        "model.importance_weight=0.01,0.1",  # set in [losses] by the recipe: goes there
        "model.num_layers=1:3",
    ])
    hp = keras_tuner.HyperParameters()
    space.declare(hp)
    declared = {h.name: h for h in hp.space}
    experts = declared["model.num_experts"]
    assert type(experts).__name__ == "Choice" and list(experts.values) == [4, 8]
    rate = declared["optimizer.learning_rate"]
    assert type(rate).__name__ == "Float" and rate.sampling == "log"
    assert (rate.min_value, rate.max_value) == (1e-4, 1e-2)
    assert list(declared["losses.importance_weight"].values) == [0.01, 0.1]
    layers = declared["model.num_layers"]
    assert type(layers).__name__ == "Int" and (layers.min_value, layers.max_value) == (1, 3)
    # Defaults kept for the keys not given.
    assert "losses.load_weight" in declared and "model.top_k" in declared


def test_the_default_space_follows_the_model_family(recipe):
    assert tuning.default_search_space(recipe).keys == [
        "model.num_experts", "model.top_k", "losses.importance_weight",
        "losses.load_weight", "optimizer.learning_rate"]
    space = tuning.default_search_space(recipe)
    assert (space["losses.importance_weight"].low, space["losses.importance_weight"].high) \
        == pytest.approx((0.01, 1.0))  # the paper's 0.1, a decade either side
    expected = {
        "deepmoe_resnet56": ["losses.gate_l1", "losses.embedding_loss_weight"],
        "deepmoe_resnet18": ["losses.gate_l1"],  # mu is 0 (off) on ImageNet
        "dmoe_mnist": ["model.experts", "model.assignment_margin"],
        "two_domain_moe": ["losses.alpha", "losses.beta"],
        "tsne_moe": ["model.num_experts", "model.top_k", "losses.tsne_weight"],
        "resnet56": [],
    }
    for name, keys in expected.items():
        space = tuning.default_search_space(cli.recipe_for_model(name, 2))
        assert space.keys == keys + ["optimizer.learning_rate"], name
    eigen = tuning.default_search_space(cli.recipe_for_model("dmoe_mnist", 2))
    assert eigen["model.experts"].values == ("[2, 2]", "[4, 4]", "[8, 8]")


def test_unknown_and_unsearchable_keys_are_rejected_by_name(recipe):
    with pytest.raises(RecipeError, match="'num_expert'.*did you mean 'num_experts'"):
        tuning.build_search_space(recipe, ["model.num_expert=4,8"])
    with pytest.raises(RecipeError, match="data.batch_size"):
        tuning.build_search_space(recipe, ["data.batch_size=32,64"])
    with pytest.raises(RecipeError, match="phases.0.epochs"):
        tuning.build_search_space(recipe, ["phases.0.epochs=1,2"])
    with pytest.raises(RecipeError, match="learning_rate must be > 0"):
        tuning.build_search_space(recipe, ["optimizer.learning_rate=-1,0.1"])
    with pytest.raises(RecipeError, match="lo < hi"):
        tuning.build_search_space(recipe, ["optimizer.learning_rate=1e-2:1e-4"])
    with pytest.raises(RecipeError, match="section.key="):
        tuning.build_search_space(recipe, ["model.num_experts"])
    with pytest.raises(RecipeError, match="given 2 times"):
        tuning.build_search_space(recipe, ["model.top_k=1", "model.top_k=2"])


def test_phases_scale_in_proportion():
    deepmoe = cli.recipe_for_model("deepmoe_resnet56", 6)  # joint 6, finetune 2
    assert [p.epochs for p in tuning.scale_phases(deepmoe, 4).phases] == [3, 1]
    assert [p.epochs for p in tuning.scale_phases(deepmoe, 2).phases] == [1, 1]
    assert [p.epochs for p in tuning.scale_phases(deepmoe, 1).phases] == [1, 0]
    assert tuning.scale_phases(deepmoe, None) is deepmoe
    stepped = deepmoe.override(['schedule.name="step"', "schedule.boundaries=[3, 5]"])
    assert tuning.scale_phases(stepped, 4).schedule.boundaries == (2,)


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
