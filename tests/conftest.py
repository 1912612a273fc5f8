"""Test-session set-up: two logical CPU devices, so tf.distribute tests run on one CPU.

This must happen before TensorFlow initialises its devices, hence at conftest import.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0],
        [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
    )
except RuntimeError:  # devices already initialised by an earlier import
    pass

LOGICAL_CPUS = [d.name for d in tf.config.list_logical_devices("CPU")]


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mirrored_strategy():
    """One MirroredStrategy over the two logical CPUs, shared by every test that trains.

    TensorFlow keys collective ops by group and instance. A second strategy over the same
    devices starts its instance keys again, so its first gradient all-reduce meets the
    cached parameters of an earlier strategy's and aborts ("Shape mismatch in the
    collective instance 100") whenever the two models' gradients differ in size.
    """
    return tf.distribute.MirroredStrategy(LOGICAL_CPUS[:2])
