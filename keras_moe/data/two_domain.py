"""The two-domain 20-class set of paper 002: MNIST (labels 0-9) + CIFAR-10 (labels 10-19).

Both domains are converted to 32x32 gray (ITU-R BT.601 luma, bilinear resize
with antialiasing), concatenated and shuffled together with a seed. ``domain``
is 0 for the first domain (digits) and 1 for the second (natural images): it is
what the oracle gate of paper 002 uses and the rows of its activation-rate table.

Stand-ins (offline, where MNIST or CIFAR-10 is not found, with
``allow_stand_in=True``), chosen per domain from real data that is here:

* domain 0, instead of MNIST: scikit-learn's ``load_digits`` (1,797 real 8x8
  handwritten digits, values 0-16, scaled to 0-255 and upsampled to 32x32);
  split deterministically 80 % train / 20 % test (:data:`DIGITS_SPLIT_SEED`).
* domain 1, instead of CIFAR-10: Fashion-MNIST (Debian's package, the embedded
  default), resized 28 -> 32; its labels 0-9 become 10-19.

With a stand-in the two domains have very different sizes (1,438 vs 60,000
training images), so by default (``balance=None``) the larger domain is
subsampled, with the seed, to the size of the smaller. The ``source`` field says
exactly what was used; ``domain_names`` names each domain.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional, Tuple

import numpy as np

from keras_moe.data import sources as _sources

__all__ = ["DIGITS_SPLIT_SEED", "TwoDomainSet", "to_gray", "sklearn_digits", "make_two_domain", "load_two_domain"]

DIGITS_SPLIT_SEED = 0
_LUMA = np.array([0.2989, 0.5870, 0.1140], np.float32)


@dataclasses.dataclass
class TwoDomainSet:
    """The combined set.

    Attributes:
      images: uint8 ``(N, 32, 32, 1)``.
      labels: int64 ``(N,)`` in ``[0, 20)``: domain 0 keeps 0-9, domain 1 gets 10-19.
      domain: int64 ``(N,)``: 0 (digits) or 1 (natural images / stand-in).
      domain_names: Names of domain 0 and 1, e.g. ``("mnist", "cifar10")``.
      source: Where each domain came from; contains ``"stand-in"`` if one was used.
    """

    images: np.ndarray
    labels: np.ndarray
    domain: np.ndarray
    domain_names: Tuple[str, str] = ("mnist", "cifar10")
    source: str = ""

    @property
    def stand_in(self) -> bool:
        """True when a domain is not the paper's (MNIST / CIFAR-10)."""
        return self.domain_names != ("mnist", "cifar10")

    def __len__(self):
        return len(self.images)


