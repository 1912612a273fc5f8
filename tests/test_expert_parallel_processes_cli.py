"""`keras-moe train --strategy expert_parallel` as two processes on 127.0.0.1 (JAX).

Each process runs the same command with its own `--process-id` (4 virtual CPU devices
each, mesh 2x4 with the expert axis across both). Checked in one test, to pay JAX's
start-up and compile time as few times as possible:

- the run ends; only process 0 wrote the run directory, whose `model.keras` holds the
  full weights in a one-process model's layout; `evaluate` and `export` of it in this
  ordinary process give the run report's test accuracy;
- a second run, one process killed during its second epoch: the survivor exits non-zero
  within the bound (`--process-timeout`) with JAX's message naming the lost process; a
  `--resume` with one process is refused, naming the count; `--resume` with both ends
  with the uninterrupted run's weights.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import TINY_SPARSE_RECIPE, free_ports, write_recipe
from testing_utils import BACKEND

pytestmark = [pytest.mark.multi_backend, pytest.mark.slow,
              pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")]

TIMEOUT = 240  # seconds for any one run; the processes are killed past it
PROCESS_TIMEOUT = 10  # --process-timeout: the survivor's bound is this plus start-up slack
EPOCHS = 2


def _worker_env(scratch):
    from test_expert_parallel import _worker_env

    scratch.mkdir(exist_ok=True)  # process 1's temporary run directories
    return dict(_worker_env(4), TMPDIR=str(scratch))


def _start(recipe, out, port, index):
    return subprocess.Popen(
        [sys.executable, "-m", "keras_moe.cli", "train", recipe, "--out", str(out),
         "--strategy", "expert_parallel", "--mesh", "2x4", "--epochs", str(EPOCHS),
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(index), "--process-timeout", str(PROCESS_TIMEOUT),
         "--no-export", "--verbose", "0"],
        env=_worker_env(Path(out).parent / "scratch"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(processes, timeout=TIMEOUT):
    """Outputs of every process (killing them all past `timeout`), and return codes."""
    outputs, deadline = [], time.monotonic() + timeout
    try:
        for p in processes:
            outputs.append(p.communicate(timeout=max(1, deadline - time.monotonic()))[0])
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outputs, [p.returncode for p in processes]


def _weights(path):
    import keras_moe  # noqa: F401  (registers the layers)

    return keras.saving.load_model(path, safe_mode=True, compile=False).get_weights()


def test_two_processes_train_resume_after_a_kill_and_evaluate_in_one(tmp_path, capsys):
    from keras_moe import cli, recipes
    from keras_moe.training import run_dir, runner

    recipe = write_recipe(tmp_path, TINY_SPARSE_RECIPE)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    ports = free_ports(2)
    runs = [_start(recipe, whole, ports[0], i) for i in range(2)]
    victims = [_start(recipe, killed, ports[1], i) for i in range(2)]
    try:
        # Kill process 1 of the second run once its first epoch's backup is written.
        deadline = time.monotonic() + TIMEOUT
        while not list(killed.glob("backup/*/epoch-1.weights.h5")):
            assert time.monotonic() < deadline and victims[0].poll() is None, \
                victims[0].communicate()[0][-3000:] if victims[0].poll() is not None else ""
            time.sleep(0.2)
        victims[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        survivor, code = _finish(victims[:1], timeout=PROCESS_TIMEOUT + 60)
        waited = time.monotonic() - killed_at
        outputs, codes = _finish(runs)
    finally:  # nothing left running, whatever failed
        for p in runs + victims:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0], [o[-3000:] for o in outputs]
    assert code[0] != 0 and waited < PROCESS_TIMEOUT + 60, (code, waited)
    # JAX's coordination service names the lost process (task 1), in one of two forms.
    assert re.search(r"Task 1 heartbeat timeout|stopped sending heartbeats\):\s*1\b",
                     survivor[0]), survivor[0][-3000:]
    assert not (killed / "model.keras").exists()

    # Process 0 alone wrote the run directory.
    assert "process 1 of 2: process 0 writes the run directory" in outputs[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "killed", "recipe.toml", "scratch", "whole"]
    # Left behind by the killed process alone (the other process 1 removed its own).
    assert [p.name.startswith("keras-moe-process1-") for p in
            (tmp_path / "scratch").glob("keras-moe-*")] == [True]
    report = json.loads((whole / "report.json").read_text())
    settings = json.loads((whole / "run.json").read_text())
    assert (settings["processes"], settings["mesh"]) == (2, "2x4")

    # The full weights, laid out as a one-process model's.
    trained = _weights(whole / "model.keras")
    loaded = recipes.load_recipe(recipe)
    fresh = runner.build_model(runner.for_static_shapes(loaded))
    assert [w.shape for w in trained] == [tuple(w.shape) for w in fresh.weights]

    # evaluate and export in this ordinary process.
    capsys.readouterr()
    assert cli.main(["evaluate", str(whole), "--json", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["test"]["accuracy"] == pytest.approx(report["test"]["accuracy"])
    assert cli.main(["export", str(whole), "--out", str(tmp_path / "saved")]) == 0
    assert (tmp_path / "saved" / "saved_model.pb").exists()

    # A resume with another process count is refused, named; with both, it ends where
    # the uninterrupted run did.
    capsys.readouterr()
    assert cli.main(["train", "--out", str(killed), "--resume"]) == 2
    assert "one process (the run has processes = 2)" in capsys.readouterr().err
    port, = free_ports(1)
    resumed = [subprocess.Popen(
        [sys.executable, "-m", "keras_moe.cli", "train", "--out", str(killed), "--resume",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i), "--verbose", "0"],
        env=_worker_env(tmp_path / "scratch"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs, codes = _finish(resumed)
    assert codes == [0, 0], [o[-3000:] for o in outputs]
    history = run_dir.read_history(killed)
    # Each epoch once: the resume started after the last backup, not from the start.
    assert [(r["phase"], r["epoch"]) for r in history] == [("train", e) for e in range(EPOCHS)]
    # Up to the kill (the first epoch's end) both runs trained alike, and the resumed
    # run ends with the uninterrupted run's weights.
    whole_history = run_dir.read_history(whole)
    np.testing.assert_allclose([r["loss"] for r in history],
                               [r["loss"] for r in whole_history], rtol=1e-5)
    for got, want in zip(_weights(killed / "model.keras"), trained, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(trained[0], fresh.get_weights()[0])  # it did train
