"""A study's table from its results rows alone: per arm and metric n, mean, spread and
the 95% t-interval; paired-by-seed comparisons; the block that goes into the model card."""

import math
import os
import pathlib
import shlex
import sys

from studies.base import REPO
from studies.running import settings_id, train_command

CONFIDENCE = 0.95

def t_quantile(probability, dof):
    """The `probability` quantile of Student's t with `dof` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(probability, dof))


def summarize(values):
    """n, mean, sample standard deviation and the 95% t-interval of the mean.

    Args:
        values: Finite numbers (one per run).

    Returns:
        A dict with `n`, `mean`, `std` (ddof 1), `ci_low`, `ci_high`; `std` and the
        interval are None for fewer than two values, `mean` None for none.
    """
    values = [float(v) for v in values]
    n = len(values)
    out = {"n": n, "mean": None, "std": None, "ci_low": None, "ci_high": None}
    if n == 0:
        return out
    mean = sum(values) / n
    out["mean"] = mean
    if n >= 2:
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
        out.update(std=std, ci_low=mean - half, ci_high=mean + half)
    return out


def current_rows(study, rows, budget_name, deterministic=True):
    """The rows of `budget_name` run with today's settings of their arm (others are
    counted apart: the arm's command changed since)."""
    wanted = {}
    for arm in study.arms:
        command = train_command(study, arm, budget_name, 0, pathlib.Path("RUN"), deterministic)
        wanted[arm.name] = settings_id(command)
    kept, stale = [], 0
    for row in rows:
        if row.get("paper") != study.paper or row.get("budget") != budget_name:
            continue
        if wanted.get(row["arm"]) == row.get("settings_id"):
            kept.append(row)
        else:
            stale += 1
    return kept, stale


def compute_table(study, rows, budget_name, deterministic=True):
    """The study's table from results rows: per-arm summaries and paired comparisons."""
    rows, stale = current_rows(study, rows, budget_name, deterministic)
    by_arm = {}
    for row in rows:
        by_arm.setdefault(row["arm"], {})[row["seed"]] = row["metrics"]
    arms = []
    for arm in study.arms:
        runs = by_arm.get(arm.name, {})
        for metric in study.metrics:
            seeds = [s for s, m in sorted(runs.items()) if metric.value(m) is not None]
            if not seeds:
                continue
            arms.append({"arm": arm.name, "metric": metric.key, "label": metric.label,
                         "decimals": metric.decimals, "seeds": seeds,
                         **summarize([metric.value(runs[s]) for s in seeds])})
    comparisons = []
    for comparison in study.comparisons:
        a_runs, b_runs = by_arm.get(comparison.arm_a, {}), by_arm.get(comparison.arm_b, {})
        metric_b = comparison.metric_b or comparison.metric
        seeds = sorted(s for s in a_runs if s in b_runs
                       and isinstance(a_runs[s].get(comparison.metric), (int, float))
                       and isinstance(b_runs[s].get(metric_b), (int, float)))
        if comparison.kind == "ratio":
            values = [a_runs[s][comparison.metric] / b_runs[s][metric_b] for s in seeds]
        else:
            values = [a_runs[s][comparison.metric] - b_runs[s][metric_b] for s in seeds]
        if not values:
            continue
        comparisons.append({"label": comparison.label, "arm_a": comparison.arm_a,
                            "arm_b": comparison.arm_b, "metric": comparison.metric,
                            "metric_b": metric_b, "kind": comparison.kind,
                            "decimals": comparison.decimals, "seeds": seeds,
                            **summarize(values)})
    budget = study.budgets[budget_name]
    report = study.report(by_arm) if study.report else None
    planned = {(a.name, s) for a in study.arms for s in range(budget["seeds"])}
    done = {(r["arm"], r["seed"]) for r in rows}
    return {"paper": study.paper, "budget": budget_name, "budget_settings": budget,
            "runs_done": len(done & planned), "runs_planned": len(planned),
            "runs_beyond_plan": len(done - planned),
            "rows_with_other_settings": stale, "arms": arms, "comparisons": comparisons,
            "reused_rows": sum(1 for r in rows if r.get("reused_from")),
            **({"report": report} if report is not None else {})}


def runs_by_arm(study, rows, budget_name, deterministic=True):
    """`{arm: {seed: metrics}}` of the rows run with today's settings (`current_rows`)."""
    by_arm = {}
    for row in current_rows(study, rows, budget_name, deterministic)[0]:
        by_arm.setdefault(row["arm"], {})[row["seed"]] = row["metrics"]
    return by_arm


