"""`keras_moe.tuning.space`: the search space a family registers, `--search` strings."""

import keras_tuner
import pytest

from keras_moe import cli, tuning
from keras_moe.recipes import RecipeError, load_recipe

TINY = ["data.train_size=512", "data.test_size=256", "data.batch_size=64", "model.units=32"]


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("sparse_moe_fashion_mnist").override(TINY)


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
    # DeepMoE's lambda: log-uniform over the range where a fixed lambda moves the density.
    deepmoe = tuning.default_search_space(cli.recipe_for_model("deepmoe_resnet56", 2))
    gate_l1 = deepmoe["losses.gate_l1"]
    assert (gate_l1.low, gate_l1.high, gate_l1.log) == (1.0, 100.0, True)
    assert gate_l1.default == 1.0  # the builder's 0.1, raised into the range
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



def test_the_routers_of_current_moe_models_are_searchable(recipe):
    """Routing keywords of the classifier: a gate by name, the bias rate on a log range,
    the Switch and z-loss coefficients in [losses]; every sampled recipe builds."""
    from keras_moe import zoo

    space = tuning.build_search_space(recipe, [
        "model.gate=noisy_top_k,sigmoid_top_k,softmax", "model.bias_update_rate=1e-4:1e-2",
        "losses.switch_weight=0.001,0.01", "losses.z_loss_weight=0.0,0.001",
        "model.num_shared_experts=0,1", "losses.load_weight=0.0"])
    hp = keras_tuner.HyperParameters()
    space.declare(hp)
    declared = {h.name: h for h in hp.space}
    assert list(declared["model.gate"].values) == ["noisy_top_k", "sigmoid_top_k", "softmax"]
    assert declared["model.bias_update_rate"].sampling == "log"
    assert "losses.switch_weight" in declared and "losses.z_loss_weight" in declared
    for gate in ("sigmoid_top_k", "softmax"):
        values = {"model.gate": gate, "model.bias_update_rate": 0.001,
                  "losses.switch_weight": 0.01, "losses.z_loss_weight": 0.001,
                  "model.num_shared_experts": 1, "losses.load_weight": 0.0}
        tuned = space.apply(values)
        model = zoo.get_model(tuned.model.name, **tuned.model.builder_kwargs())
        layer = model.get_layer("moe_0")
        assert (layer.gate.__class__.__name__, layer.bias_update_rate,
                layer.num_shared_experts) == (
            {"sigmoid_top_k": "SigmoidTopKGate", "softmax": "SoftmaxGate"}[gate], 0.001, 1)
        assert sorted(type(r).__name__ for r in layer.balance_loss) == [
            "ImportanceLoss", "RouterZLoss", "SwitchLoadBalanceLoss"]
