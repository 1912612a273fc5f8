"""``tf.data`` input pipelines: CIFAR and ImageNet augmentation, batching, prefetching.

Randomness is stateless: each example is paired with a seed pair drawn from
``tf.data.Dataset.random(seed, rerandomize_each_iteration=True)``, and the
augmentation ops are the ``tf.image.stateless_*`` ones. The same ``seed`` gives
the same batches in every run (also with parallel ``map``, which keeps order),
and each new pass over the data set (each epoch of ``model.fit``) gets fresh
crops and flips. Shuffling uses ``Dataset.shuffle(seed=seed)`` likewise.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

__all__ = [
    "MEAN_STD",
    "channel_stats",
    "normalize",
    "cifar_augment",
    "imagenet_train_preprocess",
    "imagenet_eval_preprocess",
    "segmentation_train_preprocess",
    "build_pipeline",
    "cifar_pipeline",
]

# Per-channel mean and std of pixel values scaled to [0, 1], from each training set.
MEAN_STD = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cityscapes": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

AUTOTUNE = tf.data.AUTOTUNE


def channel_stats(images: np.ndarray) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, on the [0, 1] scale.

    Args:
      images: uint8 array ``(N, H, W, C)``.

    Returns:
      ``(mean, std)``: tuples of ``C`` floats.

    Example:
      >>> channel_stats(np.full((2, 4, 4, 1), 255, np.uint8))
      ((1.0,), (0.0,))
    """
    x = np.asarray(images)
    flat = x.reshape(-1, x.shape[-1])
    mean = np.zeros(x.shape[-1])
    sq = np.zeros(x.shape[-1])
    step = 1 << 22
    for i in range(0, len(flat), step):  # chunked: avoids a float64 copy of the whole set
        c = flat[i:i + step].astype(np.float64) / 255.0
        mean += c.sum(0)
        sq += (c * c).sum(0)
    n = max(len(flat), 1)
    mean /= n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def normalize(image, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
    """Scales a uint8 image to float32 [0, 1], then standardises each channel.

    Args:
      image: uint8 or float tensor ``(..., H, W, C)`` (float input is taken as [0, 1]).
      mean: Per-channel mean on the [0, 1] scale, or ``None`` to only scale.
      std: Per-channel standard deviation.

    Returns:
      float32 tensor of the same shape.

    Example:
      >>> normalize(tf.fill([2, 2, 1], tf.constant(255, tf.uint8)), [0.5], [0.5]).numpy().max()
      1.0
    """
    if image.dtype == tf.uint8:
        x = tf.cast(image, tf.float32) * (1.0 / 255.0)
    else:
        x = tf.cast(image, tf.float32)
    if mean is not None:
        x = (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)
    return x


def _split_seed(seed, n):
    seed = tf.cast(seed, tf.int64)
    return tf.unstack(tf.random.experimental.stateless_split(seed, num=n))


def cifar_augment(image, seed, pad: int = 4):
    """CIFAR training augmentation: zero-pad by ``pad``, random crop back, random horizontal flip.

    Args:
      image: Tensor ``(H, W, C)`` (any dtype, returned unchanged in dtype).
      seed: Shape ``[2]`` integer tensor (stateless seed).
      pad: Padding on each side (4 in the ResNet CIFAR recipe).

    Returns:
      Tensor with the shape and dtype of ``image``.

    Example:
      >>> cifar_augment(tf.zeros([32, 32, 3], tf.uint8), tf.constant([1, 2])).shape
      TensorShape([32, 32, 3])
    """
    s_crop, s_flip = _split_seed(seed, 2)
    shape = tf.shape(image)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    out = tf.image.stateless_random_crop(padded, size=shape, seed=s_crop)
    out = tf.image.stateless_random_flip_left_right(out, seed=s_flip)
    return tf.ensure_shape(out, image.shape)


def imagenet_train_preprocess(
    image,
    seed,
    size: int = 224,
    area_range: Tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
):
    """ImageNet training augmentation (the Inception/ResNet recipe).

    Random-resized crop (area fraction ``area_range``, aspect ratio
    ``aspect_ratio_range``, whole image if no valid box), bilinear resize to
    ``size``, random horizontal flip, colour jitter (brightness factor,
    contrast, saturation each uniform in ``[1 - v, 1 + v]``), clipped to [0, 1].

    Args:
      image: uint8 tensor ``(H, W, 3)`` of any size.
      seed: Shape ``[2]`` integer stateless seed.
      size: Output side.
      area_range: Crop area as a fraction of the image.
      aspect_ratio_range: Crop width / height.
      brightness: Multiplicative brightness jitter; 0 disables.
      contrast: Contrast jitter; 0 disables.
      saturation: Saturation jitter; 0 disables.

    Returns:
      float32 tensor ``(size, size, 3)`` in [0, 1] (not yet standardised).

    Example:
      >>> imagenet_train_preprocess(tf.zeros([300, 400, 3], tf.uint8), tf.constant([0, 1])).shape
      TensorShape([224, 224, 3])
    """
    s_box, s_flip, s_b, s_c, s_s = _split_seed(seed, 5)
    shape = tf.shape(image)
    begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=s_box,
        min_object_covered=0.0,
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, box_size)
    x = tf.image.resize(crop, [size, size], method="bilinear")
    x = tf.clip_by_value(x / 255.0, 0.0, 1.0)
    x = tf.image.stateless_random_flip_left_right(x, seed=s_flip)
    if brightness:
        x = x * tf.random.stateless_uniform([], s_b, 1.0 - brightness, 1.0 + brightness)
    if contrast:
        x = tf.image.stateless_random_contrast(x, 1.0 - contrast, 1.0 + contrast, seed=s_c)
    if saturation:
        x = tf.image.stateless_random_saturation(x, 1.0 - saturation, 1.0 + saturation, seed=s_s)
    return tf.ensure_shape(tf.clip_by_value(x, 0.0, 1.0), [size, size, 3])


