"""Serves exported SavedModels in a process that never imports keras_moe (nor Keras).

Usage: python serve_saved_models.py ROOT

For every directory ROOT/NAME/ holding `saved_model/` and `inputs.npz`, loads the
SavedModel with `tf.saved_model.load`, calls its "serving_default" signature on the
arrays of `inputs.npz` (one per signature input) and writes every output to
ROOT/NAME/served.npz. Prints "SERVED <count>" at the end.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def main(root):
    count = 0
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isdir(os.path.join(folder, "saved_model")):
            continue
        loaded = tf.saved_model.load(os.path.join(folder, "saved_model"))
        serve = loaded.signatures["serving_default"]
        with np.load(os.path.join(folder, "inputs.npz")) as inputs:
            feed = {key: tf.constant(inputs[key]) for key in inputs.files}
        outputs = serve(**feed)
        np.savez(os.path.join(folder, "served.npz"),
                 **{key: value.numpy() for key, value in outputs.items()})
        count += 1
    bad = sorted(m for m in sys.modules if m == "keras_moe" or m.startswith("keras_moe."))
    if bad:
        raise SystemExit(f"keras_moe was imported: {bad}")
    print(f"SERVED {count}")


if __name__ == "__main__":
    main(sys.argv[1])
