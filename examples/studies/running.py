"""Running a study: the command of each (arm, seed), its fingerprint, and the loop that
trains the missing runs and appends their rows."""

import datetime
import hashlib
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

from studies.base import REPO, STUDY_RECIPES
from studies.results import append_row, read_rows


def train_command(study, arm, budget_name, seed, run_dir, deterministic=True):
    """The argv of one run (`keras-moe train ...`, or the arm's script with the same flags)."""
    budget = study.budgets[budget_name]
    flags = list(arm.args) + study.flags(arm.name, budget) + [
        "--seed", str(seed), "--out", str(run_dir),
        "--train-size", str(budget["train_size"]), "--test-size", str(budget["test_size"]),
        "--no-export"]
    if deterministic:
        flags.append("--deterministic")
    if arm.script:
        script, *script_args = arm.script
        return [sys.executable, str(REPO / script), *script_args, "--recipe", arm.target] + flags
    return ["keras-moe", "train", arm.target] + flags + ["--verbose", "2"]


def settings_id(command):
    """A fingerprint of what a run computes: its command without `--out` and `--seed`
    (and without the interpreter's and the repository's paths); a study's frozen copy of
    a recipe (`base.study_recipe`) stands as the recipe's name."""
    kept, skip = [], False
    for token in command:
        if skip:
            skip = False
            continue
        if token in ("--out", "--seed"):
            skip = True
            continue
        if token == sys.executable:
            token = "python"
        elif pathlib.Path(token).parent == STUDY_RECIPES and token.endswith(".toml"):
            token = pathlib.Path(token).stem
        elif token.startswith(str(REPO) + os.sep):
            token = os.path.relpath(token, REPO)
        kept.append(token)
    return hashlib.sha1(json.dumps(kept).encode()).hexdigest()[:12]


def repository_relative(token):
    """`token` with this repository's path made relative (rows name the files of the
    copy that ran them as the repository's own), the interpreter as `python3`."""
    if token == sys.executable:
        return "python3"
    if token == str(REPO) or token.startswith(str(REPO) + os.sep):
        return os.path.relpath(token, REPO)
    return token


def arm_fingerprints(study, deterministic=True):
    """`{(budget name, settings fingerprint): arm name}` of every arm and budget."""
    return {(budget, settings_id(train_command(study, arm, budget, 0, pathlib.Path("RUN"),
                                               deterministic))): arm.name
            for budget in study.budgets for arm in study.arms}


def study_rows(study, results, deterministic=True):
    """The rows of `results`, and those of the studies in `study.reuses` (their results
    files beside it) that ran one of this study's arms with the same settings
    (budget and fingerprint), relabelled with this study's paper and arm name and
    marked `reused_from`; a row of this study's own file wins over a reused one."""
    rows = read_rows(results)
    have = {(r.get("arm"), r.get("seed"), r.get("budget"), r.get("settings_id")) for r in rows}
    wanted = arm_fingerprints(study, deterministic)
    for paper in study.reuses:
        for row in read_rows(pathlib.Path(results).parent / f"{paper}.jsonl"):
            arm = wanted.get((row.get("budget"), row.get("settings_id")))
            key = (arm, row.get("seed"), row.get("budget"), row.get("settings_id"))
            if arm is None or key in have:
                continue
            rows.append(dict(row, paper=study.paper, arm=arm, reused_from=paper,
                             reused_arm=row.get("arm")))
            have.add(key)
    return rows


def code_commit():
    """The commit of the code being run: `$KERAS_MOE_CODE_COMMIT` (a frozen copy
    without git), else `git rev-parse HEAD` here, with `+dirty` if tracked code
    (keras_moe/, examples/, zoo/*.toml) differs from it."""
    if os.environ.get("KERAS_MOE_CODE_COMMIT"):
        return os.environ["KERAS_MOE_CODE_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "keras_moe", "examples",
             "zoo/*.toml"], text=True, capture_output=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _finished(run_dir):
    return (run_dir / "report.json").exists() and (run_dir / "model.keras").exists()