def _number(value, decimals):
    return "-" if value is None else f"{value:.{decimals}f}"


def _interval(entry):
    d = entry["decimals"]
    if entry["ci_low"] is None:
        return "-"
    return f"[{_number(entry['ci_low'], d)}, {_number(entry['ci_high'], d)}]"


def format_table(study, table):
    """The table as markdown (what goes into the model card)."""
    labels = {m.key: m.label for m in study.metrics}
    lines = [f"Runs in: {table['runs_done']} of {table['runs_planned']} "
             f"({len(study.arms)} arms x {table['budget_settings']['seeds']} seeds), budget "
             f"`{table['budget']}`: " + ", ".join(
                 f"{k} {'all' if k.endswith('_size') and v == 0 else v}"
                 for k, v in table["budget_settings"].items() if k != "seeds") + "."
             + (f" Also {table['runs_beyond_plan']} runs of further seeds."
                if table["runs_beyond_plan"] else "")]
    if table.get("reused_rows"):
        lines.append(f"({table['reused_rows']} of these runs are rows of another study with "
                     "the same settings, counted here: " + ", ".join(study.reuses) + ".)")
    if table["rows_with_other_settings"]:
        lines.append(f"({table['rows_with_other_settings']} rows of this budget were run with "
                     "other settings and are left out.)")
    lines += ["", "| arm | metric | n | mean | std | 95% interval |",
              "| --- | --- | --- | --- | --- | --- |"]
    for entry in table["arms"]:
        d = entry["decimals"]
        lines.append(f"| {entry['arm']} | {labels[entry['metric']]} | {entry['n']} | "
                     f"{_number(entry['mean'], d)} | {_number(entry['std'], d)} | "
                     f"{_interval(entry)} |")
    if table["comparisons"]:
        lines += ["", "Paired by seed (the same seeds in both):", "",
                  "| comparison | metric | pairs | mean | std | 95% t-interval |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for entry in table["comparisons"]:
            d = entry["decimals"]
            metric = labels.get(entry["metric"], entry["metric"])
            if entry["metric_b"] != entry["metric"]:
                metric = f"{labels.get(entry['metric'])} vs {labels.get(entry['metric_b'])}"
            what = "ratio" if entry["kind"] == "ratio" else "difference"
            lines.append(f"| {entry['label']} | {metric} ({what}) | {entry['n']} | "
                         f"{_number(entry['mean'], d)} | {_number(entry['std'], d)} | "
                         f"{_interval(entry)} |")
    if table.get("report"):
        lines += [""] + table["report"]["lines"]
    if study.notes:
        lines += ["", study.notes]
    return "\n".join(lines)


def format_markdown(study, table, results):
    """The card's block: the table, the arms and their commands, how to reprint it."""
    budget = table["budget"]
    lines = [format_table(study, table), "", "Arms (each run: this command with `--seed N` "
             "and a new `--out`):", ""]
    for arm in study.arms:
        command = train_command(study, arm, budget, "N", pathlib.Path("RUN_DIR"))
        command = [("python3" if c == sys.executable else
                    os.path.relpath(c, REPO) if c.startswith(str(REPO)) else c) for c in command]
        lines.append(f"- `{arm.name}` ({arm.description}): `{shlex.join(command)}`")
    flag = "" if budget == next(iter(study.budgets)) else f" --budget {budget}"
    shown = (os.path.relpath(results, REPO) if str(pathlib.Path(results).resolve()).startswith(
        str(REPO)) else str(results))
    lines += ["", f"Printed from `{shown}` alone by `python3 examples/study.py {study.paper}"
              f"{flag} --print-only --update-card`; `python3 examples/study.py {study.paper}"
              f"{flag}` trains the runs still missing."]
    return "\n".join(lines)


CARD_BEGIN = "<!-- study table: begin (python3 examples/study.py {paper} --print-only --update-card) -->"
CARD_END = "<!-- study table: end -->"


def update_card(study, block, card=None):
    """Replaces the text between the study's markers in its model card with `block`.

    Raises:
        ValueError: The card lacks the two marker lines (`CARD_BEGIN`, `CARD_END`).
    """
    card = pathlib.Path(card or REPO / study.card)
    text = card.read_text()
    begin, end = CARD_BEGIN.format(paper=study.paper), CARD_END
    if begin not in text or end not in text.split(begin, 1)[-1]:
        raise ValueError(f"{card}: no lines {begin!r} ... {end!r} to put the table between")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    card.write_text(f"{head}{begin}\n{block}\n{end}{tail}")
    return card

