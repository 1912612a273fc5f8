"""Finding the base data sets: directories, the Debian package, TFDS.

Search order for ``source="files"`` (and first for ``source="auto"``):

1. the ``data_dir`` argument, when given: it is then the only place searched (a folder
   the user names is used, or refused with an error that names it; never skipped for
   another copy elsewhere);
2. every directory in the environment variable ``KERAS_MOE_DATA_DIR``
   (``os.pathsep``-separated);
3. ``~/.keras/datasets`` (where ``keras.datasets`` caches downloads);
4. for ``fashion_mnist`` only: ``/usr/share/datasets/fashion-mnist``, where
   Debian's ``dataset-fashion-mnist`` package installs the real files.

In each root, the subfolders conventionally named for the data set are tried
first (``mnist/``, ``MNIST/raw/``, ``fashion-mnist/``, ``FashionMNIST/raw/``,
``cifar-10-batches-py/``, ``cifar-10-python.tar.gz``, ...), then the root itself.
Files are recognised by content: IDX headers for the MNIST family, the CIFAR
batch names and pickle keys for CIFAR. A file named like an IDX file (``*-ubyte*``)
whose header does not parse is reported as corrupt (`IDXFormatError`, naming it). The IDX format cannot tell MNIST from
Fashion-MNIST, so a root that holds bare IDX files is used for whichever of the
two you ask for: keep them in named subfolders when you have both.

With ``source="auto"``, when no files are found, TFDS is used: a data set
already prepared under ``data_dir`` (or TFDS's default ``~/tensorflow_datasets``)
is loaded, otherwise TFDS downloads it when ``download=True``. Before a download the
data set's download host is resolved and connected to (a few seconds at most): offline,
the `DataNotFoundError` says so at once (its TFDS line: `DataUnreachableError`, a
`ConnectionError`), instead of TFDS retrying each file for minutes, and the answer is
remembered for the process. With ``source="tfds"`` TFDS itself is asked. ``imagenet2012``
and ``cityscapes`` are TFDS-only and need a manual download (see
:data:`MANUAL_DOWNLOAD`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from keras_moe.data import cifar as _cifar
from keras_moe.data import idx as _idx

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "ENV_VAR",
    "DATASETS",
    "MANUAL_DOWNLOAD",
    "DataNotFoundError",
    "DataUnreachableError",
    "DatasetInfo",
    "LocalData",
    "find_local",
    "search_roots",
    "tfds_dataset",
    "load_numpy",
]

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "KERAS_MOE_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a base data set."""

    name: str
    tfds_name: str
    kind: str  # "idx", "cifar" or "tfds" (TFDS only)
    num_classes: int
    subdirs: Tuple[str, ...] = ()
    image_key: str = "image"
    label_key: str = "label"
    download: Optional[Tuple[str, int]] = None  # (host, port) TFDS downloads it from


DATASETS: Dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", "mnist", "idx", 10, ("mnist", "MNIST/raw", "MNIST"),
                         download=("storage.googleapis.com", 443)),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", "fashion_mnist", "idx", 10,
        ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw", "FashionMNIST"),
        download=("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
    ),
    "cifar10": DatasetInfo("cifar10", "cifar10", "cifar", 10, ("cifar10", "cifar-10"),
                           download=("www.cs.toronto.edu", 443)),
    "cifar100": DatasetInfo("cifar100", "cifar100", "cifar", 100, ("cifar100", "cifar-100"),
                            download=("www.cs.toronto.edu", 443)),
    "imagenet2012": DatasetInfo("imagenet2012", "imagenet2012", "tfds", 1000),
    "cityscapes": DatasetInfo(
        "cityscapes", "cityscapes/semantic_segmentation", "tfds", 34,
        image_key="image_left", label_key="segmentation_label",
    ),
}

MANUAL_DOWNLOAD = {
    "imagenet2012": (
        "imagenet2012 is a manual download in TFDS: register at https://image-net.org/download-images, "
        "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, put both in "
        "<data_dir>/downloads/manual/ (default data_dir ~/tensorflow_datasets), then run "
        "`tfds build imagenet2012 --data_dir <data_dir>` or call load('imagenet2012', ..., data_dir=<data_dir>) "
        "once (preparation takes hours and about 300 GB)"
    ),
    "cityscapes": (
        "cityscapes is a manual download in TFDS: register at https://www.cityscapes-dataset.com, download "
        "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip, put both in <data_dir>/downloads/manual/ "
        "(default data_dir ~/tensorflow_datasets), then run "
        "`tfds build cityscapes/semantic_segmentation --data_dir <data_dir>` or call "
        "load('cityscapes', ..., data_dir=<data_dir>) once"
    ),
}


