"""Speed of MoEDense's dispatch modes against the dense floor, measured side by side.

For each number of experts, a top-2 MoEDense with feed-forward experts (d -> hidden -> d)
runs forward and a training step (loss and gradients of every weight), compiled, once per
dispatch mode. The floor is one dense two-layer feed-forward network of the same sizes
over the same k * tokens token-assignments: the least work any top-k MoE layer can do.
Timings are medians over interleaved repetitions (every candidate is timed once per round)
so that load on this shared machine hits all candidates alike; read the ratios, not the
absolute times.

    python benchmarks/moe_dense.py                 # the issue's sizes, TensorFlow
    python benchmarks/moe_dense.py --experts 4 64 --reps 5
    python benchmarks/moe_dense.py --backends tensorflow jax   # both, interleaved

Each backend runs in the process it needs (Keras picks its backend once per process):
with one backend, in this one; with several, in one worker process per backend, and the
rounds alternate between them, so that both backends' candidates are timed under the
same load. Each ratio is to the floor of the same backend. A worker's time includes the
pipe round trip to it (about 0.1 ms). On JAX, `dispatch="sparse"` is a `jax.lax.ragged_dot`
grouped matmul; on the CPU it lowers to a masked dense product over every expert, which is
why capacity dispatch is JAX's CPU default.

Every TensorFlow candidate runs under the same settings (default thread pools: as many
intra- and inter-op threads as CPUs). With 64 experts each stacked expert weight is
exactly 32 MiB, and so is its gradient: glibc's malloc serves every block of that size
with a fresh mmap, so each training step page-faults 64 MiB of new gradient memory in
(~17,000 faults, ~50 ms of CPU time on the 2-core machine) that smaller tensors, and the
floor's, never pay. TensorFlow's own pooling
allocator avoids it, and so does telling glibc to keep freed memory for reuse; to measure
without that cost, for every candidate alike:

    TF_CPU_ALLOCATOR_USE_BFC=true python benchmarks/moe_dense.py
    python benchmarks/moe_dense.py --keep-freed-memory
"""

import argparse
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BACKENDS = ("tensorflow", "jax")


def keep_freed_memory():
    """Makes glibc's malloc keep freed memory for reuse rather than unmapping it.

    `mallopt(M_MMAP_MAX, 0)`: no block is served by its own mmap (glibc caps the mmap
    threshold at 32 MiB, so a 32 MiB gradient always would be); `mallopt(M_TRIM_THRESHOLD,
    1 GiB)`: freed memory is not returned to the system. Affects the whole process, from
    the call on; only for glibc (raises SystemExit elsewhere).
    """
    import ctypes

    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError) as error:
        raise SystemExit(f"--keep-freed-memory needs glibc's mallopt: {error}")
    if not (mallopt(m_trim_threshold, 1 << 30) and mallopt(m_mmap_max, 0)):
        raise SystemExit("--keep-freed-memory: mallopt refused the settings.")


def make_moe(num_experts, args, dispatch):
    import numpy as np

    from keras_moe.layers import MoEDense

    layer = MoEDense(
        args.dim, num_experts=num_experts, top_k=args.k, gate="noisy_top_k",
        expert_hidden_units=args.hidden, dispatch=dispatch, capacity_factor=1.25,
    )
    layer.build((None, args.dim))
    # A trained router spreads tokens; W_g = 0 (the paper's init) would tie every logit.
    layer.gate.kernel.assign(
        np.random.default_rng(0).normal(0, 0.1, layer.gate.kernel.shape).astype("float32")
    )
    return layer


def make_floor(args):
    import keras

    return keras.Sequential(
        [keras.Input((args.dim,)), keras.layers.Dense(args.hidden, activation="relu"),
         keras.layers.Dense(args.dim)]
    )


def tensorflow_steps(layer, inputs):
    """A forward pass, and a training step: loss and the gradient of every weight.

    Both return a scalar computed in the graph from everything they produce (the outputs;
    every gradient, read whole), so timing never includes copying tensors to the host and
    nothing can be pruned. The optimizer update is left out: its cost scales with the
    parameter count, which is the point of a MoE, not a cost of its dispatch.
    """
    import tensorflow as tf

    @tf.function(jit_compile=False)
    def forward():
        return tf.reduce_sum(layer(inputs, training=False))

    @tf.function(jit_compile=False)
    def train_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(inputs, training=True)))
        grads = tape.gradient(loss, layer.trainable_weights)
        return tf.add_n([tf.reduce_sum(g) for g in grads])

    return forward, train_step


def jax_steps(layer, inputs):
    """The same two steps as `tensorflow_steps`, as `jax.jit` programs of the layer's
    stateless call; each waits for its result (JAX dispatches asynchronously)."""
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    @jax.jit
    def forward(trainable, non_trainable, x):
        outputs, _ = layer.stateless_call(trainable, non_trainable, x, training=False)
        return jnp.sum(outputs)

    def loss(trainable, non_trainable, x):
        outputs, _ = layer.stateless_call(trainable, non_trainable, x, training=True)
        return jnp.mean(jnp.square(outputs))

    @jax.jit
    def train_step(trainable, non_trainable, x):
        grads = jax.grad(loss)(trainable, non_trainable, x)
        return sum(jnp.sum(g) for g in grads)

    return (
        lambda: forward(trainable, non_trainable, inputs).block_until_ready(),
        lambda: train_step(trainable, non_trainable, inputs).block_until_ready(),
    )


