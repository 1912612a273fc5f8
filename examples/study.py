"""Multi-seed studies of the papers' central claims, resumable, with intervals.

    python examples/study.py PAPER [--budget full] [--seeds N] [--print-only] [--markdown]

PAPER is one of `deepmoe` (004), `two_domain` (002), `eigen` (001), `shazeer` (003), or
`routing` (the routers of current MoE models on paper 003's classifier;
`examples/routing.py` runs it).
Each study has arms (a model or recipe and its settings); this script trains every arm
seed by seed (seed 0 of every arm, then seed 1, ...) through the public command line,
as a subprocess:

    keras-moe train RECIPE --set section.key=value ... --seed N --out RUN_DIR \\
        --train-size N --test-size N --no-export --deterministic

then reads the run directory's `report.json` and `history.jsonl` (and, where the study
needs numbers that the report does not hold, loads `model.keras` and measures them with
`keras_moe.analysis`), and appends one row per finished run to the results file
(default `zoo/results/PAPER.jsonl`): paper, arm, seed, budget, recipe and model, the
metrics, the exact command, the code's commit and the date. Rows already in the file
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

The DeepMoE arm `wide_layer_mean` cannot be expressed with `--set` (the L1 term's layer
weights are not a recipe setting), so it runs `examples/deepmoe_l1_normalisation.py
--term layer_mean` with the same flags instead; that script trains the same recipe
through the same runner and writes the same run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time
import warnings

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # analyse with the same copy of keras_moe that trains
    sys.path.insert(0, str(REPO))
PAPERS = ("deepmoe", "two_domain", "eigen", "shazeer", "routing")
CONFIDENCE = 0.95

# Statistics ------------------------------------------------------------------------------


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


# The results file ------------------------------------------------------------------------


def read_rows(path):
    """The rows of a results file (JSON lines); a torn last line is ignored with a warning.

    Raises:
        ValueError: A line other than the last is not a JSON object (the file is
            damaged: it names the line).
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    complete = text.endswith("\n") or not text
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = number == len(lines) or (number == len(lines) - 1 and lines[-1] == "")
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            if last:
                warnings.warn(f"{path}: ignoring a torn last line ({len(line)} characters: "
                              f"{error}); the next run appended replaces it", stacklevel=2)
                continue
            raise ValueError(f"{path}, line {number}: not a results row ({error})") from None
        if last and not complete:
            warnings.warn(f"{path}: ignoring an unterminated last line (a torn write)",
                          stacklevel=2)
            continue
        rows.append(row)
    return rows


def append_row(path, row):
    """Appends `row` as one JSON line with a single `write`, then fsyncs.

    A torn last line left by a crash (no newline at the end of the file) is cut off
    first, so the new row starts on a line of its own.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.lseek(fd, max(0, size - 65536), os.SEEK_SET)
            tail = os.read(fd, 65536)
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                keep = size - len(tail) + cut + 1 if cut >= 0 else (
                    0 if size <= 65536 else None)
                if keep is None:
                    raise ValueError(f"{path}: last line is longer than 64 KiB and torn")
                os.ftruncate(fd, keep)
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"{path}: short write ({written} of {len(data)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


# Studies --------------------------------------------------------------------------------


@dataclasses.dataclass
class Arm:
    """One arm: what `keras-moe train` runs, with which settings.

    `target` is the recipe or zoo model; `args` the arm's own flags (`--set ...`);
    `script` (optional) a repository script that takes the same flags instead of
    `keras-moe train TARGET` (see the module docstring).
    """

    name: str
    target: str
    args: tuple = ()
    description: str = ""
    script: tuple = ()


@dataclasses.dataclass
class Metric:
    """A scalar of a row's `metrics` shown in the table: key, label, decimals.

    `derive` (optional) computes it from the row's `metrics` instead (a number the
    row holds in another form, e.g. a count over the stored per-expert shares).
    """

    key: str
    label: str
    decimals: int = 4
    derive: object = None

    def value(self, metrics):
        """The metric's value in a row's `metrics` (None if absent)."""
        value = self.derive(metrics) if self.derive else metrics.get(self.key)
        return value if isinstance(value, (int, float)) else None


@dataclasses.dataclass
class Comparison:
    """A paired-by-seed comparison: `a - b` (or `a / b`) of one metric.

    `metric_b` defaults to `metric` (two arms); with `arm_a == arm_b` it compares two
    metrics of the same runs (e.g. layer 1 against layer 2).
    """

    label: str
    arm_a: str
    arm_b: str
    metric: str
    metric_b: str = None
    kind: str = "difference"
    decimals: int = 4


@dataclasses.dataclass
class Study:
    """A paper's study: arms, budgets (flags per arm), metrics, table and comparisons."""

    paper: str
    title: str
    card: str
    arms: list
    budgets: dict
    measure: object
    metrics: list
    comparisons: list
    notes: str = ""


