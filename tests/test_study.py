"""examples/study.py and examples/studies/: results rows, resuming, torn lines, the table.

One end-to-end run of the Shazeer study at its `tiny` budget (1 seed, 2 arms, two
batches each, 256 training / 256 test images) into a temporary results file, through
`keras-moe train` as the study runs it; then the table is checked against a
recomputation with scipy from a results file holding several seeds.
"""

import importlib.util
import json
import pathlib
import shlex

import numpy as np
import pytest
from scipy import stats

# The tests share nothing but the module: spread them over the test workers (conftest).
XDIST_SPREAD = True

from study_helpers import REPO, jsonl_rows, run_study  # noqa: E402  (puts examples/ on the path)

from studies import deepmoe as deepmoe_study  # noqa: E402
from studies import get_study  # noqa: E402
from studies import results as results_file  # noqa: E402
from studies import routing as routing_study  # noqa: E402
from studies import table as study_table  # noqa: E402


def _check_summary(entry, values):
    """A table entry against numpy / scipy recomputed from `values`."""
    values = np.asarray(values, dtype=float)
    assert entry["n"] == len(values)
    assert entry["mean"] == pytest.approx(values.mean(), rel=1e-12, abs=1e-12)
    assert entry["std"] == pytest.approx(values.std(ddof=1), rel=1e-12, abs=1e-12)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(),
                                 scale=stats.sem(values))
    assert entry["ci_low"] == pytest.approx(low, rel=1e-9, abs=1e-12)
    assert entry["ci_high"] == pytest.approx(high, rel=1e-9, abs=1e-12)


