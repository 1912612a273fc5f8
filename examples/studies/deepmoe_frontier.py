"""DeepMoE's accuracy-for-computation frontier (issue 22; paper Fig. 3 and 5 at a CPU
budget): the plain ResNet-8 at width multipliers 0.35-2.0 (the compute-matched
baselines) against narrow and wide DeepMoE-8 at fixed lambdas and under the density
controller, at the `deepmoe` study's budget, test accuracy against effective MACs.

The verdict compares each DeepMoE run with the plain frontier of the same seed at the
run's own effective MACs: the plain widths' (MACs, accuracy) points of that seed,
interpolated linearly in log MACs (a width multiplier w scales MACs by about w^2);
a run outside the plain widths' MACs range is not compared (no extrapolation). The
per-seed differences give the mean and its 95% t-interval.
"""

import math

from studies.base import Comparison, Study
from studies.deepmoe import measure_deepmoe
from studies.deepmoe import study as deepmoe_study
from studies.deepmoe_arms import (PLAIN_RECIPE, bind_flags, budget_flags, controller,
                                  fixed_lambda, plain)
from studies.deepmoe_ladder import BUDGETS, LADDER_LAMBDA
from studies.table import summarize

# 0.35 reaches down to the MACs of the lowest-density DeepMoE arms (no extrapolation).
WIDTHS = (0.35, 0.5, 0.7, 1.0, 1.4, 2.0)
# Fixed lambdas (ours: the paper's x 288 wide, x 176 narrow gated channels). A fixed
# lambda closes gates late and then fast (with batch norm after every gated convolution
# the loss hardly resists a layer's gates shrinking together, so the L1 term shrinks
# them at a rate ~ lambda until they cross zero): in the probes of zoo/deepmoe.md
# (wide, seed 0) lambda 5 stayed open 3 epochs, then fell to 0.31 in the 4th and 0.03
# by the 7th; lambda 2.5 ended the joint phase at 0.93. These values bracket the end of
# the 7 joint epochs; the spread-heads arms (W_g ~ U(0, 2), as the controller starts)
# try to make the gates close one by one instead (the fallback if fixed lambda
# stays bistable).
WIDE_LAMBDAS = (2.5, LADDER_LAMBDA, 3.5, 5.0)
NARROW_LAMBDAS = (2.5, 3.5, 5.0)
# Spread heads close gates one by one (lambda 3 ended at 0.48 open, 5 at 0.13 over
# 2-3 seeds), so 2 and 4 fill in the 0.3-0.9 range of the paper's Fig. 3.
SPREAD_LAMBDAS = (2.0, 3.0, 4.0, 5.0)


def _name(prefix, value):
    return f"{prefix}{value:g}".replace(".", "p")


def arms():
    out = []
    for gate_l1 in WIDE_LAMBDAS:
        out.append(fixed_lambda(_name("wide_lambda", gate_l1), gate_l1))
    for gate_l1 in NARROW_LAMBDAS:
        out.append(fixed_lambda(_name("narrow_lambda", gate_l1), gate_l1, wide=False))
    for gate_l1 in SPREAD_LAMBDAS:
        out.append(fixed_lambda(_name("wide_spread_lambda", gate_l1), gate_l1, spread=True))
    out.append(controller("wide", description="wide DeepMoE-8, the controller (target 0.5 "
                                              "open; the deepmoe study's wide)"))
    out.append(controller("narrow", wide=False, target=0.75,
                          description="narrow DeepMoE-8, the controller (target 0.75 open; "
                                      "the deepmoe study's narrow)"))
    for width in WIDTHS:
        name = "baseline" if width == 1.0 else _name("plain_w", width)
        out.append(plain(name, width))
    return out


def plain_arms(study_arms):
    """`{arm name: width}` of the plain arms."""
    widths = {}
    for arm in study_arms:
        if arm.target == PLAIN_RECIPE:
            args = list(arm.args)
            widths[arm.name] = next((float(a.split("=", 1)[1]) for a in args
                                     if a.startswith("model.width_multiplier=")), 1.0)
    return widths


def frontier_at(points, macs):
    """The plain frontier's accuracy at `macs`: `points` [(macs, accuracy)] interpolated
    linearly in log MACs; None outside their range (or with fewer than two points)."""
    points = sorted(points)
    if len(points) < 2 or not points[0][0] <= macs <= points[-1][0]:
        return None
    for (m0, a0), (m1, a1) in zip(points, points[1:]):
        if m0 <= macs <= m1:
            if m1 == m0:
                return (a0 + a1) / 2
            t = (math.log(macs) - math.log(m0)) / (math.log(m1) - math.log(m0))
            return a0 + t * (a1 - a0)
    return None