# DeepMoE (004) ----------------------------------------------------------------------------

DEEPMOE_BUDGETS = {
    # 20,000 Fashion-MNIST images padded to 32x32x3 (2.5x the recipes' 8,000), 10 epochs
    # (2.5x their 4): DeepMoE 7 joint + 3 fine-tune, learning rate /10 at the fine-tune,
    # the baseline 10 epochs with the same drop; the whole 10,000-image test set.
    "full": {"seeds": 5, "train_size": 20000, "test_size": 10000, "joint": 7, "finetune": 3},
    "tiny": {"seeds": 1, "train_size": 256, "test_size": 256, "joint": 1, "finetune": 1},
}


def _deepmoe_args(arm, budget):
    joint, finetune = budget["joint"], budget["finetune"]
    common = ["--set", f"schedule.boundaries=[{joint}]"]
    if arm == "baseline":
        return ["--set", f"phases.0.epochs={joint + finetune}"] + common
    return ["--set", f"phases.0.epochs={joint}", "--set", f"phases.1.epochs={finetune}"] + common


def measure_deepmoe(run_dir, arm, budget, seed):
    """Test accuracy, MACs per example, gate density overall / per layer, and the
    density of every joint epoch's end (history.jsonl) with its minimum."""
    report = json.loads((run_dir / "report.json").read_text())
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()
               if line.strip()]
    deep = report.get("deepmoe")
    metrics = {
        "test_accuracy": report["test"]["accuracy"],
        "static_macs": report["static_macs"],
        "macs_millions": (deep["effective_macs"] if deep else report["static_macs"]) / 1e6,
        "parameters": report["parameters"],
    }
    if deep:
        per_layer = deep["gate_density_per_layer"]
        joint = [row for row in history if row["phase"] == "joint"]
        densities = [row["gate_density"] for row in joint]
        metrics.update(
            gate_density=deep["gate_density"],
            gate_density_per_layer=per_layer,
            min_layer_density=min(per_layer.values()),
            max_layer_density=max(per_layer.values()),
            joint_epoch_densities=densities,
            joint_epoch_gate_l1=[row.get("gate_l1") for row in joint],
            min_joint_epoch_density=min(densities),
            argmin_joint_epoch=int(densities.index(min(densities))),
            final_joint_density=densities[-1],
        )
        # The controller's lowest reading of each joint epoch (every 10 batches; runs
        # from before the controller logged it have none).
        readings = [row["gate_density_min"] for row in joint if "gate_density_min" in row]
        if readings:
            metrics["min_joint_density_reading"] = min(readings)
    else:
        metrics.update(gate_density=1.0, min_layer_density=1.0, max_layer_density=1.0)
    return metrics