def imagenet_eval_preprocess(image, size: int = 224, resize: int = 256):
    """ImageNet evaluation: resize the shorter side to ``resize``, centre-crop ``size``.

    Args:
      image: uint8 tensor ``(H, W, 3)``.
      size: Crop side.
      resize: Shorter side after resizing (256 for 224 crops).

    Returns:
      float32 tensor ``(size, size, 3)`` in [0, 1].

    Example:
      >>> imagenet_eval_preprocess(tf.zeros([300, 400, 3], tf.uint8)).shape
      TensorShape([224, 224, 3])
    """
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    x = tf.image.resize(image, new, method="bilinear")
    top = (new[0] - size) // 2
    left = (new[1] - size) // 2
    x = x[top:top + size, left:left + size]
    return tf.ensure_shape(tf.clip_by_value(x / 255.0, 0.0, 1.0), [size, size, 3])


def segmentation_train_preprocess(image, mask, seed, size: Tuple[int, int] = (512, 1024)):
    """Joint random crop and horizontal flip of an image and its label mask.

    Args:
      image: uint8 ``(H, W, 3)``.
      mask: uint8 ``(H, W, 1)`` class ids.
      seed: Shape ``[2]`` stateless seed.
      size: Crop ``(height, width)``; must not exceed the image.

    Returns:
      ``(image, mask)`` cropped to ``size``, same dtypes.

    Example:
      >>> i, m = segmentation_train_preprocess(tf.zeros([64, 64, 3], tf.uint8),
      ...                                      tf.zeros([64, 64, 1], tf.uint8), [0, 1], (32, 32))
      >>> i.shape, m.shape
      (TensorShape([32, 32, 3]), TensorShape([32, 32, 1]))
    """
    s_crop, s_flip = _split_seed(seed, 2)
    both = tf.concat([image, tf.cast(mask, image.dtype)], axis=-1)
    both = tf.image.stateless_random_crop(both, [size[0], size[1], 4], seed=s_crop)
    both = tf.image.stateless_random_flip_left_right(both, seed=s_flip)
    return both[..., :3], tf.cast(both[..., 3:], mask.dtype)


