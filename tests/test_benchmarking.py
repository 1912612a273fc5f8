"""`keras_moe.benchmarking`: the suites, the interleaved timer, `keras-moe bench`."""

import pathlib

import pytest

from keras_moe import benchmarking


def test_bench_suites_are_exactly_the_benchmark_scripts():
    benchmarks = pathlib.Path(benchmarking.__file__).resolve().parent.parent / "benchmarks"
    assert sorted(benchmarking.SUITES) == sorted(p.stem for p in benchmarks.glob("*.py"))
    with pytest.raises(ValueError, match="suite must be one of moe_dense, "):
        benchmarking.run_suite("moe_sparse")


def test_interleaved_medians_times_candidates_in_rounds(monkeypatch):
    calls = []
    durations = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 7.0, 5.0])}
    clock = [0.0]
    timing = [False]

    def candidate(name):
        def run():
            calls.append(name)
            if timing[0]:
                clock[0] += next(durations[name])
        return run

    def perf_counter():
        timing[0] = True
        return clock[0]

    monkeypatch.setattr(benchmarking.time, "perf_counter", perf_counter)
    medians = benchmarking.interleaved_medians(
        {"a": candidate("a"), "b": candidate("b")}, reps=3, warmup=2
    )
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert medians == {"a": 2.0, "b": 5.0}


def test_interleaved_medians_settles_each_candidate_right_before_its_timing(monkeypatch):
    events = []
    clock = [0.0]

    def candidate(name):
        def run():
            events.append(name)
            clock[0] += {"a": 1.0, "b": 10.0}[name]
        return run

    def perf_counter():
        events.append("clock")
        return clock[0]

    monkeypatch.setattr(benchmarking.time, "perf_counter", perf_counter)
    medians = benchmarking.interleaved_medians(
        {"a": candidate("a"), "b": candidate("b")}, reps=2, warmup=1, settle=2)
    one_round = ["a", "a", "clock", "a", "clock", "b", "b", "clock", "b", "clock"]
    assert events == ["a", "b"] + one_round * 2
    assert medians == {"a": 1.0, "b": 10.0}  # the settling calls are not timed


def test_interleaved_medians_reads_tensor_results_inside_the_timing(monkeypatch):
    events = []

    class Tensor:
        def numpy(self):
            events.append("read")

    def perf_counter():
        events.append("clock")
        return 0.0

    monkeypatch.setattr(benchmarking.time, "perf_counter", perf_counter)
    benchmarking.interleaved_medians({"t": Tensor}, reps=1, warmup=0)
    assert events == ["clock", "read", "clock"]


def _benchmark_script(name):
    import importlib.util

    path = pathlib.Path(benchmarking.__file__).resolve().parent.parent / "benchmarks" / (
        name + ".py")
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.multi_backend
def test_keras_hub_benchmark_times_blocks_that_compute_the_same(capsys):
    """`benchmarks/keras_hub_moe.py` compares like with like: for each family its
    `hub` and `sparse` layers give the same compiled forward loss (and the same training
    gradient sum) on this backend, and its table has a row per family, experts and step."""
    pytest.importorskip("keras_hub")
    import keras
    import numpy as np

    bench = _benchmark_script("keras_hub_moe")
    d, f, e, tokens = 8, 4, 4, 12
    inputs = keras.ops.convert_to_tensor(
        np.random.default_rng(0).normal(size=(1, tokens, d)).astype("float32"))
    for family in bench.TOP_K:
        keras.utils.set_random_seed(0)
        block, k = bench.make_block(family, d, f, e)
        rng = np.random.default_rng(1)
        for w in block.trainable_weights:  # away from the zero initialisers
            w.assign(rng.normal(0, 0.5, w.shape).astype(w.dtype))
        sparse = bench.sparse_block(family, block, k)
        (hub_forward, hub_train), (forward, train) = (bench.steps(layer, inputs)
                                                       for layer in (block, sparse))
        assert float(hub_forward()) > 1e-6, family  # not a trivial output
        np.testing.assert_allclose(float(forward()), float(hub_forward()), rtol=1e-4,
                                   err_msg=family)
        np.testing.assert_allclose(float(train()), float(hub_train()), rtol=1e-3, atol=1e-5,
                                   err_msg=family)
        floor = bench.make_floor(family, d, f, e, k, tokens)
        assert np.isfinite(float(bench.steps(floor, inputs)[1]()))
    bench.main(["--families", "gemma4", "mixtral", "--experts", "4", "--dim", str(d),
                "--width", str(f), "--tokens", str(tokens), "--reps", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("gemma4", "mixtral"))]
    assert [(r[0], r[1], r[4]) for r in rows] == [
        (fam, "4", step) for fam in ("gemma4", "mixtral") for step in ("forward", "train")]
