"""The routers of current MoE models (issue 16) on paper 003's classifier: the balancing
ways side by side (`examples/routing.py` also times them)."""

import json

from studies.base import Arm, Metric, Comparison, Study, numpy_split, load_model, check_accuracy
from studies.shazeer import measure_shazeer

BUDGETS = {
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
    model = load_model(run_dir)
    layers = [layer for layer in model.layers if isinstance(layer, MoEDense)]
    for layer in layers:
        layer.reset_drop_counters()
    features, labels = numpy_split("fashion_mnist", "test", seed, "auto", budget["test_size"])
    # The batches the run's report evaluated (max(batch size, 256)): expert choice
    # chooses within a batch, so its outputs depend on the batch.
    logits = model.predict(features["image"], batch_size=256, verbose=0)
    check_accuracy(float(np.mean(np.argmax(logits, -1) == labels)), report, run_dir.name)
    metrics["dropped_fraction"] = max(layer.dropped_fraction for layer in layers)
    steps = report["epochs"] * math.ceil(report["train_examples"] / 128)
    metrics["ms_per_step"] = 1000.0 * report["training_seconds"] / steps
    return metrics


def study():
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
        "zoo/sparse_moe_classifier.md", routing_arms(), BUDGETS, measure_routing,
        metrics, comparisons,
        flags=_routing_args,
        notes=f"{ROUTING_EXPERTS} experts, top-{ROUTING_TOP_K} (expert choice: capacity "
              "factor 2, the same mean experts per image). CVs and shares: report.json, on "
              "the first 1,024 test images; share = fraction of the assignments.")
