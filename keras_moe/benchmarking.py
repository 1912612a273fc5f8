"""`keras-moe bench`: training throughput and serving latency of a recipe's model.

`benchmark_recipe(recipe)` builds the recipe's model (shapes and classes from its data),
and times on this machine, with inputs drawn from the real data:

- training: examples per second over `steps` compiled training steps (after a warm-up
  step that traces the step function), the recipe's optimizer and losses included;
- inference: examples per second of compiled forward passes on training-size batches;
- serving: latency of one example (batch 1), median and 90th percentile of `repeats`
  compiled forward passes.

Absolute times on a shared machine are noisy: compare models within one run (the
repository's `benchmarks/` scripts print such side-by-side ratios; `run_suite` runs
them). Training steps run the recipe's first phase through the phase runner
(`keras_moe.training.phases.run_phases`), so its settings apply as in `keras-moe train`
(the t-SNE map is fitted first). No number here is asserted by a test.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

__all__ = ["BenchmarkResult", "benchmark_recipe", "interleaved_medians", "run_suite", "SUITES"]

SUITES = ("moe_dense", "moe_dense_breakdown", "deepmoe", "data_pipeline", "expert_parallel",
          "keras_hub_moe")


@dataclasses.dataclass
class BenchmarkResult:
    """What `benchmark_recipe` measured (times in seconds)."""

    model: str
    parameters: int
    static_macs: object
    batch_size: int
    train_examples_per_second: float
    inference_examples_per_second: float
    latency_median: float
    latency_p90: float
    steps: int

    def __str__(self):
        macs = f"{self.static_macs / 1e6:.2f}M" if self.static_macs else "n/a"
        return "\n".join([
            f"model {self.model}: {self.parameters:,} parameters, {macs} MACs per example",
            f"training   {self.train_examples_per_second:10.1f} examples/s  (batch "
            f"{self.batch_size}, {self.steps} steps)",
            f"inference  {self.inference_examples_per_second:10.1f} examples/s  (batch "
            f"{self.batch_size})",
            f"serving    {self.latency_median * 1e3:10.2f} ms median, "
            f"{self.latency_p90 * 1e3:.2f} ms p90  (batch 1)",
        ])


def interleaved_medians(candidates, reps, warmup=2, settle=0):
    """Median seconds of each callable, timed in rounds that run every candidate once.

    Interleaving spreads changes in the load of a shared machine over all candidates
    alike, so their ratios stay meaningful when absolute times drift. Each candidate is
    called `warmup` times first (tracing, allocation). A result with a `numpy` method
    (a tensor) is read to the host inside the timing, so the time covers all its work.

    Args:
        candidates: Dict of name -> callable taking no arguments.
        reps: Timed rounds.
        warmup: Untimed calls of each candidate before the first round.
        settle: Untimed calls of each candidate right before each of its timed calls.
            A candidate that follows one freeing much memory pays for faulting its
            own buffers back in (on TensorFlow's CPU allocator, after keras-hub's
            500 MB MoE block, measured +8 ms on a 35 ms step); settling charges each
            candidate only its own steady-state time.

    Returns:
        Dict of name -> median seconds, in the order of `candidates`.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            for _ in range(settle):
                _read(fn())
            start = time.perf_counter()
            _read(fn())
            samples[name].append(time.perf_counter() - start)
    return {name: float(np.median(times)) for name, times in samples.items()}


def _read(result):
    """Waits for a tensor result by reading it to the host."""
    if hasattr(result, "numpy"):
        result.numpy()


