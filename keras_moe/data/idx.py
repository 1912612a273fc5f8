"""Reader for MNIST-format IDX files (MNIST, Fashion-MNIST, EMNIST, KMNIST, ...).

The IDX format (http://yann.lecun.com/exdb/mnist/) is a 4-byte magic number
``0x00 0x00 <dtype code> <ndim>`` followed by ``ndim`` big-endian uint32
dimension sizes and the row-major data. Files may be gzipped; gzip is detected
from the file's first two bytes, not from its name.

Every problem raises :class:`IDXFormatError` (a ``ValueError``) whose message
names the file and what is wrong with it.
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import Dict, List, Optional, Tuple

import numpy as np

__all__ = [
    "IDXFormatError",
    "read_idx",
    "read_idx_header",
    "read_idx_pair",
    "write_idx",
    "find_idx_files",
]

# IDX dtype codes -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_FOR_DTYPE = {v.newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


class IDXFormatError(ValueError):
    """Raised when a file is not a valid IDX file (or a pair does not match)."""


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _open(path: str):
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


def _parse_header(head: bytes, path: str) -> Tuple[np.dtype, Tuple[int, ...], int]:
    if len(head) < 4:
        raise IDXFormatError(
            f"{path}: not an IDX file: only {len(head)} bytes, the 4-byte magic number is missing"
        )
    zero0, zero1, code, ndim = head[0], head[1], head[2], head[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise IDXFormatError(
            f"{path}: wrong magic number 0x{head[:4].hex()}: an IDX file starts with "
            f"0x0000 then a dtype code in {{{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}}} "
            f"and a non-zero number of dimensions (MNIST images 0x00000803, labels 0x00000801)"
        )
    need = 4 + 4 * ndim
    if len(head) < need:
        raise IDXFormatError(
            f"{path}: truncated header: {ndim} dimensions need {need} header bytes, "
            f"the file has {len(head)}"
        )
    shape = struct.unpack(f">{ndim}I", head[4:need])
    return _IDX_DTYPES[code], tuple(int(s) for s in shape), need


def read_idx_header(path: str) -> Tuple[np.dtype, Tuple[int, ...]]:
    """Reads only the header of an IDX file (cheap, also for large gzipped files).

    Args:
      path: An IDX file, raw or gzipped.

    Returns:
      ``(dtype, shape)`` as declared by the header (dtype in native byte order).

    Raises:
      IDXFormatError: If the magic number or header is invalid.

    Example:
      >>> read_idx_header("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
      (dtype('uint8'), (10000,))
    """
    path = os.fspath(path)
    try:
        with _open(path) as f:
            head = f.read(4)
            if len(head) == 4 and head[3] > 0:
                head += f.read(4 * head[3])
    except (OSError, EOFError) as e:  # bad gzip stream
        raise IDXFormatError(f"{path}: cannot read IDX header: {e}") from e
    dtype, shape, _ = _parse_header(head, path)
    return dtype.newbyteorder("="), shape


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file into a numpy array.

    Args:
      path: An IDX file, raw or gzipped (detected from its content).

    Returns:
      An array with the shape and dtype (native byte order) the header declares.

    Raises:
      IDXFormatError: Wrong magic number, truncated header or data, trailing bytes,
        or a corrupt gzip stream; the message names the file.

    Example:
      >>> y = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
      >>> y.shape, y.dtype
      ((10000,), dtype('uint8'))
    """
    path = os.fspath(path)
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise IDXFormatError(f"{path}: cannot read (corrupt or truncated gzip stream?): {e}") from e
    dtype, shape, offset = _parse_header(raw[: 4 + 4 * 255], path)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - offset
    if got < expected:
        raise IDXFormatError(
            f"{path}: truncated data: header declares shape {shape} of {dtype.newbyteorder('=')} "
            f"({expected} bytes) but only {got} bytes follow the header"
        )
    if got > expected:
        raise IDXFormatError(
            f"{path}: {got - expected} unexpected trailing bytes after the {expected} data bytes "
            f"declared by the header (shape {shape})"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=offset)
    return arr.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def read_idx_pair(
    images_path: str, labels_path: str, num_classes: Optional[int] = 10
) -> Tuple[np.ndarray, np.ndarray]:
    """Reads and cross-checks an images file and its labels file.

    Args:
      images_path: IDX file of ``uint8`` images, shape ``(N, H, W)`` or ``(N, H, W, C)``.
      labels_path: IDX file of integer labels, shape ``(N,)``.
      num_classes: Labels must lie in ``[0, num_classes)``; ``None`` skips the check.

    Returns:
      ``(x, y)``: ``x`` uint8 of shape ``(N, H, W, C)`` (a channel axis is added to
      3-D data), ``y`` int64 of shape ``(N,)``.

    Raises:
      IDXFormatError: Bad file, wrong rank or dtype, counts that differ, or labels
        out of range; the message names the offending file.

    Example:
      >>> d = "/usr/share/datasets/fashion-mnist"
      >>> x, y = read_idx_pair(f"{d}/t10k-images-idx3-ubyte.gz", f"{d}/t10k-labels-idx1-ubyte.gz")
      >>> x.shape, y.max()
      ((10000, 28, 28, 1), 9)
    """
    images_path, labels_path = os.fspath(images_path), os.fspath(labels_path)
    x = read_idx(images_path)
    y = read_idx(labels_path)
    if x.ndim not in (3, 4):
        raise IDXFormatError(
            f"{images_path}: expected images of rank 3 (N, H, W) or 4 (N, H, W, C), got shape {x.shape}"
        )
    if x.dtype != np.uint8:
        raise IDXFormatError(f"{images_path}: expected uint8 images, got {x.dtype}")
    if y.ndim != 1:
        raise IDXFormatError(f"{labels_path}: expected labels of rank 1 (N,), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise IDXFormatError(f"{labels_path}: expected integer labels, got {y.dtype}")
    if len(x) != len(y):
        raise IDXFormatError(
            f"image and label counts differ: {images_path} has {len(x)} images, "
            f"{labels_path} has {len(y)} labels"
        )
    if num_classes is not None and len(y):
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            bad = int(np.sum((y < 0) | (y >= num_classes)))
            raise IDXFormatError(
                f"{labels_path}: {bad} labels out of range [0, {num_classes}) "
                f"(min {lo}, max {hi})"
            )
    if x.ndim == 3:
        x = x[..., None]
    return x, y.astype(np.int64)


def write_idx(path: str, array: np.ndarray, compress: Optional[bool] = None) -> str:
    """Writes an array as an IDX file (used by tests and to export data sets).

    Args:
      path: Destination. ``compress=None`` gzips when the name ends in ``.gz``.
      array: Array of uint8, int8, int16, int32, float32 or float64.
      compress: Force gzip on (True) or off (False).

    Returns:
      ``path``.

    Example:
      >>> write_idx("/tmp/labels-idx1-ubyte.gz", np.arange(10, dtype=np.uint8))
      '/tmp/labels-idx1-ubyte.gz'
    """
    path = os.fspath(path)
    array = np.asarray(array)
    code = _CODE_FOR_DTYPE.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"write_idx: unsupported dtype {array.dtype} for {path}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(_IDX_DTYPES[code], copy=False).tobytes()
    if compress is None:
        compress = path.endswith(".gz")
    with (gzip.open(path, "wb", compresslevel=1) if compress else open(path, "wb")) as f:
        f.write(payload)
    return path


_TRAIN_HINTS = ("train",)
_TEST_HINTS = ("t10k", "test")


def _split_of(name: str) -> Optional[str]:
    low = name.lower()
    if any(h in low for h in _TEST_HINTS):
        return "test"
    if any(h in low for h in _TRAIN_HINTS):
        return "train"
    return None


def find_idx_files(directory: str) -> Dict[str, Tuple[str, str]]:
    """Finds IDX image/label pairs in a directory by their content.

    Every regular file whose header parses as IDX is classified as images
    (rank >= 3, uint8) or labels (rank 1); a file named like an IDX file (``*ubyte*``)
    whose header does not parse raises `IDXFormatError` naming it (other files are
    ignored). Images and labels with the same count
    are paired. The split comes from the file name (``train``; ``t10k`` or
    ``test``); when names say nothing, the larger pair is ``train`` and the
    smaller ``test``.

    Args:
      directory: Directory to scan (not recursive).

    Returns:
      ``{"train": (images_path, labels_path), "test": (...)}``, possibly with one
      or no split.

    Example:
      >>> sorted(find_idx_files("/usr/share/datasets/fashion-mnist"))
      ['test', 'train']
    """
    directory = os.fspath(directory)
    images: List[Tuple[str, int]] = []
    labels: List[Tuple[str, int]] = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return {}
    for name in names:
        p = os.path.join(directory, name)
        if not os.path.isfile(p):
            continue
        try:
            dtype, shape = read_idx_header(p)
        except IDXFormatError as error:
            if "ubyte" in name.lower():  # named as an IDX file: corrupt, not unrelated
                raise IDXFormatError(f"corrupt IDX file: {error}") from None
            continue
        if len(shape) >= 3 and dtype == np.uint8:
            images.append((p, shape[0]))
        elif len(shape) == 1:
            labels.append((p, shape[0]))
    pairs: List[Tuple[str, str, int]] = []
    used = set()
    for ip, n in images:
        # Prefer a labels file of the same count whose name agrees on the split.
        cands = [lp for lp, m in labels if m == n and lp not in used]
        if not cands:
            continue
        same = [lp for lp in cands if _split_of(os.path.basename(lp)) == _split_of(os.path.basename(ip))]
        lp = (same or cands)[0]
        used.add(lp)
        pairs.append((ip, lp, n))
    out: Dict[str, Tuple[str, str]] = {}
    unnamed = []
    for ip, lp, n in pairs:
        split = _split_of(os.path.basename(ip))
        if split is not None and split not in out:
            out[split] = (ip, lp)
        else:
            unnamed.append((n, ip, lp))
    for n, ip, lp in sorted(unnamed, reverse=True):
        for split in ("train", "test"):
            if split not in out:
                out[split] = (ip, lp)
                break
    return out
