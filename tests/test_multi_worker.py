"""Distribution: `get_strategy`, MirroredStrategy and a two-process MultiWorkerMirroredStrategy.

A tiny zoo model with a balancing loss (`two_domain_moe`, dense gate, entropy or
variance gate loss) trained data-parallel must reach the weights of one device trained
on the same global batches: the gate losses are non-linear in the batch mean gate, so
this holds only if they are computed over the global batch
(`keras_moe.regularizers.reduction`; across workers its `ctx.all_reduce` path).

Keras 3.15's `model.fit` fails under MultiWorkerMirroredStrategy before its first step
(two bugs in `keras/src/backend/tensorflow/trainer.py`: `_maybe_symbolic_build` passes
the whole `(x, y)` tuple of `PerReplica` values to `strategy.reduce`, and
`reduce_per_replica` reduces the scalar logs with `strategy.reduce("MEAN", v, axis=0)`,
"Invalid reduction dimension 0 for input with 0 dimensions"). The workers therefore
train with a custom loop (`two_domain_training.train_custom_loop`), which the test
first checks against `model.fit` on one device.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_moe.distribute import STRATEGIES, get_strategy

from conftest import LOGICAL_CPUS, finish_all, free_ports

WORKERS = os.path.join(os.path.dirname(__file__), "_workers")
sys.path.insert(0, WORKERS)
import two_domain_training as training  # noqa: E402

pytestmark = pytest.mark.slow  # several processes


def _initial_weights(gate_loss):
    import keras

    keras.utils.set_random_seed(3)
    return training.build_model(gate_loss).get_weights()


def _assert_same_training(got, want, initial):
    got_loss, got_weights = got
    want_loss, want_weights = want
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for g, w in zip(got_weights, want_weights):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    assert any(np.abs(w - i).max() > 1e-3 for w, i in zip(want_weights, initial))


def test_get_strategy_names_and_errors():
    assert get_strategy("default") is tf.distribute.get_strategy()
    assert STRATEGIES == ("default", "mirrored", "multi_worker", "tpu", "expert_parallel")
    with pytest.raises(ValueError, match="'default', 'mirrored', 'multi_worker', 'tpu', "
                                         "'expert_parallel'"):
        get_strategy("horovod")
    with pytest.raises(ValueError, match="mesh= is only for 'expert_parallel'"):
        get_strategy("default", mesh="2x4")
    with pytest.raises(ValueError, match="devices= is only for the 'mirrored'"):
        get_strategy("default", devices=LOGICAL_CPUS)
    mirrored = get_strategy("mirrored", devices=LOGICAL_CPUS[:2])
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert mirrored.num_replicas_in_sync == 2
    with pytest.raises(RuntimeError, match="no TPU is available"):
        get_strategy("tpu")


def test_multi_worker_rejects_a_malformed_tf_config(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        get_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"worker": ["127.0.0.1:1"]}))
    with pytest.raises(ValueError, match="'cluster'"):
        get_strategy("multi_worker")


@pytest.mark.parametrize("gate_loss", ["entropy", "variance"])
def test_mirrored_zoo_model_matches_one_device(gate_loss, mirrored_strategy):
    x, y = training.make_data()
    initial = _initial_weights(gate_loss)
    single = training.train(get_strategy("default"), initial, x, y, gate_loss)
    # The session's shared strategy: see conftest.mirrored_strategy.
    mirrored = training.train(mirrored_strategy, initial, x, y, gate_loss)
    _assert_same_training(mirrored, single, initial)


@pytest.mark.slow
def test_two_worker_processes_match_one_process(tmp_path):
    x, y = training.make_data()
    initial = _initial_weights("entropy")
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y, **{f"w{i}": w for i, w in enumerate(initial)})
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
                   TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                         "task": {"type": "worker", "index": index}}))
        processes.append(subprocess.Popen(
            [sys.executable, os.path.join(WORKERS, "two_domain_training.py"), str(data),
             str(tmp_path / f"worker{index}.npz")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    for output in finish_all(processes, 180):
        assert "TRAINED 2" in output, output[-4000:]

    # The reference: one process, one device, the full global batches, `model.fit`.
    single = training.train(get_strategy("default"), initial, x, y)
    loop = training.train_custom_loop(get_strategy("default"), initial, x, y)
    _assert_same_training(loop, single, initial)
    for index in range(2):
        with np.load(tmp_path / f"worker{index}.npz") as result:
            assert int(result["replicas"]) == 2
            weights = [result[f"w{i}"] for i in range(len(initial))]
            _assert_same_training((result["loss"], weights), single, initial)
