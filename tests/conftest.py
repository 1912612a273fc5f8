"""Test-session set-up: devices, and which tests run on which Keras backend.

- Two logical CPU devices, so tf.distribute tests run on one CPU; this must happen
  before TensorFlow initialises its devices, hence at conftest import.
- `KERAS_BACKEND` picks the backend (TensorFlow by default). Under JAX, eight virtual
  CPU devices (`--xla_force_host_platform_device_count=8`) for the multi-device tests,
  and only the tests marked `multi_backend` run: the rest are TensorFlow-only by nature
  (tf.distribute, SavedModel serving, the command line's TensorFlow paths).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One test worker per core (the README's `-n 2`): each worker's own ops on one
    # thread, so the two do not fight over both cores (tests/layers and tests/zoo ran
    # 7-10% faster so). Inherited by the processes tests start.
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
# Tests on JAX compile thousands of tiny programs: compile time, not run time, is what
# they spend, and XLA's cheapest CPU code generation makes the JAX pass about 4x faster.
# (Benchmarks never set these.)
JAX_TEST_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)
if os.environ["KERAS_BACKEND"] == "jax":
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in JAX_TEST_XLA_FLAGS:
        if flag.split("=")[0] not in flags:
            flags += " " + flag
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Test workers (pytest-xdist, `-n 2 --dist loadgroup`, the README's command) run
    each test module on one worker, so that its module-scoped fixtures (a trained run
    directory, a set of exports) are built once; a module whose tests are independent
    says so with `XDIST_SPREAD = True` and has them spread over the workers.
    (`tryfirst`: xdist reads the groups from the markers after this hook.)

    Off TensorFlow, run only the tests marked `multi_backend`."""
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and not getattr(module, "XDIST_SPREAD", False) \
                and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(module.__name__))
    if os.environ["KERAS_BACKEND"] == "tensorflow":
        return
    selected = [item for item in items if item.get_closest_marker("multi_backend")]
    deselected = [item for item in items if not item.get_closest_marker("multi_backend")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


@pytest.fixture(scope="session")
def mirrored_strategy():
    """One MirroredStrategy over the two logical CPUs, shared by every test that trains.

    TensorFlow keys collective ops by group and instance. A second strategy over the same
    devices starts its instance keys again, so its first gradient all-reduce meets the
    cached parameters of an earlier strategy's and aborts ("Shape mismatch in the
    collective instance 100") whenever the two models' gradients differ in size.
    """
    return tf.distribute.MirroredStrategy(LOGICAL_CPUS[:2])


def free_ports(count):
    """`count` TCP ports on 127.0.0.1 that were free a moment ago (for TF_CONFIG)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def finish_all(processes, timeout):
    """Waits for every `subprocess.Popen` (text stdout); kills them all if one times out.

    Returns their outputs, after asserting that each exited with status 0.
    """
    import subprocess

    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]
    return outputs


# A tiny two-domain MoE recipe (conv gate, entropy gate loss: no gate noise, so replicas
# and workers must reproduce one device exactly), shared by the distribution tests.
TINY_TWO_DOMAIN_RECIPE = """
[recipe]
name = "tiny_two_domain"
description = "tiny two-domain MoE for the distribution tests"

[model]
name = "two_domain_moe"
gate = "conv"
expert_filters = 4
expert_units = 6
gate_filters = 3
gate_units = 5

[losses]
gate_loss = "entropy"
alpha = 0.3
beta = 0.1

[data]
dataset = "two_domain"
batch_size = 64
train_size = 256
test_size = 64

[optimizer]
name = "sgd"
learning_rate = 0.05

[[phases]]
name = "train"
epochs = 2
"""

# A tiny noisy top-k MoE recipe on the real Fashion-MNIST, for the command-line and data
# tests; and a tiny two-phase Eigen recipe (the constraint on, then off).
TINY_SPARSE_RECIPE = """
[recipe]
name = "tiny_sparse"
description = "tiny"
paper = "test"

[model]
name = "sparse_moe_classifier"
num_experts = 4
top_k = 2
units = 16

[losses]
importance_weight = 0.1
load_weight = 0.1

[data]
dataset = "fashion_mnist"
batch_size = 64
train_size = 512
test_size = 256

[[phases]]
name = "train"
epochs = 2
"""

TINY_EIGEN_RECIPE = """
[recipe]
name = "tiny_eigen"

[model]
name = "dmoe_mnist"
experts = [3, 2]
units = [16, 8]
gate_hidden_units = [8, 4]
assignment_margin = 20.0

[data]
dataset = "fashion_mnist"
batch_size = 64
train_size = 512
test_size = 64
normalize = "none"

[optimizer]
name = "adam"
learning_rate = 0.002

[[phases]]
name = "constrained"
epochs = 2
assignment_constraint = true

[[phases]]
name = "free"
epochs = 2
assignment_constraint = false
"""


def write_recipe(folder, text, name="recipe.toml"):
    """Writes a recipe's text into `folder`; returns its path as a string."""
    path = folder / name
    path.write_text(text)
    return str(path)
