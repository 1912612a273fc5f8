"""How a trained mixture of experts routes: activation rates, routing information, plots.

Functions take gate values as arrays of shape (examples, experts) (numpy or tensors)
and integer group labels of shape (examples,) (class, domain, translation cell, ...):

- `activation_rates(gates, groups)`: the (groups x experts) mean gate value per group
  (Eigen et al.'s Fig. 2; the two-domain paper's activation-rate table).
- `routing_mutual_information(gates, groups)`: how much the argmax expert depends on
  the group, as a normalised mutual information (Eigen et al.'s "where" and "what").
- `translation_grids(gates, offsets)`: the mean gate per translation on the
  (2m+1) x (2m+1) offset grid, per expert (Fig. 2, "by translation").
- `top_examples_per_combination(gates1, gates2, k)`: the k examples with the highest
  gate value for each pair of first- and second-layer experts (Fig. 3).
- `joint_assignment(gates1, gates2)`: the mean product of the two layers' gates per
  expert pair (Fig. 5).
- Figures (`plot_gate_heatmap`, `plot_translation_grids`, `plot_top_examples`) are
  `matplotlib.figure.Figure` objects drawn on the non-interactive Agg canvas: no
  display needed and no change to pyplot's global backend; save with
  `fig.savefig(path)`.
- `gating_model(model)`: a model from the inputs to the gates of every MoE layer (the
  gate reader's, `keras_moe.analysis.gates`).

Reference:
    Eigen, Ranzato & Sutskever, "Learning Factored Representations in a Deep Mixture
    of Experts", 2013, Figs. 2, 3 and 5.
"""

import math

import numpy as np

from keras_moe import validation

NORMALIZATIONS = ("expert", "group", "arithmetic", "geometric", "min", "max")