@pytest.mark.slow
def test_study_rows_resume_torn_line_and_table(tmp_path):
    results = tmp_path / "results" / "shazeer.jsonl"
    runs = tmp_path / "runs"
    common = ("shazeer", "--budget", "tiny", "--results", results, "--runs-dir", runs)

    first = run_study(*common)
    rows = jsonl_rows(results)
    assert [(r["arm"], r["seed"]) for r in rows] == [("balanced", 0), ("unbalanced", 0)]
    for row in rows:
        for field in ("paper", "arm", "seed", "budget", "budget_settings", "recipe", "model",
                      "metrics", "command", "code_commit", "date", "settings_id"):
            assert field in row, field
        assert row["paper"] == "shazeer" and row["budget"] == "tiny"
        assert row["recipe"] == "sparse_moe_fashion_mnist"
        assert row["train_examples"] == 256 and row["test_examples"] == 256
        assert row["command"].startswith("keras-moe train sparse_moe_fashion_mnist ")
        assert "--seed 0" in row["command"] and "--no-export" in row["command"]
        metrics = row["metrics"]
        assert 0.0 <= metrics["test_accuracy"] <= 1.0
        assert metrics["importance_cv"] >= 0 and metrics["load_cv"] >= 0
        assert len(metrics["share"]) == 8
        assert sum(metrics["share"]) == pytest.approx(1.0, abs=1e-3)
        run_dir, = [p for p in runs.glob(f"shazeer/tiny/{row['arm']}-seed0-*") if p.is_dir()]
        report = json.loads((run_dir / "report.json").read_text())
        assert metrics["test_accuracy"] == report["test"]["accuracy"]
    # The unbalanced arm really ran without the balancing losses.
    assert "losses.importance_weight=0.0" in rows[1]["command"]
    assert "losses.importance_weight" not in rows[0]["command"]
    assert "run shazeer balanced seed 0" in first.stdout

    # A second invocation trains nothing: every row is there.
    before = results.read_bytes()
    second = run_study(*common)
    assert results.read_bytes() == before
    assert second.stdout.count("skip shazeer") == 2
    assert "run shazeer" not in second.stdout

    # A torn last line (a crash mid-write) is ignored with a warning ...
    results.write_bytes(before + b'{"paper": "shazeer", "arm": "balanced", "se')
    printed = run_study(*common, "--print-only", "--json")
    assert "torn" in printed.stderr
    table = json.loads(printed.stdout)
    assert table["runs_done"] == 2 and table["runs_planned"] == 2
    # ... and the next append cuts it off, so every line is a row again.
    results_file.append_row(results, dict(rows[0], seed=1))
    assert [r["seed"] for r in jsonl_rows(results)] == [0, 0, 1]

    # The printed table equals a recomputation from a file with several seeds.
    rng = np.random.default_rng(0)
    several = tmp_path / "several.jsonl"
    for seed in range(5):
        for row in rows:
            metrics = dict(row["metrics"], test_accuracy=float(rng.uniform(0.6, 0.9)),
                           load_cv=float(rng.uniform(0, 3)),
                           importance_cv=float(rng.uniform(0, 3)))
            results_file.append_row(several, dict(row, seed=seed, metrics=metrics))
    # A row of another settings fingerprint (the arm's command changed) is left out.
    results_file.append_row(several, dict(rows[0], seed=7, settings_id="other"))
    table = json.loads(run_study("shazeer", "--budget", "tiny", "--results", several,
                            "--print-only", "--json").stdout)
    assert table["runs_done"] == 2 and table["runs_beyond_plan"] == 8
    assert table["rows_with_other_settings"] == 1
    values = {(r["arm"], r["seed"]): r["metrics"] for r in jsonl_rows(several)
              if r["settings_id"] != "other"}
    entries = {(e["arm"], e["metric"]): e for e in table["arms"]}
    for arm in ("balanced", "unbalanced"):
        for metric in ("test_accuracy", "load_cv", "importance_cv"):
            _check_summary(entries[arm, metric],
                           [values[arm, s][metric] for s in range(5)])
    paired = {(e["label"], e["metric"]): e for e in table["comparisons"]}
    for metric in ("test_accuracy", "load_cv"):
        differences = [values["balanced", s][metric] - values["unbalanced", s][metric]
                       for s in range(5)]
        _check_summary(paired["balanced - unbalanced", metric], differences)

    # The markdown table prints those numbers.
    markdown = run_study("shazeer", "--budget", "tiny", "--results", several, "--print-only",
                    "--markdown").stdout
    entry = entries["balanced", "test_accuracy"]
    assert (f"| balanced | test accuracy | 5 | {entry['mean']:.4f} | {entry['std']:.4f} | "
            f"[{entry['ci_low']:.4f}, {entry['ci_high']:.4f}] |") in markdown
    entry = paired["balanced - unbalanced", "load_cv"]
    assert (f"| balanced - unbalanced | CV of load (difference) | 5 | {entry['mean']:.3f} | "
            f"{entry['std']:.3f} | [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}] |") in markdown
    assert "Runs in: 2 of 2" in markdown and "Also 8 runs of further seeds" in markdown


def test_a_damaged_line_before_the_last_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        results_file.read_rows(path)


def test_summary_of_one_value_has_no_spread():
    summary = study_table.summarize([0.5])
    assert summary["mean"] == 0.5
    assert summary["std"] is None and summary["ci_low"] is None


def test_update_card_replaces_only_the_text_between_the_markers(tmp_path):
    shazeer = get_study("shazeer")
    begin = study_table.CARD_BEGIN.format(paper="shazeer")
    card = tmp_path / "card.md"
    card.write_text(f"# Card\n\nbefore\n{begin}\nold table\n{study_table.CARD_END}\nafter\n")
    study_table.update_card(shazeer, "new table\nline 2", card)
    study_table.update_card(shazeer, "newer table", card)
    assert card.read_text() == (f"# Card\n\nbefore\n{begin}\nnewer table\n"
                                f"{study_table.CARD_END}\nafter\n")
    card.write_text("# Card without markers\n")
    with pytest.raises(ValueError, match="no lines"):
        study_table.update_card(shazeer, "table", card)


