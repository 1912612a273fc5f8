"""Inference paths that turn a mixture of experts' sparsity into saved compute.

- `SkipChannelRunner`, `compile_skip_inference` (`keras_moe.inference.deepmoe`): run a
  DeepMoE (paper 004) skipping the channels its gates close; logits equal `model(x)`.
"""

from keras_moe.inference.deepmoe import SkipChannelRunner, compile_skip_inference

__all__ = ["SkipChannelRunner", "compile_skip_inference"]