def _as_gates(name, gates):
    array = np.asarray(gates, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(
            f"{name} must be a non-empty array of shape (examples, experts), "
            f"got shape {array.shape}"
        )
    return array


def _as_groups(groups, count, num_groups=None):
    array = np.asarray(groups)
    if array.shape != (count,):
        raise ValueError(f"groups must have shape ({count},), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError("groups must hold integer group labels")
        array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise ValueError(f"groups must be >= 0, got a minimum of {array.min()}")
    if num_groups is None:
        num_groups = int(array.max()) + 1
    else:
        num_groups = validation.positive_int("num_groups", num_groups)
        if array.max() >= num_groups:
            raise ValueError(
                f"num_groups must exceed every group label ({int(array.max())}), "
                f"got {num_groups}"
            )
    return array.astype(np.int64), num_groups


def activation_rates(gates, groups, num_groups=None):
    """Mean gate value of each expert within each group.

    Args:
        gates: (examples, experts) gate values.
        groups: (examples,) integer group labels >= 0 (class, domain, translation cell).
        num_groups: Number of groups (default: largest label + 1).

    Returns:
        float64 array (num_groups, experts): row g is the mean of `gates` over the
        examples of group g; NaN for a group with no examples (a choice: an empty group
        has no rate).

    Example:

    >>> activation_rates([[1, 0], [0, 1], [0.5, 0.5]], [0, 1, 1])
    array([[1.  , 0.  ],
           [0.25, 0.75]])
    """
    gates = _as_gates("gates", gates)
    groups, num_groups = _as_groups(groups, len(gates), num_groups)
    sums = np.zeros((num_groups, gates.shape[1]))
    np.add.at(sums, groups, gates)
    counts = np.bincount(groups, minlength=num_groups).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = sums / counts[:, None]
    rates[counts == 0] = np.nan
    return rates


def _entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def routing_mutual_information(gates, groups, num_groups=None, normalization="expert"):
    """Normalised mutual information between the argmax expert and the group.

    With `e = argmax(gates)` and `c = groups`, from their joint frequency table,
    `I(e; c) = sum p(e, c) log(p(e, c) / (p(e) p(c)))`, divided by:

    - `"expert"` (default): `H(e)`, the share of the expert choice's entropy that the
      group explains (uncertainty coefficient U(e | c)): 1 when the group determines
      the expert, 0 when they are independent, whatever the number of groups; this
      reads directly as "how strongly the expert choice depends on the group".
    - `"group"`: `H(c)`; `"arithmetic"`, `"geometric"`, `"min"`, `"max"`: the mean,
      geometric mean, min or max of `H(e)` and `H(c)` (scikit-learn's
      `normalized_mutual_info_score` options).

    When the denominator is 0 (one expert takes every example, or one group) the
    result is 0.0: a constant cannot carry information (a choice).

    Args:
        gates: (examples, experts) gate values; ties go to the lowest expert index.
        groups: (examples,) integer group labels.
        num_groups: Number of groups (default: largest label + 1).
        normalization: One of `NORMALIZATIONS`.

    Returns:
        A float in [0, 1].

    Example:

    >>> routing_mutual_information([[1, 0], [0, 1], [1, 0], [0, 1]], [0, 1, 0, 1])
    1.0
    """
    gates = _as_gates("gates", gates)
    groups, num_groups = _as_groups(groups, len(gates), num_groups)
    validation.one_of("normalization", normalization, NORMALIZATIONS)
    experts = np.argmax(gates, axis=1)
    joint = np.zeros((gates.shape[1], num_groups))
    np.add.at(joint, (experts, groups), 1.0)
    joint /= joint.sum()
    p_expert, p_group = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    outer = np.outer(p_expert, p_group)
    mi = float((joint[nonzero] * np.log(joint[nonzero] / outer[nonzero])).sum())
    h_expert, h_group = _entropy(p_expert), _entropy(p_group)
    denominator = {
        "expert": h_expert,
        "group": h_group,
        "arithmetic": (h_expert + h_group) / 2,
        "geometric": math.sqrt(h_expert * h_group),
        "min": min(h_expert, h_group),
        "max": max(h_expert, h_group),
    }[normalization]
    if denominator <= 1e-15:
        return 0.0
    return float(min(max(mi / denominator, 0.0), 1.0))


def translation_grids(gates, offsets, max_shift=4):
    """Mean gate per translation, as one (2m+1) x (2m+1) grid per expert.

    Args:
        gates: (examples, experts) gate values.
        offsets: (examples, 2) integer translations `(dx, dy)` in [-m, m] (as
            `keras_moe.data.load_jittered_mnist` returns them), or (examples,) cells
            `(dy + m) * (2m + 1) + (dx + m)`.
        max_shift: The largest translation `m` (4: a 9x9 grid).

    Returns:
        float64 array (experts, 2m+1, 2m+1): entry [e, dy + m, dx + m] is the mean gate
        of expert e over examples translated by (dx, dy) (rows: down, columns: right);
        NaN where no example has that translation.

    Example:

    >>> translation_grids([[1.0, 0.0], [0.0, 1.0]], [[-1, -1], [1, 1]], max_shift=1)[0]
    array([[ 1., nan, nan],
           [nan, nan, nan],
           [nan, nan,  0.]])
    """
    gates = _as_gates("gates", gates)
    max_shift = validation.integer("max_shift", max_shift, minimum=0)
    side = 2 * max_shift + 1
    offsets = np.asarray(offsets)
    if offsets.ndim == 2 and offsets.shape[1] == 2:
        if np.abs(offsets).max() > max_shift:
            raise ValueError(
                f"offsets must lie in [-max_shift, max_shift] = [-{max_shift}, "
                f"{max_shift}], got up to {int(np.abs(offsets).max())}"
            )
        cells = (offsets[:, 1] + max_shift) * side + (offsets[:, 0] + max_shift)
    elif offsets.ndim == 1:
        cells = offsets
    else:
        raise ValueError(
            f"offsets must have shape (examples, 2) or (examples,), got {offsets.shape}"
        )
    rates = activation_rates(gates, cells, num_groups=side * side)
    return rates.T.reshape(gates.shape[1], side, side)


def joint_assignment(gates1, gates2, normalize_rows=False):
    """Mean product of first- and second-layer gates per expert pair (Eigen Fig. 5).

    Args:
        gates1: (examples, N) first-layer gates.
        gates2: (examples, M) second-layer gates.
        normalize_rows: Divide each row by its sum: the mean second-layer assignment
            given the first-layer expert.

    Returns:
        float64 array (N, M).

    Example:

    >>> joint_assignment([[1, 0], [0, 1]], [[0, 1], [0, 1]])
    array([[0. , 0.5],
           [0. , 0.5]])
    """
    gates1, gates2 = _as_gates("gates1", gates1), _as_gates("gates2", gates2)
    if len(gates1) != len(gates2):
        raise ValueError(
            f"gates1 and gates2 must have the same number of examples, got "
            f"{len(gates1)} and {len(gates2)}"
        )
    joint = gates1.T @ gates2 / len(gates1)
    if normalize_rows:
        joint = joint / np.maximum(joint.sum(1, keepdims=True), 1e-300)
    return joint


def top_examples_per_combination(gates1, gates2, k=9):
    """The k examples with the highest gate value for each pair of experts (Fig. 3).

    The gate value of example x for the combination (i, j) is the product
    `gates1[x, i] * gates2[x, j]` (the weight of path (i, j) through the two mixtures;
    the paper does not define it, and this is the quantity of its Fig. 5).

    Args:
        gates1: (examples, N) first-layer gates.
        gates2: (examples, M) second-layer gates.
        k: Examples per combination, 1 <= k <= examples.

    Returns:
        int64 array (N, M, k) of example indices, highest value first; ties go to the
        lower index.

    Example:

    >>> top_examples_per_combination([[0.9, 0.1], [0.2, 0.8]],
    ...                              [[0.5, 0.5], [0.1, 0.9]], k=1)[:, :, 0]
    array([[0, 0],
           [1, 1]])
    """
    gates1, gates2 = _as_gates("gates1", gates1), _as_gates("gates2", gates2)
    if len(gates1) != len(gates2):
        raise ValueError(
            f"gates1 and gates2 must have the same number of examples, got "
            f"{len(gates1)} and {len(gates2)}"
        )
    count = len(gates1)
    k = validation.positive_int("k", k)
    if k > count:
        raise ValueError(f"k must be <= the number of examples ({count}), got {k}")
    values = gates1[:, :, None] * gates2[:, None, :]  # (examples, N, M)
    order = np.argsort(-values, axis=0, kind="stable")[:k]  # (k, N, M)
    return np.transpose(order, (1, 2, 0)).astype(np.int64)


# Models -----------------------------------------------------------------------------------


def gating_model(model):
    """A model from `model`'s inputs to the gates of each of its MoE layers.

    The gate reader's (`keras_moe.analysis.gates`) MoE sites: every `MoEDense` and
    `ExpertMixture` of a functional model, in graph order.

    Args:
        model: A functional Keras model.

    Returns:
        A `keras.Model` with one (batch, experts) output per MoE layer (a list of
        arrays from `predict`, or one array with a single MoE layer).

    Example:

    >>> gates1, gates2 = gating_model(eigen.dmoe_mnist()).predict(images)
    """
    from keras_moe.analysis import gates as gate_reader
    from keras_moe.analysis import graph

    outputs = list(gate_reader.gate_tensors(model, kinds=("moe",)).values())
    if not outputs:
        raise ValueError("model has no MoEDense or ExpertMixture layer whose gates can be read")
    return graph.submodel(model, outputs if len(outputs) > 1 else outputs[0],
                          name=f"{model.name}_gates")


# Figures ----------------------------------------------------------------------------------


def agg_figure(width, height):
    """A new `matplotlib.figure.Figure` on the non-interactive Agg canvas.

    pyplot's global backend is left alone, so this works without a display and does
    not disturb an interactive session.

    Args:
        width: Width in inches.
        height: Height in inches.

    Returns:
        The figure (constrained layout); save it with `fig.savefig(path)`.

    Example:

    >>> fig = agg_figure(4, 3)
    >>> ax = fig.add_subplot()
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_gate_heatmap(rates, group_labels=None, expert_labels=None, title=None,
                      group_name="group", vmin=0.0, vmax=None, ax=None):
    """Heatmap of an activation-rate table: experts in rows, groups in columns.

    Args:
        rates: (groups, experts) table, e.g. from `activation_rates`.
        group_labels: Column labels (default 0, 1, ...).
        expert_labels: Row labels (default "expert 0", ...).
        title: Axes title.
        group_name: x-axis label.
        vmin: Colour scale minimum.
        vmax: Colour scale maximum (default: the table's maximum).
        ax: Draw into this matplotlib Axes instead of a new figure.

    Returns:
        The `matplotlib.figure.Figure` (Agg canvas).

    Example:

    >>> fig = plot_gate_heatmap(activation_rates(gates, labels), title="by class")
    >>> fig.savefig("by_class.png")
    """
    rates = np.asarray(rates, dtype=np.float64)
    if rates.ndim != 2:
        raise ValueError(f"rates must be a (groups, experts) table, got shape {rates.shape}")
    groups, experts = rates.shape
    if ax is None:
        fig = agg_figure(max(3.0, 0.45 * groups + 2.0), max(2.0, 0.45 * experts + 1.2))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    image = ax.imshow(rates.T, aspect="auto", cmap="viridis", vmin=vmin,
                      vmax=vmax if vmax is not None else np.nanmax(rates))
    ax.set_xticks(range(groups))
    ax.set_xticklabels(group_labels if group_labels is not None else range(groups))
    ax.set_yticks(range(experts))
    ax.set_yticklabels(expert_labels if expert_labels is not None
                       else [f"expert {e}" for e in range(experts)])
    ax.set_xlabel(group_name)
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def plot_translation_grids(grids, title=None, vmin=0.0, vmax=None, axes=None):
    """One (2m+1) x (2m+1) heatmap of mean gate by translation per expert (Fig. 2).

    Args:
        grids: (experts, 2m+1, 2m+1), from `translation_grids`.
        title: Figure title.
        vmin: Colour scale minimum.
        vmax: Colour scale maximum (default: the grids' maximum).
        axes: A sequence of one matplotlib Axes per expert to draw into.

    Returns:
        The `matplotlib.figure.Figure` (Agg canvas).

    Example:

    >>> fig = plot_translation_grids(translation_grids(gates, offsets))
    """
    grids = np.asarray(grids, dtype=np.float64)
    if grids.ndim != 3 or grids.shape[1] != grids.shape[2]:
        raise ValueError(
            f"grids must have shape (experts, side, side), got shape {grids.shape}"
        )
    experts, side = grids.shape[0], grids.shape[1]
    shift = side // 2
    if axes is None:
        fig = agg_figure(2.2 * experts + 0.8, 2.6)
        axes = fig.subplots(1, experts, squeeze=False)[0]
    else:
        fig = axes[0].figure
    vmax = vmax if vmax is not None else np.nanmax(grids)
    for e, ax in enumerate(axes):
        image = ax.imshow(grids[e], cmap="viridis", vmin=vmin, vmax=vmax,
                          extent=(-shift - 0.5, shift + 0.5, shift + 0.5, -shift - 0.5))
        ax.set_title(f"expert {e}")
        ax.set_xlabel("dx")
        if e == 0:
            ax.set_ylabel("dy")
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def plot_top_examples(images, indices, title=None):
    """Grid of example images per expert combination (Fig. 3).

    Rows are first-layer experts and columns second-layer experts; each cell is a
    ceil(sqrt(k)) x ceil(sqrt(k)) mosaic of that combination's k images.

    Args:
        images: (examples, H, W) or (examples, H, W, 1) images.
        indices: (N, M, k) example indices, from `top_examples_per_combination`.
        title: Figure title.

    Returns:
        The `matplotlib.figure.Figure` (Agg canvas).

    Example:

    >>> idx = top_examples_per_combination(gates1, gates2, k=9)
    >>> plot_top_examples(test.images, idx).savefig("fig3.png")
    """
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(
            f"images must have shape (examples, H, W) or (examples, H, W, 1), got "
            f"{images.shape}"
        )
    indices = np.asarray(indices)
    if indices.ndim != 3:
        raise ValueError(f"indices must have shape (N, M, k), got {indices.shape}")
    rows, cols, k = indices.shape
    tiles = int(math.ceil(math.sqrt(k)))
    h, w = images.shape[1:]
    fig = agg_figure(1.6 * cols + 0.6, 1.6 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        for j in range(cols):
            mosaic = np.zeros((tiles * (h + 1) - 1, tiles * (w + 1) - 1), np.float64)
            for n, index in enumerate(indices[i, j]):
                r, c = divmod(n, tiles)
                mosaic[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = (
                    images[index]
                )
            ax = axes[i, j]
            ax.imshow(mosaic, cmap="gray_r")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"layer 2: {j}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"layer 1: {i}", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig
