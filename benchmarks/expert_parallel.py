"""Expert parallelism: what each device holds, sends and spends as experts grow with devices.

For 1, 2, 4 and 8 devices (`keras_moe.expert_parallel`, mesh data=1 x expert=n; on the
CPU these are XLA's virtual host devices), a top-2 `MoEDense` with `experts_per_device * n`
feed-forward experts trains on `tokens_per_device * n` tokens per step (weak scaling: the
work and the memory of each device stay the same while the layer grows). From the
compiled training step (gradients and an SGD update of every weight) it reads:

- expert bytes per device: the size of the device's slice of the expert weights;
- collective bytes per step: the results of every all-to-all, all-reduce and all-gather
  of one device's program (what that device receives), from the compiled HLO;
- memory per device: arguments, outputs and temporaries of one device's program, from
  XLA's memory analysis;
- step time: the median over `--reps` steps;
- the most experts that fit a per-device memory budget (`--budget-mib`): the largest
  multiple of n whose compiled step needs at most that much per device.

    python benchmarks/expert_parallel.py
    python benchmarks/expert_parallel.py --devices 1 2 --reps 3
    python benchmarks/expert_parallel.py --processes 1 2 4   # 2 devices per process

With `--processes`, each count P starts P processes of `--devices-per-process` virtual
devices on 127.0.0.1 (`keras_moe.expert_parallel.initialize`, JAX's gloo collectives),
mesh data=1 x expert=all devices, and reads from the compiled step, per process: the
expert bytes it holds (its devices' slices) and the bytes of collective results that
come from other processes' devices in one step. That is, for an all-to-all or an
all-gather over n devices of which n/P are a process's own, (n - n/P)/n of each result;
for an all-reduce twice that (a ring's reduce-scatter and all-gather). It counts what
the program moves, not how a real network would schedule it.

What virtual devices on a 2-core CPU can show: the memory and the communication of each
device are those of the program a real n-device run compiles (XLA partitions the same
way); what they cannot show is speed. The n virtual devices share the machine's cores and
memory bandwidth, and a collective is a memory copy, so the step time grows with n here
where on n real devices it would stay about flat. Over processes on one machine the same
holds: loopback gloo shows what crosses processes, not what a network costs.
"""

import argparse
import os
import re
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_moe import expert_parallel  # noqa: E402
from keras_moe.benchmarking import interleaved_medians  # noqa: E402
from keras_moe.layers import MoEDense  # noqa: E402

COLLECTIVES = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "f64": 8, "s64": 8}


def collective_bytes(hlo_text):
    """Bytes of the results of every collective of one device's compiled program."""
    total = 0
    for line in hlo_text.splitlines():
        match = re.search(r"= (.*?) (%s)(-start)?\(" % "|".join(COLLECTIVES), line)
        if not match:
            continue
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
            count = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            total += count * _BYTES.get(dtype, 4)
    return total


def build_step(devices, experts, args, per_process=False):
    """The compiled training step and its state for `experts` experts on `devices`."""
    distribution = expert_parallel.expert_parallel(
        data=1, expert=devices, devices=keras.distribution.list_devices()[:devices]
    )
    tokens = args.tokens_per_device * devices
    with distribution.scope():
        if args.model == "classifier":
            from keras_moe import zoo

            model = zoo.sparse_moe_classifier(
                num_experts=experts, units=args.dim, expert_hidden_units=args.hidden,
                dispatch="capacity", dropout=0.0,
            )
            layer = next(l for l in model.layers if isinstance(l, MoEDense))
            shape = (tokens,) + tuple(model.input_shape[1:])
        else:
            inputs = keras.Input((args.dim,))
            layer = MoEDense(
                args.dim, num_experts=experts, top_k=2, gate="noisy_top_k",
                expert_hidden_units=args.hidden, dispatch="capacity", capacity_factor=1.25,
                balance_loss=["importance", "load"], name="moe",
            )
            model = keras.Model(inputs, layer(inputs))
            shape = (tokens, args.dim)
        layer.gate.kernel.assign(
            np.random.default_rng(0).normal(0, 0.1, layer.gate.kernel.shape).astype("float32")
        )
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        x = np.random.default_rng(1).normal(size=shape).astype("float32")
        sharding = distribution.get_data_layout(shape).backend_layout
        if jax.process_count() > 1:  # each process places its own blocks of the batch
            rows = tokens // distribution.num_devices
            x = jax.make_array_from_process_local_data(sharding, np.concatenate(
                [x[b * rows:(b + 1) * rows] for b in distribution.local_batch_blocks()]))
        else:
            x = jax.device_put(x, sharding)

        def loss(trainable, non_trainable, x):
            outputs, non_trainable, losses = model.stateless_call(
                trainable, non_trainable, x, training=True, return_losses=True
            )
            return keras.ops.mean(keras.ops.square(outputs)) + sum(losses), non_trainable

        def step(trainable, non_trainable, x):
            grads, non_trainable = jax.grad(loss, has_aux=True)(trainable, non_trainable, x)
            return [w - 0.01 * g for w, g in zip(trainable, grads)], non_trainable

        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(trainable, non_trainable, x).compile()
    expert_bytes = sum(
        w.value.addressable_shards[0].data.nbytes
        for w in layer.stacked_expert_weights().values()
    )
    if per_process:  # what the process holds: its devices' slices
        expert_bytes = sum(
            sum(s.data.nbytes for s in w.value.addressable_shards)
            for w in layer.stacked_expert_weights().values()
        )
    return compiled, (trainable, non_trainable, x), expert_bytes, model.count_params()