def deepmoe_study():
    arms = [
        Arm("baseline", "resnet8_fashion_mnist", description="ResNet-8, no gates"),
        Arm("wide", "deepmoe_resnet8_fashion_mnist",
            description="wide-DeepMoE-8, lambda steered to 0.5 open (channel-weighted L1)"),
        Arm("narrow", "deepmoe_resnet8_fashion_mnist",
            ("--set", "model.wide=false", "--set", "phases.0.gate_density_target=0.75"),
            description="narrow DeepMoE-8, lambda steered to 0.75 open"),
        Arm("wide_layer_mean", "deepmoe_resnet8_fashion_mnist",
            description="wide-DeepMoE-8 with the layer-mean L1 term",
            script=("examples/deepmoe_l1_normalisation.py", "--term", "layer_mean")),
    ]
    metrics = [
        Metric("test_accuracy", "test accuracy"),
        Metric("macs_millions", "MACs per example (M, effective)", 2),
        Metric("gate_density", "gate density (test probe)", 3),
        Metric("min_layer_density", "lowest layer's density", 3),
        Metric("max_layer_density", "highest layer's density", 3),
        Metric("min_joint_epoch_density", "min density at a joint epoch's end", 3),
        Metric("min_joint_density_reading", "min density the controller read (joint)", 3),
    ]
    comparisons = [
        Comparison("wide - baseline", "wide", "baseline", "test_accuracy"),
        Comparison("wide / baseline", "wide", "baseline", "macs_millions", kind="ratio",
                   decimals=3),
        Comparison("narrow - baseline", "narrow", "baseline", "test_accuracy"),
        Comparison("narrow / baseline", "narrow", "baseline", "macs_millions", kind="ratio",
                   decimals=3),
        Comparison("layer-mean - channel-weighted", "wide_layer_mean", "wide",
                   "test_accuracy"),
        Comparison("layer-mean / channel-weighted", "wide_layer_mean", "wide",
                   "macs_millions", kind="ratio", decimals=3),
        Comparison("layer-mean - channel-weighted", "wide_layer_mean", "wide",
                   "min_layer_density", decimals=3),
        Comparison("layer-mean - channel-weighted", "wide_layer_mean", "wide",
                   "min_joint_epoch_density", decimals=3),
        Comparison("layer-mean - channel-weighted", "wide_layer_mean", "wide",
                   "min_joint_density_reading", decimals=3),
    ]
    return Study(
        "deepmoe", "DeepMoE (004): wide / narrow DeepMoE against the plain ResNet",
        "zoo/deepmoe.md", arms, DEEPMOE_BUDGETS, measure_deepmoe, metrics, comparisons,
        notes="MACs: effective multiply-adds per example on the first 1,024 test images "
              "(report.json), the baseline's static ones. Densities at the joint epochs' "
              "ends, and the lowest of the controller's readings (every 10 batches) in "
              "each joint epoch, come from history.jsonl; rows from before the "
              "controller logged its readings (commit d75a412 and earlier) have none.")


# Two-domain (002) -------------------------------------------------------------------------

TWO_DOMAIN_BUDGETS = {
    # All 2,876 training and 718 test images of the stand-in, the recipe
    # two_domain_moe_conv_gate's 10 epochs and the paper's batch of 128.
    "full": {"seeds": 5, "train_size": 0, "test_size": 0, "epochs": 10},
    "tiny": {"seeds": 1, "train_size": 256, "test_size": 128, "epochs": 1},
}
COLLAPSE_THRESHOLD = 0.05  # an expert whose mean gate over the test set is below this


def _two_domain_args(arm, budget):
    return ["--dataset", "two_domain", "--epochs", str(budget["epochs"]), "--batch-size", "128"]


def _numpy_split(name, split, seed, normalize, size):
    """The first `size` (0: all) examples of a split as the runner feeds them, unbatched
    and unshuffled, as numpy: (features dict, labels)."""
    import numpy as np

    from keras_moe import data

    ds = data.load(name, split, batch_size=None, seed=seed, shuffle=False, augment=False,
                   normalize=normalize, with_extras=True, download=False)
    if size:
        ds = ds.take(size)
    features, labels = next(iter(ds.batch(1 << 20)))
    if not isinstance(features, dict):  # a set without extras: the images alone
        features = {"image": features}
    return {k: np.asarray(v) for k, v in features.items()}, np.asarray(labels)


def _load_model(run_dir):
    import keras

    import keras_moe  # noqa: F401  (registers the serializable layers)

    return keras.saving.load_model(run_dir / "model.keras", safe_mode=True)


