"""SavedModel export of every zoo model, served without keras_moe; `.keras` safe-mode loads.

Every registered builder has a tiny configuration (`tests/_workers/tiny_zoo.py`). Each is
exported with its gates; one subprocess that never imports keras_moe loads all the
SavedModels at once and serves them, and `saved_model_cli` shows and runs one of them.
The builders whose depth is fixed by the paper take 5-30 s each to trace and save on 2
cores, which the suite's time budget cannot afford: the default run exports the ones
whose code the others repeat at a greater depth (DeepMoE ResNet-18 for the ImageNet
family, the depth-8 DeepMoE and plain CIFAR ResNets, DeepMoE VGG-16); the plain
ImageNet ResNets, ResNet-56/110, their DeepMoE versions, DeepMoE ResNet-34/50 and the
plain VGG-16 are exported too with KERAS_MOE_FULL_EXPORT=1 (all passed when this was
written). Gated-expert MoEDense layers (SwiGLU, GPT-OSS's clamped GLU) are exported in
sparse and capacity dispatch and served in this process.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_moe import zoo
from keras_moe.export import export_saved_model, gate_tensors
from testing_utils import BACKEND

WORKERS = os.path.join(os.path.dirname(__file__), "_workers")
sys.path.insert(0, WORKERS)
import tiny_zoo  # noqa: E402

pytestmark = pytest.mark.slow  # exports served by fresh processes

SLOW_EXPORTS = {"deepmoe_resnet34", "deepmoe_resnet50", "deepmoe_resnet56",
                "deepmoe_resnet110", "resnet18", "resnet34", "resnet50", "resnet56",
                "resnet110", "vgg16"}
FULL = os.environ.get("KERAS_MOE_FULL_EXPORT") == "1"
# On JAX, Keras's export traces the serving function with JAX and converts it for
# TensorFlow (jax2tf, the batch a symbolic dimension): one model per family, capacity
# dispatch (JAX's default on the CPU) in the classifier.
JAX_NAMES = ["sparse_moe_classifier", "dmoe_mnist", "dmoe_mnist_dnn", "two_domain_moe",
             "tsne_moe", "deepmoe_resnet_cifar"]
NAMES = ([n for n in zoo.list_models() if FULL or n not in SLOW_EXPORTS]
         if BACKEND == "tensorflow" else JAX_NAMES)
CLI_MODEL = "sparse_moe_classifier"
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def _softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_every_registered_builder_has_a_tiny_configuration():
    assert set(tiny_zoo.TINY) == set(zoo.list_models())


def _case(root, key, model, inputs, *, from_logits=True):
    """Exports `model` to root/key with gates; returns what Keras predicts for `inputs`."""
    folder = root / key
    folder.mkdir()
    export_saved_model(model, folder / "saved_model", return_gates=True,
                       from_logits=from_logits)
    np.savez(folder / "inputs.npz", **inputs)
    feed = inputs["images"] if len(inputs) == 1 else {
        "image": inputs["images"], **{k: v for k, v in inputs.items() if k != "images"}}
    out = keras.ops.convert_to_numpy(model(feed, training=False))
    expected = {"probabilities": _softmax(out) if from_logits else out}
    graph, _, gates = gate_tensors(model)
    if gates:
        probe = keras.Model(graph.input, gates)
        expected.update({k: keras.ops.convert_to_numpy(v)
                         for k, v in probe(feed, training=False).items()})
    keras_path = str(folder / "model.keras")
    model.save(keras_path)
    reloaded = keras.saving.load_model(keras_path, safe_mode=True)
    return expected, keras.ops.convert_to_numpy(reloaded(feed, training=False)), out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Exports every tiny model, then serves all of them in one keras_moe-free process."""
    root = tmp_path_factory.mktemp("exported")
    cases = {}
    for name in NAMES:
        model = tiny_zoo.build(name)
        cases[name] = _case(root, name, model, {"images": tiny_zoo.images(name)})
    # The oracle two-domain model has a second, integer input, served as "domain".
    oracle = tiny_zoo.TINY["two_domain_moe"] | {"gate": "oracle", "output": "probabilities"}
    model = zoo.two_domain_moe(**oracle)
    images = tiny_zoo.images("two_domain_moe")
    domain = np.array([0, 1, 1, 0, 1], "int32")
    cases["oracle"] = _case(root, "oracle", model, {"images": images, "domain": domain},
                            from_logits=False)
    result = subprocess.run(
        [sys.executable, os.path.join(WORKERS, "serve_saved_models.py"), str(root)],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"SERVED {len(cases)}" in result.stdout
    return root, cases


@pytest.mark.multi_backend
@pytest.mark.parametrize("name", NAMES + ["oracle"])
def test_saved_model_serves_keras_predictions_without_keras_moe(served, name):
    root, cases = served
    expected, _, _ = cases[name]
    with np.load(root / name / "served.npz") as got:
        assert set(got.files) == set(expected)
        for key, want in expected.items():
            assert got[key].shape == want.shape, key
            np.testing.assert_allclose(got[key], want, atol=1e-5, err_msg=f"{name}: {key}")
    probabilities = expected["probabilities"]
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    assert probabilities.shape[0] == 5


@pytest.mark.multi_backend
@pytest.mark.parametrize("name", NAMES + ["oracle"])
def test_keras_file_loads_in_safe_mode_with_same_predictions(served, name):
    _, cases = served
    _, reloaded, original = cases[name]
    np.testing.assert_allclose(reloaded, original, atol=1e-6)


@pytest.mark.multi_backend
def test_gate_outputs_name_every_moe_layer(served):
    _, cases = served
    gates = {name: sorted(k for k in cases[name][0] if k.startswith("gates_"))
             for name in ("sparse_moe_classifier", "dmoe_mnist", "dmoe_mnist_dnn",
                          "two_domain_moe", "tsne_moe", "deepmoe_resnet_cifar")}
    assert gates["sparse_moe_classifier"] == ["gates_moe_0"]
    assert gates["dmoe_mnist"] == ["gates_moe_1", "gates_moe_2"]
    assert gates["dmoe_mnist_dnn"] == []
    assert gates["two_domain_moe"] == ["gates_mixture"]
    assert gates["tsne_moe"] == ["gates_gate"]
    assert len(gates["deepmoe_resnet_cifar"]) == 6  # depth 8: 3 blocks x 2 gated convs
    # Top-2 of 4 experts: two non-zero gates per example, summing to one.
    top2 = cases["sparse_moe_classifier"][0]["gates_moe_0"]
    assert top2.shape == (5, 4)
    np.testing.assert_array_equal((top2 > 0).sum(-1), 2)
    np.testing.assert_allclose(top2.sum(-1), 1.0, atol=1e-5)
    # The oracle gate follows the domain input.
    np.testing.assert_allclose(cases["oracle"][0]["gates_mixture"][:, 1], [0, 1, 1, 0, 1])


def test_saved_model_cli_shows_and_runs_the_signature(served, tmp_path):
    root, cases = served
    model_dir = str(root / CLI_MODEL / "saved_model")
    images = tmp_path / "images.npy"
    np.save(images, tiny_zoo.images(CLI_MODEL))
    outdir = tmp_path / "out"
    script = (
        f"saved_model_cli show --dir {model_dir} --tag_set serve "
        f"--signature_def serving_default && echo '--- run' && "
        f"saved_model_cli run --dir {model_dir} --tag_set serve "
        f"--signature_def serving_default --inputs images={images} --outdir {outdir}"
    )
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                            env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = result.stdout.split("--- run")[0]
    for expected in ("inputs['images']", "dtype: DT_FLOAT", "shape: (-1, 6, 6, 1)",
                     "outputs['probabilities']", "shape: (-1, 3)", "outputs['gates_moe_0']",
                     "shape: (-1, 4)", "Method name is: tensorflow/serving/predict"):
        assert expected in shown, (expected, shown)
    want = cases[CLI_MODEL][0]
    np.testing.assert_allclose(np.load(outdir / "probabilities.npy"), want["probabilities"],
                               atol=1e-5)
    np.testing.assert_allclose(np.load(outdir / "gates_moe_0.npy"), want["gates_moe_0"],
                               atol=1e-5)


def test_existing_path_is_never_overwritten_silently(tmp_path):
    model = tiny_zoo.build("dmoe_mnist_dnn")
    target = tmp_path / "export"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="already exists.*overwrite=True") as error:
        export_saved_model(model, target)
    assert str(target) in str(error.value)
    assert (target / "keep.txt").read_text() == "user data"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="a_file"):
        export_saved_model(model, a_file)

    # A failed export (here: no readable graph for the gates) leaves the old one intact.
    with pytest.raises(ValueError):
        export_saved_model(_opaque_model(), target, overwrite=True, return_gates=True)
    assert (target / "keep.txt").read_text() == "user data"
    assert sorted(os.listdir(tmp_path)) == ["a_file", "export"]  # no staging left

    assert export_saved_model(model, target, overwrite=True) == str(target)
    assert not (target / "keep.txt").exists()
    assert (target / "saved_model.pb").exists()
    import tensorflow as tf

    serve = tf.saved_model.load(str(target)).signatures["serving_default"]
    x = tiny_zoo.images("dmoe_mnist_dnn")
    out = serve(images=tf.constant(x))
    assert set(out) == {"probabilities"}  # no gates unless asked
    np.testing.assert_allclose(out["probabilities"].numpy(),
                               _softmax(model.predict(x, verbose=0)), atol=1e-5)


