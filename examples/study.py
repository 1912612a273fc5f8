"""Multi-seed studies of the papers' central claims, resumable, with intervals.

    python examples/study.py PAPER [--budget full] [--seeds N] [--print-only] [--markdown]

PAPER is one of `deepmoe` (004), `two_domain` (002), `eigen` (001), `shazeer` (003),
`routing` (the routers of current MoE models on paper 003's classifier;
`examples/routing.py` runs it), or DeepMoE's trade-off studies `deepmoe_ladder` (the
ablation ladder), `deepmoe_frontier` (accuracy against effective MACs, with
`--figure`) and `deepmoe_long` (3x the epochs). A study may count the rows of another
(`Study.reuses`): a row there with the same budget and settings fingerprint as one of
its arms stands for that arm, so identical runs are trained once.
Each study has arms (a model or recipe and its settings); this script trains every arm
seed by seed (seed 0 of every arm, then seed 1, ...) through the public command line,
as a subprocess:

    keras-moe train RECIPE --set section.key=value ... --seed N --out RUN_DIR \\
        --train-size N --test-size N --no-export --deterministic

then reads the run directory's `report.json` and `history.jsonl` (and, where the study
needs numbers that the report does not hold, loads `model.keras` and measures them with
`keras_moe.analysis`), and appends one row per finished run to the results file
(default `zoo/results/PAPER.jsonl`): paper, arm, seed, budget, recipe and model, the
metrics, the exact command (paths relative to the repository, where it runs), the
code's commit and the date. Rows already in the file
are skipped, so a killed study started again resumes where it stopped; a run killed
half-way is started again from scratch (its partial run directory is removed), never
continued, so that every row comes from one uninterrupted run.

Each row is written with one `write` on a file opened for appending, then flushed to
disk; a crash can leave at most a torn last line, which reading ignores with a warning
(and the next append cuts off before writing).

The table is computed from the results file alone: per arm and metric n, mean, the
sample standard deviation (spread) and the 95% t-interval of the mean; for each paired
comparison the mean of the per-seed differences (or ratios) with its 95% t-interval.
`--print-only` prints it without training; `--markdown` prints the block that goes into
the model card; `--json` the same numbers as JSON.

The studies live in `examples/studies/`, one module per paper beside the machinery they
share.

The DeepMoE arm `wide_layer_mean` cannot be expressed with `--set` (the L1 term's layer
weights are not a recipe setting), so it runs `examples/deepmoe_l1_normalisation.py
--term layer_mean` with the same flags instead; that script trains the same recipe
through the same runner and writes the same run directory.
"""

import argparse
import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "examples"):  # the same copy of keras_moe that trains; `studies`
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from studies import PAPERS, get_study  # noqa: E402
from studies.running import run_study, study_rows  # noqa: E402
from studies.table import (  # noqa: E402
    compute_table, format_markdown, format_table, runs_by_arm, update_card)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paper", choices=PAPERS)
    parser.add_argument("--budget", help="a budget of the study (default its first: full, "
                                          "or deepmoe_long's long; tiny)")
    parser.add_argument("--results", help="results file (default zoo/results/PAPER.jsonl)")
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "study"),
                        help="where the run directories go")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the budget's)")
    parser.add_argument("--arms", help="comma-separated arms (default: all)")
    parser.add_argument("--no-deterministic", action="store_true",
                        help="train without --deterministic (a different setting: new rows)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each run's checkpoints/ (removed once its row is in)")
    parser.add_argument("--print-only", action="store_true", help="print the table, train nothing")
    parser.add_argument("--markdown", action="store_true", help="print the model card's block")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("--update-card", action="store_true",
                        help="also write the --markdown block into the model card, between "
                             "its study-table markers (and the study's figure beside it)")
    parser.add_argument("--figure", help="write the study's figure (PNG) here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    study = get_study(args.paper)
    args.budget = args.budget or next(iter(study.budgets))
    if args.budget not in study.budgets:
        parser.error(f"--budget: one of {', '.join(study.budgets)}")
    results = pathlib.Path(args.results or REPO / "zoo" / "results" / f"{args.paper}.jsonl")
    deterministic = not args.no_deterministic
    arms = None
    if args.arms:
        arms = args.arms.split(",")
        unknown = set(arms) - {a.name for a in study.arms}
        if unknown:
            parser.error(f"--arms: unknown {sorted(unknown)}; arms: "
                         f"{', '.join(a.name for a in study.arms)}")
    if not args.print_only:
        run_study(study, args.budget, results, args.runs_dir, seeds=args.seeds, arms=arms,
                  deterministic=deterministic, keep_checkpoints=args.keep_checkpoints,
                  log=lambda text: print(text, flush=True))
    rows = study_rows(study, results, deterministic)
    table = compute_table(study, rows, args.budget, deterministic)
    figures = [args.figure] if args.figure else []
    if args.update_card and study.figure_file:
        figures.append(REPO / study.figure_file)
    if figures and study.figure is None:
        parser.error(f"--figure: the {args.paper} study draws no figure")
    for path in figures:
        study.figure(runs_by_arm(study, rows, args.budget, deterministic), path)
        print(f"figure: {path}")
    if args.update_card:
        print(f"updated {update_card(study, format_markdown(study, table, results))}")
    if args.json:
        print(json.dumps(table, indent=2))
    elif args.markdown:
        print(format_markdown(study, table, results))
    else:
        print(f"{study.title}\nresults: {results}\n")
        print(format_table(study, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
