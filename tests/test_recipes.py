"""Recipes (zoo/*.toml): parsing, checking, overriding, writing; the optimizer they give."""

import pathlib
import re

import keras
import numpy as np
import pytest

from keras_moe import cli, recipes, zoo
from keras_moe.recipes import RecipeError
from keras_moe.training import runner

ZOO_DIR = pathlib.Path(__file__).resolve().parent.parent / "zoo"

MINIMAL = """
[model]
name = "sparse_moe_classifier"
num_experts = 4

[[phases]]
epochs = 2
"""


def _write(tmp_path, text, name="r.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_zoo_recipe_loads_names_a_zoo_model_and_has_a_model_card():
    names = recipes.list_recipes()
    assert cli.DEFAULT_RECIPE in names
    assert len(names) >= 6
    for name in names:
        recipe = recipes.load_recipe(name)
        assert recipe.name == name
        assert recipe.model.name in zoo.list_models()
        assert recipe.description and recipe.paper
        card = ZOO_DIR / recipe.model_card
        assert card.is_file(), f"{name}: model card {card} missing"
        assert name in card.read_text(), f"{card.name} does not mention recipe {name}"


def test_defaults_fill_what_a_recipe_leaves_out(tmp_path):
    recipe = recipes.load_recipe(_write(tmp_path, MINIMAL))
    assert recipe.name == "r"  # the file's stem
    assert recipe.data == recipes.DataSpec()
    assert recipe.optimizer == recipes.OptimizerSpec()
    assert recipe.schedule == recipes.ScheduleSpec()
    assert [(p.name, p.epochs) for p in recipe.phases] == [("phase0", 2)]
    assert recipe.model.builder_kwargs() == {"num_experts": 4}


def test_round_trip_through_toml_keeps_every_value(tmp_path):
    for name in recipes.list_recipes():
        recipe = recipes.load_recipe(name)
        path = recipes.save_recipe(recipe, tmp_path / f"{name}.toml", header="copy\nof it")
        assert path.read_text().startswith("# copy\n# of it\n")
        again = recipes.load_recipe(path)
        assert again.to_dict() == recipe.to_dict()


def test_save_never_overwrites_silently(tmp_path):
    recipe = recipes.load_recipe(_write(tmp_path, MINIMAL))
    target = _write(tmp_path, "keep", "out.toml")
    with pytest.raises(ValueError, match="already exists"):
        recipes.save_recipe(recipe, target)
    assert target.read_text() == "keep"
    recipes.save_recipe(recipe, target, overwrite=True)
    assert recipes.load_recipe(target).model.args == {"num_experts": 4}


@pytest.mark.parametrize("text, message", [
    ("[modle]\nname='x'\n", r"unknown key 'modle' \(did you mean 'model'\?\)"),
    (MINIMAL + "[data]\nbatchsize = 3\n", r"\[data\]: unknown key 'batchsize' \(did you mean "
                                          r"'batch_size'\?\)"),
    (MINIMAL + "[optimizer]\nlearning_rat = 0.1\n", r"did you mean 'learning_rate'"),
    (MINIMAL.replace("[[phases]]", "[[phases]]\nfreeze_gates = true"),
     r"unknown key 'freeze_gates' \(did you mean 'freeze_gating'\?\)"),
    (MINIMAL.replace("num_experts", "num_expert"),
     r"\[model\] \(sparse_moe_classifier\): unknown key 'num_expert' \(did you mean "
     r"'num_experts'\?\); keywords of the builder: .*top_k"),
    (MINIMAL + "[losses]\nimportance = 0.1\n", r"\[losses\].*'importance' \(did you mean "
                                               r"'importance_weight'\?\)"),
    (MINIMAL.replace("sparse_moe_classifier", "sparse_moe_clasifier"),
     r"unknown zoo model 'sparse_moe_clasifier'\. Did you mean 'sparse_moe_classifier'"),
    ("[model]\nnum_experts = 4\n[[phases]]\nepochs = 1\n", r"\[model\]: name .* is required"),
    ("[model]\nname = 'sparse_moe_classifier'\n", r"at least one \[\[phases\]\]"),
    (MINIMAL.replace("epochs = 2", "epochs = -1"), r"epochs must be >= 0, got -1"),
    (MINIMAL.replace("epochs = 2", "epochs = 0"), r"0 epochs in all"),
    (MINIMAL.replace("epochs = 2", "epochs = 'two'"), r"epochs must be an integer, got 'two'"),
    (MINIMAL + "[data]\ndataset = 'imagenet'\n", r"dataset must be one of .*imagenet2012"),
    (MINIMAL + "[data]\nbatch_size = 0\n", r"batch_size must be >= 1, got 0"),
    (MINIMAL + "[data]\naugment = 'yes'\n", r"augment must be \"auto\", true or false"),
    (MINIMAL + "[optimizer]\nname = 'adagrad'\n", r"name must be one of adam, adamw, sgd"),
    (MINIMAL + "[optimizer]\nlearning_rate = 0\n", r"learning_rate must be > 0, got 0"),
    (MINIMAL + "[optimizer]\nmomentum = 1.5\n", r"momentum must be < 1"),
    (MINIMAL + "[schedule]\nname = 'step'\nboundaries = [5, 3]\n",
     r"boundaries must be increasing positive epochs"),
    (MINIMAL + "[schedule]\nboundaries = [5]\n", r"only used by name = \"step\""),
    (MINIMAL.replace("[[phases]]", "[[phases]]\ngate_density_target = 1.5"),
     r"gate_density_target must be in \(0, 1\) or false"),
    (MINIMAL.replace("[[phases]]", "[[phases]]\ngate_density_target = true"),
     r"gate_density_target must be in \(0, 1\) or false"),
    (MINIMAL + "[[phases]]\nepochs = 1\nname = 'two'\nspread_gate_heads = true\n",
     r"#1: spread_gate_heads acts when the model is built: set it in the first phase"),
    (MINIMAL + "[losses]\nnum_experts = 8\n", r"num_experts given in both \[model\] and "
                                              r"\[losses\]"),
    ("[model\nname=1", r"not valid TOML"),
])
def test_bad_recipes_are_refused_with_the_key_and_what_is_allowed(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        recipes.load_recipe(_write(tmp_path, text))


def test_unknown_recipe_names_suggest_close_ones():
    with pytest.raises(RecipeError, match="Did you mean 'deepmoe_resnet56_cifar10'"):
        recipes.find_recipe("deepmoe_resnet56_cifar")
    with pytest.raises(RecipeError, match="does not exist"):
        recipes.find_recipe("no/such/file.toml")


def test_override_sets_any_value_in_toml_syntax_and_rechecks(tmp_path):
    recipe = recipes.load_recipe("deepmoe_resnet56_cifar10")
    changed = recipe.override(["phases.1.epochs=2", "data.batch_size=64",
                               "model.wide=false", "schedule.boundaries=[1]",
                               "data.dataset=fashion_mnist"])
    assert [p.epochs for p in changed.phases] == [270, 2]
    assert changed.data.batch_size == 64 and changed.data.dataset == "fashion_mnist"
    assert changed.model.args["wide"] is False
    assert changed.schedule.boundaries == (1,)
    assert recipe.data.batch_size == 128  # the original is unchanged
    with pytest.raises(RecipeError, match="phase index must be 0..1"):
        recipe.override(["phases.2.epochs=1"])
    with pytest.raises(RecipeError, match="unknown section 'dat'"):
        recipe.override(["dat.batch_size=1"])
    with pytest.raises(RecipeError, match="expects section.key=value"):
        recipe.override(["batch_size"])
    with pytest.raises(RecipeError, match="did you mean 'batch_size'"):
        recipe.override(["data.batchsize=1"])


def test_step_schedule_follows_the_formula_over_all_phases():
    recipe = recipes.load_recipe("deepmoe_resnet56_cifar10").override(
        ["schedule.boundaries=[2, 5]", "schedule.factor=0.2"])
    steps = 7
    optimizer = runner.make_optimizer(recipe, steps_per_epoch=steps)
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert optimizer.momentum == pytest.approx(0.9)
    assert optimizer.weight_decay == pytest.approx(1e-4)
    schedule = optimizer._learning_rate  # the LearningRateSchedule itself
    for epoch in range(8):
        expected = 0.1 * 0.2 ** sum(epoch >= b for b in (2, 5))
        step = epoch * steps + 3  # inside the epoch
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6), epoch
    cosine = runner.make_optimizer(recipe.override(["schedule.name=cosine",
                                                    "schedule.boundaries=[]"]), steps)
    total = recipe.total_epochs * steps
    for step in (0, total // 3, total):
        expected = 0.1 * 0.5 * (1 + np.cos(np.pi * step / total))
        assert float(cosine._learning_rate(step)) == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_a_bare_zoo_model_gets_a_recipe_on_the_default_data():
    plain = cli.recipe_for_model("sparse_moe_classifier", epochs=3)
    assert [(p.name, p.epochs) for p in plain.phases] == [("train", 3)]
    assert plain.data.dataset == "fashion_mnist" and plain.data.pad_to == 0
    deep = cli.recipe_for_model("deepmoe_resnet56", epochs=6)
    assert [(p.name, p.epochs) for p in deep.phases] == [("joint", 6), ("finetune", 2)]
    assert deep.phases[1].freeze_gating and deep.phases[1].gate_l1 == 0.0
    assert (deep.data.pad_to, deep.data.channels) == (32, 3)  # RGB conv nets: 32x32x3


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [
    (["train", "sparse_moe_fashon_mnist"], "Did you mean 'sparse_moe_fashion_mnist'"),
    (["train", "deepmoe_resnet5"], "Did you mean 'deepmoe_resnet56'"),
    (["train", "--set", "data.batchsize=3"], "did you mean 'batch_size'"),
    (["train", "--set", "model.num_expert=3"], "did you mean 'num_experts'"),
    (["train", "deepmoe_resnet56_cifar10", "--epochs", "3"],
     r"has 2 phases \(joint 270, finetune 80\); set each with --set phases.N.epochs"),
    (["train", "--resume"], "--resume needs --out"),
])
def test_cli_names_what_is_wrong_and_exits_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"keras-moe {argv[0]}: error: ")
    assert re.search(message, err), err


