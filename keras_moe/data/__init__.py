"""Data sets for keras-moe: TFDS where reachable, offline files otherwise.

Entry points:

* :func:`load` — any supported set as a batched, prefetched ``tf.data.Dataset``
  of ``(image, label)``: ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``,
  ``imagenet2012``, ``cityscapes`` and the derived ``jittered_mnist`` (paper 001)
  and ``two_domain`` (paper 002, MNIST + CIFAR-10, 20 classes).
* :func:`load_numpy` — a base set as ``(x, y)`` numpy arrays (uint8 NHWC, int64).
* :func:`load_jittered_mnist` / :func:`jitter` — 36x36 jittered digits with the
  ``(dx, dy)`` translation of every example.
* :func:`load_two_domain` / :func:`make_two_domain` — the 20-class two-domain
  set with each example's ``domain`` (0 digits, 1 natural images).
* Readers: :func:`read_idx`, :func:`read_idx_pair` (MNIST-format IDX, gzipped
  or not) and :func:`read_cifar` (CIFAR python archives, ``.tar.gz`` or
  extracted); pipelines :func:`cifar_pipeline`, :func:`cifar_augment`,
  :func:`imagenet_train_preprocess`, :func:`imagenet_eval_preprocess`.

Where data comes from (``source="auto"``): the ``data_dir`` argument, the
directories in ``$KERAS_MOE_DATA_DIR``, ``~/.keras/datasets``, and for
Fashion-MNIST Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``, the embedded default); then TFDS
(``tfds.load(..., data_dir=data_dir)``). ImageNet and Cityscapes are manual
downloads in TFDS (:data:`MANUAL_DOWNLOAD`). Without apt, point the loader at
the four Fashion-MNIST ``*-ubyte.gz`` files with ``data_dir=`` or
``KERAS_MOE_DATA_DIR``. When nothing is found, :class:`DataNotFoundError` lists
where it looked and the three ways to get the data.

Offline stand-ins: jittered MNIST falls back to jittered Fashion-MNIST, and
the two-domain set to scikit-learn digits + Fashion-MNIST, each with a warning
and a ``source`` that says so.

Example:
  >>> import keras_moe.data as kd
  >>> train = kd.load("fashion_mnist", "train", batch_size=128, seed=0)
  >>> jit = kd.load_jittered_mnist("test")          # .images, .labels, .offsets
  >>> two = kd.load("two_domain", "train", with_extras=True)  # ({"image", "domain"}, label)
"""

from keras_moe.data.cifar import CIFARFormatError, find_cifar, read_cifar, write_cifar_batch
from keras_moe.data.idx import IDXFormatError, find_idx_files, read_idx, read_idx_header, read_idx_pair, write_idx
from keras_moe.data.jittered import TEST_SEED, JitteredSet, jitter, load_jittered_mnist, offset_index, unjitter
from keras_moe.data.loaders import NAMES, load
from keras_moe.data.pipelines import (
    MEAN_STD,
    build_pipeline,
    channel_stats,
    cifar_augment,
    cifar_pipeline,
    imagenet_eval_preprocess,
    imagenet_train_preprocess,
    normalize,
    segmentation_train_preprocess,
)
from keras_moe.data.sources import (
    DATASETS,
    DEBIAN_FASHION_MNIST_DIR,
    ENV_VAR,
    MANUAL_DOWNLOAD,
    DataNotFoundError,
    LocalData,
    find_local,
    load_numpy,
    search_roots,
    tfds_dataset,
)
from keras_moe.data.two_domain import TwoDomainSet, load_two_domain, make_two_domain, sklearn_digits, to_gray

__all__ = [
    "NAMES", "load", "load_numpy",
    "DATASETS", "DEBIAN_FASHION_MNIST_DIR", "ENV_VAR", "MANUAL_DOWNLOAD",
    "DataNotFoundError", "IDXFormatError", "CIFARFormatError", "LocalData",
    "find_local", "search_roots", "tfds_dataset",
    "read_idx", "read_idx_header", "read_idx_pair", "write_idx", "find_idx_files",
    "read_cifar", "find_cifar", "write_cifar_batch",
    "TEST_SEED", "JitteredSet", "jitter", "unjitter", "offset_index", "load_jittered_mnist",
    "TwoDomainSet", "load_two_domain", "make_two_domain", "sklearn_digits", "to_gray",
    "MEAN_STD", "normalize", "channel_stats", "cifar_augment", "cifar_pipeline", "build_pipeline",
    "imagenet_train_preprocess", "imagenet_eval_preprocess", "segmentation_train_preprocess",
]
