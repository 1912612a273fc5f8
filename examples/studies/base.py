"""What a study is made of (arms, metrics, paired comparisons) and the readers of a
finished run directory that several papers' measurements share."""

import dataclasses
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
# The studies' own copies of the zoo recipes their arms change with `--set`, frozen as
# they were when the rows were trained: the zoo's recipe may then move to what a study
# measured best without changing what the study's rows mean. A copy counts as the recipe
# of its name in a run's settings fingerprint (`running.settings_id`), since the rows
# trained before the copy existed ran the recipe under that name.
STUDY_RECIPES = pathlib.Path(__file__).resolve().parent / "recipes"


def study_recipe(name):
    """The path of the studies' frozen copy of the zoo recipe `name`."""
    path = STUDY_RECIPES / f"{name}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no study copy of recipe {name!r} in {STUDY_RECIPES}")
    return str(path)

@dataclasses.dataclass
class Arm:
    """One arm: what `keras-moe train` runs, with which settings.

    `target` is the recipe or zoo model; `args` the arm's own flags (`--set ...`);
    `script` (optional) a repository script that takes the same flags instead of
    `keras-moe train TARGET` (see `examples/study.py`'s docstring).
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
    flags: object  # flags(arm_name, budget) -> the budget's flags of an arm
    notes: str = ""
    # Other studies whose results files (beside this one's) hold runs this study counts:
    # a row there of the same budget and settings fingerprint as one of this study's arms
    # stands for that arm (identical runs are trained once; `running.study_rows`).
    reuses: tuple = ()
    # report(table rows by arm) -> (JSON-able dict, markdown lines): a study's own
    # summary beyond the per-arm table (e.g. the frontier's verdict), or None.
    report: object = None
    # figure(table rows by arm, path): draws the study's plot; `figure_file` is where the
    # card expects it (relative to the repository).
    figure: object = None
    figure_file: str = None


def numpy_split(name, split, seed, normalize, size):
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


def load_model(run_dir):
    import keras

    import keras_moe  # noqa: F401  (registers the serializable layers)

    return keras.saving.load_model(run_dir / "model.keras", safe_mode=True)


def check_accuracy(accuracy, report, what):
    """The analysis must see the data the run was tested on: same test accuracy."""
    reported = report["test"]["accuracy"]
    if abs(accuracy - reported) > 2e-3:
        raise RuntimeError(
            f"{what}: accuracy {accuracy:.4f} on the analysis's test data differs from "
            f"report.json's {reported:.4f}; the study reads different data than the run")