class DataNotFoundError(FileNotFoundError):
    """No copy of a data set was found; the message lists where we looked and how to get it."""


class DataUnreachableError(DataNotFoundError, ConnectionError):
    """A data set would have to be downloaded, and its download host cannot be reached."""


_UNREACHABLE: Dict[Tuple[str, int], str] = {}


def check_download_reachable(name: str, timeout: float = 5.0) -> None:
    """Raises `DataUnreachableError` at once if TFDS could not download ``name`` from here.

    The data set's download host is resolved and connected to (``timeout`` seconds at
    most); a failure is remembered for the rest of the process.
    """
    info = _info(name)
    if info.download is None:
        return
    host, port = info.download
    if (host, port) not in _UNREACHABLE:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return
        except OSError as error:
            _UNREACHABLE[(host, port)] = f"{type(error).__name__}: {error}"
    raise DataUnreachableError(
        f"{name}: TFDS downloads it from {host}, which this machine cannot reach "
        f"({_UNREACHABLE[(host, port)]}): no network, so no download")


@dataclasses.dataclass(frozen=True)
class LocalData:
    """A data set found on disk.

    Attributes:
      name: Data set name.
      kind: ``"idx"`` or ``"cifar"``.
      location: The directory (IDX, CIFAR folder) or archive path.
      files: For IDX, ``{"train": (images, labels), "test": (...)}``.
    """

    name: str
    kind: str
    location: str
    files: Dict[str, Tuple[str, str]] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        return f"files {self.location}"


def _info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}") from None


def search_roots(name: str, data_dir: Optional[str] = None) -> List[str]:
    """Lists the root directories searched for ``name``, in order.

    Args:
      name: A key of :data:`DATASETS`.
      data_dir: Optional explicit directory: when given, the only root.

    Returns:
      Absolute paths (they need not exist).

    Example:
      >>> search_roots("fashion_mnist")[-1]
      '/usr/share/datasets/fashion-mnist'
    """
    _info(name)
    roots: List[str] = []
    if data_dir:
        return [os.path.abspath(os.path.expanduser(os.fspath(data_dir)))]
    env = os.environ.get(ENV_VAR, "")
    roots += [p for p in env.split(os.pathsep) if p]
    roots.append(os.path.join("~", ".keras", "datasets"))
    if name == "fashion_mnist":
        roots.append(DEBIAN_FASHION_MNIST_DIR)
    out = []
    for r in roots:
        r = os.path.abspath(os.path.expanduser(r))
        if r not in out:
            out.append(r)
    return out


def find_local(name: str, data_dir: Optional[str] = None, looked: Optional[List[str]] = None) -> Optional[LocalData]:
    """Finds ``name`` on disk, recognising files by their content.

    Args:
      name: ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"`` or ``"cifar100"``.
      data_dir: Optional directory searched first.
      looked: If given, every place examined is appended (for error messages).

    Returns:
      A :class:`LocalData`, or ``None``.

    Example:
      >>> find_local("fashion_mnist").location  # with dataset-fashion-mnist installed
      '/usr/share/datasets/fashion-mnist'
    """
    info = _info(name)
    if info.kind == "tfds":
        return None
    for root in search_roots(name, data_dir):
        if info.kind == "idx":
            for d in [os.path.join(root, s) for s in info.subdirs] + [root]:
                if looked is not None:
                    looked.append(d)
                files = _idx.find_idx_files(d)
                if files:
                    return LocalData(name, "idx", d, files)
        else:
            for d in [os.path.join(root, s) for s in info.subdirs] + [root]:
                if looked is not None:
                    looked.append(d)
                if not os.path.exists(d):
                    continue
                found = _cifar.find_cifar(d, name)
                if found is not None:
                    return LocalData(name, "cifar", found[0])
    return None


