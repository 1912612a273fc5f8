"""Reader for the CIFAR-10 / CIFAR-100 "python version" archives.

Accepted layouts, detected by content (file names inside, then the pickles' keys):

* the archive itself: ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``
  (read in place, never extracted to disk);
* the extracted folder ``cifar-10-batches-py/`` (``data_batch_1..5``,
  ``test_batch``, ``batches.meta``) or ``cifar-100-python/`` (``train``, ``test``,
  ``meta``), or a directory that contains one of these folders or archives.

Each batch is a pickled dict with ``b"data"`` (``N x 3072`` uint8, channel-major
RGB planes of 32x32) and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` /
``b"coarse_labels"`` (CIFAR-100). Pickles are read with a restricted unpickler
that only resolves the numpy names a CIFAR pickle needs, so a malicious file
cannot run code. Problems raise :class:`CIFARFormatError` (a ``ValueError``)
naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from typing import Dict, List, Optional, Tuple

import numpy as np

__all__ = ["CIFARFormatError", "read_cifar", "find_cifar", "write_cifar_batch"]

_CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR10_TEST = ["test_batch"]
_CIFAR100_TRAIN = ["train"]
_CIFAR100_TEST = ["test"]
_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


class CIFARFormatError(ValueError):
    """Raised when a CIFAR batch file or archive is malformed."""


class _SafeUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # truncated, not a pickle, forbidden global, ...
        raise CIFARFormatError(f"{where}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CIFARFormatError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    # Normalise keys to str.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _parse_batch(d: dict, where: str, label_key: Optional[str]) -> Tuple[np.ndarray, np.ndarray, str]:
    if "data" not in d:
        raise CIFARFormatError(f"{where}: no 'data' entry (keys: {sorted(d)})")
    if label_key is None:
        label_key = "labels" if "labels" in d else "fine_labels" if "fine_labels" in d else None
        if label_key is None:
            raise CIFARFormatError(
                f"{where}: no 'labels' (CIFAR-10) or 'fine_labels' (CIFAR-100) entry (keys: {sorted(d)})"
            )
    elif label_key not in d:
        raise CIFARFormatError(f"{where}: no '{label_key}' entry (keys: {sorted(d)})")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8:
        raise CIFARFormatError(f"{where}: expected uint8 'data', got {data.dtype}")
    if data.ndim == 1 and data.size % 3072 == 0:
        data = data.reshape(-1, 3072)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise CIFARFormatError(
            f"{where}: 'data' has shape {data.shape}; expected (N, 3072) = N images of 3x32x32 "
            f"(truncated or not CIFAR?)"
        )
    labels = np.asarray(d[label_key])
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise CIFARFormatError(f"{where}: '{label_key}' must be a 1-D list of ints, got {labels.dtype} {labels.shape}")
    if len(labels) != len(data):
        raise CIFARFormatError(
            f"{where}: image and label counts differ: {len(data)} images, {len(labels)} '{label_key}'"
        )
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, labels.astype(np.int64), label_key


class _Source:
    """Uniform access to members of a folder or a tar archive, by basename."""

    def __init__(self, path: str):
        self.path = path
        self._tar = None
        self._members: Dict[str, object] = {}
        if os.path.isdir(path):
            for name in os.listdir(path):
                self._members[name] = os.path.join(path, name)
        else:
            try:
                self._tar = tarfile.open(path, "r:*")
                for m in self._tar.getmembers():
                    if m.isfile():
                        self._members.setdefault(os.path.basename(m.name), m)
            except (tarfile.TarError, OSError, EOFError) as e:
                raise CIFARFormatError(f"{path}: not a readable tar archive ({e})") from e

    def names(self):
        return set(self._members)

    def where(self, name: str) -> str:
        m = self._members[name]
        return m if isinstance(m, str) else f"{self.path}!{m.name}"

    def read(self, name: str) -> bytes:
        m = self._members[name]
        try:
            if isinstance(m, str):
                with open(m, "rb") as f:
                    return f.read()
            f = self._tar.extractfile(m)
            return f.read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise CIFARFormatError(f"{self.where(name)}: cannot read ({e}); truncated archive?") from e

    def close(self):
        if self._tar is not None:
            self._tar.close()


def _variant_of(names) -> Optional[str]:
    if set(_CIFAR10_TEST) <= names or any(n in names for n in _CIFAR10_TRAIN):
        return "cifar10"
    if ("train" in names or "test" in names) and "meta" in names:
        return "cifar100"
    return None


def find_cifar(path: str, name: Optional[str] = None) -> Optional[Tuple[str, str]]:
    """Locates a CIFAR archive or extracted folder at or directly under ``path``.

    Args:
      path: A ``.tar.gz`` archive, an extracted batches folder, or a directory
        holding either.
      name: ``"cifar10"``, ``"cifar100"`` or ``None`` (any).

    Returns:
      ``(location, variant)`` or ``None`` when nothing matches.

    Example:
      >>> find_cifar("~/data")  # doctest: +SKIP
      ('/home/me/data/cifar-10-batches-py', 'cifar10')
    """
    path = os.path.expanduser(os.fspath(path))
    wanted = [name] if name else ["cifar10", "cifar100"]
    cands: List[str] = [path]
    if os.path.isdir(path):
        for v in wanted:
            cands += [os.path.join(path, _FOLDERS[v]), os.path.join(path, _ARCHIVES[v])]
    for c in cands:
        if not os.path.exists(c):
            continue
        if os.path.isfile(c) and not tarfile.is_tarfile(c):
            continue
        try:
            src = _Source(c)
        except CIFARFormatError:
            continue
        try:
            variant = _variant_of(src.names())
        finally:
            src.close()
        if variant is not None and variant in wanted:
            return c, variant
    return None


def read_cifar(
    path: str, split: str = "train", name: Optional[str] = None, label_mode: str = "fine"
) -> Tuple[np.ndarray, np.ndarray]:
    """Reads one split of CIFAR-10 or CIFAR-100 from an archive or folder.

    Args:
      path: ``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``, an extracted
        batches folder, or a directory containing one of them.
      split: ``"train"`` or ``"test"``.
      name: ``"cifar10"``, ``"cifar100"`` or ``None`` to detect.
      label_mode: CIFAR-100 only: ``"fine"`` (100 classes) or ``"coarse"`` (20).

    Returns:
      ``(x, y)``: ``x`` uint8 ``(N, 32, 32, 3)`` RGB, ``y`` int64 ``(N,)``.

    Raises:
      FileNotFoundError: No CIFAR data at ``path``.
      CIFARFormatError: A batch is missing, truncated, has counts that differ or
        labels out of range; the message names the file (``archive!member`` for
        archives).

    Example:
      >>> x, y = read_cifar("cifar-10-python.tar.gz", "test")  # doctest: +SKIP
      >>> x.shape
      (10000, 32, 32, 3)
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    found = find_cifar(path, name)
    if found is None:
        raise FileNotFoundError(
            f"{path}: no CIFAR{'' if name is None else '-' + name[5:]} python archive or batches folder "
            f"found (expected e.g. cifar-10-python.tar.gz, cifar-10-batches-py/ with data_batch_1..5 "
            f"and test_batch, or cifar-100-python/ with train, test and meta)"
        )
    location, variant = found
    if variant == "cifar10":
        members = _CIFAR10_TRAIN if split == "train" else _CIFAR10_TEST
        label_key, num_classes = "labels", 10
    else:
        members = _CIFAR100_TRAIN if split == "train" else _CIFAR100_TEST
        label_key = "fine_labels" if label_mode == "fine" else "coarse_labels"
        num_classes = 100 if label_mode == "fine" else 20
    src = _Source(location)
    try:
        missing = [m for m in members if m not in src.names()]
        if missing:
            raise CIFARFormatError(f"{location}: {variant} {split} split is missing {', '.join(missing)}")
        xs, ys = [], []
        for m in members:
            where = src.where(m)
            x, y, _ = _parse_batch(_unpickle(src.read(m), where), where, label_key)
            if len(y):
                lo, hi = int(y.min()), int(y.max())
                if lo < 0 or hi >= num_classes:
                    raise CIFARFormatError(
                        f"{where}: labels out of range [0, {num_classes}) (min {lo}, max {hi})"
                    )
            xs.append(x)
            ys.append(y)
    finally:
        src.close()
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def write_cifar_batch(path: str, images: np.ndarray, labels, variant: str = "cifar10", coarse_labels=None) -> str:
    """Writes a batch in the CIFAR python pickle format (used by tests and tools).

    Args:
      path: Destination file.
      images: uint8 ``(N, 32, 32, 3)``.
      labels: ``N`` ints (CIFAR-10 ``labels`` or CIFAR-100 ``fine_labels``).
      variant: ``"cifar10"`` or ``"cifar100"``.
      coarse_labels: CIFAR-100 coarse labels (defaults to ``labels // 5``).

    Returns:
      ``path``.

    Example:
      >>> write_cifar_batch("/tmp/test_batch", np.zeros((2, 32, 32, 3), np.uint8), [0, 1])
      '/tmp/test_batch'
    """
    images = np.asarray(images, dtype=np.uint8)
    d = {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072), b"batch_label": b"keras_moe"}
    labels = [int(v) for v in labels]
    if variant == "cifar10":
        d[b"labels"] = labels
    else:
        d[b"fine_labels"] = labels
        d[b"coarse_labels"] = [int(v) for v in (coarse_labels if coarse_labels is not None else np.asarray(labels) // 5)]
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)
    return path
