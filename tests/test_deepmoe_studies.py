"""DeepMoE's trade-off studies (examples/studies/deepmoe_ladder.py, deepmoe_frontier.py,
deepmoe_long.py): their commands, the rows they share, the frontier's verdict and plot.

One slow test trains two tiny runs of the frontier (a fixed lambda, which the ladder
counts as its own rung, and a plain width) and checks the measurements against their
formulas; the long study's arms are the same kinds of run at another budget, checked by
their commands. The rest reads commands and synthetic rows only.
"""

import json
import math
import pathlib
import shlex

import numpy as np
import pytest
from scipy import stats

XDIST_SPREAD = True

from study_helpers import jsonl_rows, run_study  # noqa: E402  (puts examples/ on the path)

from studies import deepmoe_frontier, deepmoe_ladder, deepmoe_long, get_study  # noqa: E402
from studies.running import arm_fingerprints, study_rows, train_command  # noqa: E402
from studies.table import compute_table  # noqa: E402


def resnet8_macs(widths, size=32, channels=3, classes=10):
    """Multiply-adds of the plain CIFAR ResNet-8 (3x3 convolutions, 1x1 projection
    shortcuts at the stride-2 stages, the classifier; batch norm and pooling not
    counted), from its layer shapes."""
    c1, c2, c3 = widths
    macs = size * size * 9 * channels * c1  # stem
    macs += 2 * size * size * 9 * c1 * c1  # stage 1, identity shortcut
    for c_in, c_out, side in ((c1, c2, size // 2), (c2, c3, size // 4)):
        macs += side * side * (9 * c_in * c_out + 9 * c_out * c_out + c_in * c_out)
    return macs + c3 * classes


def test_resnet8_macs_formula_matches_the_baseline_rows():
    # The deepmoe study's baseline rows hold 12,501,632 static MACs for ResNet-8.
    assert resnet8_macs((16, 32, 64)) == 12_501_632


@pytest.mark.slow
def test_frontier_measures_its_runs_and_the_ladder_counts_the_shared_one(tmp_path):
    """The frontier at its tiny budget, one fixed-lambda arm and one plain width; the
    ladder's fixed-lambda rung has the same command, so the ladder's table counts that
    row without training it again (one study.py run: 35 s of a worker, measured)."""
    runs = tmp_path / "runs"
    frontier = tmp_path / "deepmoe_frontier.jsonl"
    figure = tmp_path / "frontier.png"
    out = run_study("deepmoe_frontier", "--budget", "tiny", "--arms", "wide_lambda3,plain_w0p5",
               "--results", frontier, "--runs-dir", runs, "--figure", figure, "--json",
               timeout=600).stdout
    rows = {row["arm"]: row for row in jsonl_rows(frontier)}
    assert sorted(rows) == ["plain_w0p5", "wide_lambda3"]
    metrics = rows["wide_lambda3"]["metrics"]
    # No controller: lambda stays at 3 through the joint phase (history.jsonl's reading).
    assert metrics["joint_epoch_gate_l1"] == [3.0]
    assert "min_joint_density_reading" not in metrics  # no controller, no readings
    assert 0.0 <= metrics["gate_density"] <= 1.0
    assert metrics["macs_millions"] * 1e6 <= metrics["static_macs"]
    assert rows["wide_lambda3"]["code_path"] == "keras_moe"  # relative to the repository
    assert "phases.0.gate_density_target=false" in shlex.split(rows["wide_lambda3"]["command"])
    plain = rows["plain_w0p5"]["metrics"]
    assert plain["static_macs"] == resnet8_macs((8, 16, 32))
    assert plain["macs_millions"] == plain["static_macs"] / 1e6
    table = json.loads(out[out.index("{"):])
    (entry,) = table["report"]["entries"]  # one plain point: no frontier to compare with
    assert entry["arm"] == "wide_lambda3" and entry["minus_frontier"]["n"] == 0
    assert entry["macs_millions"]["mean"] == pytest.approx(metrics["macs_millions"])
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000

    ladder = get_study("deepmoe_ladder")
    shared = study_rows(ladder, tmp_path / "deepmoe_ladder.jsonl")
    assert [(r["arm"], r["reused_from"]) for r in shared] == [("wide_lambda3",
                                                                "deepmoe_frontier")]
    ladder_table = compute_table(ladder, shared, "tiny")
    assert ladder_table["runs_done"] == 1 and ladder_table["reused_rows"] == 1


def test_frontier_interpolates_in_log_macs_and_pairs_by_seed():
    points = [(3.0, 0.85), (12.0, 0.90), (48.0, 0.92)]
    at = deepmoe_frontier.frontier_at(points, 6.0)
    assert at == pytest.approx(np.interp(math.log(6.0), [math.log(3), math.log(12)],
                                         [0.85, 0.90]))
    assert deepmoe_frontier.frontier_at(points, 48.0) == pytest.approx(0.92)
    assert deepmoe_frontier.frontier_at(points, 2.0) is None  # no extrapolation
    assert deepmoe_frontier.frontier_at(points[:1], 3.0) is None

    arms = deepmoe_frontier.arms()
    rng = np.random.default_rng(0)
    by_arm, expected = {}, []
    widths = deepmoe_frontier.plain_arms(arms)
    assert sorted(widths.values()) == list(deepmoe_frontier.WIDTHS)
    for seed in range(3):
        for name, width in widths.items():
            by_arm.setdefault(name, {})[seed] = {"macs_millions": 12.5 * width ** 2,
                                                 "test_accuracy": 0.8 + 0.05 * width
                                                 + rng.normal(0, 0.01)}
        macs, accuracy = 9.0 + seed, 0.86 + 0.01 * seed
        by_arm.setdefault("narrow", {})[seed] = {"macs_millions": macs, "gate_density": 0.7,
                                                 "test_accuracy": accuracy}
        plain = sorted((by_arm[n][seed]["macs_millions"], by_arm[n][seed]["test_accuracy"])
                       for n in widths)
        xs, ys = zip(*plain)
        expected.append(accuracy - np.interp(math.log(macs), np.log(xs), ys))
    report = deepmoe_frontier.frontier_report(by_arm, arms)
    (entry,) = report["entries"]
    assert entry["arm"] == "narrow" and entry["seeds"] == [0, 1, 2]
    difference = entry["minus_frontier"]
    assert difference["mean"] == pytest.approx(np.mean(expected))
    low, high = stats.t.interval(0.95, 2, loc=np.mean(expected), scale=stats.sem(expected))
    assert (difference["ci_low"], difference["ci_high"]) == pytest.approx((low, high))
    assert any(line.startswith("| narrow | 3 |") for line in report["lines"])


def test_shared_arms_keep_the_deepmoe_studys_fingerprints_and_budgets_scale():
    deepmoe = arm_fingerprints(get_study("deepmoe"))
    ladder = arm_fingerprints(get_study("deepmoe_ladder"))
    frontier = arm_fingerprints(get_study("deepmoe_frontier"))
    for arm in ("baseline", "wide"):
        assert {k for k, v in deepmoe.items() if v == arm} <= set(ladder)
    for arm in ("baseline", "wide", "narrow"):
        assert {k for k, v in deepmoe.items() if v == arm} <= set(frontier)
    # The ladder's fixed-lambda rung is a frontier arm: one run serves both.
    rung = {k for k, v in ladder.items() if v == "wide_lambda3"}
    assert rung and all(frontier[k] == "wide_lambda3" for k in rung)

    study = get_study("deepmoe_ladder")
    arms = {arm.name: arm for arm in study.arms}
    command = train_command(study, arms["wide_finetune_x3"], "full", 0, pathlib.Path("R"))
    assert "phases.1.epochs=9" in command and "phases.0.epochs=7" in command
    assert "schedule.boundaries=[7]" in command
    long = get_study("deepmoe_long")
    budget = long.budgets["long"]
    full = get_study("deepmoe").budgets["full"]
    assert (budget["joint"], budget["finetune"]) == (3 * full["joint"], 3 * full["finetune"])
    arms = {arm.name: arm for arm in long.arms}
    command = train_command(long, arms["plain_matched"], "long", 0, pathlib.Path("R"))
    assert "phases.0.epochs=30" in command
    assert f"model.width_multiplier={deepmoe_long.MATCHED_WIDTH}" in command
    # The long study's DeepMoE arm is the frontier's arm of that name, at 3x the epochs.
    frontier_arms = {arm.name: arm for arm in deepmoe_frontier.arms()}
    for name in (deepmoe_long.DEEPMOE_ARM, deepmoe_long.DEFAULT_ARM):
        assert arms[name].args == frontier_arms[name].args
    assert next(iter(long.budgets)) == "long"  # study.py's default budget
    assert deepmoe_ladder.LADDER_LAMBDA in deepmoe_frontier.WIDE_LAMBDAS


def _recipe_of(study_name, arm_name):
    """The recipe one arm of a study trains at the study's first budget: the study's
    frozen recipe with the arm's `--set`, `--train-size` and `--test-size` applied."""
    from keras_moe import recipes

    study = get_study(study_name)
    arm = {arm.name: arm for arm in study.arms}[arm_name]
    command = train_command(study, arm, next(iter(study.budgets)), 0, pathlib.Path("R"))
    flags = dict(zip(command[3::2], command[4::2]))  # fine for the flags that take values
    sets = [command[i + 1] for i, token in enumerate(command) if token == "--set"]
    sets += [f"data.train_size={flags['--train-size']}", f"data.test_size={flags['--test-size']}"]
    return recipes.load_recipe(arm.target).override(sets)


@pytest.mark.parametrize("zoo_recipe, study_name, arm_name", [
    ("deepmoe_resnet8_fashion_mnist", "deepmoe_frontier", "wide_lambda3p5"),
    ("resnet8_fashion_mnist", "deepmoe_frontier", "baseline"),
])
def test_the_zoo_recipes_are_the_study_arms_that_back_them(zoo_recipe, study_name, arm_name):
    """The CPU recipes train exactly what the study row named in zoo/deepmoe.md measured
    (the best DeepMoE setting and its baseline), so the card's numbers are the recipe's."""
    from keras_moe import recipes

    def settings(recipe):
        table = recipe.to_dict()
        del table["recipe"]  # name, description and paper: words, not settings
        return table

    assert settings(recipes.load_recipe(zoo_recipe)) == settings(_recipe_of(study_name, arm_name))


def test_a_study_copy_of_a_recipe_keeps_the_fingerprint_of_its_name():
    from studies.base import study_recipe
    from studies.running import settings_id

    copy = study_recipe("deepmoe_resnet8_fashion_mnist")
    named = ["keras-moe", "train", "deepmoe_resnet8_fashion_mnist", "--seed", "0"]
    assert settings_id(["keras-moe", "train", copy, "--seed", "1"]) == settings_id(named)
    assert settings_id(["keras-moe", "train", "zoo/other.toml"]) != settings_id(named)
    # The copies still hold what the rows ran: the controller steering lambda to 0.5.
    recipe = _recipe_of("deepmoe_frontier", "wide")
    assert recipe.phases[0].gate_density_target == 0.5 and recipe.model.losses["gate_l1"] == 5.0