def _how_to_get(name: str) -> str:
    info = _info(name)
    lines = [
        f"Three ways to get {name}:",
        f"  1. TFDS with internet: load({name!r}, split, source='tfds', data_dir=DIR) downloads "
        f"{info.tfds_name!r} into DIR (default ~/tensorflow_datasets).",
    ]
    if name in MANUAL_DOWNLOAD:
        lines[-1] += " " + MANUAL_DOWNLOAD[name] + "."
    if info.kind == "idx":
        what = ("MNIST-format IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])")
    elif info.kind == "cifar":
        what = (f"the CIFAR python archive ({_cifar._ARCHIVES[name]}) or its extracted folder "
                f"({_cifar._FOLDERS[name]}/)")
    else:
        what = None
    if what:
        lines.append(f"  2. A directory: put {what} in a directory and pass data_dir=DIR or set "
                     f"{ENV_VAR}=DIR (a subfolder named {info.subdirs[0]!r} also works).")
    else:
        lines.append(f"  2. A directory: not supported for {name}; prepare it with TFDS (way 1) and pass "
                     f"that data_dir.")
    lines.append(
        "  3. The Debian package: `sudo apt-get install dataset-fashion-mnist` installs Fashion-MNIST in "
        f"{DEBIAN_FASHION_MNIST_DIR}" + (" (the embedded default)." if name == "fashion_mnist" else
                                         f" (Fashion-MNIST only: it does not provide {name}).")
    )
    return "\n".join(lines)


def not_found_error(name: str, looked: Sequence[str], tfds_error: Optional[BaseException] = None,
                    tfds_note: Optional[str] = None,
                    data_dir_given: bool = False) -> DataNotFoundError:
    """Builds the :class:`DataNotFoundError` for ``name``."""
    msg = [f"{name}: no copy found. Looked in:"]
    if data_dir_given:
        msg = [f"{name}: no copy found in the data_dir given (the only place searched when "
               "one is given). Looked in:"]
    msg += [f"  - {p}{'' if os.path.exists(p) else ' (does not exist)'}" for p in looked]
    if tfds_note:
        msg.append(f"  - {tfds_note}")
    if tfds_error is not None:
        msg.append(f"  - TFDS: {type(tfds_error).__name__}: {str(tfds_error).splitlines()[0] if str(tfds_error) else ''}")
    msg.append(_how_to_get(name))
    return DataNotFoundError("\n".join(msg))


def _tfds_split(split: str) -> str:
    return "test" if split == "t10k" else split


def tfds_dataset(name: str, split: str, data_dir: Optional[str] = None, download: bool = True):
    """Loads ``name`` from TFDS as an unbatched ``tf.data.Dataset`` of (image, label).

    Args:
      name: A key of :data:`DATASETS` (``cityscapes`` yields (image, segmentation mask)).
      split: A TFDS split string (``"train"``, ``"test"``, ``"validation"``, ``"train[:10%]"``).
      data_dir: TFDS data directory (default ``~/tensorflow_datasets``).
      download: Let TFDS download and prepare the data set if needed.

    Returns:
      ``tf.data.Dataset`` of ``(uint8 image (H, W, C), int64 label)``.

    Example:
      >>> ds = tfds_dataset("mnist", "test")  # doctest: +SKIP
    """
    import tensorflow_datasets as tfds

    info = _info(name)
    ds = tfds.load(info.tfds_name, split=_tfds_split(split), data_dir=data_dir, download=download,
                   shuffle_files=False)
    return ds.map(lambda ex: (ex[info.image_key], ex[info.label_key]))


def _tfds_prepared(name: str, data_dir: Optional[str]) -> bool:
    try:
        import tensorflow_datasets as tfds

        return bool(tfds.builder(_info(name).tfds_name, data_dir=data_dir).is_prepared())
    except Exception:
        return False


def resolve(name: str, data_dir: Optional[str] = None, source: str = "auto", download: bool = True):
    """Decides where ``name`` comes from.

    Args:
      name: A key of :data:`DATASETS`.
      data_dir: Directory searched first for files, and TFDS ``data_dir``.
      source: ``"auto"`` (files, then TFDS), ``"files"`` or ``"tfds"``.
      download: In ``"auto"`` mode, allow TFDS to download when nothing is local.

    Returns:
      A :class:`LocalData`, or the string ``"tfds"``.

    Raises:
      DataNotFoundError: ``source="files"`` and nothing found.

    Example:
      >>> resolve("fashion_mnist").location
      '/usr/share/datasets/fashion-mnist'
    """
    info = _info(name)
    if source not in ("auto", "files", "tfds"):
        raise ValueError(f"source must be 'auto', 'files' or 'tfds', got {source!r}")
    if source == "tfds":
        return "tfds"
    looked: List[str] = []
    if info.kind != "tfds":
        local = find_local(name, data_dir, looked)
        if local is not None:
            return local
    if source == "files":
        if info.kind == "tfds":
            raise ValueError(f"{name} has no file reader; use source='tfds'. {MANUAL_DOWNLOAD[name]}")
        raise not_found_error(name, looked, data_dir_given=bool(data_dir))
    prepared = _tfds_prepared(name, data_dir)
    if download and not prepared:
        try:  # fail at once offline, not after TFDS's minutes of retries per file
            check_download_reachable(name)
        except DataUnreachableError as error:
            raise not_found_error(name, looked, error, data_dir_given=bool(data_dir)) from error
    if download or prepared:
        return "tfds"
    raise not_found_error(name, looked, tfds_note=f"TFDS {info.tfds_name} under "
                          f"{data_dir or '~/tensorflow_datasets'}: not prepared, and download=False")