@pytest.mark.slow
def test_the_routing_study_counts_unrouted_images_and_times_every_arm(tmp_path):
    """`examples/routing.py`'s study at its tiny budget for its expert-choice arm: some
    test images get no expert (counted), every expert the same load; then one timed
    step of every arm's model, side by side."""
    results = tmp_path / "routing.jsonl"
    run_study("routing", "--budget", "tiny", "--arms", "expert_choice",
         "--results", results, "--runs-dir", tmp_path / "runs")
    (row,) = jsonl_rows(results)
    assert row["arm"] == "expert_choice" and row["seed"] == 0
    metrics = row["metrics"]
    assert 0.0 < metrics["dropped_fraction"] < 0.5
    assert metrics["load_cv"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["ms_per_step"] > 0
    spec = importlib.util.spec_from_file_location("routing", REPO / "examples" / "routing.py")
    routing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(routing)
    medians = routing.time_arms(reps=1)
    assert list(medians) == [arm.name for arm in routing_study.routing_arms()]
    assert all(seconds > 0 for seconds in medians.values())


def test_the_layer_mean_arm_really_swaps_deepmoes_l1_term():
    """`examples/deepmoe_l1_normalisation.py --term layer_mean` (the DeepMoE study's
    `wide_layer_mean` arm) must change the added gate loss: an earlier version set an
    attribute nothing read, and its runs equalled the `wide` arm's to the last digit."""
    import keras

    from keras_moe import zoo

    spec = importlib.util.spec_from_file_location(
        "deepmoe_l1_normalisation", REPO / "examples" / "deepmoe_l1_normalisation.py")
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    images = np.random.default_rng(0).uniform(0, 1, (4, 16, 16, 3)).astype("float32")
    losses = {}
    for term in ("channel", "layer_mean"):
        keras.utils.set_random_seed(0)
        model = zoo.deepmoe_resnet_cifar(depth=8, input_shape=(16, 16, 3), num_classes=3,
                                         width_multiplier=0.5, embedding_widths=(4, 4, 4, 4),
                                         gate_l1=1.0)
        experiment.set_l1_term(model, term)
        # Gates of unequal openness per layer (at the start every gate is about 1).
        heads = [layer for layer in model.network.layers if type(layer).__name__ == "ReLUGate"]
        for index, head in enumerate(heads):
            head.kernel.assign(head.kernel * (0.2 + 0.3 * index))
        gates = model.network(images, training=True)["gates"]  # batch norms as below
        model(images, training=True)
        gate_loss = float(keras.ops.convert_to_numpy(model.objective.losses[0]))
        means = [float(np.mean(np.abs(keras.ops.convert_to_numpy(g)).sum(-1)))
                 / g.shape[-1] for g in gates]
        widths = [g.shape[-1] for g in gates]
        expected = (np.dot(means, widths) / sum(widths) if term == "channel"
                    else np.mean(means))
        assert gate_loss == pytest.approx(expected, rel=1e-4), term
        losses[term] = gate_loss
    assert len(set(widths)) > 1 and abs(losses["channel"] - losses["layer_mean"]) > 1e-3


def test_deepmoe_measures_the_controllers_lowest_reading_of_the_joint_phase(tmp_path):
    report = {"test": {"accuracy": 0.8}, "static_macs": 2e6, "parameters": 10,
              "deepmoe": {"effective_macs": 1e6, "gate_density": 0.5,
                          "gate_density_per_layer": {"a": 0.4, "b": 0.6}}}
    history = [
        {"phase": "joint", "epoch": 0, "gate_density": 0.9, "gate_density_min": 0.85},
        {"phase": "joint", "epoch": 1, "gate_density": 0.52, "gate_density_min": 0.07},
        {"phase": "joint", "epoch": 2, "gate_density": 0.49, "gate_density_min": 0.45},
        {"phase": "finetune", "epoch": 3, "gate_density_min": 0.01},  # not the joint phase
    ]
    (tmp_path / "report.json").write_text(json.dumps(report))
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    metrics = deepmoe_study.measure_deepmoe(tmp_path, "wide", {}, 0)
    assert metrics["min_joint_density_reading"] == 0.07
    assert metrics["min_joint_epoch_density"] == 0.49
    assert metrics["argmin_joint_epoch"] == 2
    assert (metrics["min_layer_density"], metrics["max_layer_density"]) == (0.4, 0.6)
    # A run from before the controller logged its readings: no such metric, not a guess.
    for row in history:
        row.pop("gate_density_min")
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    assert "min_joint_density_reading" not in deepmoe_study.measure_deepmoe(tmp_path, "wide", {}, 0)


def _check_two_domain(rows):
    by_arm = {row["arm"]: row["metrics"] for row in rows}
    for arm, metrics in by_arm.items():
        rates = np.asarray(metrics["activation_rates_test"])
        assert rates.shape == (2, 2)
        np.testing.assert_allclose(rates.sum(1), 1.0, atol=1e-5)  # softmax gates per domain
        diagonal = max(rates[0, 0] + rates[1, 1], rates[0, 1] + rates[1, 0]) / 2
        assert metrics["diagonal_share"] == pytest.approx(diagonal)
        means = metrics["expert_mean_gate"]
        assert metrics["min_expert_mean_gate"] == pytest.approx(min(means))
        assert metrics["collapsed"] == int(min(means) < 0.05)
        assert metrics["test_examples"] == 128
    # The oracle gate reads each image's domain: the table is the identity.
    np.testing.assert_allclose(by_arm["oracle"]["activation_rates_test"], np.eye(2), atol=1e-6)
    assert by_arm["oracle"]["diagonal_share"] == pytest.approx(1.0)


def _check_eigen(rows):
    (row,) = rows
    metrics = row["metrics"]
    assert metrics["test_error"] == pytest.approx(100 * (1 - metrics["test_accuracy"]))
    assert 0 <= metrics["train_error"] <= 100
    for layer in (1, 2):
        assert sum(metrics[f"expert_share_layer{layer}"]) == pytest.approx(1.0)
        for key in ("u_translation", "u_class", "nmi_translation", "nmi_class"):
            assert 0.0 <= metrics[f"{key}_layer{layer}"] <= 1.0 + 1e-9


def _check_deepmoe(rows):
    (row,) = rows
    metrics = row["metrics"]
    assert 0.0 <= metrics["gate_density"] <= 1.0
    assert metrics["macs_millions"] * 1e6 <= metrics["static_macs"]
    densities = metrics["joint_epoch_densities"]
    assert metrics["min_joint_epoch_density"] == min(densities)
    # 10 batches: the controller read once, and history.jsonl holds that reading.
    command = shlex.split(row["command"])
    run_dir = pathlib.Path(command[command.index("--out") + 1])
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    readings = [r["gate_density_min"] for r in history if r["phase"] == "joint"]
    assert len(readings) == 1 and 0.0 <= readings[0] <= 1.0
    assert metrics["min_joint_density_reading"] == readings[0]


@pytest.mark.slow
@pytest.mark.parametrize("paper, arms, check", [
    ("two_domain", "conv_none,oracle", _check_two_domain),
    ("eigen", "dmoe", _check_eigen),
    ("deepmoe", "wide", _check_deepmoe),
])
def test_each_papers_study_measures_its_runs(tmp_path, paper, arms, check):
    """Every paper's measurement on real runs at its tiny budget (the full studies run
    for hours: a measurement that breaks would only show after the first run)."""
    results = tmp_path / f"{paper}.jsonl"
    run_study(paper, "--budget", "tiny", "--arms", arms, "--results", results,
         "--runs-dir", tmp_path / "runs", timeout=600)
    rows = jsonl_rows(results)
    assert sorted(row["arm"] for row in rows) == sorted(arms.split(","))
    check(rows)