def _check_accuracy(accuracy, report, what):
    """The analysis must see the data the run was tested on: same test accuracy."""
    reported = report["test"]["accuracy"]
    if abs(accuracy - reported) > 2e-3:
        raise RuntimeError(
            f"{what}: accuracy {accuracy:.4f} on the analysis's test data differs from "
            f"report.json's {reported:.4f}; the study reads different data than the run")


def measure_two_domain(run_dir, arm, budget, seed):
    """Test accuracy, the [domain x expert] activation rates on the test set, their
    diagonal share and whether the gate collapsed onto one expert."""
    import numpy as np

    from keras_moe.analysis import activation_rates
    from keras_moe.zoo.two_domain import two_domain_gate_model

    report = json.loads((run_dir / "report.json").read_text())
    model = _load_model(run_dir)
    features, labels = _numpy_split("two_domain", "test", seed, "unit", budget["test_size"])
    oracle = arm == "oracle"
    inputs = features if oracle else features["image"]
    logits = model.predict(inputs, batch_size=256, verbose=0)
    accuracy = float(np.mean(np.argmax(logits, -1) == labels))
    _check_accuracy(accuracy, report, f"{run_dir}")
    gates = two_domain_gate_model(model).predict(inputs, batch_size=256, verbose=0)
    rates = activation_rates(gates, features["domain"], num_groups=2)
    diagonal = max(rates[0, 0] + rates[1, 1], rates[0, 1] + rates[1, 0]) / 2
    expert_mean = gates.mean(0)
    return {
        "test_accuracy": report["test"]["accuracy"],
        "activation_rates_test": rates.tolist(),
        "diagonal_share": float(diagonal),
        "expert_mean_gate": expert_mean.tolist(),
        "min_expert_mean_gate": float(expert_mean.min()),
        "collapsed": int(expert_mean.min() < COLLAPSE_THRESHOLD),
        "test_examples": int(len(labels)),
    }


def two_domain_study():
    arms = []
    for gate in ("conv", "dense"):
        for loss in ("none", "entropy", "variance"):
            extra = ("--set", f"model.gate={gate}")
            if loss != "none":
                extra += ("--set", f"losses.gate_loss={loss}")
            arms.append(Arm(f"{gate}_{loss}", "two_domain_moe", extra,
                            description=f"{gate} gate, gate loss {loss}"))
    arms.append(Arm("oracle", "two_domain_moe",
                    ("--set", "model.gate=oracle", "--set", "data.with_extras=true"),
                    description="oracle gate (the paper's baseline: two distinct experts)"))
    metrics = [
        Metric("test_accuracy", "test accuracy"),
        Metric("collapsed", f"collapsed (an expert's mean gate < {COLLAPSE_THRESHOLD})", 2),
        Metric("min_expert_mean_gate", "least-used expert's mean gate", 3),
        Metric("diagonal_share", "activation-rate diagonal share", 3),
    ]
    comparisons = []
    for gate in ("conv", "dense"):
        for loss in ("entropy", "variance"):
            for metric, decimals in (("diagonal_share", 3), ("test_accuracy", 4)):
                comparisons.append(Comparison(f"{gate}: {loss} - none", f"{gate}_{loss}",
                                              f"{gate}_none", metric, decimals=decimals))
    comparisons += [
        Comparison("conv - dense (no loss)", "conv_none", "dense_none", "min_expert_mean_gate",
                   decimals=3),
        Comparison("oracle - conv (no loss)", "oracle", "conv_none", "test_accuracy"),
        Comparison("oracle - dense (no loss)", "oracle", "dense_none", "test_accuracy"),
    ]
    return Study(
        "two_domain", "Two-domain MoE (002): gate collapse and domain split",
        "zoo/two_domain_moe.md", arms, TWO_DOMAIN_BUDGETS, measure_two_domain, metrics,
        comparisons,
        notes="Data: the library's offline stand-in for MNIST + CIFAR-10 (scikit-learn "
              "digits + Fashion-MNIST, balanced), not the paper's sets. Diagonal share: "
              "the mean gate of each domain's own expert under the better of the two "
              "expert-to-domain matchings (1: split by domain, 0.5: no split or collapse). "
              "Collapse rate = mean of `collapsed`.")