@pytest.mark.slow
def test_list_shows_recipes_with_their_descriptions(capsys):
    assert cli.main(["list", "--recipes"]) == 0
    out = capsys.readouterr().out
    default = recipes.load_recipe(cli.DEFAULT_RECIPE)
    assert f"recipe {cli.DEFAULT_RECIPE}: {default.description}" in out


def test_tpu_runs_use_capacity_dispatch_where_the_model_has_it():
    default = recipes.load_recipe(cli.DEFAULT_RECIPE)
    assert runner.for_static_shapes(default).model.args["dispatch"] == "capacity"
    explicit = default.override(['model.dispatch="dense"'])
    assert runner.for_static_shapes(explicit).model.args["dispatch"] == "dense"
    deep = recipes.load_recipe("deepmoe_resnet56_cifar10")
    assert runner.for_static_shapes(deep).to_dict() == deep.to_dict()  # no MoEDense: unchanged


def test_a_fixed_lambda_and_the_heads_start_are_reachable_from_set():
    """The CPU recipe fixes lambda (`gate_density_target = false`: lambda stays at
    `gate_l1`, the paper's way) with the heads as initialised; `--set` switches the
    controller on and chooses the heads' start whatever the controller; unset, the heads
    are spread exactly when a controller runs."""
    import numpy as np

    from keras_moe.training import runner
    from keras_moe.training.deepmoe import ReLUGate, gating_layers
    from keras_moe.zoo import get_family
    from keras_moe.zoo.registry import PhaseContext

    base = recipes.load_recipe("deepmoe_resnet8_fashion_mnist").override(
        ["model.width_multiplier=0.25", "data.pad_to=8", "model.embedding_widths=[2, 2]"])
    assert "spread_gate_heads" not in base.to_dict()["phases"][0]

    def kernels(*assignments):
        recipe = base.override(list(assignments))
        model = runner.build_model(recipe)
        return recipe, model, np.concatenate([np.ravel(layer.kernel) for layer in
                                              gating_layers(model)
                                              if isinstance(layer, ReLUGate)])

    def spread(values):  # U(0, 2) against the initialiser's ~1 +- 0.01
        return values.min() < 0.5 and values.max() > 1.5

    fixed, model, values = kernels()
    assert fixed.phases[0].gate_density_target is False and not spread(values)
    assert model.gate_l1 == 3.5
    assert kernels("losses.gate_l1=0.75")[1].gate_l1 == 0.75
    family = get_family(fixed.model.name)
    setting = family.phase_settings["gate_density_target"]
    assert setting.callbacks(model, False, PhaseContext(fixed.phases[0])) == []
    assert spread(kernels("phases.0.spread_gate_heads=true")[2])
    steered = kernels("phases.0.gate_density_target=0.5", "phases.0.spread_gate_heads=false")
    assert steered[0].phases[0].gate_density_target == 0.5 and not spread(steered[2])
    assert spread(kernels("phases.0.gate_density_target=0.5")[2])