def frontier_report(by_arm, study_arms):
    """Each DeepMoE arm against the plain frontier of the same seeds at its MACs."""
    widths = plain_arms(study_arms)
    entries = []
    for arm in study_arms:
        if arm.name in widths or arm.name not in by_arm:
            continue
        differences, seeds = [], []
        for seed, metrics in sorted(by_arm[arm.name].items()):
            points = [(by_arm[p][seed]["macs_millions"], by_arm[p][seed]["test_accuracy"])
                      for p in widths if seed in by_arm.get(p, {})]
            at = frontier_at(points, metrics["macs_millions"])
            if at is not None:
                differences.append(metrics["test_accuracy"] - at)
                seeds.append(seed)
        runs = by_arm[arm.name]
        entries.append({
            "arm": arm.name, "seeds": seeds,
            "macs_millions": summarize([m["macs_millions"] for m in runs.values()]),
            "test_accuracy": summarize([m["test_accuracy"] for m in runs.values()]),
            "gate_density": summarize([m["gate_density"] for m in runs.values()]),
            "minus_frontier": summarize(differences)})
    lines = ["DeepMoE against the plain frontier at equal effective MACs (the plain widths' "
             "accuracy of the same seed, interpolated in log MACs):", "",
             "| arm | runs | effective MACs (M) | gate density | test accuracy | "
             "minus plain frontier (paired) | 95% t-interval |",
             "| --- | --- | --- | --- | --- | --- | --- |"]

    def number(summary, decimals):
        return "-" if summary["mean"] is None else f"{summary['mean']:.{decimals}f}"

    for entry in entries:
        diff = entry["minus_frontier"]
        interval = ("-" if diff["ci_low"] is None
                    else f"[{diff['ci_low']:+.4f}, {diff['ci_high']:+.4f}]")
        lines.append(
            f"| {entry['arm']} | {entry['test_accuracy']['n']} | "
            f"{number(entry['macs_millions'], 2)} | {number(entry['gate_density'], 3)} | "
            f"{number(entry['test_accuracy'], 4)} | "
            f"{'-' if diff['mean'] is None else format(diff['mean'], '+.4f')} "
            f"(n {diff['n']}) | {interval} |")
    return {"entries": entries, "lines": lines}


def draw_frontier(by_arm, path, study_arms):
    """Accuracy against effective MACs: mean and 95% interval (both axes) per arm, the
    plain widths joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = plain_arms(study_arms)
    figure, axes = plt.subplots(figsize=(9, 4.5))

    def point(runs, key):
        summary = summarize([m[key] for m in runs.values()])
        low = summary["ci_low"] if summary["ci_low"] is not None else summary["mean"]
        high = summary["ci_high"] if summary["ci_high"] is not None else summary["mean"]
        return summary["mean"], (summary["mean"] - low, high - summary["mean"])

    plain_points = []
    for arm in study_arms:
        runs = by_arm.get(arm.name)
        if not runs:
            continue
        (x, x_err), (y, y_err) = point(runs, "macs_millions"), point(runs, "test_accuracy")
        is_plain = arm.name in widths
        if is_plain:
            plain_points.append((x, y))
        style = dict(fmt="s", color="black") if is_plain else dict(
            fmt="o" if arm.name.startswith("wide") else "^")
        axes.errorbar([x], [y], xerr=[[x_err[0]], [x_err[1]]], yerr=[[y_err[0]], [y_err[1]]],
                      capsize=3, label=f"{arm.name} (n {len(runs)})", **style)
    if plain_points:
        xs, ys = zip(*sorted(plain_points))
        axes.plot(xs, ys, "-", color="black", linewidth=1, zorder=0)
    axes.set_xscale("log")
    axes.set_xlabel("effective MACs per example (millions, log scale)")
    axes.set_ylabel("test accuracy")
    axes.set_title("DeepMoE-8 vs plain ResNet-8 widths (Fashion-MNIST 32x32, 20k images)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the points
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def study():
    frontier = arms()
    flags = bind_flags(budget_flags(), frontier)
    base = deepmoe_study()
    comparisons = [Comparison(f"{a} / baseline", a, "baseline", "macs_millions",
                              kind="ratio", decimals=3)
                   for a in (arm.name for arm in frontier) if a != "baseline"]
    return Study(
        "deepmoe_frontier", "DeepMoE (004): accuracy against effective MACs, plain widths "
                            "as the frontier", "zoo/deepmoe.md", frontier, BUDGETS,
        measure_deepmoe, base.metrics, comparisons, flags=flags,
        reuses=("deepmoe", "deepmoe_ladder"),
        report=lambda by_arm: frontier_report(by_arm, frontier),
        figure=lambda by_arm, path: draw_frontier(by_arm, path, frontier),
        figure_file="zoo/deepmoe_frontier.png",
        notes="lambda is ours (the paper's x 288 gated channels wide, x 176 narrow). "
              + base.notes)
