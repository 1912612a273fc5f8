"""`keras_moe.training.phases`: the one phase runner, and settings from the family."""

import keras
import numpy as np
import pytest

from keras_moe import recipes, zoo
from keras_moe.recipes import Phase, RecipeError
from keras_moe.training import datasets, runner
from keras_moe.training.phases import apply_phase, phase_spans, run_phases
from keras_moe.zoo.registry import PhaseContext

from conftest import TINY_EIGEN_RECIPE, write_recipe


def _fits(log):
    def fit(index, phase, start, stop, callbacks):
        log.append((index, phase.name, start, stop, [type(c).__name__ for c in callbacks]))
    return fit


def test_the_runner_numbers_epochs_on_and_applies_settings_as_the_family_says():
    model = zoo.deepmoe_resnet_cifar(depth=8, width_multiplier=0.25, input_shape=(16, 16, 3),
                                     embedding_widths=(4, 4, 4, 4))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    phases = [Phase("joint", 2, gate_density_target=0.5), Phase("still", 0, gate_l1=0.2),
              Phase("finetune", 3, freeze_gating=True, gate_l1=0.0)]
    assert phase_spans(phases) == [(0, 2), (2, 2), (2, 5)]
    log = []
    probe = np.zeros((4, 16, 16, 3), "float32")
    run_phases(model, phases, _fits(log), family=zoo.get_family("deepmoe_resnet_cifar"),
               probe=probe)
    assert [entry[:4] for entry in log] == [(0, "joint", 0, 2), (2, "finetune", 2, 5)]
    assert "GateDensityTarget" in log[0][4] and "GateDensityTarget" not in log[1][4]
    assert model.gate_l1 == 0.0 and not any(layer.trainable for layer in model.gating_layers())
    # A run continued at epoch 3: passed phases are applied again, not trained.
    log.clear()
    run_phases(model, phases, _fits(log), family=zoo.get_family("deepmoe_resnet_cifar"),
               probe=probe, start_epoch=3, stop_epoch=4)
    assert [entry[:4] for entry in log] == [(2, "finetune", 3, 4)]


def test_a_setting_of_another_family_names_the_families_that_have_it():
    model = zoo.sparse_moe_classifier(num_experts=4, units=8, input_shape=(4, 4, 1))
    model.compile("adam", "sparse_categorical_crossentropy")
    with pytest.raises(RecipeError, match="freeze_gating applies to models of the deepmoe "
                                          "family, and 'sparse_moe_classifier' is a shazeer"):
        apply_phase(model, Phase("p", 1, freeze_gating=True),
                    zoo.get_family("sparse_moe_classifier"))
    with pytest.raises(RecipeError, match="tsne_map_epochs needs the training data"):
        apply_phase(model, Phase("p", 1, tsne_map_epochs=2), zoo.get_family("tsne_moe"))


def test_phases_apply_their_settings_and_number_epochs_on(tmp_path):
    recipe = recipes.load_recipe(write_recipe(tmp_path, TINY_EIGEN_RECIPE))
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
    assert int(result.model.optimizer.iterations.numpy()) == 4 * 8  # 512 / 64 per epoch


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
    recipe = recipes.load_recipe(write_recipe(tmp_path, text))
    keras.utils.set_random_seed(0)
    data = datasets.build_datasets(recipe)
    model = runner.build_model(recipe, data)
    runner.compile_model(model, recipe, data.steps_per_epoch)
    gate = next(layer for layer in model.layers if isinstance(layer, TSNEGate))
    before = [w.copy() for w in gate.mapping.get_weights()]
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




def _two_layer_model(optimizer):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(6, activation="relu", name="first")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="second")(hidden))
    model.compile(optimizer, "mse")
    return model


@pytest.mark.multi_backend
@pytest.mark.parametrize("make_optimizer", [
    lambda: keras.optimizers.Adam(0.01),
    lambda: keras.optimizers.SGD(0.05, momentum=0.9),
])
def test_freezing_carries_the_optimizer_state_over_to_the_remaining_variables(
        make_optimizer):
    """A phase that freezes layers recompiles with an optimizer built for the remaining
    trainable variables (JAX's stateless step refused the old one: 'must be a list of
    tensors corresponding 1:1'), with the iteration count and their slots carried over;
    on TensorFlow the next step equals the old optimizer instance's."""
    from keras_moe.training.phases import recompile
    from testing_utils import BACKEND, to_numpy

    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(16, 4)).astype("float32"), rng.normal(size=(16, 2)).astype("float32")
    model = _two_layer_model(make_optimizer())
    for _ in range(2):
        model.train_on_batch(x, y)
    old = model.optimizer
    slots = {v.path: to_numpy(v).copy() for v in old.variables}
    model.get_layer("first").trainable = False
    recompile(model)
    new = model.optimizer
    assert int(to_numpy(new.iterations)) == 2
    for variable in new.variables:  # every state variable the new one has, carried over
        np.testing.assert_array_equal(to_numpy(variable), slots[variable.path])
    assert not any("first" in v.path for v in new.variables)
    assert any("second" in v.path for v in new.variables)
    frozen = [to_numpy(w).copy() for w in model.get_layer("first").weights]
    model.train_on_batch(x, y)
    for before, after in zip(frozen, model.get_layer("first").weights):
        np.testing.assert_array_equal(to_numpy(after), before)
    if BACKEND == "tensorflow":  # the old instance on the remaining variables
        reference = _two_layer_model(make_optimizer())
        for _ in range(2):
            reference.train_on_batch(x, y)
        reference.get_layer("first").trainable = False
        reference.compile(reference.optimizer, "mse")
        reference.train_on_batch(x, y)
        for got, want in zip(model.get_weights(), reference.get_weights()):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
