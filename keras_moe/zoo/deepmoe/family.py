"""The DeepMoE family and the family of its plain baselines: their defaults.

DeepMoE models (`DeepMoEModel`) train with Procedure 1 by default: a joint phase, then
fine-tuning with the embedding and gate heads frozen and lambda = mu = 0 (Wang et al.
2019, Procedure 1; `max(1, epochs // 3)` fine-tuning epochs for a bare model, the
paper's CIFAR schedule being 270 + 80). The phase keys those phases use
(`freeze_gating`, `gate_l1`, `embedding_loss_weight`, `gate_density_target`,
`spread_gate_heads`) belong to the training procedure: `keras_moe.training.deepmoe`
registers them against this family (`register_phase_settings`), so the zoo never imports
the training package. `keras-moe tune` searches lambda (log-uniformly over the decades
that move the gate density) and mu.

The plain baselines (ResNets, VGG-16, DRN-A) train in one phase and tune only what
every family tunes (the learning rate).
"""

from keras_moe.zoo.registry import ModelFamily, register_family


def _procedure_1(epochs):
    return [{"name": "joint", "epochs": epochs},
            {"name": "finetune", "epochs": max(1, epochs // 3), "freeze_gating": True,
             "gate_l1": 0.0, "embedding_loss_weight": 0.0}]


DEEPMOE = register_family(ModelFamily(
    name="deepmoe",
    description="DeepMoE (Wang et al. 2019): gated convolutions, shallow embedding",
    default_phases=_procedure_1,
    search_space=(("gate_l1", "gate_l1"), ("embedding_loss_weight", "decade")),
))

CONVNET = register_family(ModelFamily(
    name="convnet",
    description="plain convolutional baselines of DeepMoE (ResNet, VGG-16, DRN-A)",
))
