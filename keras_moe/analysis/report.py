"""The final report of a training run: test metrics, expert use, gate density, FLOPs, plots.

`make_report(model, data, history)` gathers the numbers, `format_report` prints them and
`plot_report` draws them (training curves with the phases marked, and expert shares per
MoE layer or gate density per gated conv). `keras-moe train` and `keras-moe evaluate`
write them as `report.txt`, `report.json` and `report.png` in the run directory.
"""

from __future__ import annotations

import json
import math

import numpy as np

__all__ = ["format_report", "make_report", "plot_report", "probabilities", "write_report"]


def probabilities(model, images, batch_size=256):
    """Class probabilities of `model` (which outputs logits) on `images`, as the serving
    signature computes them: softmax over the last axis in float32, inference mode."""
    import keras

    logits = model.predict(images, batch_size=batch_size, verbose=0)
    if isinstance(logits, dict):
        logits = logits["logits"]
    return keras.ops.convert_to_numpy(
        keras.ops.softmax(keras.ops.cast(logits, "float32"), axis=-1))


def make_report(model, data, history=(), *, recipe=None, seconds=None):
    """Evaluates `model` on `data.test` and collects what the report shows.

    Args:
        model: A compiled Keras model (any zoo model).
        data: A `keras_moe.training.runner.RecipeData`.
        history: Rows of `history.jsonl` (dicts with `phase`, `epoch` and the logs), or
            None when the model's training history is unknown (a bare `.keras` file).
        recipe: The `keras_moe.recipes.Recipe` that was run, if any.
        seconds: Training time, if known.

    Returns:
        A JSON-ready dict: `test` (loss, accuracy), `parameters`, `static_macs` (per
        example, None when the graph cannot be read), `moe` (per MoE layer: `share`,
        `importance_cv`, `load_cv`, `gate_entropy`, on the probe), `deepmoe` (gate
        density overall and per gated conv, effective MACs, on the probe) and what
        was run.
    """
    from keras_moe.analysis import flops, gates, graph

    test = model.evaluate(data.test, verbose=0, return_dict=True)
    known = history is not None
    history = list(history or ())
    report = {
        "model": model.name,
        "recipe": recipe.name if recipe is not None else None,
        "dataset": getattr(recipe.data, "dataset", None) if recipe is not None else None,
        "data_source": data.source,
        "train_examples": data.train_examples,
        "test_examples": data.test_examples,
        "epochs": len(history) if known else None,
        "phases": _phase_spans(history),
        "training_seconds": seconds,
        "parameters": int(model.count_params()),
        "test": {k: float(v) for k, v in test.items()},
    }
    from keras_moe.layers.expert_clusters import ExpertClusters
    from keras_moe.layers.tsne_gate import TSNEGate

    uncounted = (TSNEGate, ExpertClusters)  # static_flops does not count them
    try:
        if any(isinstance(layer, uncounted) for layer in graph.layers(model, include_self=True)):
            report["static_macs"] = None
        else:
            report["static_macs"] = int(flops.static_flops(model))
    except (ValueError, TypeError):
        report["static_macs"] = None
    report["moe"] = {}
    if gates.moe_layers(model):
        for name, stats in gates.gate_statistics(model, data.probe).items():
            report["moe"][name] = {
                "share": [float(s) for s in stats["share"]],
                "importance_cv": stats["importance_cv"],
                "load_cv": stats["load_cv"],
                "gate_entropy": stats["gate_entropy"],
            }
    report["deepmoe"] = None
    if gates.gated_convolutions(model):
        per_layer, overall = gates.densities(
            gates.gate_values(model, data.probe, kinds=("gated_conv",)))
        report["deepmoe"] = {
            "gate_density": float(overall),
            "gate_density_per_layer": {k: float(v) for k, v in per_layer.items()},
            "effective_macs": float(flops.effective_flops(model, data.probe).total),
            "gate_l1": float(getattr(model, "gate_l1", 0.0)),
            "embedding_loss_weight": float(getattr(model, "embedding_loss_weight", 0.0)),
        }
    return report


def _phase_spans(history):
    spans = []
    for row in history:
        if spans and spans[-1]["name"] == row["phase"]:
            spans[-1]["last_epoch"] = row["epoch"]
        else:
            spans.append({"name": row["phase"], "first_epoch": row["epoch"],
                          "last_epoch": row["epoch"]})
    return spans


def _macs(value):
    if value is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def format_report(report):
    """The report as text (what `keras-moe train` prints and writes to `report.txt`)."""
    lines = [f"model {report['model']}" + (f" (recipe {report['recipe']})" if report["recipe"]
                                          else "")]
    lines.append(f"data {report['dataset'] or ''}: {report['train_examples']} training, "
                 f"{report['test_examples']} test examples ({report['data_source']})")
    phases = ", ".join(
        f"{p['name']} epoch{'s' if p['last_epoch'] > p['first_epoch'] else ''} "
        f"{p['first_epoch'] + 1}" + (f"-{p['last_epoch'] + 1}"
                                     if p["last_epoch"] > p["first_epoch"] else "")
        for p in report["phases"])
    took = report["training_seconds"]
    if report["epochs"] is None:
        lines.append("trained for an unknown number of epochs (no run directory with a "
                     "history beside the model)")
    else:
        lines.append(f"trained {report['epochs']} epoch{'s' if report['epochs'] != 1 else ''}"
                     + (f" ({phases})" if phases else "")
                     + (f" in {took:.0f} s" if took is not None else ""))
    lines.append(f"parameters {report['parameters']:,}; static MACs per example "
                 f"{_macs(report['static_macs'])}")
    test = report["test"]
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in test.items())
    lines.append(f"test: {metrics}")
    for name, stats in report["moe"].items():
        shares = " ".join(f"{s:.3f}" for s in stats["share"])
        lines.append(f"{name}: share of assignments per expert [{shares}]")
        lines.append(f"{name}: CV of importance {stats['importance_cv']:.3f}, CV of load "
                     f"{stats['load_cv']:.3f}, mean gate entropy {stats['gate_entropy']:.3f} nats")
    deep = report["deepmoe"]
    if deep:
        lines.append(f"DeepMoE gate density {deep['gate_density']:.3f} (fraction of gated "
                     f"channels open); effective MACs {_macs(deep['effective_macs'])} = "
                     + (f"{deep['effective_macs'] / report['static_macs']:.2f} x static"
                        if report["static_macs"] else "n/a"))
        densities = deep["gate_density_per_layer"]
        low = min(densities, key=densities.get)
        lines.append(f"gate density per gated conv: min {densities[low]:.3f} ({low}), max "
                     f"{max(densities.values()):.3f}; lambda {deep['gate_l1']:g}, mu "
                     f"{deep['embedding_loss_weight']:g}")
    return "\n".join(lines)


def plot_report(report, history, path):
    """Draws training curves and expert use / gate density into a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] + 1 for row in history]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, metric in zip(axes[:2], ("loss", "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = [row.get(prefix + metric, math.nan) for row in history]
            if any(np.isfinite(values)):
                axis.plot(epochs, values, style, marker="o",
                          label="test" if prefix else "train")
        for span in report["phases"][1:]:
            axis.axvline(span["first_epoch"] + 0.5, color="gray", linestyle=":")
            axis.text(span["first_epoch"] + 0.6, axis.get_ylim()[1], span["name"],
                      va="top", fontsize=8, color="gray")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        if axis.lines:
            axis.legend()
    axis = axes[2]
    if report["moe"]:
        names = list(report["moe"])
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            share = report["moe"][name]["share"]
            axis.bar(np.arange(len(share)) + i * width, share, width, label=name)
            axis.axhline(1 / len(share), color="gray", linestyle=":")
        axis.set_xlabel("expert")
        axis.set_ylabel("share of assignments (test probe)")
        axis.set_title("expert use")
        axis.legend(fontsize=8)
    elif report["deepmoe"]:
        densities = report["deepmoe"]["gate_density_per_layer"]
        axis.bar(range(len(densities)), list(densities.values()))
        axis.set_ylim(0, 1.05)
        axis.set_xlabel("gated convolution (input to output)")
        axis.set_ylabel("fraction of channels open")
        axis.set_title(f"gate density (overall {report['deepmoe']['gate_density']:.2f})")
    else:
        axis.axis("off")
        axis.text(0.5, 0.5, "no MoE layer", ha="center")
    figure.suptitle(f"{report['model']}: test accuracy "
                    f"{report['test'].get('accuracy', math.nan):.4f}")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def write_report(report, history, run_dir):
    """Writes `report.txt`, `report.json` and `report.png` into `run_dir` (each
    atomically: a temporary file, fsynced, renamed); returns the text."""
    import pathlib
    import tempfile

    from keras_moe.training.run_dir import atomic_write

    run_dir = pathlib.Path(run_dir)
    text = format_report(report)
    atomic_write(run_dir / "report.txt", text + "\n")
    atomic_write(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    with tempfile.TemporaryDirectory(dir=run_dir) as scratch:
        image = plot_report(report, history or [], pathlib.Path(scratch) / "report.png")
        atomic_write(run_dir / "report.png", image.read_bytes())
    return text
