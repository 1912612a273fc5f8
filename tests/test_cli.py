"""The `keras-moe` console script."""

import pathlib
import subprocess
import sys

import pytest

import keras_moe
from keras_moe import benchmarking, cli


def test_version_and_info_report_the_installation(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == keras_moe.__version__
    assert cli.main(["info"]) == 0  # .ci/run installs the default data set
    out = capsys.readouterr().out
    assert "keras-moe " + keras_moe.__version__ in out
    assert "fashion-mnist" in out


def test_no_command_prints_help_and_fails():
    result = subprocess.run([sys.executable, "-m", "keras_moe.cli"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage: keras-moe" in result.stdout


def test_list_prints_every_registered_model_with_its_description(monkeypatch, capsys):
    from keras_moe.zoo import registry

    def alpha_moe():
        """Alpha model."""

    def beta_net():
        """Beta model."""

    monkeypatch.setattr(registry, "_BUILDERS", {"alpha_moe": alpha_moe, "beta_net": beta_net})
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["alpha_moe", "beta_net"]
    assert lines[0].endswith("Alpha model.")
    assert cli.main(["list", "moe"]) == 0
    assert capsys.readouterr().out.split() == ["alpha_moe", "Alpha", "model."]
    assert cli.main(["list", "zzz"]) == 1


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
