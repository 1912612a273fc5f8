"""A keras-hub MoE causal LM, made sparse and fine-tuned with keras-moe's balancing.

    python examples/keras_hub_sparse.py                  # 40 steps, Mixtral, TensorFlow
    python examples/keras_hub_sparse.py --steps 200 --family qwen3_moe
    KERAS_BACKEND=jax python examples/keras_hub_sparse.py

A small, randomly initialised keras-hub `MixtralCausalLM` (or `Qwen3MoeCausalLM`: 2
layers, hidden 64, 8 experts, top-2) is sparsified with `keras_moe.hub.sparsify`, with
the Switch load-balancing loss (0.01) and the router z-loss (0.001) on every MoE block
in place of keras-hub's own auxiliary loss, then trained with `model.fit` on a real
text this machine has: the GNU GPL version 3 (`/usr/share/common-licenses/GPL-3`, in
every Debian and Ubuntu install), read as bytes (vocabulary 256; no tokenizer). It
prints the loss before and after, each block's expert use (`keras_moe.hub.expert_use`:
share of the assignments per expert, and its coefficient of variation, Shazeer et al.'s
balance measure), and a greedy continuation of a prompt from the text.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXT = "/usr/share/common-licenses/GPL-3"


def windows(path, length, rng):
    import numpy as np

    data = np.frombuffer(open(path, "rb").read(), dtype=np.uint8).astype("int32")
    starts = rng.permutation(len(data) - length - 1)
    return data, np.stack([data[s:s + length + 1] for s in starts[: len(data) // length]])


def report(title, model, probe):
    import numpy as np

    from keras_moe.hub import expert_use

    print(title)
    for path, share in expert_use(model, probe).items():
        cv = share.std() / share.mean()
        print(f"  {path:60s} share min {share.min():.3f} max {share.max():.3f} "
              f"cv {cv:.2f}  [{' '.join(f'{s:.2f}' for s in share)}]")
    return np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["mixtral", "qwen3_moe"], default="mixtral")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--text", default=TEXT)
    args = parser.parse_args(argv)

    import keras
    import keras_hub
    import numpy as np

    from keras_moe import regularizers
    from keras_moe.hub import sparsify

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    data, batches = windows(args.text, args.length, rng)
    size = dict(vocabulary_size=256, num_layers=2, num_query_heads=4, num_key_value_heads=2,
                hidden_dim=64, num_experts=8, top_k=2)
    if args.family == "mixtral":
        backbone = keras_hub.models.MixtralBackbone(intermediate_dim=128, **size)
        causal_lm = keras_hub.models.MixtralCausalLM(backbone=backbone, preprocessor=None)
    else:
        backbone = keras_hub.models.Qwen3MoeBackbone(
            intermediate_dim=128, moe_intermediate_dim=128, head_dim=16,
            norm_top_k_prob=True, **size)
        causal_lm = keras_hub.models.Qwen3MoeCausalLM(backbone=backbone, preprocessor=None)
    sparsify(causal_lm, balance_loss=[regularizers.SwitchLoadBalanceLoss(0.01),
                                      regularizers.RouterZLoss(0.001)])

    x = {"token_ids": batches[:, :-1], "padding_mask": np.ones_like(batches[:, :-1], bool)}
    y = batches[:, 1:]
    causal_lm.compile(optimizer=keras.optimizers.Adam(3e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      weighted_metrics=[], sampler="greedy")
    probe = {k: v[:32] for k, v in x.items()}
    print(f"{args.family}: {causal_lm.count_params():,} parameters; {len(data):,} bytes of "
          f"{args.text}; {args.steps} steps of {args.batch_size} x {args.length} bytes")
    before = causal_lm.evaluate(probe, y[:32], verbose=0)
    report("expert use before training:", causal_lm, probe)
    causal_lm.fit(x, y, batch_size=args.batch_size, epochs=1, steps_per_epoch=args.steps,
                  verbose=2)
    after = causal_lm.evaluate(probe, y[:32], verbose=0)
    report("expert use after training:", causal_lm, probe)
    print(f"loss on 32 windows: {np.ravel(before)[0]:.3f} before, {np.ravel(after)[0]:.3f} after "
          f"(uniform over bytes: {np.log(256):.3f})")

    prompt = data[:48]
    ids = np.zeros((1, 96), "int32")
    ids[0, :48] = prompt
    mask = np.zeros_like(ids, bool)
    mask[0, :48] = True
    out = causal_lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    text = bytes(int(t) for t in np.asarray(out["token_ids"])[0]).decode("latin-1")
    print("greedy continuation:", repr(text))


if __name__ == "__main__":
    main()