# Eigen (001) ------------------------------------------------------------------------------

EIGEN_BUDGETS = {
    # The recipe eigen_dmoe_jittered_mnist's budget: 20 constrained + 10 free epochs on
    # all 60,000 training images (the DNN: 30 plain epochs), the 10,000 test images.
    "full": {"seeds": 5, "train_size": 0, "test_size": 0, "constrained": 20, "free": 10},
    "tiny": {"seeds": 1, "train_size": 512, "test_size": 256, "constrained": 1, "free": 1},
}


def _eigen_args(arm, budget):
    if arm == "dnn":
        return ["--set", f"phases.0.epochs={budget['constrained'] + budget['free']}"]
    return ["--set", f"phases.0.epochs={budget['constrained']}",
            "--set", f"phases.1.epochs={budget['free']}"]


def measure_eigen(run_dir, arm, budget, seed):
    """Test and training error (inference mode) and, per MoE layer, how much the argmax
    expert depends on translation and on class: U(expert | group) and the arithmetic
    NMI, with the experts' shares."""
    import numpy as np

    from keras_moe import data
    from keras_moe.analysis import gating

    report = json.loads((run_dir / "report.json").read_text())
    model = _load_model(run_dir)
    test, test_labels = _numpy_split("jittered_mnist", "test", seed, "none", budget["test_size"])
    train, train_labels = _numpy_split("jittered_mnist", "train", seed, "none",
                                       budget["train_size"])
    test_logits = model.predict(test["image"], batch_size=1024, verbose=0)
    accuracy = float(np.mean(np.argmax(test_logits, -1) == test_labels))
    _check_accuracy(accuracy, report, f"{run_dir}")
    train_logits = model.predict(train["image"], batch_size=1024, verbose=0)
    metrics = {
        "test_accuracy": report["test"]["accuracy"],
        "test_error": 100.0 * (1.0 - report["test"]["accuracy"]),
        "train_error": 100.0 * float(np.mean(np.argmax(train_logits, -1) != train_labels)),
    }
    try:
        gate_model = gating.gating_model(model)
    except ValueError:
        return metrics  # the DNN has no gates
    gates = gate_model.predict(test["image"], batch_size=1024, verbose=0)
    gates = gates if isinstance(gates, list) else [gates]
    side = 2 * 4 + 1
    cells = data.offset_index(test["offset"], 4)
    for layer, g in enumerate(gates, 1):
        metrics[f"u_translation_layer{layer}"] = gating.routing_mutual_information(
            g, cells, side * side, "expert")
        metrics[f"u_class_layer{layer}"] = gating.routing_mutual_information(
            g, test_labels, 10, "expert")
        metrics[f"nmi_translation_layer{layer}"] = gating.routing_mutual_information(
            g, cells, side * side, "arithmetic")
        metrics[f"nmi_class_layer{layer}"] = gating.routing_mutual_information(
            g, test_labels, 10, "arithmetic")
        counts = np.bincount(np.argmax(g, 1), minlength=g.shape[1])
        metrics[f"expert_share_layer{layer}"] = (counts / len(g)).tolist()
    return metrics