def run_study(study, budget_name, results, runs_dir, *, seeds=None, arms=None,
              deterministic=True, keep_checkpoints=False, log=print):
    """Trains every missing (arm, seed) of the study seed by seed; appends a row each.

    Returns:
        The number of runs trained (rows appended).
    """
    budget = study.budgets[budget_name]
    seeds = range(budget["seeds"] if seeds is None else seeds)
    chosen = [a for a in study.arms if arms is None or a.name in arms]
    rows = study_rows(study, results, deterministic)
    done = {(r["arm"], r["seed"], r["budget"], r["settings_id"]) for r in rows}
    sources = {(r["arm"], r["seed"], r["budget"], r["settings_id"]):
               pathlib.Path(results).parent / f"{r['reused_from']}.jsonl"
               for r in rows if r.get("reused_from")}
    commit = code_commit()
    import keras_moe

    code = str(pathlib.Path(keras_moe.__file__).resolve().parent)
    if code != str(REPO / "keras_moe"):
        raise RuntimeError(f"keras_moe is imported from {code}, not from {REPO}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    appended = 0
    for seed in seeds:
        for arm in chosen:
            # The settings' fingerprint is in the name: a changed arm never reuses a run.
            probe = train_command(study, arm, budget_name, seed, pathlib.Path("RUN"),
                                  deterministic)
            key = (arm.name, seed, budget_name, settings_id(probe))
            run_dir = (pathlib.Path(runs_dir) / study.paper / budget_name
                       / f"{arm.name}-seed{seed}-{key[3]}")
            command = train_command(study, arm, budget_name, seed, run_dir, deterministic)
            if command[0] == "keras-moe" and shutil.which("keras-moe") is None:
                command = [sys.executable, "-m", "keras_moe"] + command[1:]
            if key in done:
                log(f"skip {study.paper} {arm.name} seed {seed}: in {sources.get(key, results)}")
                continue
            started = time.time()
            if not _finished(run_dir):
                if run_dir.exists():  # a run killed half-way: start it again, do not resume
                    log(f"removing the unfinished run {run_dir}")
                    shutil.rmtree(run_dir)
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                log(f"run {study.paper} {arm.name} seed {seed}: {shlex.join(command)}")
                log_path = run_dir.parent / f"{run_dir.name}.log"
                with open(log_path, "w") as out:
                    completed = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                               cwd=REPO, env=env)
                if completed.returncode != 0 or not _finished(run_dir):
                    raise RuntimeError(f"{shlex.join(command)} failed (exit "
                                       f"{completed.returncode}); see {log_path}")
            else:
                log(f"{run_dir} holds a finished run without a row: measuring it")
            metrics = study.measure(run_dir, arm.name, budget, seed)
            report = json.loads((run_dir / "report.json").read_text())
            row = {
                "paper": study.paper, "arm": arm.name, "seed": seed, "budget": budget_name,
                "budget_settings": budget, "settings_id": key[3],
                "recipe": report.get("recipe") or arm.target, "model": report.get("model"),
                "data_source": report.get("data_source"),
                "train_examples": report.get("train_examples"),
                "test_examples": report.get("test_examples"),
                "epochs": report.get("epochs"), "training_seconds": report.get("training_seconds"),
                "wall_seconds": round(time.time() - started, 1),
                "metrics": metrics,
                # Paths relative to the repository (the run's cwd): runs from a frozen
                # copy and from a checkout read alike.
                "command": shlex.join(repository_relative(c) for c in command),
                "code_commit": commit, "code_path": repository_relative(code),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            append_row(results, row)
            appended += 1
            done.add(key)
            log(f"row appended: {study.paper} {arm.name} seed {seed}: "
                + ", ".join(f"{m.key} {metrics[m.key]:.{m.decimals}f}" for m in study.metrics
                            if isinstance(metrics.get(m.key), (int, float))))
            if not keep_checkpoints:
                for name in ("checkpoints", "backup"):
                    shutil.rmtree(run_dir / name, ignore_errors=True)
    return appended


