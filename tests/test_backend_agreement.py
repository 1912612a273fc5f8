"""TensorFlow and JAX compute the same thing: layers, losses, gradients, SGD steps.

Every case of `_workers/backend_agreement.py` runs here on TensorFlow, and in one
subprocess on JAX from the same weights and inputs. Forward outputs, added losses and
gradients of every layer family agree within rtol 1e-4; the losses of three SGD steps
of `dmoe_mnist`, `sparse_moe_classifier` (noise off) and `deepmoe_resnet_cifar(depth=8)`
within rtol 1e-3.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from testing_utils import BACKEND

WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_workers")
sys.path.insert(0, WORKERS)

import backend_agreement  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(BACKEND != "tensorflow", reason="runs the JAX side in a subprocess"),
]


@pytest.fixture(scope="module")
def both_backends(tmp_path_factory):
    folder = tmp_path_factory.mktemp("backends")
    tensorflow_results, states = {}, {}
    for name, case in backend_agreement.CASES.items():
        tensorflow_results[name], states[name] = case(None)
    backend_agreement.save_states(states, folder / "states.npz")
    from conftest import JAX_TEST_XLA_FLAGS

    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS=" ".join(JAX_TEST_XLA_FLAGS), JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, os.path.join(WORKERS, "backend_agreement.py"),
         str(folder / "states.npz"), str(folder / "jax.npz")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    jax_results = {}
    with np.load(folder / "jax.npz") as data:
        assert str(data["backend"]) == "jax"
        for key in data.files:
            if key != "backend":
                name, item = key.split("/")
                jax_results.setdefault(name, {})[item] = data[key]
    return tensorflow_results, jax_results


@pytest.mark.parametrize("name", sorted(backend_agreement.LAYER_CASES))
def test_layer_outputs_losses_and_gradients_agree(both_backends, name):
    tensorflow, jax = (results[name] for results in both_backends)
    assert sorted(tensorflow) == sorted(jax)
    assert any(key.startswith("grad_") for key in tensorflow) or name == "moe_eigen_constraint"
    for key, want in tensorflow.items():
        # float32 sums of different order: the absolute slack scales with the array.
        atol = 1e-5 * max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(jax[key], want, rtol=1e-4, atol=atol, err_msg=f"{name}/{key}")


@pytest.mark.parametrize("name", sorted(backend_agreement.MODEL_CASES))
def test_sgd_steps_of_zoo_models_give_the_same_losses(both_backends, name):
    tensorflow, jax = (results[name]["losses"] for results in both_backends)
    assert np.all(np.isfinite(tensorflow)) and len(tensorflow) == 3
    assert not np.allclose(tensorflow[0], tensorflow[-1])  # the steps did train
    np.testing.assert_allclose(jax, tensorflow, rtol=1e-3)
