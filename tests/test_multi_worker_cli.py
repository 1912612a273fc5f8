"""`keras-moe train --strategy multi_worker`: two worker processes on loopback.

Keras 3.15's `model.fit` fails under MultiWorkerMirroredStrategy, so `train_recipe`
trains there with `keras_moe.training.custom_loop.fit_distributed`. Two workers (one
CPU replica each) running the same command must train a zoo model with a balancing
loss (two-domain MoE, conv gate, entropy gate loss: no gate noise, so the replicas
agree) to the weights and losses of one process on the same global batches, and only
the chief may write the run directory.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_moe.training import run_dir, runner

from conftest import TINY_TWO_DOMAIN_RECIPE, finish_all, free_ports

pytestmark = pytest.mark.slow  # several processes

RECIPE = TINY_TWO_DOMAIN_RECIPE

TIMEOUT = 240


def _train(recipe, out, env):
    return subprocess.Popen(
        [sys.executable, "-m", "keras_moe.cli", "train", recipe, "--out", str(out),
         "--strategy", env.pop("_STRATEGY"), "--deterministic", "--no-export",
         "--verbose", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_worker_cli_run_matches_one_process(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    multi, single = tmp_path / "multi", tmp_path / "single"
    worker_tmp = tmp_path / "worker_tmp"  # the non-chief's temporary directories
    worker_tmp.mkdir()
    base = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    base.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        env = dict(base, _STRATEGY="multi_worker", TMPDIR=str(worker_tmp),
                   TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                         "task": {"type": "worker", "index": index}}))
        processes.append(_train(str(recipe), multi, env))
    # The reference, alongside: one process, the default strategy, the same global batches.
    processes.append(_train(str(recipe), single, dict(base, _STRATEGY="default")))
    outputs = finish_all(processes, TIMEOUT)
    assert "non-chief worker" in outputs[1] and "non-chief worker" not in outputs[0]

    # Only the chief wrote a run directory, and the non-chief cleaned up after itself.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "multi", "recipe.toml", "single", "worker_tmp"]
    assert not [name for name in os.listdir(worker_tmp) if name.startswith("keras-moe-")]
    for name in ("recipe.toml", "command.txt", "history.jsonl", "model.keras",
                 "report.txt", "report.json", "checkpoints/0-train.keras"):
        assert (multi / name).exists(), name
    assert not (multi / "saved_model").exists()  # --no-export
    assert (multi / "command.txt").read_text().count("keras-moe train") == 1

    got, want = run_dir.read_history(multi), run_dir.read_history(single)
    assert [(r["phase"], r["epoch"]) for r in got] == [("train", 0), ("train", 1)]
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-4)
    for key in ("accuracy", "val_accuracy"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], atol=1e-6)
    a = keras.saving.load_model(multi / "model.keras", safe_mode=True).get_weights()
    b = keras.saving.load_model(single / "model.keras", safe_mode=True).get_weights()
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    phase = keras.saving.load_model(multi / "checkpoints" / "0-train.keras", safe_mode=True)
    assert int(phase.optimizer.iterations.numpy()) == 2 * 256 // 64
    report = json.loads((multi / "report.json").read_text())
    assert report["train_examples"] == 256 and report["test_examples"] == 64


def test_malformed_tf_config_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from keras_moe import cli

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    out = tmp_path / "run"
    assert cli.main(["train", str(recipe), "--strategy", "multi_worker", "--out", str(out),
                     "--verbose", "0"]) == 2
    assert "--strategy multi_worker: TF_CONFIG is not valid JSON" in capsys.readouterr().err
    assert not out.exists()