def to_gray(images: np.ndarray, size: int = 32, chunk: int = 8192) -> np.ndarray:
    """Converts uint8 images to ``size`` x ``size`` single-channel uint8.

    Args:
      images: uint8 ``(N, H, W)``, ``(N, H, W, 1)`` or ``(N, H, W, 3)``.
      size: Output side.
      chunk: Images per resize call (bounds memory).

    Returns:
      uint8 ``(N, size, size, 1)``.

    Example:
      >>> to_gray(np.zeros((2, 28, 28, 1), np.uint8)).shape
      (2, 32, 32, 1)
    """
    import tensorflow as tf

    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[-1] == 3:
        x = np.tensordot(x.astype(np.float32), _LUMA, axes=([3], [0]))[..., None]
    elif x.shape[-1] != 1:
        raise ValueError(f"expected 1 or 3 channels, got shape {x.shape}")
    if x.shape[1:3] == (size, size):
        out = x
    else:
        parts = [tf.image.resize(x[i:i + chunk].astype(np.float32), [size, size], method="bilinear",
                                 antialias=True).numpy() for i in range(0, len(x), chunk)]
        out = np.concatenate(parts) if parts else np.zeros((0, size, size, 1), np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def sklearn_digits(split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as uint8 images, split 80/20 deterministically.

    Args:
      split: ``"train"`` (1,438 images) or ``"test"`` (359).

    Returns:
      ``(x, y)``: uint8 ``(N, 8, 8, 1)`` scaled from 0-16 to 0-255, int64 labels 0-9.

    Example:
      >>> x, y = sklearn_digits("test")
      >>> x.shape
      (359, 8, 8, 1)
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(x))
    cut = int(round(0.8 * len(x)))
    idx = perm[:cut] if not _sources.is_test_split(split) else perm[cut:]
    idx = np.sort(idx)
    return x[idx], y[idx]


def make_two_domain(first, second, seed: int = 0, balance: bool = False, size: int = 32,
                    domain_names: Tuple[str, str] = ("mnist", "cifar10"), source: str = "") -> TwoDomainSet:
    """Combines two 10-class sets into the 20-class two-domain set.

    Args:
      first: ``(x, y)`` of domain 0; labels stay 0-9.
      second: ``(x, y)`` of domain 1; labels become 10-19.
      seed: Seed of the joint shuffle (and of the subsampling when balancing).
      balance: Subsample the larger domain to the size of the smaller.
      size: Image side.
      domain_names: Recorded in the result.
      source: Recorded in the result.

    Returns:
      A shuffled :class:`TwoDomainSet`.

    Example:
      >>> a = (np.zeros((4, 28, 28, 1), np.uint8), np.arange(4))
      >>> b = (np.zeros((4, 32, 32, 3), np.uint8), np.arange(4))
      >>> s = make_two_domain(a, b)
      >>> s.images.shape, sorted(set(s.labels.tolist()))
      ((8, 32, 32, 1), [0, 1, 2, 3, 10, 11, 12, 13])
    """
    rng = np.random.default_rng(seed)
    (x0, y0), (x1, y1) = first, second
    y0, y1 = np.asarray(y0, np.int64), np.asarray(y1, np.int64)
    for name, y in zip(domain_names, (y0, y1)):
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"{name}: labels must be in [0, 10), got min {y.min()}, max {y.max()}")
    if balance:
        n = min(len(y0), len(y1))
        if len(y0) > n:
            keep = np.sort(rng.choice(len(y0), n, replace=False))
            x0, y0 = x0[keep], y0[keep]
        if len(y1) > n:
            keep = np.sort(rng.choice(len(y1), n, replace=False))
            x1, y1 = x1[keep], y1[keep]
    images = np.concatenate([to_gray(x0, size), to_gray(x1, size)])
    labels = np.concatenate([y0, y1 + 10])
    domain = np.concatenate([np.zeros(len(y0), np.int64), np.ones(len(y1), np.int64)])
    perm = rng.permutation(len(labels))
    return TwoDomainSet(images[perm], labels[perm], domain[perm], tuple(domain_names), source)


def load_two_domain(
    split: str = "train",
    data_dir: Optional[str] = None,
    source: str = "auto",
    seed: int = 0,
    allow_stand_in: bool = True,
    balance: Optional[bool] = None,
    download: bool = True,
) -> TwoDomainSet:
    """Loads the MNIST + CIFAR-10 two-domain set, or its documented stand-in.

    Args:
      split: ``"train"`` or ``"test"``.
      data_dir: Directory searched first for MNIST and CIFAR-10 (and TFDS ``data_dir``).
      source: ``"auto"``, ``"files"`` or ``"tfds"`` for MNIST and CIFAR-10.
      seed: Shuffle (and balancing) seed.
      allow_stand_in: Replace a missing domain by its stand-in (module docstring)
        with a warning; ``False`` raises :class:`DataNotFoundError` instead.
      balance: Subsample the larger domain; ``None`` = only when a stand-in is used.
      download: Let TFDS download MNIST / CIFAR-10 when not on disk.

    Returns:
      A :class:`TwoDomainSet`; ``.source`` and ``.domain_names`` say what was used.

    Example:
      >>> s = load_two_domain("test")   # offline here: sklearn digits + Fashion-MNIST
      >>> s.images.shape[1:], s.domain_names
      ((32, 32, 1), ('sklearn_digits', 'fashion_mnist'))
    """
    parts, names, descs, missing = [], [], [], []
    for real, stand_in in (("mnist", "sklearn_digits"), ("cifar10", "fashion_mnist")):
        try:
            x, y, where = _sources.load_numpy(real, split, data_dir, source, download=download, return_source=True)
            parts.append((x, y))
            names.append(real)
            descs.append(f"{real}: {where}")
        except _sources.DataNotFoundError as e:
            if not allow_stand_in:
                raise
            missing.append(str(e).splitlines()[0])
            if stand_in == "sklearn_digits":
                parts.append(sklearn_digits(split))
                descs.append("stand-in for mnist: sklearn_digits (sklearn.datasets.load_digits, 8x8 upsampled)")
            else:
                x, y, where = _sources.load_stand_in("fashion_mnist", split, data_dir)
                parts.append((x, y))
                descs.append(f"stand-in for cifar10: fashion_mnist ({where})")
            names.append(stand_in)
    if missing:
        warnings.warn("two-domain set uses a stand-in: " + "; ".join(descs), stacklevel=2)
    if balance is None:
        balance = bool(missing)
    return make_two_domain(parts[0], parts[1], seed=seed, balance=balance, domain_names=tuple(names),
                           source="; ".join(descs) + ("; balanced" if balance else ""))