def cross_process_bytes(hlo_text, devices, processes):
    """Bytes of one device's collective results that come from other processes' devices
    (see the module docstring), for collectives over all `devices` (a data=1 mesh:
    every collective of the step is over the expert axis, which is every device)."""
    foreign = (devices - devices // processes) / devices
    total = 0.0
    for line in hlo_text.splitlines():
        match = re.search(r"= (.*?) (%s)(-start)?\(" % "|".join(COLLECTIVES), line)
        if not match:
            continue
        size = sum(int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                   * _BYTES.get(dtype, 4)
                   for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)))
        total += size * foreign * (2 if match.group(2) == "all-reduce" else 1)
    return total


def process_main(index, count, port, args):
    """One of `count` processes: joins the others, compiles the step, prints a row."""
    import json

    expert_parallel.initialize(f"127.0.0.1:{port}", count, index)
    devices = len(jax.devices())
    compiled, _, expert_bytes, _ = build_step(
        devices, args.experts_per_device * devices, args, per_process=True)
    if index == 0:
        print("ROW " + json.dumps(dict(
            processes=count, devices=devices, experts=args.experts_per_device * devices,
            expert_mib=expert_bytes / 2**20,
            collective_mib=collective_bytes(compiled.as_text()) / 2**20,
            cross_mib=cross_process_bytes(compiled.as_text(), devices, count)
            * (devices // count) / 2**20)), flush=True)


def processes_main(args, argv):
    """`--processes`: a row per process count, each from its own set of processes."""
    import json
    import socket
    import subprocess

    print(f"top-2 MoEDense, d {args.dim}, expert hidden {args.hidden}, "
          f"{args.experts_per_device} experts and {args.tokens_per_device} tokens per device, "
          f"{args.devices_per_process} devices per process, training step with SGD, mesh "
          f"data=1 x expert=all (JAX {jax.__version__}, CPU, gloo on 127.0.0.1, "
          f"{os.cpu_count()} CPUs)")
    print()
    print("| processes | devices | experts | expert MiB / process | collective MiB / step "
          "/ device | MiB from other processes / step / process |")
    print("| --- | --- | --- | --- | --- | --- |")
    for count in args.processes:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, XLA_FLAGS=" ".join(
            [f for f in os.environ.get("XLA_FLAGS", "").split()
             if "device_count" not in f]
            + [f"--xla_force_host_platform_device_count={args.devices_per_process}"]))
        children = [subprocess.Popen(
            [sys.executable, __file__, *argv, "--as-process", str(i), str(count), str(port)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            for i in range(count)]
        try:
            outputs = [c.communicate(timeout=args.timeout)[0] for c in children]
        finally:  # nothing left running, whatever happened
            for c in children:
                if c.poll() is None:
                    c.kill()
        rows = [json.loads(line[4:]) for line in outputs[0].splitlines()
                if line.startswith("ROW ")]
        if not rows or any(c.returncode for c in children):
            sys.exit(f"--processes {count}: a process failed (return codes "
                     f"{[c.returncode for c in children]})")
        r = rows[0]
        print(f"| {r['processes']} | {r['devices']} | {r['experts']} | {r['expert_mib']:.2f} "
              f"| {r['collective_mib']:.2f} | {r['cross_mib']:.2f} |", flush=True)


def memory_per_device(compiled):
    analysis = compiled.memory_analysis()
    return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def most_experts_within(devices, budget, args):
    """Largest multiple of `devices` experts whose compiled step fits `budget` bytes."""
    def fits(per_device):
        return memory_per_device(build_step(devices, per_device * devices, args)[0]) <= budget

    low = 1 if devices >= 2 else 2  # top-2 routing needs two experts
    if not fits(low):
        return 0
    while fits(low * 2):
        low *= 2
    high = low * 2  # low experts per device fit, high do not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low * devices


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--experts-per-device", type=int, default=8)
    parser.add_argument("--tokens-per-device", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--model", choices=["layer", "classifier"], default="layer",
                        help="a bare MoEDense on d-wide tokens, or the zoo's "
                        "sparse_moe_classifier on 28x28 images (units = --dim)")
    parser.add_argument("--budget-mib", type=float, default=64.0,
                        help="per-device memory budget for the weak-scaling column")
    parser.add_argument("--processes", type=int, nargs="+", default=None,
                        help="instead: rows for these process counts on 127.0.0.1")
    parser.add_argument("--devices-per-process", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600,
                        help="--processes: seconds before a set of processes is killed")
    parser.add_argument("--as-process", type=int, nargs=3, default=None,
                        metavar=("INDEX", "COUNT", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.as_process:
        return process_main(*args.as_process, args)
    if args.processes:
        argv = list(sys.argv[1:] if argv is None else argv)
        child_argv = []
        skip = 0
        for a in argv:  # the children get every option but --processes
            if skip and not a.startswith("--"):
                continue
            skip = a == "--processes"
            if not skip:
                child_argv.append(a)
        return processes_main(args, child_argv)
    available = len(jax.devices())
    if max(args.devices) > available:
        sys.exit(f"--devices {max(args.devices)} needs that many devices; {available} here.")

    rows, candidates, states = [], {}, {}
    for devices in args.devices:
        experts = args.experts_per_device * devices
        compiled, state, expert_bytes, parameters = build_step(devices, experts, args)
        states[devices] = [compiled, state]

        def run(devices=devices):
            compiled, (trainable, non_trainable, x) = states[devices]
            trainable, non_trainable = compiled(trainable, non_trainable, x)
            jax.block_until_ready(trainable)
            states[devices][1] = (trainable, non_trainable, x)

        candidates[devices] = run
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
        flops = cost.get("flops", float("nan"))
        rows.append(dict(
            devices=devices, experts=experts, parameters=parameters,
            expert_mib=expert_bytes / 2**20,
            collective_mib=collective_bytes(compiled.as_text()) / 2**20,
            memory_mib=memory_per_device(compiled) / 2**20,
            flops_per_token=flops / args.tokens_per_device,
        ))
    times = interleaved_medians(candidates, args.reps)
    budget = int(args.budget_mib * 2**20)
    for row in rows:
        row["step_ms"] = times[row["devices"]] * 1e3
        row["most_experts"] = most_experts_within(row["devices"], budget, args)

    what = ("sparse_moe_classifier (28x28x1 inputs), its top-2 MoEDense"
            if args.model == "classifier" else "top-2 MoEDense")
    print(f"{what}, d {args.dim}, expert hidden {args.hidden}, "
          f"{args.experts_per_device} experts and {args.tokens_per_device} tokens (examples) per device, "
          f"capacity factor 1.25, training step with SGD (median of {args.reps}; "
          f"JAX {jax.__version__} on {jax.default_backend()}, {available} devices, "
          f"{os.cpu_count()} CPUs)")
    print()
    print("| devices | experts | parameters | expert MiB / device | memory MiB / device "
          "| collective MiB / step | GFLOP / example / device | step ms "
          f"| most experts in {args.budget_mib:g} MiB / device |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['devices']} | {r['experts']} | {r['parameters']:,} | {r['expert_mib']:.2f} "
              f"| {r['memory_mib']:.1f} | {r['collective_mib']:.2f} "
              f"| {r['flops_per_token'] / 1e9:.4f} | {r['step_ms']:.1f} | {r['most_experts']} |")


if __name__ == "__main__":
    main()
