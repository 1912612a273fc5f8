"""The DeepMoE family and the family of its plain baselines: defaults and phase settings.

DeepMoE models (`DeepMoEModel`) train with Procedure 1 by default: a joint phase, then
fine-tuning with the embedding and gate heads frozen and lambda = mu = 0 (Wang et al.
2019, Procedure 1; `max(1, epochs // 3)` fine-tuning epochs for a bare model, the
paper's CIFAR schedule being 270 + 80). Their phases may set `freeze_gating`, `gate_l1`
(lambda), `embedding_loss_weight` (mu) and `gate_density_target` (a controller that
steers lambda to an open-gate fraction; the gate heads then start spread,
`keras_moe.training.deepmoe.spread_gate_heads`; `false`: no controller, lambda stays
where `gate_l1` put it, the paper's way). The first phase may set `spread_gate_heads`
(true or false) to choose the heads' start whatever the controller. `keras-moe tune`
searches lambda (log-uniformly over the decades that move the gate density) and mu.

The plain baselines (ResNets, VGG-16, DRN-A) train in one phase and tune only what
every family tunes (the learning rate).
"""

from keras_moe.zoo.registry import ModelFamily, PhaseSetting, register_family


def _procedure_1(epochs):
    return [{"name": "joint", "epochs": epochs},
            {"name": "finetune", "epochs": max(1, epochs // 3), "freeze_gating": True,
             "gate_l1": 0.0, "embedding_loss_weight": 0.0}]


def _freeze_gating(model, value, context):
    model.set_gating_trainable(not value)
    return True  # Keras captures the trainable variables when it builds the train step


def _coefficient(key):
    def apply(model, value, context):
        setattr(model, key, value)  # a variable: no recompile, no retrace
        return False

    return apply


def _density_controller(model, value, context):
    from keras_moe.training.deepmoe import GateDensityTarget  # the controller is a callback

    if value is False:  # lambda fixed: the paper's Procedure 1
        return []
    if context.probe is None:
        raise ValueError(f"phase {context.phase.name!r}: gate_density_target needs data to "
                         "measure the gate density on")
    return [GateDensityTarget(value, data=context.probe)]


# The model attribute that records an explicit `spread_gate_heads` choice, so that the
# controller's build step (run after it: `phase_settings` order) leaves the heads alone.
_SPREAD_CHOSEN = "_keras_moe_spread_gate_heads_chosen"


def _spread_heads_choice(model, value):
    from keras_moe.training.deepmoe import spread_gate_heads

    setattr(model, _SPREAD_CHOSEN, bool(value))
    if value:
        spread_gate_heads(model)


def _spread_heads_for_controller(model, value):
    from keras_moe.training.deepmoe import spread_gate_heads

    if value is False or getattr(model, _SPREAD_CHOSEN, None) is not None:
        return
    # The density controller needs gates that close one by one, not all together.
    spread_gate_heads(model)


DEEPMOE = register_family(ModelFamily(
    name="deepmoe",
    description="DeepMoE (Wang et al. 2019): gated convolutions, shallow embedding",
    default_phases=_procedure_1,
    search_space=(("gate_l1", "gate_l1"), ("embedding_loss_weight", "decade")),
    phase_settings={
        "freeze_gating": PhaseSetting(apply=_freeze_gating),
        "gate_l1": PhaseSetting(apply=_coefficient("gate_l1")),
        "embedding_loss_weight": PhaseSetting(apply=_coefficient("embedding_loss_weight")),
        # Before gate_density_target: the build steps run in this order.
        "spread_gate_heads": PhaseSetting(on_build=_spread_heads_choice),
        "gate_density_target": PhaseSetting(callbacks=_density_controller,
                                            on_build=_spread_heads_for_controller),
    },
))

CONVNET = register_family(ModelFamily(
    name="convnet",
    description="plain convolutional baselines of DeepMoE (ResNet, VGG-16, DRN-A)",
))
