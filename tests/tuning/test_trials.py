"""`keras_moe.tuning.trials`: a trial's scaled phases, run through the phase runner."""

import keras_tuner
import numpy as np
import pytest

from keras_moe import cli, tuning
from keras_moe.recipes import load_recipe
from keras_moe.training.datasets import build_datasets


def test_phases_scale_in_proportion():
    deepmoe = cli.recipe_for_model("deepmoe_resnet56", 6)  # joint 6, finetune 2
    assert [p.epochs for p in tuning.scale_phases(deepmoe, 4).phases] == [3, 1]
    assert [p.epochs for p in tuning.scale_phases(deepmoe, 2).phases] == [1, 1]
    assert [p.epochs for p in tuning.scale_phases(deepmoe, 1).phases] == [1, 0]
    assert tuning.scale_phases(deepmoe, None) is deepmoe
    stepped = deepmoe.override(['schedule.name="step"', "schedule.boundaries=[3, 5]"])
    assert tuning.scale_phases(stepped, 4).schedule.boundaries == (2,)



def test_a_tsne_trial_fits_the_map_then_validates_on_held_out_training_data():
    """A trial runs the recipe's phases with the data (the t-SNE map is fitted first, as
    `keras-moe train` does; the tuner used to call the phase settings without it) and
    reports the accuracy of the examples held out from the training split."""
    recipe = load_recipe("tsne_moe_fashion_mnist").override(
        ["data.train_size=600", "data.test_size=64", "model.expert_units=8",
         "model.map_hidden_units=[16, 16]", "phases.0.tsne_map_epochs=2"])
    data = build_datasets(recipe, validation_size=100)
    space = tuning.build_search_space(recipe, ["model.num_experts=4", "model.top_k=2"])
    hypermodel = tuning.RecipeHyperModel(recipe, data, space, epochs=1)
    hp = keras_tuner.HyperParameters()
    model = hypermodel.build(hp)
    gate = model.get_layer("gate")
    before = np.array(gate.positions)
    logs = hypermodel.fit(hp, model)
    assert not np.allclose(np.array(gate.positions), before)  # placed on the fitted map
    assert gate.temperature != 1.0  # set from the placed experts' spacing
    # val_accuracy is the model's accuracy on the 100 held-out training examples.
    held_out = [(x, y) for x, y in data.validation.unbatch().as_numpy_iterator()]
    images = np.stack([x for x, _ in held_out])
    labels = np.array([y for _, y in held_out])
    assert len(labels) == 100 and data.train_examples == 500
    accuracy = np.mean(model.predict(images, verbose=0).argmax(-1) == labels)
    assert logs["val_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_a_step_schedule_scaled_past_its_boundaries_trains_at_a_constant_rate():
    """Scaled to one epoch, a recipe's step boundaries (epoch 3 of 4) all fall past the
    trial's end; the trial used to fail with Keras's IndexError on an empty schedule."""
    from keras_moe.training import runner

    recipe = load_recipe("resnet8_fashion_mnist")
    short = tuning.scale_phases(recipe, 1)
    assert short.schedule.name == "step" and short.schedule.boundaries == ()
    optimizer = runner.make_optimizer(short, steps_per_epoch=10)
    assert float(optimizer.learning_rate) == pytest.approx(recipe.optimizer.learning_rate)
    assert float(optimizer.learning_rate) == pytest.approx(
        float(runner.make_optimizer(recipe, 10).learning_rate))  # iteration 0: the base rate
