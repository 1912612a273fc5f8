"""Every family's recipe, stopped at every epoch boundary and mid-epoch, resumes exactly.

For each family's recipe at a tiny budget, one run trains uninterrupted and a second
run is stopped with SIGKILL again and again (`tests/_workers/killed_train.py`): each
process of the chain is killed at its first epoch boundary (`after-backup`: the epoch's
backup is complete, the next epoch not begun; at a phase's last epoch this is before
the phase's checkpoint, at the run's last before `model.keras`), or mid-epoch, or
between an epoch backup's state file and its weights file, and the next process
continues it with `keras-moe train --out RUN --resume` alone. The last one finishes,
and must end with the uninterrupted run's weights (largest difference <= 1e-6; both are
`--deterministic`) and the same `history.jsonl`.

What each recipe brings: DeepMoE its two phases and the density controller's counters,
readings and gate snapshots (`GateDensityTarget.get_state`; before it a resumed run's
controller restarted its count and ended 5.8e-3 away), Shazeer's classifier its gate
noise (the random generator's state, which `save_weights` leaves out), the t-SNE recipe
its map phase and temperature, Eigen's its constraint switch, the two-domain recipe its
conv gate. The CI runs DeepMoE's and the classifier's chains on TensorFlow and
DeepMoE's on JAX; `KERAS_MOE_FULL_RESUME=1` runs every family on both backends.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_moe  # noqa: F401 (registers the classes the saved models name)
from keras_moe.training import run_dir
from testing_utils import BACKEND

pytestmark = [pytest.mark.slow, pytest.mark.multi_backend]
XDIST_SPREAD = True  # the families' chains are independent

WORKER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_workers", "killed_train.py")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
COMMON = ["--deterministic", "--no-export", "--classify", "0", "--seed", "3", "--verbose", "0",
          "--test-size", "64", "--batch-size", "32"]

# recipe: (its tiny budget, the kill of each process of the chain but the last).
# Kills count from 1 within the process they stop.
FAMILIES = {
    # 16 batches an epoch: the controller reads at batches 10, 20, 30 (a resume at
    # batch 16 that restarted its count read at 26). The recipe fixes lambda; the
    # controller is switched on here because its state is what a resume can lose.
    "deepmoe_resnet8_fashion_mnist": (
        ["--train-size", "512", "--set", "phases.0.gate_density_target=0.5",
         "--set", "model.width_multiplier=0.125",
         "--set", "model.embedding_widths=[4, 4, 4, 4]",
         "--set", "phases.0.epochs=2", "--set", "phases.1.epochs=1"],
        [("mid-epoch", 5), ("after-backup", 1), ("after-backup", 1), ("after-backup", 1)]),
    "sparse_moe_fashion_mnist": (
        ["--train-size", "256", "--set", "model.units=32", "--epochs", "3"],
        [("between-state-and-weights", 2), ("after-backup", 1), ("after-backup", 1)]),
    "tsne_moe_fashion_mnist": (
        ["--train-size", "256", "--set", "model.expert_units=8",
         "--set", "model.map_hidden_units=[16, 16]", "--set", "phases.0.tsne_map_epochs=2",
         "--epochs", "2"],
        [("after-backup", 1)]),
    "eigen_dmoe_jittered_mnist": (
        ["--train-size", "256", "--set", "model.units=[16, 16]",
         "--set", "model.gate_hidden_units=[8, 8]",
         "--set", "phases.0.epochs=1", "--set", "phases.1.epochs=1"],
        [("after-backup", 1), ("after-backup", 1)]),
    "two_domain_moe_conv_gate": (
        ["--train-size", "256", "--set", "model.expert_filters=4", "--set", "model.expert_units=8",
         "--set", "model.gate_filters=2", "--set", "model.gate_units=4", "--epochs", "2"],
        [("mid-epoch", 3), ("after-backup", 1)]),
}
IN_CI = {"tensorflow": ["deepmoe_resnet8_fashion_mnist", "sparse_moe_fashion_mnist"],
         "jax": ["deepmoe_resnet8_fashion_mnist"]}
FULL = os.environ.get("KERAS_MOE_FULL_RESUME") == "1"
# The two-domain recipe is TensorFlow-only (the README's JAX list).
ON_JAX = ["deepmoe_resnet8_fashion_mnist", "sparse_moe_fashion_mnist",
          "tsne_moe_fashion_mnist", "eigen_dmoe_jittered_mnist"]


def _selected():
    names = sorted(FAMILIES) if BACKEND == "tensorflow" else ON_JAX
    return [pytest.param(name, marks=() if FULL or name in IN_CI.get(BACKEND, ()) else
                         pytest.mark.skip(reason="KERAS_MOE_FULL_RESUME=1 runs it"))
            for name in names]


def _start(args):
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)


def _finish(process, what):
    out = process.communicate(timeout=900)[0]
    return process.returncode, out


def _weights(path):
    return keras.saving.load_model(path, safe_mode=True).get_weights()


@pytest.mark.parametrize("name", _selected())
def test_a_run_stopped_at_every_boundary_resumes_to_the_uninterrupted_run(name, tmp_path):
    budget, kills = FAMILIES[name]
    whole, chain = tmp_path / "whole", tmp_path / "chain"
    started = [name, *budget, *COMMON]
    uninterrupted = _start(["-m", "keras_moe", "train", *started, "--out", str(whole)])
    point, n = kills[0]
    first = _start([WORKER, point, str(n), "--", *started, "--out", str(chain)])
    said = []
    for index, (point, n) in enumerate(kills):
        if index:
            process = _start([WORKER, point, str(n), "--", "--out", str(chain), "--resume"])
        else:
            process = first
        code, out = _finish(process, (point, n))
        assert code == -9, (name, index, point, out[-3000:])  # killed where asked
        said.append(out)
        if point == "between-state-and-weights":
            # The killed backup's state file is there without its weights: the resume
            # must take the backup before it, which reads back whole.
            states = sorted(p.name for p in chain.glob("backup/*/epoch-*.state.json"))
            assert f"epoch-{n}.state.json" in states
            assert not list(chain.glob(f"backup/*/epoch-{n}.weights.h5"))
    code, out = _finish(_start(["-m", "keras_moe", "train", "--out", str(chain), "--resume"]),
                        "last")
    assert code == 0, (name, out[-3000:])
    said.append(out)
    code, out = _finish(uninterrupted, "whole")
    assert code == 0, (name, out[-3000:])

    expected, got = _weights(whole / "model.keras"), _weights(chain / "model.keras")
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=name)
    rows, resumed = run_dir.read_history(whole), run_dir.read_history(chain)
    assert [(r["phase"], r["epoch"]) for r in resumed] == [(r["phase"], r["epoch"]) for r in rows]
    for a, b in zip(resumed, rows):
        assert a.keys() == b.keys(), (name, a, b)
        for key in a:
            if key != "phase":
                np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7,
                                           err_msg=f"{name} epoch {a['epoch']} {key}")
    assert (chain / "command.txt").read_text().count("--resume") == len(kills)
    if ("between-state-and-weights", 2) in kills:
        index = kills.index(("between-state-and-weights", 2))
        assert "resuming at epoch 2 from" in said[index + 1] and \
            "epoch-1.weights.h5" in said[index + 1], said[index + 1][-2000:]
