"""`keras_moe.training.datasets`: epochs from (seed, epoch), the validation split, class
names, and data brought to a model's input."""

import numpy as np
import pytest
import tensorflow as tf

from keras_moe import recipes
from keras_moe.recipes import RecipeError
from keras_moe.training import datasets

from conftest import TINY_SPARSE_RECIPE, write_recipe


def test_epochs_are_drawn_from_seed_and_epoch_alone(tmp_path):
    """Epoch e's order and augmentation depend on (seed, e) only: what resuming needs."""
    from keras_moe.data import pipelines

    recipe = recipes.load_recipe(write_recipe(tmp_path, TINY_SPARSE_RECIPE)).override(
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


def test_the_validation_split_is_the_last_training_examples_and_never_trains(tmp_path):
    recipe = recipes.load_recipe(write_recipe(tmp_path, TINY_SPARSE_RECIPE)).override(["data.train_size=100"])
    whole = datasets.build_datasets(recipe)
    split = datasets.build_datasets(recipe, validation_size=30)
    assert (split.train_examples, split.validation_examples) == (70, 30)
    everything = whole.train_inputs()
    held = np.concatenate([x.numpy() for x, _ in split.validation])
    np.testing.assert_array_equal(held, everything[70:])
    np.testing.assert_array_equal(split.train_inputs(), everything[:70])
    trained = np.concatenate([b[0].numpy() for b in split.train_epochs(0, 1)])
    assert len(trained) == 70
    with pytest.raises(RecipeError, match="leaves no training example"):
        datasets.build_datasets(recipe, validation_size=100)


def test_class_names_name_the_two_domain_classes():
    names = datasets.class_names("two_domain", 20, "stand-in for cifar10: fashion_mnist (files)")
    assert names[:2] == ["digit 0", "digit 1"] and names[13] == "Dress"
    assert datasets.class_names("two_domain", 20, "cifar10: files")[10] == "airplane"
    assert datasets.class_names("fashion_mnist", 10)[9] == "Ankle boot"
    assert datasets.class_names("cifar100", 100)[5] == "class 5"


def test_data_is_brought_to_the_models_input_or_the_message_says_what_to_pass(tmp_path):
    recipe = recipes.load_recipe(write_recipe(tmp_path, TINY_SPARSE_RECIPE))
    fitted = datasets.fit_recipe_to_input(recipe, (32, 32, 3))
    assert (fitted.data.pad_to, fitted.data.channels) == (32, 3)
    assert datasets.fit_recipe_to_input(recipe, (28, 28, 1)) is recipe
    with pytest.raises(RecipeError, match=r"takes \(20, 20, 1\) images and fashion_mnist has "
                                          r"\(28, 28, 1\).*--recipe.*--dataset"):
        datasets.fit_recipe_to_input(recipe, (20, 20, 1), what="the model")
