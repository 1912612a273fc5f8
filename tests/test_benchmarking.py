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
