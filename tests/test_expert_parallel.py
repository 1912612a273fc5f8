"""Experts split over devices (`keras_moe.expert_parallel`), on 8 virtual CPU devices.

Runs in the JAX pass (`KERAS_BACKEND=jax`; conftest makes eight host devices). Each mesh
`data x expert` of the eight devices must: hold `E / expert` experts of every expert
weight on each device, compute the forward pass and three training steps of one device
(with the same token groups, so that the same assignments are dropped), and exchange
token rows only through all-to-alls. Gated (SwiGLU) experts likewise, their gate and up
projections split alike.
"""

import re

import keras
import numpy as np
import pytest

from keras_moe import expert_parallel, regularizers
from keras_moe.layers import MoEDense, NoisyTopKGate
from testing_utils import BACKEND, to_numpy

pytestmark = pytest.mark.multi_backend

requires_jax = pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")

EXPERTS, TOKENS, DIM, HIDDEN = 16, 256, 12, 20
MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]


def _model(token_groups=None, capacity_factor=1.0, gated_experts=None):
    """A model that is not from the zoo: Dense, a noisy top-2 MoEDense, Dense (its
    experts' hidden layer a GLU with `gated_experts`)."""
    inputs = keras.Input((DIM,))
    hidden = keras.layers.Dense(DIM, activation="relu", name="embed")(inputs)
    # A seeded gate: both models draw the same noise (JAX's random numbers do not depend
    # on how the batch is split over devices).
    gate = NoisyTopKGate(EXPERTS, top_k=2, seed=7, name="gate")
    moe = MoEDense(
        DIM, num_experts=EXPERTS, top_k=2, gate=gate, expert_hidden_units=HIDDEN,
        dispatch="capacity", capacity_factor=capacity_factor, token_groups=token_groups,
        gated_experts=gated_experts,
        balance_loss=[regularizers.ImportanceLoss(0.1), regularizers.LoadLoss(0.1)],
        name="moe",
    )
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(moe(hidden)))


def _initial_weights(gated_experts=None):
    keras.utils.set_random_seed(0)
    model = _model(token_groups=8, gated_experts=gated_experts)
    rng = np.random.default_rng(1)
    for w in model.weights:
        if w.path.startswith("moe/gate/"):  # the zero init would route every token alike
            w.assign(rng.normal(0, 0.5, w.shape).astype("float32"))
    return model.get_weights()


def _data():
    rng = np.random.default_rng(2)
    return (rng.normal(size=(3 * TOKENS, DIM)).astype("float32"),
            rng.integers(0, 3, size=3 * TOKENS))


def _train_three_steps(model, weights):
    model.set_weights(weights)
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    forward = model.predict(x[:TOKENS], batch_size=TOKENS, verbose=0)
    losses = [float(model.train_on_batch(x[i * TOKENS:(i + 1) * TOKENS],
                                         y[i * TOKENS:(i + 1) * TOKENS]))
              for i in range(3)]
    moe = model.get_layer("moe")
    return forward, losses, [to_numpy(w) for w in model.get_weights()], moe.dropped_fraction


@pytest.fixture(scope="module")
def one_device():
    weights = _initial_weights()
    return weights, _train_three_steps(_model(token_groups=8), weights)