def build_candidates(args):
    """Name -> callable of every candidate, on this process's Keras backend."""
    import keras

    keras.utils.set_random_seed(0)
    backend = keras.backend.backend()
    steps = tensorflow_steps if backend == "tensorflow" else jax_steps
    inputs = keras.random.normal((args.tokens, args.dim), seed=1)
    floor_inputs = keras.random.normal((args.k * args.tokens, args.dim), seed=2)
    floor_forward, floor_train = steps(make_floor(args), floor_inputs)
    candidates = {("floor", 0, "forward"): floor_forward, ("floor", 0, "train"): floor_train}
    for num_experts in args.experts:
        for mode in args.modes:
            forward, train = steps(make_moe(num_experts, args, mode), inputs)
            candidates[(mode, num_experts, "forward")] = forward
            candidates[(mode, num_experts, "train")] = train
    return candidates


def versions():
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return f"TensorFlow {tf.__version__}"
    import jax

    return f"JAX {jax.__version__} on {jax.default_backend()}"


def serve(args):
    """Worker: build the candidates, then time one candidate per line read from stdin."""
    import json

    candidates = build_candidates(args)
    names = {json.dumps(list(name)): fn for name, fn in candidates.items()}
    print(json.dumps({"ready": list(names), "versions": versions()}), flush=True)
    for line in sys.stdin:
        names[line.strip()]()
        print("done", flush=True)


class RemoteBackend:
    """One worker process per backend; `candidates()` are callables that run in it."""

    def __init__(self, backend, argv):
        import json

        env = dict(os.environ, KERAS_BACKEND=backend)
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", *argv],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        ready = json.loads(self.process.stdout.readline())
        self.names = [tuple(json.loads(n)) for n in ready["ready"]]
        self.versions = ready["versions"]
        self.backend = backend

    def run(self, name):
        import json

        self.process.stdin.write(json.dumps(list(name)) + "\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "done"

    def candidates(self):
        return {(self.backend,) + n: (lambda n=n: self.run(n)) for n in self.names}

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def print_table(args, times, backend, versions):
    floor_f, floor_t = times[("floor", 0, "forward")], times[("floor", 0, "train")]
    print(
        f"{backend}: tokens {args.tokens}, d {args.dim}, expert hidden {args.hidden}, "
        f"k {args.k}; floor = dense FFN over {args.k * args.tokens} assignments: "
        f"forward {floor_f * 1e3:.1f} ms, train step {floor_t * 1e3:.1f} ms "
        f"(median of {args.reps}, {versions}, {os.cpu_count()} CPUs, "
        f"TF_CPU_ALLOCATOR_USE_BFC={os.environ.get('TF_CPU_ALLOCATOR_USE_BFC', 'unset')}, "
        f"keep-freed-memory {args.keep_freed_memory})"
    )
    print()
    print("| experts | dispatch | forward ms | forward / floor | train step ms | train / floor |")
    print("| --- | --- | --- | --- | --- | --- |")
    for num_experts in args.experts:
        for mode in args.modes:
            f = times[(mode, num_experts, "forward")]
            t = times[(mode, num_experts, "train")]
            print(
                f"| {num_experts} | {mode} | {f * 1e3:.1f} | {f / floor_f:.2f} | "
                f"{t * 1e3:.1f} | {t / floor_t:.2f} |"
            )
    if "sparse" in args.modes and len(args.experts) > 1:
        # The foundation issue's targets were set for TensorFlow's sparse dispatch.
        def target(text):
            return f" (target {text})" if backend == "tensorflow" else ""

        lo, hi = min(args.experts), max(args.experts)
        fwd_scale = times[("sparse", hi, "forward")] / times[("sparse", lo, "forward")]
        train_scale = times[("sparse", hi, "train")] / times[("sparse", lo, "train")]
        print()
        print(f"sparse {hi} experts / sparse {lo} experts: forward {fwd_scale:.2f}, "
              f"train step {train_scale:.2f}{target('<= 1.5')}")
        print(f"sparse forward at {hi} experts / floor: "
              f"{times[('sparse', hi, 'forward')] / floor_f:.2f}{target('<= 1.3')}")
        print(f"sparse train step at {hi} experts / floor train step: "
              f"{times[('sparse', hi, 'train')] / floor_t:.2f}{target('<= 1.5')}")
    print()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--modes", nargs="+", default=["sparse", "capacity", "dense"],
                        choices=["sparse", "capacity", "dense"])
    parser.add_argument("--backends", nargs="+", default=None, choices=BACKENDS,
                        help="Keras backends to time (default: KERAS_BACKEND, else tensorflow)")
    parser.add_argument(
        "--keep-freed-memory", action="store_true",
        help="glibc keeps freed memory for reuse (see keep_freed_memory), for every candidate",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.worker:
        return serve(args)
    backends = args.backends or [os.environ.get("KERAS_BACKEND", "tensorflow")]
    from keras_moe.benchmarking import interleaved_medians

    if len(backends) == 1 and backends[0] == os.environ.get("KERAS_BACKEND", "tensorflow"):
        import keras

        times = interleaved_medians(build_candidates(args), args.reps)
        print_table(args, times, keras.backend.backend(), versions())
        return
    worker_argv = [a for a in argv if a != "--backends" and a not in BACKENDS]
    workers = [RemoteBackend(backend, worker_argv) for backend in backends]
    try:
        candidates = {}
        for worker in workers:
            candidates.update(worker.candidates())
        times = interleaved_medians(candidates, args.reps)
    finally:
        for worker in workers:
            worker.close()
    for worker in workers:
        own = {name[1:]: t for name, t in times.items() if name[0] == worker.backend}
        print_table(args, own, worker.backend, worker.versions)


if __name__ == "__main__":
    main()
