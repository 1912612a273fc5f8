#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine (idempotent): the embedded default data set
# (Debian's dataset-fashion-mnist) and this package with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST not found; install Debian's dataset-fashion-mnist or set KERAS_MOE_DATA_DIR (see README)" >&2
  fi
fi
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
# keras-hub for keras_moe.hub and tests/test_hub.py, without its dependencies: its
# tensorflow-text requirement would install a second TensorFlow (`tensorflow`) next to
# tensorflow-cpu. What it imports on `import keras_hub` (tokenizers, regex) comes with
# the test extra above; tensorflow-text is only needed by its tokenizers' TF paths.
python3 -m pip install -q --disable-pip-version-check --no-deps "keras-hub==0.32.0"