def is_test_split(split: str) -> bool:
    """True for ``"test"``, ``"t10k"`` and TFDS test slices such as ``"test[:50%]"``."""
    return split.split("[")[0] in ("test", "t10k")


def _file_split(split: str) -> str:
    s = {"train": "train", "test": "test", "t10k": "test"}.get(split)
    if s is None:
        raise ValueError(f"split {split!r} is not available from files; use 'train' or 'test' (or source='tfds')")
    return s


def read_local(local: LocalData, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Reads one split of a :class:`LocalData` into ``(x, y)`` numpy arrays."""
    split = _file_split(split)
    info = _info(local.name)
    if local.kind == "idx":
        if split not in local.files:
            raise DataNotFoundError(
                f"{local.name}: {local.location} has IDX files for {sorted(local.files)} but none for the "
                f"{split} split (expected e.g. {'t10k' if split == 'test' else 'train'}-images-idx3-ubyte.gz "
                f"and the matching labels file)"
            )
        return _idx.read_idx_pair(*local.files[split], num_classes=info.num_classes)
    return _cifar.read_cifar(local.location, split, name=local.name)


def load_numpy(
    name: str,
    split: str = "train",
    data_dir: Optional[str] = None,
    source: str = "auto",
    download: bool = True,
    return_source: bool = False,
):
    """Loads a base data set split into memory as numpy arrays.

    Args:
      name: ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ``"cifar100"`` (or a
        TFDS-only name if it fits in memory).
      split: ``"train"`` or ``"test"`` (TFDS split strings with ``source="tfds"``).
      data_dir: Directory searched first; also the TFDS ``data_dir``.
      source: ``"auto"``, ``"files"`` or ``"tfds"``.
      download: Allow a TFDS download in ``"auto"``/``"tfds"`` mode.
      return_source: Also return a string saying where the data came from.

    Returns:
      ``(x, y)``: ``x`` uint8 ``(N, H, W, C)``, ``y`` int64 ``(N,)``; with
      ``return_source``, ``(x, y, source_description)``.

    Raises:
      DataNotFoundError: Nothing found; lists where it looked and the three ways
        to get the data.
      ValueError: A malformed file (the message names it).

    Example:
      >>> x, y = load_numpy("fashion_mnist", "test")
      >>> x.shape, x.dtype, int(y.max())
      ((10000, 28, 28, 1), dtype('uint8'), 9)
    """
    where = resolve(name, data_dir, source, download)
    if where == "tfds":
        info = _info(name)
        try:
            ds = tfds_dataset(name, split, data_dir, download=download)
        except Exception as e:
            if source == "tfds":
                raise
            looked: List[str] = []
            find_local(name, data_dir, looked)
            raise not_found_error(name, looked, e, data_dir_given=bool(data_dir)) from e
        # Batched iteration rather than tfds.load(batch_size=-1): that path runs the whole split
        # through get_single_element, which aborts the process on generator-backed datasets.
        xs, ys = [], []
        for xb, yb in ds.batch(4096).as_numpy_iterator():
            xs.append(xb)
            ys.append(yb)
        if not xs:
            raise ValueError(f"{name}: TFDS split {split!r} is empty")
        x, y = np.concatenate(xs), np.concatenate(ys)
        if y.ndim == 1:
            y = y.astype(np.int64)
        desc = f"tfds {info.tfds_name} ({data_dir or '~/tensorflow_datasets'})"
    else:
        x, y = read_local(where, split)
        desc = where.describe()
    return (x, y, desc) if return_source else (x, y)


def load_stand_in(name: str, split: str, data_dir: Optional[str] = None):
    """A stand-in set for a derived data set whose real source is missing (offline).

    The stand-in comes from ``data_dir`` if it holds it, else from the default search (a
    documented fallback the caller announces; ``data_dir`` was used for the real set).

    Returns:
      ``(x, y, source_description)``.
    """
    if data_dir:
        try:
            return load_numpy(name, split, data_dir, "files", return_source=True)
        except DataNotFoundError:
            pass
    return load_numpy(name, split, None, "auto", download=False, return_source=True)
