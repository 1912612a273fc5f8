"""The top-level :func:`load`: any supported data set as a batched, prefetched ``tf.data.Dataset``."""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from keras_moe.data import jittered as _jitter
from keras_moe.data import pipelines as _pl
from keras_moe.data import sources as _sources
from keras_moe.data import two_domain as _two

__all__ = ["NAMES", "load"]

NAMES = ("mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet2012", "cityscapes", "jittered_mnist", "two_domain")
_NUM_CLASSES = {"jittered_mnist": 10, "two_domain": 20}


def _base(name, split, data_dir, source, download):
    """Unbatched (image uint8, label) dataset + description + count (None if unknown)."""
    where = _sources.resolve(name, data_dir, source, download)
    if where != "tfds":
        x, y = _sources.read_local(where, split)
        return tf.data.Dataset.from_tensor_slices((x, y)), where.describe(), len(y)
    info = _sources.DATASETS[name]
    try:
        ds = _sources.tfds_dataset(name, split, data_dir, download=download)
    except Exception as e:
        if source == "tfds":
            raise
        looked = []
        _sources.find_local(name, data_dir, looked)
        raise _sources.not_found_error(name, looked, e, data_dir_given=bool(data_dir)) from e
    n = None
    try:
        n = int(ds.cardinality().numpy())
        n = n if n >= 0 else None
    except Exception:
        pass
    return ds, f"tfds {info.tfds_name} ({data_dir or '~/tensorflow_datasets'})", n


