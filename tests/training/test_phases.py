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


