"""DeepMoE (004): wide / narrow DeepMoE against the plain ResNet, and the open choices of
the last round (the L1 term's layer weights, the density controller's undershoot)."""

import json

from studies.base import Arm, Metric, Comparison, Study
from studies.deepmoe_arms import DEEPMOE_RECIPE, PLAIN_RECIPE

BUDGETS = {
    # 20,000 Fashion-MNIST images padded to 32x32x3 (2.5x the recipes' 8,000), 10 epochs
    # (2.5x their 4): DeepMoE 7 joint + 3 fine-tune, learning rate /10 at the fine-tune,
    # the baseline 10 epochs with the same drop; the whole 10,000-image test set.
    "full": {"seeds": 5, "train_size": 20000, "test_size": 10000, "joint": 7, "finetune": 3},
    # tiny: 10 batches, so that the density controller reads once (every 10 batches).
    "tiny": {"seeds": 1, "train_size": 1280, "test_size": 256, "joint": 1, "finetune": 1},
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
    from keras_moe.training.run_dir import read_history

    report = json.loads((run_dir / "report.json").read_text())
    history = read_history(run_dir)  # the runner's reader: re-run epochs, torn lines
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


def study():
    arms = [
        Arm("baseline", PLAIN_RECIPE, description="ResNet-8, no gates"),
        Arm("wide", DEEPMOE_RECIPE,
            description="wide-DeepMoE-8, lambda steered to 0.5 open (channel-weighted L1)"),
        Arm("narrow", DEEPMOE_RECIPE,
            ("--set", "model.wide=false", "--set", "phases.0.gate_density_target=0.75"),
            description="narrow DeepMoE-8, lambda steered to 0.75 open"),
        Arm("wide_layer_mean", DEEPMOE_RECIPE,
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
        "zoo/deepmoe.md", arms, BUDGETS, measure_deepmoe, metrics, comparisons,
        flags=_deepmoe_args,
        notes="MACs: effective multiply-adds per example on the first 1,024 test images "
              "(report.json), the baseline's static ones. Densities at the joint epochs' "
              "ends, and the lowest of the controller's readings (every 10 batches) in "
              "each joint epoch, come from history.jsonl; rows from before the "
              "controller logged its readings (commit d75a412 and earlier) have none.")