def load(
    name: str,
    split: str = "train",
    batch_size: Optional[int] = 128,
    data_dir: Optional[str] = None,
    source: str = "auto",
    seed: int = 0,
    shuffle: Optional[bool] = None,
    augment: Optional[bool] = None,
    normalize: str = "auto",
    with_extras: bool = False,
    with_info: bool = False,
    download: bool = True,
    image_size: Optional[int] = None,
    drop_remainder: bool = False,
    repeat: bool = False,
    shuffle_buffer: int = 10000,
):
    """Loads a data set as a batched, prefetched ``tf.data.Dataset`` of ``(image, label)``.

    Names and what they yield (images float32 NHWC after ``normalize``):

    ========================  ==============================  =====================================
    name                      image                           training augmentation (``augment``)
    ========================  ==============================  =====================================
    ``mnist``                 28x28x1                         none by default
    ``fashion_mnist``         28x28x1 (the embedded default)  none by default
    ``cifar10``/``cifar100``  32x32x3                         pad 4, random 32x32 crop, flip
    ``imagenet2012``          ``image_size`` (224) x3         random-resized crop, flip, colour jitter
    ``cityscapes``            crop ``image_size`` x 2 (512)   joint random crop and flip; label = mask
    ``jittered_mnist``        36x36x1, paper 001              (the jitter itself); extras: ``offset``
    ``two_domain``            32x32x1 gray, 20 classes        none; extras: ``domain``
    ========================  ==============================  =====================================

    Evaluation: ImageNet resizes the shorter side to ``image_size / 0.875`` and
    centre-crops; the others only normalise. Everything is deterministic given
    ``seed``; each epoch reshuffles and re-augments reproducibly.

    Args:
      name: One of :data:`NAMES`.
      split: ``"train"`` or ``"test"`` (TFDS split strings such as ``"validation"``
        or ``"train[:10%]"`` with TFDS). Splits starting with ``"train"`` count as
        training (shuffle and augment by default).
      batch_size: Batch size, or ``None`` for unbatched examples.
      data_dir: Directory searched first for files; also the TFDS ``data_dir``.
      source: ``"auto"`` (files, then TFDS), ``"files"`` or ``"tfds"``.
      seed: Seed of the shuffle, the augmentation, the jitter (training split)
        and the two-domain mix.
      shuffle: Defaults to training.
      augment: Defaults to training for cifar10/cifar100/imagenet2012/cityscapes,
        otherwise False (True applies the CIFAR pad-crop-flip).
      normalize: ``"standard"`` (per-channel mean/std of the training set),
        ``"unit"`` (scale to [0, 1]), ``"none"`` (keep uint8 where possible) or
        ``"auto"`` (standard for CIFAR/ImageNet/Cityscapes, unit otherwise).
      with_extras: Yield ``({"image": x, "offset": dxdy}, y)`` for jittered_mnist
        and ``({"image": x, "domain": d}, y)`` for two_domain. The dict keys match
        Keras ``Input(name="image")`` / ``Input(name="domain")`` of a functional
        model, so an oracle gate is just a second input.
      with_info: Also return a dict with ``source`` (where the data came from),
        ``num_examples`` (None if unknown), ``num_classes`` and ``stand_in``.
      download: Let TFDS download when nothing is on disk.
      image_size: ImageNet crop side (224) or Cityscapes crop height (512, width 2x).
      drop_remainder: Drop the last partial batch.
      repeat: Repeat forever.
      shuffle_buffer: Shuffle buffer size.

    Returns:
      The dataset, or ``(dataset, info)`` with ``with_info=True``.

    Raises:
      DataNotFoundError: Nothing found (lists where it looked and the three ways
        to get the data).
      ValueError: Unknown name or options, or a malformed file (named).

    Example:
      >>> ds = load("fashion_mnist", "train", batch_size=128, seed=0)
      >>> x, y = next(iter(ds))
      >>> x.shape, x.dtype, y.dtype
      (TensorShape([128, 28, 28, 1]), tf.float32, tf.int64)
    """
    if name not in NAMES:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(NAMES)}")
    if normalize not in ("auto", "standard", "unit", "none"):
        raise ValueError(f"normalize must be 'auto', 'standard', 'unit' or 'none', got {normalize!r}")
    training = split.split("[")[0] == "train"
    shuffle = training if shuffle is None else shuffle
    heavy = name in ("cifar10", "cifar100", "imagenet2012", "cityscapes")
    augment = (training and heavy) if augment is None else augment
    if normalize == "auto":
        normalize = "standard" if heavy else "unit"
    stand_in = False
    extras_key = None

    if name == "jittered_mnist":
        js = _jitter.load_jittered_mnist(split, data_dir, source, seed=seed, download=download)
        ds = tf.data.Dataset.from_tensor_slices(((js.images, js.offsets), js.labels))
        desc, n, stand_in, extras_key = js.source, len(js), js.source.startswith("stand-in"), "offset"
        mean_std = _pl.MEAN_STD["mnist"]
    elif name == "two_domain":
        td = _two.load_two_domain(split, data_dir, source, seed=seed, download=download)
        ds = tf.data.Dataset.from_tensor_slices(((td.images, td.domain), td.labels))
        desc, n, stand_in, extras_key = td.source, len(td), td.stand_in, "domain"
        mean_std = None
    else:
        ds, desc, n = _base(name, split, data_dir, source, download)
        mean_std = _pl.MEAN_STD.get(name)

    if normalize == "standard" and mean_std is None:
        # Two-domain: statistics of this split's gray images (cheap, in memory).
        mean_std = _pl.channel_stats(td.images)

    def norm(img):
        if normalize == "standard":
            return _pl.normalize(img, *mean_std)
        if normalize == "unit":
            return _pl.normalize(img)
        return img

    def split_features(f):
        return (f[0], f[1]) if extras_key is not None else (f, None)

    def pack(img, extra, y):
        if with_extras and extras_key is not None:
            return {"image": img, extras_key: extra}, y
        return img, y

    if name == "imagenet2012":
        size = image_size or 224

        def train_map(f, y, s):
            img, extra = split_features(f)
            return pack(norm(_pl.imagenet_train_preprocess(img, s, size)), extra, y)

        def eval_map(f, y):
            img, extra = split_features(f)
            return pack(norm(_pl.imagenet_eval_preprocess(img, size, int(round(size / 0.875)))), extra, y)
    elif name == "cityscapes":
        h = image_size or 512

        def train_map(f, y, s):
            img, extra = split_features(f)
            img, mask = _pl.segmentation_train_preprocess(img, y, s, (h, 2 * h))
            return pack(norm(img), extra, tf.cast(mask[..., 0], tf.int32))

        def eval_map(f, y):
            img, extra = split_features(f)
            return pack(norm(img), extra, tf.cast(y[..., 0], tf.int32))
    else:
        def train_map(f, y, s):
            img, extra = split_features(f)
            return pack(norm(_pl.cifar_augment(img, s)), extra, y)

        def eval_map(f, y):
            img, extra = split_features(f)
            return pack(norm(img), extra, y)

    ds = _pl.build_pipeline(ds, batch_size, train_map, eval_map, training=augment, shuffle=shuffle, seed=seed,
                            shuffle_buffer=shuffle_buffer, drop_remainder=drop_remainder, repeat=repeat)
    if not with_info:
        return ds
    num_classes = _NUM_CLASSES.get(name) or _sources.DATASETS[name].num_classes
    return ds, {"name": name, "split": split, "source": desc, "num_examples": n, "num_classes": num_classes,
                "stand_in": stand_in}