def eigen_study():
    arms = [
        Arm("dmoe", "eigen_dmoe_jittered_mnist", description="DMoE 4x100-4x100, gates 50-50"),
        Arm("single", "eigen_dmoe_jittered_mnist", ("--set", "model.second_layer=single"),
            description="first layer a mixture, second one ReLU expert"),
        Arm("concat", "eigen_dmoe_jittered_mnist", ("--set", "model.second_layer=concat"),
            description="first layer a mixture, second the 4 experts concatenated"),
        Arm("dnn", "eigen_dnn_jittered_mnist",
            description="DNN with the DMoE's parameter count (631,157 vs 630,518)"),
    ]
    metrics = [Metric("test_error", "test error %", 2), Metric("train_error", "training error %", 2)]
    for layer in (1, 2):
        metrics += [Metric(f"u_translation_layer{layer}", f"U(expert given translation), layer {layer}", 3),
                    Metric(f"u_class_layer{layer}", f"U(expert given class), layer {layer}", 3),
                    Metric(f"nmi_translation_layer{layer}", f"NMI(expert, translation), layer {layer}", 3),
                    Metric(f"nmi_class_layer{layer}", f"NMI(expert, class), layer {layer}", 3)]
    comparisons = [
        Comparison("DMoE - concat", "dmoe", "concat", "test_error", decimals=2),
        Comparison("single - DMoE", "single", "dmoe", "test_error", decimals=2),
        Comparison("DMoE - DNN", "dmoe", "dnn", "test_error", decimals=2),
        Comparison("DMoE - concat", "dmoe", "concat", "train_error", decimals=2),
        Comparison("single - DMoE", "single", "dmoe", "train_error", decimals=2),
        Comparison("DMoE - DNN", "dmoe", "dnn", "train_error", decimals=2),
        Comparison("DMoE: layer 1 - layer 2", "dmoe", "dmoe", "u_translation_layer1",
                   metric_b="u_translation_layer2", decimals=3),
        Comparison("DMoE: layer 2 - layer 1", "dmoe", "dmoe", "u_class_layer2",
                   metric_b="u_class_layer1", decimals=3),
        Comparison("DMoE layer 1: translation - class", "dmoe", "dmoe", "u_translation_layer1",
                   metric_b="u_class_layer1", decimals=3),
        Comparison("DMoE layer 2: class - translation", "dmoe", "dmoe", "u_class_layer2",
                   metric_b="u_translation_layer2", decimals=3),
    ]
    return Study(
        "eigen", "Eigen et al. (001): Table 1's ordering and the where / what split",
        "zoo/eigen_dmoe.md", arms, EIGEN_BUDGETS, measure_eigen, metrics, comparisons,
        notes="Data: jittered Fashion-MNIST, the library's offline stand-in for jittered "
              "MNIST (36x36, +-4 px). U(expert given group) = I(argmax expert; "
              "group) / H(argmax expert) on the test set; NMI: arithmetic normalisation. Training "
              "error in inference mode on the training images.")


# Shazeer (003) ----------------------------------------------------------------------------

SHAZEER_BUDGETS = {
    # The default recipe's budget: 6 epochs on all 60,000 images, 10,000 test images.
    "full": {"seeds": 5, "train_size": 0, "test_size": 0, "epochs": 6},
    "tiny": {"seeds": 1, "train_size": 256, "test_size": 256, "epochs": 1},
}


def _shazeer_args(arm, budget):
    return ["--epochs", str(budget["epochs"])]


def measure_shazeer(run_dir, arm, budget, seed):
    """Test accuracy and the MoE layer's CV of importance and load, share per expert and
    mean gate entropy (report.json: on the first 1,024 test images)."""
    report = json.loads((run_dir / "report.json").read_text())
    (layer, stats), = report["moe"].items()
    return {
        "test_accuracy": report["test"]["accuracy"],
        "importance_cv": stats["importance_cv"],
        "load_cv": stats["load_cv"],
        "gate_entropy": stats["gate_entropy"],
        "share": stats["share"],
        "min_share": min(stats["share"]),
        "max_share": max(stats["share"]),
        "layer": layer,
    }


def shazeer_study():
    arms = [
        Arm("balanced", "sparse_moe_fashion_mnist",
            description="importance and load losses 0.1 each (the paper's)"),
        Arm("unbalanced", "sparse_moe_fashion_mnist",
            ("--set", "losses.importance_weight=0.0", "--set", "losses.load_weight=0.0"),
            description="no balancing loss"),
    ]
    metrics = [
        Metric("test_accuracy", "test accuracy"),
        Metric("importance_cv", "CV of importance", 3),
        Metric("load_cv", "CV of load", 3),
        Metric("max_share", "busiest expert's share", 3),
        Metric("min_share", "idlest expert's share", 3),
        Metric("experts_used", "experts with more than 1% of the assignments", 1,
               derive=lambda m: sum(share > 0.01 for share in m["share"])),
    ]
    comparisons = [
        Comparison("balanced - unbalanced", "balanced", "unbalanced", metric, decimals=d)
        for metric, d in (("test_accuracy", 4), ("importance_cv", 3), ("load_cv", 3),
                          ("max_share", 3))
    ]
    return Study(
        "shazeer", "Shazeer et al. (003): the balancing losses", "zoo/sparse_moe_classifier.md",
        arms, SHAZEER_BUDGETS, measure_shazeer, metrics, comparisons,
        notes="8 experts, top-2 (the default recipe). CVs and shares: report.json, on the "
              "first 1,024 test images; share = fraction of the top-k assignments.")