@requires_jax
@pytest.mark.parametrize("data, expert", MESHES)
def test_mesh_holds_its_share_of_experts_and_trains_like_one_device(data, expert, one_device):
    weights, (want_forward, want_losses, want_weights, want_dropped) = one_device
    distribution = expert_parallel.expert_parallel(data=data, expert=expert)
    with distribution.scope():
        model = _model()
        for w in model.get_layer("moe").weights:
            shards = w.value.addressable_shards
            assert len(shards) == 8
            if w.path in ("moe/hidden_kernel", "moe/hidden_bias", "moe/kernel", "moe/bias"):
                assert all(s.data.shape[0] == EXPERTS // expert for s in shards), w.path
                assert len({str(s.index) for s in shards}) == expert  # distinct slices
            else:
                assert all(s.data.shape == tuple(w.shape) for s in shards), w.path
        forward, losses, trained, dropped = _train_three_steps(model, weights)
    np.testing.assert_allclose(forward, want_forward, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for got, want in zip(trained, want_weights):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert dropped == pytest.approx(want_dropped) and 0.0 < dropped < 0.5


GATED_EXPERT_WEIGHTS = ("moe/hidden_kernel", "moe/hidden_bias", "moe/gate_kernel",
                        "moe/gate_bias", "moe/kernel", "moe/bias")


@pytest.fixture(scope="module")
def one_device_gated():
    weights = _initial_weights(gated_experts="swiglu")
    return weights, _train_three_steps(_model(token_groups=8, gated_experts="swiglu"),
                                       weights)


@requires_jax
@pytest.mark.parametrize("data, expert", [(1, 8), (2, 4)])
def test_gated_experts_split_gate_and_up_alike_and_train_like_one_device(
        data, expert, one_device_gated):
    """SwiGLU experts (gate and up projections two stacked weights): every expert weight
    split along the expert axis, the gate and up slices of the same experts on the same
    device, and the forward pass and three training steps of one device."""
    weights, (want_forward, want_losses, want_weights, want_dropped) = one_device_gated
    distribution = expert_parallel.expert_parallel(data=data, expert=expert)
    with distribution.scope():
        model = _model(gated_experts="swiglu")
        moe = model.get_layer("moe")
        held = {}  # expert weight -> {device: its slice of the expert axis}
        for w in moe.weights:
            shards = w.value.addressable_shards
            assert len(shards) == 8
            if w.path in GATED_EXPERT_WEIGHTS:
                assert all(s.data.shape[0] == EXPERTS // expert for s in shards), w.path
                held[w.path] = {s.device: (s.index[0].start, s.index[0].stop) for s in shards}
                assert len(set(held[w.path].values())) == expert  # distinct slices
            else:
                assert all(s.data.shape == tuple(w.shape) for s in shards), w.path
        assert set(held) == set(GATED_EXPERT_WEIGHTS)
        assert all(h == held["moe/kernel"] for h in held.values())
        forward, losses, trained, dropped = _train_three_steps(model, weights)
    np.testing.assert_allclose(forward, want_forward, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    names = [w.path for w in model.weights]
    for name, got, want in zip(names, trained, want_weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    # The gate projection trained (the comparison is not of two untouched copies).
    index = names.index("moe/gate_kernel")
    assert not np.allclose(want_weights[index], weights[index])
    assert dropped == pytest.approx(want_dropped) and 0.0 < dropped < 0.5


def _collectives(hlo_text):
    """(op, element count of each result) of every collective in compiled HLO text."""
    found = []
    for line in hlo_text.splitlines():
        match = re.search(r"= (.*?) (all-to-all|all-gather|all-reduce|reduce-scatter|"
                          r"collective-permute)(-start)?\(", line)
        if match:
            sizes = [int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                     for dims in re.findall(r"\w+\[([\d,]*)\]", match.group(1))]
            found.append((match.group(2), sizes))
    return found


def compiled_steps(model, x):
    """Compiled HLO text of `model`'s forward pass and of a training step's gradients
    (balancing losses included) on the global batch `x` (a `jax.Array`)."""
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def forward(trainable, non_trainable, x):
        return model.stateless_call(trainable, non_trainable, x, training=False)[0]

    def loss(trainable, non_trainable, x):
        outputs, _, losses = model.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        return keras.ops.mean(keras.ops.square(outputs)) + sum(losses)

    def train_step(trainable, non_trainable, x):
        return jax.grad(loss)(trainable, non_trainable, x)

    return (jax.jit(forward).lower(trainable, non_trainable, x).compile().as_text(),
            jax.jit(train_step).lower(trainable, non_trainable, x).compile().as_text())


@requires_jax
@pytest.mark.parametrize("gated_experts", [None, "swiglu"])
def test_compiled_steps_exchange_token_rows_only_by_all_to_all(gated_experts):
    import jax

    distribution = expert_parallel.expert_parallel(data=2, expert=4)
    with distribution.scope():
        model = _model(gated_experts=gated_experts)
        model.set_weights(_initial_weights(gated_experts))
        x = jax.device_put(_data()[0][:TOKENS], distribution.get_data_layout((TOKENS, DIM)).backend_layout)
        forward_hlo, train_hlo = compiled_steps(model, x)

    forward_ops = _collectives(forward_hlo)
    assert sum(op == "all-to-all" for op, _ in forward_ops) >= 2  # dispatch and combine
    assert [op for op, _ in forward_ops if op != "all-to-all"] == []

    train_ops = _collectives(train_hlo)
    assert sum(op == "all-to-all" for op, _ in train_ops) >= 4  # and their gradients
    assert not any(op == "all-gather" for op, _ in train_ops)
    # All-reduces only of gradients (of the replicated weights, and of each device's
    # expert slice over the data axis, along which it is replicated) and of the
    # balancing losses' per-expert statistics: nothing the size of the token rows.
    expert_weights = GATED_EXPERT_WEIGHTS  # those of plain experts, and gate_*
    gradient_sizes = {
        int(np.prod(w.shape)) // (4 if w.path in expert_weights else 1)
        for w in model.trainable_weights
    }
    if gated_experts:  # the batched experts run gate and up as one [gate | up] matmul
        moe = model.get_layer("moe")
        gradient_sizes |= {2 * int(np.prod(moe.hidden_kernel.shape)) // 4,
                           2 * int(np.prod(moe.hidden_bias.shape)) // 4}
    for op, sizes in train_ops:
        if op == "all-reduce":
            for size in sizes:
                assert size in gradient_sizes or size <= EXPERTS, (op, sizes, gradient_sizes)
    # The check can tell them apart: no weight has the size of a device's token rows.
    assert TOKENS // 8 * DIM not in gradient_sizes and TOKENS * DIM not in gradient_sizes


def fit_on_mesh(data, expert):
    """`_model` under `expert_parallel(data, expert)`, trained three steps by `model.fit`
    on `_data()` as a `tf.data.Dataset` of global batches, as one of several processes
    (`tests/_workers/expert_parallel_process.py`) or alone. Returns a dict: the
    gathered final weights, the loss, the rows of the expert axis that this process's
    devices hold, its batch blocks, the dropped fraction, and the collectives of the
    compiled forward pass and gradient step (`_collectives`)."""
    import jax
    import tensorflow as tf

    x, y = _data()
    weights = _initial_weights()  # outside the distribution, in this process alone
    distribution = expert_parallel.expert_parallel(data=data, expert=expert)
    with distribution.scope():
        model = _model()
        moe = model.get_layer("moe")
        held = {}
        for w in moe.weights:
            if len(w.shape) and w.shape[0] == EXPERTS:
                held[w.path] = sorted({(s.index[0].start or 0, s.index[0].stop or EXPERTS)
                                       for s in w.value.addressable_shards})
        model.set_weights(weights)
        blocks = distribution.local_batch_blocks()
        rows = TOKENS // distribution.num_devices
        local = np.concatenate([x[b * rows:(b + 1) * rows] for b in blocks])
        global_x = jax.make_array_from_process_local_data(
            distribution.get_data_layout(local.shape).backend_layout, local)
        assert global_x.shape == (TOKENS, DIM)
        forward_hlo, train_hlo = compiled_steps(model, global_x)
        model.compile(keras.optimizers.SGD(0.1),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(TOKENS)
        history = model.fit(dataset, epochs=1, verbose=0, shuffle=False)
        trained = expert_parallel.gathered(model.weights)
    return dict(weights=trained, loss=history.history["loss"], held=held, blocks=blocks,
                dropped=moe.dropped_fraction, forward=_collectives(forward_hlo),
                train=_collectives(train_hlo))


@requires_jax
def test_bad_meshes_and_layers_are_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match="needs 16 devices"):
        expert_parallel.expert_parallel(data=4, expert=4)
    with pytest.raises(ValueError, match="data=3 does not divide the 8 devices"):
        expert_parallel.expert_parallel(data=3)
    assert expert_parallel.expert_parallel(data=2).expert == 4
    with expert_parallel.expert_parallel(data=1, expert=8).scope():
        with pytest.raises(ValueError, match="6 experts cannot be split evenly"):
            MoEDense(4, num_experts=6, top_k=2, dispatch="capacity").build((None, 5))
        layer = MoEDense(4, num_experts=8, top_k=2, dispatch="sparse")
        with pytest.raises(ValueError, match="dispatch='capacity'"):
            layer(np.zeros((8, 5), "float32"))
        with pytest.raises(ValueError, match="token_groups=4 must be a multiple of the 8"):
            MoEDense(4, num_experts=8, top_k=2, dispatch="capacity", token_groups=4)(
                np.zeros((8, 5), "float32"))


def test_token_groups_route_each_group_on_its_own():
    """Two groups on one device: each group's slots fill from its own tokens."""
    x = np.random.default_rng(3).normal(size=(40, 8)).astype("float32")
    layer = MoEDense(3, num_experts=4, top_k=1, dispatch="capacity", capacity_factor=0.4,
                     token_groups=2)
    layer.build(x.shape)
    layer.gate.kernel.assign(np.zeros((8, 4), "float32"))
    layer.gate.bias.assign([4.0, -4.0, -4.0, -4.0])  # every token to expert 0
    y = to_numpy(layer(x))
    # 2 slots per expert and group (ceil(0.4 * 20 / 4)): tokens 0, 1 and 20, 21 kept.
    kept = np.flatnonzero(np.abs(y).sum(-1) > 0)
    np.testing.assert_array_equal(kept, [0, 1, 20, 21])
    assert layer.dropped_fraction == pytest.approx(36 / 40)
    with pytest.raises(ValueError, match="divisible by 2"):
        layer(x[:39])
    with pytest.raises(ValueError, match="token_groups"):
        MoEDense(3, num_experts=4, top_k=1, dispatch="sparse", token_groups=2)


@pytest.mark.skipif(BACKEND == "jax", reason="the refusal on other backends")
def test_expert_parallel_needs_jax(tmp_path, capsys):
    from conftest import TINY_SPARSE_RECIPE, write_recipe
    from keras_moe import cli

    with pytest.raises(ValueError, match="needs the JAX backend.*expert_devices"):
        expert_parallel.expert_parallel(data=1, expert=2)
    assert cli.main(["train", write_recipe(tmp_path, TINY_SPARSE_RECIPE), "--strategy",
                     "expert_parallel", "--out", str(tmp_path / "run")]) == 2
    assert "--strategy expert_parallel: expert_parallel needs the JAX backend" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# Through the command line -----------------------------------------------------------------


@pytest.mark.slow
@requires_jax
def test_train_command_splits_the_experts_over_the_mesh(tmp_path, capsys):
    """`keras-moe train --strategy expert_parallel --mesh 2x4`: the model is built and
    trained under the distribution (every expert weight split 4 ways, capacity dispatch
    with one token group per device), the run directory records the mesh, and a resume
    that names another mesh is refused."""
    from conftest import TINY_SPARSE_RECIPE, write_recipe
    from keras_moe import cli
    from keras_moe.training import run_dir, runner
    from keras_moe.distribute import get_strategy

    recipe_path = write_recipe(tmp_path, TINY_SPARSE_RECIPE)
    from keras_moe import recipes

    recipe = recipes.load_recipe(recipe_path).override(["phases.0.epochs=1"])
    distribution = get_strategy("expert_parallel", mesh="2x4")
    result = runner.train_recipe(recipe, tmp_path / "direct", strategy=distribution,
                                 verbose=0)
    layer = result.model.get_layer("moe_0")
    assert layer.dispatch == "capacity"
    shards = layer.kernel.value.addressable_shards
    assert len(shards) == 8 and {s.data.shape[0] for s in shards} == {1}  # 4 experts / 4
    assert result.data.steps_per_epoch == 512 // 64

    out = tmp_path / "run"
    assert cli.main(["train", recipe_path, "--strategy", "expert_parallel", "--mesh", "2x4",
                     "--epochs", "1", "--no-export", "--out", str(out), "--verbose", "0"]) == 0
    settings = run_dir.read_settings(out)
    assert (settings.strategy, settings.mesh) == ("expert_parallel", "2x4")
    assert (out / "report.json").exists()
    capsys.readouterr()
    (out / "model.keras").unlink()  # as if killed before its end
    assert cli.main(["train", "--out", str(out), "--resume", "--mesh", "1x8"]) == 2
    assert "--mesh 1x8 (the run has mesh = '2x4')" in capsys.readouterr().err


@pytest.mark.slow
@requires_jax
def test_train_command_refuses_meshes_it_cannot_run(tmp_path, capsys):
    from conftest import TINY_SPARSE_RECIPE, write_recipe
    from keras_moe import cli

    recipe_path = write_recipe(tmp_path, TINY_SPARSE_RECIPE)
    cases = [
        (["--strategy", "expert_parallel", "--mesh", "2by4"], "--mesh 2by4: mesh must be"),
        (["--strategy", "expert_parallel", "--mesh", "4x4"], "needs 16 devices"),
        (["--strategy", "default", "--mesh", "2x4"], "only for --strategy expert_parallel"),
        (["--strategy", "expert_parallel", "--batch-size", "60"],
         "batch size 60 must be a multiple of 8; pass --batch-size 56"),
    ]
    for flags, message in cases:
        assert cli.main(["train", recipe_path, "--out", str(tmp_path / "x"), *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags


# Over several processes ---------------------------------------------------------------------

PROCESS_TIMEOUT = 240  # seconds; the children are killed past it (nothing hangs CI)


def _worker_env(devices):
    """This environment for a child JAX process of `devices` virtual CPU devices."""
    import os

    from conftest import JAX_TEST_XLA_FLAGS

    flags = [f for f in JAX_TEST_XLA_FLAGS if "device_count" not in f]
    return dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
                TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
                PYTHONPATH=os.pathsep.join(filter(None, [
                    str(__import__("pathlib").Path(__file__).parents[1]),
                    os.environ.get("PYTHONPATH")])),
                XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}",
                                    *flags]))


@pytest.mark.slow
@requires_jax
def test_two_processes_hold_their_experts_and_train_like_one_process(tmp_path):
    """Two processes of 4 virtual devices each (`keras.distribution.initialize` on
    127.0.0.1, gloo collectives), meshes 1x8 and 2x4 with the expert axis across both:
    each process holds exactly its half of the experts and reads its blocks of each
    global batch, and three `fit` steps end at the one-process 8-device run's weights,
    through the same collectives."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from conftest import finish_all, free_ports

    worker = Path(__file__).parent / "_workers" / "expert_parallel_process.py"
    port, = free_ports(1)
    meshes = ["1x8", "2x4"]
    outs = [tmp_path / f"process{i}.json" for i in range(2)]
    processes = [subprocess.Popen(
        [sys.executable, str(worker), str(i), "2", str(port), str(outs[i]), *meshes],
        env=_worker_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    try:  # the reference alongside, in this process of 8 devices
        want = {mesh: fit_on_mesh(*(int(n) for n in mesh.split("x"))) for mesh in meshes}
    finally:
        finish_all(processes, PROCESS_TIMEOUT)
    got = [json.loads(out.read_text()) for out in outs]

    assert [g["devices"] for g in got] == [[8, 4], [8, 4]]
    for mesh in meshes:
        # 16 experts: process 0 holds 0-7, process 1 holds 8-15, two per device in 1x8,
        # four per device (each on two devices, along data) in 2x4.
        width = {"1x8": 2, "2x4": 4}[mesh]
        for p, result in enumerate(got):
            own = [[s, s + width] for s in range(8 * p, 8 * p + 8, width)]
            assert set(map(str, result[mesh]["held"].values())) == {str(own)}, (mesh, p)
            assert len(result[mesh]["held"]) == 4  # every expert weight
        assert [g[mesh]["blocks"] for g in got] == (
            [[0, 1, 2, 3], [4, 5, 6, 7]] if mesh == "1x8" else [[0, 1, 4, 5], [2, 3, 6, 7]])
        for result in got:
            for g, w in zip(result[mesh]["weights"], want[mesh]["weights"], strict=True):
                np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(result[mesh]["loss"], want[mesh]["loss"], rtol=1e-5)
            assert result[mesh]["dropped"] == pytest.approx(want[mesh]["dropped"])
            # The same partitioned program: the same collectives, of the same sizes.
            for step in ("forward", "train"):
                assert result[mesh][step] == [[op, sizes] for op, sizes in want[mesh][step]], \
                    (mesh, step)
            ops = [op for op, _ in result[mesh]["train"]]
            assert ops.count("all-to-all") >= 4 and "all-gather" not in ops, ops
        # The weights did train (the comparison is not of two untouched copies).
        assert not np.allclose(want[mesh]["weights"][2], _initial_weights()[2])


def test_process_settings_come_from_arguments_or_keras_variables(monkeypatch):
    for name in ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                 "KERAS_DISTRIBUTION_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    settings = expert_parallel.process_settings
    assert settings() == (None, 1, 0)
    assert settings("10.0.0.1:1234", 2, 1) == ("10.0.0.1:1234", 2, 1)
    assert settings("10.0.0.1:1234,10.0.0.2:99", None, 0) == ("10.0.0.1:1234", 2, 0)
    with pytest.raises(ValueError, match="num_processes=2: 2 processes need the coordinator"):
        settings(None, 2, 0)
    with pytest.raises(ValueError, match="process_id=2 is out of range for 2 processes: 0 to 1"):
        settings("h:1", 2, 2)
    with pytest.raises(ValueError, match="each process needs its process_id"):
        settings("h:1", 2, None)
    with pytest.raises(ValueError, match="lists 2 addresses but num_processes is 3"):
        settings("a:1,b:2", 3, 0)
    with pytest.raises(ValueError, match="--num-processes must be an integer >= 1; got 'two'"):
        settings("h:1", "two", 0, names=("--coordinator", "--num-processes", "--process-id"))
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", "h:7")
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "5")
    with pytest.raises(ValueError, match="KERAS_DISTRIBUTION_PROCESS_ID=5 is out of range"):
        settings()
    assert settings(process_id=1) == ("h:7", 2, 1)  # an argument wins over the variable


def test_train_command_checks_the_process_flags_first(tmp_path, capsys, monkeypatch):
    from conftest import TINY_SPARSE_RECIPE, write_recipe
    from keras_moe import cli

    for name in ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                 "KERAS_DISTRIBUTION_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    recipe = write_recipe(tmp_path, TINY_SPARSE_RECIPE)
    out = tmp_path / "run"
    cases = [
        (["--strategy", "expert_parallel", "--num-processes", "2", "--process-id", "0"],
         "--num-processes=2: 2 processes need the coordinator's address (--coordinator"),
        (["--strategy", "expert_parallel", "--num-processes", "2", "--process-id", "3",
          "--coordinator", "127.0.0.1:1"], "--process-id=3 is out of range for 2 processes"),
        (["--strategy", "multi_worker", "--num-processes", "2", "--process-id", "0",
          "--coordinator", "127.0.0.1:1"],
         "replicates every variable on every worker, so experts cannot be split"),
    ]
    if BACKEND != "jax":
        cases.append((["--strategy", "expert_parallel", "--num-processes", "2",
                       "--process-id", "0", "--coordinator", "127.0.0.1:1"],
                      "needs the JAX backend"))
    for flags, message in cases:
        assert cli.main(["train", recipe, "--out", str(out), *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
        assert not out.exists()
