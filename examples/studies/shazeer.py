"""Shazeer et al. (003): the balancing losses' effect on the CV of load and importance
and on accuracy."""

import json

from studies.base import Arm, Metric, Comparison, Study

BUDGETS = {
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


def study():
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
        arms, BUDGETS, measure_shazeer, metrics, comparisons,
        flags=_shazeer_args,
        notes="8 experts, top-2 (the default recipe). CVs and shares: report.json, on the "
              "first 1,024 test images; share = fraction of the top-k assignments.")