# Routing since 2017 (on 003's classifier) --------------------------------------------------

ROUTING_BUDGETS = {
    # The default recipe's budget with 32 experts, top-2: 6 epochs on all 60,000 images.
    "full": {"seeds": 3, "train_size": 0, "test_size": 0, "epochs": 6},
    "tiny": {"seeds": 1, "train_size": 256, "test_size": 256, "epochs": 1},
}
ROUTING_EXPERTS, ROUTING_TOP_K = 32, 2
# Every arm but the paper's turns the recipe's importance and load losses off.
_NO_AUX = ("--set", "losses.importance_weight=0.0", "--set", "losses.load_weight=0.0")


def _routing_args(arm, budget):
    return ["--epochs", str(budget["epochs"]), "--set", f"model.num_experts={ROUTING_EXPERTS}",
            "--set", f"model.top_k={ROUTING_TOP_K}"]


def routing_arms():
    """The balancing ways of issue 16, each an `Arm` of the default recipe."""
    return [
        Arm("none", "sparse_moe_fashion_mnist", _NO_AUX,
            description="noisy top-2, no balancing"),
        Arm("importance_load", "sparse_moe_fashion_mnist",
            description="noisy top-2, importance and load losses 0.1 each (Shazeer)"),
        Arm("switch_z", "sparse_moe_fashion_mnist",
            _NO_AUX + ("--set", "model.gate=softmax", "--set", "losses.switch_weight=0.01",
                       "--set", "losses.z_loss_weight=0.001"),
            description="softmax top-2, Switch loss 0.01 and z-loss 0.001 (Fedus, Zoph)"),
        Arm("aux_free", "sparse_moe_fashion_mnist",
            _NO_AUX + ("--set", "model.gate=softmax", "--set", "model.bias_update_rate=0.001"),
            description="softmax top-2, auxiliary-loss-free bias, rate 0.001 (Wang et al.)"),
        Arm("expert_choice", "sparse_moe_fashion_mnist",
            _NO_AUX + ("--set", "model.gate=expert_choice"),
            description="expert choice, capacity factor 2 (Zhou et al.)"),
        Arm("sigmoid_aux_free_shared", "sparse_moe_fashion_mnist",
            _NO_AUX + ("--set", "model.gate=sigmoid_top_k", "--set",
                       "model.bias_update_rate=0.001", "--set", "model.num_shared_experts=1"),
            description="sigmoid top-2, bias rate 0.001, one shared expert (DeepSeek-V3)"),
    ]


def measure_routing(run_dir, arm, budget, seed):
    """The Shazeer study's numbers, the share of tokens dropped or left without an
    expert on the test images (in the report's evaluation batches), and the wall time
    per training step (report.json's training time over the steps; the runs share a
    machine, so `examples/routing.py` also times the arms side by side)."""
    import math

    import numpy as np

    from keras_moe.layers import MoEDense

    metrics = measure_shazeer(run_dir, arm, budget, seed)
    report = json.loads((run_dir / "report.json").read_text())
    model = _load_model(run_dir)
    layers = [layer for layer in model.layers if isinstance(layer, MoEDense)]
    for layer in layers:
        layer.reset_drop_counters()
    features, labels = _numpy_split("fashion_mnist", "test", seed, "auto", budget["test_size"])
    # The batches the run's report evaluated (max(batch size, 256)): expert choice
    # chooses within a batch, so its outputs depend on the batch.
    logits = model.predict(features["image"], batch_size=256, verbose=0)
    _check_accuracy(float(np.mean(np.argmax(logits, -1) == labels)), report, run_dir.name)
    metrics["dropped_fraction"] = max(layer.dropped_fraction for layer in layers)
    steps = report["epochs"] * math.ceil(report["train_examples"] / 128)
    metrics["ms_per_step"] = 1000.0 * report["training_seconds"] / steps
    return metrics


