"""Jittered MNIST (Eigen, Ranzato & Sutskever, paper 001).

Each 28x28 digit is placed at a uniform random translation of +-``max_shift``
pixels (4 in the paper) in a ``28 + 2 * max_shift`` square canvas (36x36),
zeros elsewhere. The training set draws one translation per example from the
caller's ``seed``; the test set uses one fixed translation per image drawn from
:data:`TEST_SEED`, whatever the training seed, so every model is evaluated on the
same images. The translation of every example is returned as ``offsets[:, 0] =
dx`` (columns, positive = right) and ``offsets[:, 1] = dy`` (rows, positive =
down), for the gating-by-translation analysis (paper Fig. 2);
:func:`offset_index` maps them to the 9x9 grid.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import numpy as np

from keras_moe.data import sources as _sources

__all__ = ["TEST_SEED", "JitteredSet", "jitter", "unjitter", "offset_index", "load_jittered_mnist"]

TEST_SEED = 20131216  # fixed test-split seed (paper 001's arXiv date), independent of training seeds


@dataclasses.dataclass
class JitteredSet:
    """A jittered image set.

    Attributes:
      images: uint8 ``(N, S, S, C)`` with ``S = H + 2 * max_shift``.
      labels: int64 ``(N,)``.
      offsets: int32 ``(N, 2)``: ``(dx, dy)`` of each example.
      max_shift: The maximum translation.
      source: Where the base images came from (``"stand-in: ..."`` when not MNIST).
    """

    images: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    max_shift: int = 4
    source: str = ""

    def __len__(self):
        return len(self.images)


def jitter(images: np.ndarray, labels: Optional[np.ndarray] = None, max_shift: int = 4, seed: int = 0) -> JitteredSet:
    """Places each image at a uniform random translation in a larger zero canvas.

    Works on any square or rectangular uint8 set (MNIST, Fashion-MNIST, ...).
    Pixels are copied exactly: ``unjitter(result)`` gives ``images`` back.

    Args:
      images: ``(N, H, W)`` or ``(N, H, W, C)`` array.
      labels: Optional ``(N,)`` labels, carried along (zeros if ``None``).
      max_shift: Translations are integers uniform in ``[-max_shift, max_shift]``
        on each axis, independently: ``(2 * max_shift + 1) ** 2`` offsets.
      seed: Seed of the translations (``numpy.random.default_rng``).

    Returns:
      A :class:`JitteredSet` with ``(N, H + 2m, W + 2m, C)`` images.

    Example:
      >>> x, y = load_numpy("fashion_mnist", "test")
      >>> js = jitter(x, y, max_shift=4, seed=0)
      >>> js.images.shape, int(np.abs(js.offsets).max())
      ((10000, 36, 36, 1), 4)
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
    n, h, w, c = x.shape
    y = np.zeros(n, np.int64) if labels is None else np.asarray(labels).astype(np.int64)
    if len(y) != n:
        raise ValueError(f"{n} images but {len(y)} labels")
    m = max_shift
    rng = np.random.default_rng(seed)
    offsets = rng.integers(-m, m + 1, size=(n, 2)).astype(np.int32)
    canvas = np.zeros((n, h + 2 * m, w + 2 * m, c), dtype=x.dtype)
    code = (offsets[:, 1] + m) * (2 * m + 1) + (offsets[:, 0] + m)
    for k in np.unique(code):  # at most 81 groups: vectorised copies
        sel = np.nonzero(code == k)[0]
        dy, dx = divmod(int(k), 2 * m + 1)  # dy, dx here are canvas origins (offset + m)
        canvas[sel, dy:dy + h, dx:dx + w] = x[sel]
    return JitteredSet(canvas, y, offsets, max_shift)


def unjitter(js: JitteredSet) -> np.ndarray:
    """Crops each example back to its original size using its offset (inverse of :func:`jitter`).

    Args:
      js: A :class:`JitteredSet`.

    Returns:
      ``(N, H, W, C)`` array equal to the images given to :func:`jitter`.

    Example:
      >>> js = jitter(np.ones((3, 28, 28), np.uint8))
      >>> unjitter(js).shape
      (3, 28, 28, 1)
    """
    m = js.max_shift
    n, sh, sw, c = js.images.shape
    h, w = sh - 2 * m, sw - 2 * m
    out = np.empty((n, h, w, c), js.images.dtype)
    for i, (dx, dy) in enumerate(js.offsets):
        out[i] = js.images[i, dy + m:dy + m + h, dx + m:dx + m + w]
    return out


def offset_index(offsets: np.ndarray, max_shift: int = 4) -> np.ndarray:
    """Maps ``(dx, dy)`` offsets to a row-major cell of the ``(2m+1) x (2m+1)`` grid.

    Args:
      offsets: ``(N, 2)`` int array of ``(dx, dy)``.
      max_shift: ``m``.

    Returns:
      int array ``(N,)`` in ``[0, (2m+1)^2)``: ``(dy + m) * (2m + 1) + (dx + m)``.

    Example:
      >>> offset_index(np.array([[-4, -4], [4, 4], [0, 0]]))
      array([ 0, 80, 40])
    """
    o = np.asarray(offsets)
    return (o[:, 1] + max_shift) * (2 * max_shift + 1) + (o[:, 0] + max_shift)


def load_jittered_mnist(
    split: str = "train",
    data_dir: Optional[str] = None,
    source: str = "auto",
    seed: int = 0,
    max_shift: int = 4,
    base: str = "mnist",
    allow_stand_in: bool = True,
    download: bool = True,
) -> JitteredSet:
    """Jittered MNIST as numpy arrays, with the translation of every example.

    Args:
      split: ``"train"`` (translations from ``seed``) or ``"test"`` (translations
        from :data:`TEST_SEED`, the same for every call).
      data_dir: Directory searched first for the base set (and TFDS ``data_dir``).
      source: ``"auto"``, ``"files"`` or ``"tfds"`` for the base set.
      seed: Training-split translation seed.
      max_shift: Maximum translation (4 in the paper: 36x36 images).
      base: Base 28x28 set, ``"mnist"`` (the paper) or ``"fashion_mnist"``.
      allow_stand_in: When ``base="mnist"`` is not found, use Fashion-MNIST (the
        embedded default) instead, with a warning, and say so in ``source``.
      download: Let TFDS download the base set when it is not on disk.

    Returns:
      A :class:`JitteredSet`; ``.source`` names the base data and where it came
      from, prefixed ``"stand-in: "`` when Fashion-MNIST replaced MNIST.

    Example:
      >>> test = load_jittered_mnist("test")
      >>> test.images.shape[1:], test.offsets.shape[1]
      ((36, 36, 1), 2)
    """
    try:
        x, y, where = _sources.load_numpy(base, split, data_dir, source, download=download, return_source=True)
        desc = f"{base}: {where}"
    except _sources.DataNotFoundError as e:
        if not (allow_stand_in and base == "mnist"):
            raise
        x, y, where = _sources.load_stand_in("fashion_mnist", split, data_dir)
        desc = f"stand-in: fashion_mnist ({where}) because mnist was not found"
        warnings.warn(f"jittered MNIST: {desc}. {str(e).splitlines()[0]}", stacklevel=2)
    js = jitter(x, y, max_shift, seed=TEST_SEED if _sources.is_test_split(split) else seed)
    js.source = desc
    return js
