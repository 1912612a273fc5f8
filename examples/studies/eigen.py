"""Eigen et al. (001): Table 1's ordering (concat <= DMoE <= single, DMoE ~ DNN) and the
where / what split of the two mixture layers, as uncertainty coefficients and NMI."""

import json

from studies.base import Arm, Metric, Comparison, Study, numpy_split, load_model, check_accuracy

BUDGETS = {
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
    model = load_model(run_dir)
    test, test_labels = numpy_split("jittered_mnist", "test", seed, "none", budget["test_size"])
    train, train_labels = numpy_split("jittered_mnist", "train", seed, "none",
                                       budget["train_size"])
    test_logits = model.predict(test["image"], batch_size=1024, verbose=0)
    accuracy = float(np.mean(np.argmax(test_logits, -1) == test_labels))
    check_accuracy(accuracy, report, f"{run_dir}")
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


def study():
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
        "zoo/eigen_dmoe.md", arms, BUDGETS, measure_eigen, metrics, comparisons,
        flags=_eigen_args,
        notes="Data: jittered Fashion-MNIST, the library's offline stand-in for jittered "
              "MNIST (36x36, +-4 px). U(expert given group) = I(argmax expert; "
              "group) / H(argmax expert) on the test set; NMI: arithmetic normalisation. Training "
              "error in inference mode on the training images.")
