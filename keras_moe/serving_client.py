"""Classifies images with an exported SavedModel, with TensorFlow alone.

This file imports only numpy and TensorFlow, so run as a script it shows that an export
serves without Keras model code or keras_moe (`keras-moe train` runs it in a fresh
process after exporting):

    python keras_moe/serving_client.py SAVED_MODEL IMAGES.npz [OUT.json]

`IMAGES.npz` holds `images` (float32, as the model takes them) and optionally `labels`,
`class_names` and `expected` (probabilities to compare with). It prints one line per
image and, with `OUT.json`, writes the probabilities and whether keras_moe was imported.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def classify(saved_model_dir, images):
    """Probabilities (and any gate outputs) of the `serving_default` signature, as numpy."""
    import tensorflow as tf

    serve = tf.saved_model.load(saved_model_dir).signatures["serving_default"]
    outputs = serve(images=tf.constant(images, tf.float32))
    return {name: value.numpy() for name, value in outputs.items()}


def main(argv):
    import numpy as np

    if len(argv) not in (2, 3):
        print(__doc__)
        return 2
    saved_model_dir, images_path = argv[0], argv[1]
    with np.load(images_path) as archive:
        batch = {key: archive[key] for key in archive.files}
    outputs = classify(saved_model_dir, batch["images"])
    probabilities = outputs["probabilities"]
    names = [str(n) for n in batch.get("class_names", [])]
    predicted = probabilities.argmax(-1)
    for i, k in enumerate(predicted):
        label = names[k] if k < len(names) else str(k)
        line = f"image {i}: {label} ({probabilities[i, k]:.3f})"
        if "labels" in batch:
            truth = int(batch["labels"][i])
            line += f"  true: {names[truth] if truth < len(names) else truth}"
        print(line)
    result = {"probabilities": probabilities.tolist(),
              "keras_moe_imported": "keras_moe" in sys.modules,
              "keras_imported": "keras" in sys.modules}
    if "expected" in batch:
        diff = float(np.max(np.abs(probabilities - batch["expected"])))
        result["max_abs_diff"] = diff
        print(f"largest difference from the Keras model's probabilities: {diff:.2e}")
    print(f"served by TensorFlow alone (keras_moe imported: {result['keras_moe_imported']})")
    if len(argv) == 3:
        with open(argv[2], "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