def _opaque_model():
    class Opaque(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(keras.ops.reshape(x, (-1, 4)))

    model = Opaque()
    model(np.zeros((1, 4), "float32"))
    return model


def test_return_gates_needs_a_readable_graph(tmp_path):
    with pytest.raises(ValueError, match="functional"):
        export_saved_model(_opaque_model(), tmp_path / "opaque", return_gates=True)
    assert not (tmp_path / "opaque").exists()


# Gated (GLU) experts ---------------------------------------------------------------------


def _gated_model(gated, use_bias, dispatch):
    """Input, one gated top-2 MoEDense (linear gate), random weights large enough that
    GPT-OSS's clamps bite and capacity dispatch drops."""
    from keras_moe.layers import MoEDense, SoftmaxGate

    inputs = keras.Input((6,))
    moe = MoEDense(5, num_experts=4, top_k=2, gate=SoftmaxGate(4, top_k=2, use_bias=use_bias),
                   expert_hidden_units=3, gated_experts=gated, use_bias=use_bias,
                   dispatch=dispatch, capacity_factor=1.0, name="moe")
    model = keras.Model(inputs, moe(inputs))
    rng = np.random.default_rng(0)
    for w in model.trainable_weights:
        w.assign(rng.normal(0, 1.0, w.shape).astype("float32"))
    return model


@pytest.mark.multi_backend
@pytest.mark.parametrize("dispatch", ["sparse", "capacity"])
@pytest.mark.parametrize("gated, use_bias", [("swiglu", False), ("clamped_swiglu", True)])
def test_gated_moe_saved_model_serves_keras_outputs(gated, use_bias, dispatch, tmp_path):
    """A SwiGLU (Mixtral's, no biases) or GPT-OSS clamped-GLU (with biases) MoEDense,
    exported and reloaded with `tf.saved_model.load`: its outputs and gates at two batch
    sizes (the served batch dimension is symbolic; capacity dispatch's slots follow it)."""
    import tensorflow as tf

    model = _gated_model(gated, use_bias, dispatch)
    moe = model.get_layer("moe")
    x = (3.0 * np.random.default_rng(1).normal(size=(16, 6))).astype("float32")
    export_saved_model(model, tmp_path / "gated", return_gates=True, from_logits=False)
    serve = tf.saved_model.load(str(tmp_path / "gated")).signatures["serving_default"]
    assert list(moe.stacked_expert_weights()) == (
        ["hidden_kernel", "hidden_bias", "gate_kernel", "gate_bias", "kernel", "bias"]
        if use_bias else ["hidden_kernel", "gate_kernel", "kernel"])
    probe = keras.Model(model.input, [model.output, gate_tensors(model)[2]["gates_moe"]])
    for batch in (x, x[:5]):
        moe.reset_drop_counters()
        want, want_gates = (keras.ops.convert_to_numpy(t) for t in probe(batch, training=False))
        if dispatch == "capacity" and len(batch) == len(x):
            assert moe.dropped_fraction > 0  # the check covers dropped assignments
        got = serve(images=tf.constant(batch))
        assert set(got) == {"probabilities", "gates_moe"}
        np.testing.assert_allclose(got["probabilities"].numpy(), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["gates_moe"].numpy(), want_gates, rtol=1e-5, atol=1e-6)
    if gated == "clamped_swiglu":  # the gate clamp is reached on these inputs
        assert (x @ keras.ops.convert_to_numpy(moe.gate_kernel)[0] > 7).any()
