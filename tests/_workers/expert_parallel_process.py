"""One process of a multi-process `keras_moe.expert_parallel` run on 127.0.0.1 (JAX).

    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python expert_parallel_process.py PROCESS_ID NUM_PROCESSES PORT OUT.json MESH...

Joins the cluster with `keras.distribution.initialize` (JAX's CPU collectives over
gloo, without which cross-process collectives fail on CPU), then for each MESH
(`DATAxEXPERT`) runs `tests/test_expert_parallel.py`'s `fit_on_mesh` (build under
`expert_parallel`, compile the steps, three steps of `model.fit`) and writes its
results, mesh by mesh, to OUT.json.
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(process_id, num_processes, port, out, *meshes):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras

    keras.distribution.initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id))
    import test_expert_parallel as spec

    results = {"devices": [jax.device_count(), jax.local_device_count()]}
    for mesh in meshes:
        data, expert = (int(n) for n in mesh.split("x"))
        result = spec.fit_on_mesh(data, expert)
        result["weights"] = [w.tolist() for w in result["weights"]]
        results[mesh] = result
    with open(out, "w") as f:
        json.dump(results, f)
    print(f"process {process_id} done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
