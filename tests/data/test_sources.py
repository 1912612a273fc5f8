"""`keras_moe.data.sources`: a data_dir the user names is used or refused; TFDS offline."""

import socket
import time

import numpy as np
import pytest

import keras_moe.data as kd
from keras_moe.data import sources


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No ambient data but Debian's Fashion-MNIST: HOME and KERAS_MOE_DATA_DIR in tmp."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(kd.ENV_VAR, raising=False)
    return tmp_path


def _online(host="storage.googleapis.com"):
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def test_a_named_data_dir_without_the_files_is_refused_not_skipped(isolated):
    """Fashion-MNIST is installed (Debian); a data_dir without it must not fall back to
    that copy silently."""
    assert sources.find_local("fashion_mnist") is not None  # the embedded default exists
    empty = isolated / "empty"
    empty.mkdir()
    with pytest.raises(kd.DataNotFoundError) as error:
        kd.load_numpy("fashion_mnist", "test", data_dir=str(empty), source="files")
    assert str(empty) in str(error.value) and "the only place searched" in str(error.value)
    looked = [line for line in str(error.value).splitlines() if line.startswith("  - /")]
    assert looked and all(line.startswith(f"  - {empty}") for line in looked), looked
    if not _online():  # auto: no files there, TFDS cannot download: refused too
        with pytest.raises(kd.DataNotFoundError, match="the only place searched"):
            kd.load("fashion_mnist", "test", data_dir=str(empty))


def test_a_corrupt_idx_file_is_named_as_corrupt(isolated):
    folder = isolated / "fashion"
    folder.mkdir()
    x, y = np.zeros((6, 28, 28), np.uint8), np.arange(6, dtype=np.uint8)
    kd.write_idx(str(folder / "t10k-images-idx3-ubyte.gz"), x)
    kd.write_idx(str(folder / "t10k-labels-idx1-ubyte.gz"), y)
    kd.write_idx(str(folder / "train-labels-idx1-ubyte.gz"), y)
    bad = folder / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x09\x00" + bytes(100))  # dtype 0x09 with 0 dimensions
    for loader in (lambda: kd.load("fashion_mnist", "train", data_dir=str(folder)),
                   lambda: kd.load_numpy("fashion_mnist", "test", data_dir=str(folder))):
        with pytest.raises(kd.IDXFormatError, match="corrupt IDX file") as error:
            loader()
        assert str(bad) in str(error.value) and "wrong magic number" in str(error.value)
    # A file not named as IDX is not data: ignored, as before.
    bad.rename(folder / "notes.bin")
    kd.write_idx(str(folder / "train-images-idx3-ubyte.gz"), x)
    assert kd.load_numpy("fashion_mnist", "train", data_dir=str(folder))[0].shape == (6, 28, 28, 1)


@pytest.mark.skipif(_online(), reason="needs a machine without internet")
def test_tfds_offline_fails_with_a_network_error_not_an_import_error(tmp_path, monkeypatch):
    """TFDS imported importlib_resources without declaring it: every load on a fresh
    install died with ModuleNotFoundError. Declared now, it gets as far as the network."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import downloader

    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # TFDS retries each file for minutes
    with pytest.raises(Exception) as error:
        tfds.load("mnist", split="test", data_dir=str(tmp_path))
    assert not isinstance(error.value, ImportError), error.value
    assert isinstance(error.value, OSError) and "storage.googleapis.com" in str(error.value)


@pytest.mark.skipif(_online(), reason="needs a machine without internet")
def test_offline_the_tfds_fallback_is_a_network_error_at_once(isolated, capfd):
    started = time.monotonic()
    with pytest.raises(kd.DataNotFoundError) as error:
        kd.load_numpy("mnist", "test", data_dir=str(isolated / "none"))
    assert time.monotonic() - started < 30  # not TFDS's minutes of retries
    message = str(error.value)
    assert "DataUnreachableError" in message and "cannot reach" in message
    assert "importlib_resources" not in message and "ModuleNotFoundError" not in message
    with pytest.warns(UserWarning, match="stand-in"):
        kd.load_two_domain("test")
    assert "Downloading and preparing" not in "".join(capfd.readouterr())