def _timed(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return np.asarray(times)


def _compiled_forward(model):
    """`model`'s inference call compiled by the backend (tf.function or jax.jit), run to
    completion each call (JAX dispatches asynchronously: the result is waited for)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        @jax.jit
        def call(trainable, non_trainable, inputs):
            return model.stateless_call(trainable, non_trainable, inputs, training=False)[0]

        def forward(inputs):
            return jax.block_until_ready(call([v.value for v in model.trainable_variables],
                                              [v.value for v in model.non_trainable_variables],
                                              inputs))
        return forward
    import tensorflow as tf

    return tf.function(lambda inputs: model(inputs, training=False))


def benchmark_recipe(recipe, *, batch_size=None, steps=20, repeats=50, data_dir=None,
                     seed=0):
    """Times training, inference and batch-1 serving of `recipe`'s model.

    Args:
        recipe: A `keras_moe.recipes.Recipe`.
        batch_size: Training and inference batch (None: the recipe's).
        steps: Timed training steps, >= 1.
        repeats: Timed batch-1 forward passes, >= 1.
        data_dir: Where the data files are.
        seed: Seed of the weights.

    Returns:
        A `BenchmarkResult` (`str()` gives the printed table).

    Raises:
        ValueError: `steps`, `repeats` or `batch_size` below 1.
    """
    import keras

    from keras_moe import validation, zoo
    from keras_moe.analysis import flops
    from keras_moe.training import runner
    from keras_moe.training.datasets import build_datasets
    from keras_moe.training.phases import run_phases

    from keras_moe.training.phases import check_phase_settings

    check_phase_settings(recipe)
    steps = validation.positive_int("steps", steps)
    repeats = validation.positive_int("repeats", repeats)
    batch_size = recipe.data.batch_size if batch_size is None else validation.positive_int(
        "batch_size", batch_size)
    # The recipe's examples (a thousand at most): phase settings may fit on them (the
    # t-SNE map needs more examples than its perplexity); the steps use the first batch.
    train_size = max(batch_size, min(recipe.data.train_size or 1024, 1024))
    recipe = recipe.override([f"data.train_size={train_size}", f"data.batch_size={batch_size}",
                              "data.test_size=1"])
    keras.utils.set_random_seed(seed)
    data = build_datasets(recipe, data_dir=data_dir, seed=seed, probe_size=1)
    model = runner.build_model(recipe, data)
    runner.compile_model(model, recipe, data.steps_per_epoch)
    x, y = next(iter(data.train_epochs(0, 1)))
    if keras.backend.backend() != "tensorflow":
        # tf.data yields TensorFlow tensors; other backends take numpy arrays.
        x, y = keras.tree.map_structure(np.asarray, (x, y))
    timings = {}

    def timed_steps(index, phase, start, stop, callbacks):
        # The first phase's steps, as train runs them (its settings applied, e.g. the
        # t-SNE map fitted first); the phase's controllers (callbacks) are not timed.
        model.train_on_batch(x, y)  # traces the training step
        timings["train"] = _timed(lambda: model.train_on_batch(x, y), steps)

    first = dataclasses.replace(recipe.phases[0], epochs=1)
    run_phases(model, [first], timed_steps, family=zoo.get_family(recipe.model.name),
               data=data)
    train = timings["train"]

    forward = _compiled_forward(model)
    forward(x)
    infer = _timed(lambda: forward(x), max(3, steps // 2))
    one = keras.tree.map_structure(lambda t: t[:1], x)
    forward(one)
    latency = _timed(lambda: forward(one), repeats)
    try:
        macs = int(flops.static_flops(model))
    except (ValueError, TypeError):
        macs = None
    return BenchmarkResult(
        model=model.name, parameters=int(model.count_params()), static_macs=macs,
        batch_size=batch_size, train_examples_per_second=batch_size / float(np.median(train)),
        inference_examples_per_second=batch_size / float(np.median(infer)),
        latency_median=float(np.median(latency)),
        latency_p90=float(np.percentile(latency, 90)), steps=steps,
    )


# An installed wheel carries the suites inside the package (pyproject.toml maps the
# repository's benchmarks/ folder there); a source checkout has them beside the package.
SHIPPED_SUITES = pathlib.Path(__file__).resolve().parent / "_benchmark_suites"
CHECKOUT_SUITES = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def suite_dir():
    """Where the benchmark suites are: the package's own copy, else the checkout's."""
    return SHIPPED_SUITES if SHIPPED_SUITES.is_dir() else CHECKOUT_SUITES


def run_suite(name, arguments=()):
    """Runs the benchmark suite `<name>.py` (the repository's `benchmarks/`, shipped in
    the package) with `arguments`; returns its exit status.

    Raises:
        ValueError: `name` is not one of `SUITES`, or its script is missing.
    """
    if name not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}, got {name!r}")
    script = suite_dir() / f"{name}.py"
    if not script.is_file():
        raise ValueError(f"benchmark suite {name!r}: {script} does not exist (a broken "
                         "installation: reinstall keras-moe)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    return subprocess.run([sys.executable, str(script), *arguments], env=env).returncode