def routing_study():
    metrics = [
        Metric("test_accuracy", "test accuracy"),
        Metric("load_cv", "CV of load", 3),
        Metric("importance_cv", "CV of importance", 3),
        Metric("min_share", "least-used expert's share", 4),
        Metric("max_share", "busiest expert's share", 3),
        Metric("dropped_fraction", "tokens dropped or without an expert", 4),
        Metric("ms_per_step", "wall ms per training step (shared machine)", 1),
    ]
    comparisons = [
        Comparison(f"{arm} - importance_load", arm, "importance_load", metric, decimals=d)
        for arm in ("aux_free", "sigmoid_aux_free_shared", "switch_z", "expert_choice")
        for metric, d in (("test_accuracy", 4), ("load_cv", 3))
    ]
    return Study(
        "routing", "Routing since 2017 on Shazeer's classifier: the balancing ways",
        "zoo/sparse_moe_classifier.md", routing_arms(), ROUTING_BUDGETS, measure_routing,
        metrics, comparisons,
        notes=f"{ROUTING_EXPERTS} experts, top-{ROUTING_TOP_K} (expert choice: capacity "
              "factor 2, the same mean experts per image). CVs and shares: report.json, on "
              "the first 1,024 test images; share = fraction of the assignments.")


ARGS_FOR_BUDGET = {"deepmoe": _deepmoe_args, "two_domain": _two_domain_args,
                   "eigen": _eigen_args, "shazeer": _shazeer_args, "routing": _routing_args}
STUDIES = {"deepmoe": deepmoe_study, "two_domain": two_domain_study, "eigen": eigen_study,
           "shazeer": shazeer_study, "routing": routing_study}


def get_study(paper):
    """The `Study` of `paper` (one of `PAPERS`)."""
    if paper not in STUDIES:
        raise ValueError(f"unknown paper {paper!r}; one of {', '.join(PAPERS)}")
    return STUDIES[paper]()


# Running --------------------------------------------------------------------------------


def train_command(study, arm, budget_name, seed, run_dir, deterministic=True):
    """The argv of one run (`keras-moe train ...`, or the arm's script with the same flags)."""
    budget = study.budgets[budget_name]
    flags = list(arm.args) + ARGS_FOR_BUDGET[study.paper](arm.name, budget) + [
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
    (and without the interpreter's and the repository's paths)."""
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
        elif token.startswith(str(REPO) + os.sep):
            token = os.path.relpath(token, REPO)
        kept.append(token)
    return hashlib.sha1(json.dumps(kept).encode()).hexdigest()[:12]


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
    done = {(r["arm"], r["seed"], r["budget"], r["settings_id"]) for r in read_rows(results)}
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
                log(f"skip {study.paper} {arm.name} seed {seed}: in {results}")
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
                "command": shlex.join(command),
                "code_commit": commit, "code_path": code,
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


# The table ------------------------------------------------------------------------------


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
    planned = {(a.name, s) for a in study.arms for s in range(budget["seeds"])}
    done = {(r["arm"], r["seed"]) for r in rows}
    return {"paper": study.paper, "budget": budget_name, "budget_settings": budget,
            "runs_done": len(done & planned), "runs_planned": len(planned),
            "runs_beyond_plan": len(done - planned),
            "rows_with_other_settings": stale, "arms": arms, "comparisons": comparisons}


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
    flag = "" if budget == "full" else f" --budget {budget}"
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paper", choices=PAPERS)
    parser.add_argument("--budget", default="full", help="a budget of the study (full, tiny)")
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
                             "its study-table markers")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    study = get_study(args.paper)
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
    table = compute_table(study, read_rows(results), args.budget, deterministic)
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
