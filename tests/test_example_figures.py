"""The examples' figures are written and non-empty (the examples themselves are heavy runs)."""

import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_domain_accuracy_curves_png(tmp_path):
    example = _load_example("two_domain")
    gates = ["conv", "dense", "oracle"]
    rng = np.random.default_rng(0)
    results = {
        loss: {g: {"train_acc": rng.random(3), "test_acc": rng.random(3)} for g in gates}
        for loss in ("none", "entropy", "variance")
    }
    path = str(tmp_path / "curves.png")
    example.plot(results, gates, path)
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 3 * image.shape[0]  # three panels
    # Not a blank canvas: the curves put many distinct colours on it.
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 50
