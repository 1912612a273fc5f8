"""`keras_moe.compat`: every private Keras / keras-tuner name it holds still exists, the
pinned versions are the installed ones, and no other module uses such a name."""

import pathlib
import re
import sys

import keras
import keras_tuner
import numpy as np

from keras_moe import compat

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PACKAGE = pathlib.Path(compat.__file__).parent


def test_every_private_name_still_exists():
    for module, path, attribute in compat.CLASS_ATTRIBUTES:
        owner = compat._resolve(module, path)
        if attribute is not None:
            assert hasattr(owner, attribute), f"{module}.{path}.{attribute}"
    inputs = keras.Input((3,))
    dense = keras.layers.Dense(2)
    model = keras.Model(inputs, dense(inputs))
    model.compile("sgd", "mse")
    for name in compat.MODEL_ATTRIBUTES:
        assert hasattr(model, name), name
    for name in compat.LAYER_ATTRIBUTES:
        assert hasattr(dense, name), name
    for name in compat.TENSOR_ATTRIBUTES:
        assert hasattr(dense.output, name), name
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(compat.variable_array(
        dense.kernel)), keras.ops.convert_to_numpy(dense.kernel.value))
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    for name in compat.SEQUENTIAL_ATTRIBUTES:
        assert getattr(sequential, name) is not None, name


def test_the_compat_functions_read_what_they_name():
    inputs = keras.Input((3,))
    dense = keras.layers.Dense(2, name="d")
    model = keras.Model(inputs, dense(inputs))
    assert compat.is_functional(model) and not compat.is_functional(dense)
    assert [n.operation.name for n in compat.inbound_nodes(dense)] == ["d"]
    assert compat.producing_operation(dense.output) is dense
    assert dense in compat.flatten_layers(model)
    model.compile("sgd", "mse", metrics=["mae"])
    assert compat.compile_arguments(model)["metrics"] == ["mae"]
    assert compat.call_has_training_arg(keras.layers.Dropout(0.5))
    compat.set_initial_epoch(model, 3)
    assert compat.initial_epoch(model) == 3
    loss = compat.compute_loss(model, x=np.zeros((2, 3)), y=np.ones((2, 2)),
                               y_pred=np.zeros((2, 2)), training=False)
    assert float(loss) == 1.0
    with compat.tuner_tracebacks(False):
        assert compat._resolve(compat.TUNER_CONFIG_MODULE, compat.TUNER_DEBUG) is False


def test_pyproject_pins_the_tested_versions_and_they_are_installed():
    from packaging.requirements import Requirement

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    pins = {Requirement(r).name: str(Requirement(r).specifier)
            for r in config["project"]["dependencies"]}
    assert pins["keras"] == str(Requirement("keras" + compat.KERAS_VERSIONS).specifier)
    assert pins["keras-tuner"] == str(
        Requirement("keras-tuner" + compat.KERAS_TUNER_VERSIONS).specifier)
    assert Requirement("keras" + compat.KERAS_VERSIONS).specifier.contains(keras.__version__)
    assert Requirement("keras-tuner" + compat.KERAS_TUNER_VERSIONS).specifier.contains(
        keras_tuner.__version__)


def test_no_other_module_uses_a_private_keras_name():
    names = [compat.FLATTEN_LAYERS, compat.OWN_LOSSES, compat.CLEAR_LOSSES,
             compat.CALL_HAS_TRAINING_ARG, compat.NODES_BY_DEPTH, compat.INBOUND_NODES,
             compat.KERAS_HISTORY, compat.COMPILE_CONFIG, compat.INITIAL_EPOCH,
             compat.SYMBOLIC_BUILD, compat.COMPUTE_LOSS, compat.POPULATE_INITIAL_SPACE,
             compat.VARIABLE_VALUE]
    pattern = re.compile(r"keras\.src\b|keras_tuner\.src\b|\.(?:" + "|".join(
        re.escape(n) for n in names) + r")\b")
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if pattern.search(code) and not code.strip().startswith(("`", '"')):
                found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert found == []
