"""Two-domain MoE (002): how often the conv and the dense gate collapse, and whether the
entropy and variance losses split the gate by domain."""

import json

from studies.base import Arm, Metric, Comparison, Study, numpy_split, load_model, check_accuracy

BUDGETS = {
    # All 2,876 training and 718 test images of the stand-in, the recipe
    # two_domain_moe_conv_gate's 10 epochs and the paper's batch of 128.
    "full": {"seeds": 5, "train_size": 0, "test_size": 0, "epochs": 10},
    "tiny": {"seeds": 1, "train_size": 256, "test_size": 128, "epochs": 1},
}
COLLAPSE_THRESHOLD = 0.05  # an expert whose mean gate over the test set is below this


def _two_domain_args(arm, budget):
    return ["--dataset", "two_domain", "--epochs", str(budget["epochs"]), "--batch-size", "128"]


def measure_two_domain(run_dir, arm, budget, seed):
    """Test accuracy, the [domain x expert] activation rates on the test set, their
    diagonal share and whether the gate collapsed onto one expert."""
    import numpy as np

    from keras_moe.analysis import activation_rates
    from keras_moe.analysis.gates import gate_model

    report = json.loads((run_dir / "report.json").read_text())
    model = load_model(run_dir)
    features, labels = numpy_split("two_domain", "test", seed, "unit", budget["test_size"])
    oracle = arm == "oracle"
    inputs = features if oracle else features["image"]
    logits = model.predict(inputs, batch_size=256, verbose=0)
    accuracy = float(np.mean(np.argmax(logits, -1) == labels))
    check_accuracy(accuracy, report, f"{run_dir}")
    gates = gate_model(model, "mixture").predict(inputs, batch_size=256, verbose=0)
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


def study():
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
        "zoo/two_domain_moe.md", arms, BUDGETS, measure_two_domain, metrics,
        comparisons,
        flags=_two_domain_args,
        notes="Data: the library's offline stand-in for MNIST + CIFAR-10 (scikit-learn "
              "digits + Fashion-MNIST, balanced), not the paper's sets. Diagonal share: "
              "the mean gate of each domain's own expert under the better of the two "
              "expert-to-domain matchings (1: split by domain, 0.5: no split or collapse). "
              "Collapse rate = mean of `collapsed`.")