def _with_seeds(ds: tf.data.Dataset, seed: int) -> tf.data.Dataset:
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    return tf.data.Dataset.zip((ds, seeds))


def build_pipeline(
    ds: tf.data.Dataset,
    batch_size: Optional[int],
    train_map: Optional[Callable] = None,
    eval_map: Optional[Callable] = None,
    training: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 10000,
    drop_remainder: bool = False,
    repeat: bool = False,
    cache: bool = False,
) -> tf.data.Dataset:
    """Assembles cache / shuffle / (seeded) map / batch / prefetch around a dataset.

    Args:
      ds: Unbatched dataset of ``(features, label)``.
      batch_size: Batch size, or ``None`` for an unbatched result.
      train_map: ``fn(features, label, seed) -> (features, label)``, used when ``training``.
      eval_map: ``fn(features, label) -> (features, label)``, used otherwise.
      training: Choose ``train_map`` (with per-example stateless seeds).
      shuffle: Shuffle with ``seed`` (reshuffled every epoch, reproducibly).
      seed: Seed for shuffling and augmentation.
      shuffle_buffer: Shuffle buffer size.
      drop_remainder: Drop a last partial batch.
      repeat: Repeat forever.
      cache: Cache decoded examples in memory before shuffling.

    Returns:
      The batched, prefetched ``tf.data.Dataset``.

    Example:
      >>> ds = tf.data.Dataset.from_tensor_slices((np.zeros((8, 4, 4, 1), np.uint8), np.arange(8)))
      >>> next(iter(build_pipeline(ds, 4)))[0].shape
      TensorShape([4, 4, 4, 1])
    """
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if training and train_map is not None:
        ds = _with_seeds(ds, seed).map(lambda ex, s: train_map(ex[0], ex[1], s), num_parallel_calls=AUTOTUNE)
    elif eval_map is not None:
        ds = ds.map(eval_map, num_parallel_calls=AUTOTUNE)
    if batch_size:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def cifar_pipeline(
    data,
    training: bool,
    batch_size: int = 128,
    seed: int = 0,
    mean: Sequence[float] = MEAN_STD["cifar10"][0],
    std: Sequence[float] = MEAN_STD["cifar10"][1],
    pad: int = 4,
    shuffle: Optional[bool] = None,
    **kwargs,
) -> tf.data.Dataset:
    """The CIFAR input pipeline: augment (training only), standardise, batch, prefetch.

    Training: zero-pad 4, random crop back to the input size, random horizontal
    flip, per-channel standardisation. Evaluation: standardisation only.

    Args:
      data: ``(x, y)`` numpy arrays (uint8 NHWC) or an unbatched ``tf.data.Dataset``.
      training: Augment and (by default) shuffle.
      batch_size: Batch size.
      seed: Seed for shuffling and augmentation.
      mean: Per-channel mean on the [0, 1] scale.
      std: Per-channel standard deviation.
      pad: Padding before the random crop.
      shuffle: Defaults to ``training``.
      **kwargs: Passed to :func:`build_pipeline` (``drop_remainder``, ``repeat``, ...).

    Returns:
      ``tf.data.Dataset`` of ``(float32 (B, H, W, C), int64 (B,))``.

    Example:
      >>> x = np.zeros((16, 32, 32, 3), np.uint8); y = np.zeros(16, np.int64)
      >>> next(iter(cifar_pipeline((x, y), training=True, batch_size=8)))[0].shape
      TensorShape([8, 32, 32, 3])
    """
    ds = data if isinstance(data, tf.data.Dataset) else tf.data.Dataset.from_tensor_slices(tuple(data))
    mean, std = tuple(mean), tuple(std)

    def train_map(x, y, s):
        return normalize(cifar_augment(x, s, pad), mean, std), y

    def eval_map(x, y):
        return normalize(x, mean, std), y

    return build_pipeline(ds, batch_size, train_map, eval_map, training=training,
                          shuffle=training if shuffle is None else shuffle, seed=seed, **kwargs)
