"""A recipe's data: training epochs drawn from the seed alone, a held-out validation split,
the test split, and what the model's input needs.

`build_datasets(recipe)` is what every run uses (`keras-moe train`, `tune`, `bench`,
`evaluate`, `predict`).

- Training examples are the first `[data].train_size` of the training split (all with
  0). With `validation_size=V` the last V of them are held out as the validation set
  (`keras-moe tune` selects on it) and the rest train.
- For the in-memory sets, epoch `e`'s order and augmentation are drawn from
  `(seed, e)` alone, so a run resumed at epoch `e` sees exactly the batches an
  uninterrupted run sees there. ImageNet and Cityscapes stream through
  `keras_moe.data.load`, whose shuffle and augmentation restart with a resumed run.
- Images are normalised (`[data].normalize`), zero-padded to `[data].pad_to` and tiled
  to `[data].channels`; `fit_recipe_to_input` sets those two from a model's input shape
  (a bare `.keras` file, a SavedModel's signature) or says exactly what to pass.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_moe import recipes as _recipes
from keras_moe.recipes import RecipeError

__all__ = ["RecipeData", "build_datasets", "class_names", "fit_recipe_to_input"]

_CLASS_NAMES = {
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
    "mnist": [str(d) for d in range(10)],
    "jittered_mnist": [str(d) for d in range(10)],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"],
}


def class_names(dataset, num_classes, source=""):
    """Human-readable class names of `dataset` (`"class <k>"` where none are known).

    `source` is the data's description: an offline stand-in drawn from Fashion-MNIST
    (jittered MNIST without MNIST files; the two-domain set's second domain without
    CIFAR-10) gets Fashion-MNIST's names. The two-domain set's classes are the digits
    (0-9) and then the second domain's classes (10-19).
    """
    fashion_stand_in = "stand-in" in source and "fashion" in source.replace("-", "_")
    if dataset == "jittered_mnist" and fashion_stand_in:
        dataset = "fashion_mnist"
    if dataset == "two_domain" and num_classes == 20:
        second = _CLASS_NAMES["fashion_mnist" if fashion_stand_in else "cifar10"]
        return [f"digit {d}" for d in range(10)] + list(second)
    names = _CLASS_NAMES.get(dataset)
    if names and len(names) == num_classes:
        return list(names)
    return [f"class {k}" for k in range(num_classes)]


_STREAMED = ("imagenet2012", "cityscapes")


@dataclasses.dataclass
class RecipeData:
    """The data of a run, as `build_datasets` returns it.

    `train_epochs(start, end)` is the training data of epochs `start` to `end - 1`, one
    epoch after the other (fit it with `steps_per_epoch=data.steps_per_epoch`).
    `validation` is the held-out part of the training split (None without one), `test`
    the test split; both batched.
    """

    test: object
    input_shape: tuple
    num_classes: int
    source: str
    train_examples: int
    test_examples: int
    steps_per_epoch: int
    probe: object
    probe_labels: np.ndarray
    epoch_dataset: object = None
    ordered_train: object = None
    validation: object = None
    validation_examples: int = 0

    def train_inputs(self, limit=None):
        """The first `limit` training inputs (all with None) as the model sees them, in
        order and without augmentation, as numpy (a dict with extras)."""
        import tensorflow as tf

        if self.ordered_train is None:
            raise ValueError("training inputs of a streamed data set are not kept in memory")
        count = self.train_examples if limit is None else min(limit, self.train_examples)
        batch = next(iter(self.ordered_train.take(count).batch(count)))[0]
        return tf.nest.map_structure(lambda t: t.numpy(), batch)

    def train_epochs(self, start, end):
        import tensorflow as tf

        return (tf.data.Dataset.range(start, end).flat_map(self.epoch_dataset)
                .prefetch(tf.data.AUTOTUNE))
def _count(ds):
    """Examples in an unbatched dataset: its cardinality when known (no pass over it)."""
    count = int(ds.cardinality().numpy())
    if count < 0:
        count = int(ds.reduce(0, lambda n, _: n + 1).numpy())
    return count


def _in_memory(ds):
    """An unbatched `(features, label)` dataset as numpy arrays (features may be a dict)."""
    import tensorflow as tf

    features, labels = next(iter(ds.batch(max(_count(ds), 1))))
    features = tf.nest.map_structure(lambda t: t.numpy(), features)
    return features, labels.numpy()


def _image_transform(spec, mode, mean_std):
    """uint8 image (or batch) -> normalised, zero-padded to `pad_to`, tiled to `channels`."""
    import tensorflow as tf

    from keras_moe.data import pipelines

    def transform(image):
        if mode == "standard":
            image = pipelines.normalize(image, *mean_std)
        elif mode == "unit":
            image = pipelines.normalize(image)
        if spec.pad_to:
            height, width = int(image.shape[-3]), int(image.shape[-2])
            if spec.pad_to < max(height, width):
                raise RecipeError(
                    f"[data].pad_to must be 0 or >= the images' {height}x{width}, got "
                    f"{spec.pad_to}")
            top, left = (spec.pad_to - height) // 2, (spec.pad_to - width) // 2
            leading = [[0, 0]] * (len(image.shape) - 3)  # one image or a batch
            image = tf.pad(image, leading + [[top, spec.pad_to - height - top],
                                             [left, spec.pad_to - width - left], [0, 0]])
        if spec.channels and int(image.shape[-1]) != spec.channels:
            if int(image.shape[-1]) != 1:
                raise RecipeError(
                    f"[data].channels: only 1-channel images can be tiled, these have "
                    f"{int(image.shape[-1])}")
            image = tf.tile(image, [1] * (len(image.shape) - 1) + [spec.channels])
        return image

    return transform


def _on_image(function, features, *args):
    if isinstance(features, dict):
        return dict(features, image=function(features["image"], *args))
    return function(features, *args)



def build_datasets(recipe, *, data_dir=None, seed=0, probe_size=1024, drop_remainder=False,
                   validation_size=0):
    """The data of `recipe`: training epochs, batched validation and test data, and what
    they hold.

    Training examples are the first `train_size` of the training split (all with 0),
    less the last `validation_size` of those, which are held out as `validation`;
    reshuffled each epoch from `(seed, epoch)` and, when `[data].augment` is true (or
    "auto" for CIFAR), given CIFAR's pad-4 crop and flip drawn from
    `(seed, epoch, example)`. Test examples are the first `test_size` of the test split,
    in order. Images are normalised, zero-padded and channel-tiled as `[data]` says.

    Args:
        recipe: A `keras_moe.recipes.Recipe`.
        data_dir: Where the data files are (see `keras_moe.data.load`).
        seed: Seed of the epochs' order and augmentation.
        probe_size: Test inputs kept as numpy in `probe` (gate statistics, serving).
        drop_remainder: Drop each epoch's last partial training batch (static shapes,
            for TPUs).
        validation_size: Training examples held out for validation, >= 0.

    Returns:
        A `RecipeData`.

    Raises:
        keras_moe.data.DataNotFoundError: The data set is not on this machine (the
            message lists where it looked and how to get it).
        RecipeError: `validation_size` leaves no training example.
    """
    import tensorflow as tf

    from keras_moe import data as kdata
    from keras_moe.data import pipelines

    spec = recipe.data
    validation_size = int(validation_size)
    if spec.augment == "auto":
        augment = spec.dataset in ("cifar10", "cifar100")
    else:
        augment = bool(spec.augment)
    mode = spec.normalize
    if mode == "auto":
        mode = "standard" if spec.dataset in ("cifar10", "cifar100") + _STREAMED else "unit"

    def raw(split, size, **options):
        ds, info = kdata.load(spec.dataset, split, batch_size=None, data_dir=data_dir,
                              seed=seed, with_extras=spec.with_extras, with_info=True,
                              **options)
        return (ds.take(size) if size else ds), info

    def check_split(n_train):
        if validation_size and validation_size >= n_train:
            raise RecipeError(
                f"a validation split of {validation_size} examples leaves no training "
                f"example of the {n_train} in {spec.dataset}'s training split (as "
                "[data].train_size takes it); hold out fewer or train on more")

    validation = None
    if spec.dataset in _STREAMED:
        if validation_size:
            raise RecipeError(
                f"a validation split of {spec.dataset}, a streamed data set, is not "
                "supported; tune on an in-memory data set, or on a recipe with a "
                "train_size slice of one")
        train, info = raw("train", spec.train_size, shuffle=True, augment=augment,
                          normalize=mode)
        test, _ = raw("test", spec.test_size, shuffle=False, augment=False, normalize=mode)
        shape = _image_transform(spec, "none", None)
        train = train.map(lambda f, y: (_on_image(shape, f), y))
        test = test.map(lambda f, y: (_on_image(shape, f), y))
        n_train = info["num_examples"] if not spec.train_size else spec.train_size
        n_test = _count(test)
        batched = train.batch(spec.batch_size, drop_remainder=drop_remainder)

        def epoch_dataset(e):
            return batched

        ordered_train = None
    else:
        train, info = raw("train", spec.train_size, shuffle=False, augment=False,
                          normalize="none")
        x_train, y_train = _in_memory(train)
        check_split(len(y_train))
        test, _ = raw("test", spec.test_size, shuffle=False, augment=False, normalize="none")
        images = x_train["image"] if isinstance(x_train, dict) else x_train
        mean_std = pipelines.MEAN_STD.get(spec.dataset) or pipelines.channel_stats(images)
        transform = _image_transform(spec, mode, mean_std)
        test = test.map(lambda f, y: (_on_image(transform, f), y))
        if validation_size:
            cut = len(y_train) - validation_size
            # Copies, not views: the arrays alias the tensors they were read from.
            held = tf.nest.map_structure(lambda a: np.array(a[cut:]), x_train)
            validation = tf.data.Dataset.from_tensor_slices(
                (held, np.array(y_train[cut:]))).map(lambda f, y: (_on_image(transform, f), y))
            x_train = tf.nest.map_structure(lambda a: np.array(a[:cut]), x_train)
            y_train = np.array(y_train[:cut])
        n_train, n_test = len(y_train), _count(test)
        features = tf.nest.map_structure(tf.constant, x_train)
        labels = tf.constant(y_train)
        base_seed = tf.constant(seed, tf.int64)

        def augment_each(images, indices, e):
            # Per example, from (seed, epoch, example index) alone: resumable.
            return tf.map_fn(
                lambda pair: pipelines.cifar_augment(
                    pair[0], tf.stack([base_seed * 1000003 + e, pair[1]])),
                (images, indices), fn_output_signature=images.dtype)

        def examples(indices, e=None):
            """The examples at `indices` (a batch: gathered and transformed at once)."""
            picked = tf.nest.map_structure(lambda t: tf.gather(t, indices), features)
            picked = _on_image(transform, picked)
            if augment and e is not None:
                picked = _on_image(augment_each, picked, indices, e)
            return picked, tf.gather(labels, indices)

        def epoch_dataset(e):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(n_train, dtype=tf.int64), seed=tf.stack([base_seed, e]))
            return (tf.data.Dataset.from_tensor_slices(order)
                    .batch(spec.batch_size, drop_remainder=drop_remainder)
                    .map(lambda batch: examples(batch, e), num_parallel_calls=tf.data.AUTOTUNE,
                         deterministic=True))

        ordered_train = tf.data.Dataset.range(n_train).batch(1024).map(examples).unbatch()

    features_spec = test.element_spec[0]
    image_spec = features_spec["image"] if isinstance(features_spec, dict) else features_spec
    probe_batch = next(iter(test.batch(probe_size)))
    probe = tf.nest.map_structure(lambda t: t.numpy(), probe_batch[0])
    eval_batch = max(spec.batch_size, 256)
    return RecipeData(
        test=test.batch(eval_batch).cache().prefetch(tf.data.AUTOTUNE),
        input_shape=tuple(int(d) for d in image_spec.shape),
        num_classes=int(info["num_classes"]), source=info["source"],
        train_examples=int(n_train), test_examples=n_test,
        steps_per_epoch=(n_train // spec.batch_size if drop_remainder
                         else _recipes.steps_per_epoch(n_train, spec.batch_size)),
        probe=probe, probe_labels=probe_batch[1].numpy(), epoch_dataset=epoch_dataset,
        ordered_train=ordered_train,
        validation=(None if validation is None
                    else validation.batch(eval_batch).cache().prefetch(tf.data.AUTOTUNE)),
        validation_examples=validation_size,
    )


def natural_image_shape(recipe, data_dir=None):
    """The shape of one image of `recipe`'s data set as the loader gives it (before
    `[data].pad_to` and `channels`)."""
    from keras_moe import data as kdata

    ds = kdata.load(recipe.data.dataset, "test", batch_size=None, data_dir=data_dir,
                    with_extras=recipe.data.with_extras, normalize="none")
    features = next(iter(ds.take(1)))[0]
    image = features["image"] if isinstance(features, dict) else features
    return tuple(int(d) for d in image.shape)


def fit_recipe_to_input(recipe, input_shape, *, data_dir=None, what="the model"):
    """`recipe` with `[data].pad_to` and `channels` set so its images fit `input_shape`.

    A model trained on padded, channel-tiled images (a DeepMoE ResNet on Fashion-MNIST
    takes 32x32x3) records that in its run's recipe; a bare `.keras` file or SavedModel
    does not, so its input shape decides: smaller square images are zero-padded, and
    1-channel images tiled.

    Args:
        recipe: The recipe whose data is to be fed.
        input_shape: The model's input shape without the batch axis, `(H, W, C)`.
        data_dir: Where the data files are.
        what: How to name the model in a message.

    Returns:
        The recipe (unchanged when the images already fit).

    Raises:
        RecipeError: The images cannot be brought to `input_shape`; the message says
            what the model takes and what to pass.
    """
    input_shape = tuple(int(d) for d in input_shape)
    probe = recipe.override(["data.test_size=1"])
    if len(input_shape) != 3:
        return recipe
    natural = natural_image_shape(probe, data_dir)
    if _shaped(natural, recipe.data) == input_shape:
        return recipe
    height, width, channels = input_shape
    assignments = []
    if (height, width) != natural[:2]:
        if height == width and height >= max(natural[:2]):
            assignments.append(f"data.pad_to={height}")
        else:
            assignments = None
    if assignments is not None and channels != natural[2]:
        if natural[2] == 1:
            assignments.append(f"data.channels={channels}")
        else:
            assignments = None
    if assignments is None:
        raise RecipeError(
            f"{what} takes {input_shape} images and {recipe.data.dataset} has "
            f"{natural}; pass the recipe it was trained with (--recipe) or a data set "
            f"with such images (--dataset)")
    return recipe.override(assignments)


def _shaped(natural, spec):
    height, width, channels = natural
    if spec.pad_to:
        height = width = spec.pad_to
    if spec.channels:
        channels = spec.channels
    return height, width, channels


def count_training_examples(recipe, data_dir=None):
    """The training examples `recipe` uses: `[data].train_size`, or the whole split's."""
    from keras_moe import data as kdata

    if recipe.data.train_size:
        return recipe.data.train_size
    _, info = kdata.load(recipe.data.dataset, "train", batch_size=None, data_dir=data_dir,
                         with_info=True)
    if info["num_examples"] is None:
        raise RecipeError(f"the size of {recipe.data.dataset}'s training split is unknown; "
                          "give [data].train_size or a validation count")
    return int(info["num_examples"])
