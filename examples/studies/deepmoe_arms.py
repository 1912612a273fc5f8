"""The arms that DeepMoE's trade-off studies (`deepmoe_ladder`, `deepmoe_frontier`,
`deepmoe_long`) are made of, and the budget flags they share with the `deepmoe` study.

Every arm is the CPU recipe as the studies began with it (`deepmoe_resnet8_fashion_mnist`,
wide, lambda steered to 0.5 open by the controller, mu = 1) or its plain baseline
(`resnet8_fashion_mnist`), in the studies' frozen copies (`examples/studies/recipes/`;
the zoo's recipes have since moved to the best measured setting), changed by `--set` flags only, so each row's command says exactly what ran. An arm
written as `deepmoe` writes it has the very command of that study's arm (same settings
fingerprint), so its rows there count here (`Study.reuses`).

lambda here is `gate_l1` on this package's scale: L_g is divided by the number of gated
channels (288 in wide ResNet-8, 176 in narrow), so lambda = the paper's x that number.
"""

from studies.base import Arm, study_recipe

DEEPMOE_RECIPE = study_recipe("deepmoe_resnet8_fashion_mnist")
PLAIN_RECIPE = study_recipe("resnet8_fashion_mnist")
# No controller: lambda stays where `losses.gate_l1` sets it (the paper's Procedure 1).
NO_CONTROLLER = ("--set", "phases.0.gate_density_target=false")


def plain(name, width=1.0, description=""):
    """The plain ResNet-8 at a width multiplier (1.0: the `deepmoe` study's baseline)."""
    args = () if width == 1.0 else ("--set", f"model.width_multiplier={width}")
    return Arm(name, PLAIN_RECIPE, args,
               description=description or f"plain ResNet-8, width x{width}")


def fixed_lambda(name, gate_l1, *, wide=True, mu=None, spread=None, description=""):
    """DeepMoE with lambda fixed at `gate_l1` (our scale), mu at `mu` (None: the
    recipe's 1.0), the heads spread or not (None: as initialised, no controller)."""
    args = NO_CONTROLLER + ("--set", f"losses.gate_l1={gate_l1}")
    if not wide:
        args += ("--set", "model.wide=false")
    if mu is not None:
        args += ("--set", f"losses.embedding_loss_weight={mu}")
    if spread is not None:
        args += ("--set", f"phases.0.spread_gate_heads={str(spread).lower()}")
    what = "wide" if wide else "narrow"
    return Arm(name, DEEPMOE_RECIPE, args, description=description or (
        f"{what} DeepMoE-8, lambda fixed at {gate_l1} (ours; paper's "
        f"{gate_l1 / (288 if wide else 176):.3g})"
        + ("" if mu is None else f", mu {mu}") + (", heads spread" if spread else "")))


def controller(name, *, wide=True, target=None, spread=None, description=""):
    """DeepMoE with lambda steered to `target` open (None: the recipe's 0.5). Written as
    the `deepmoe` study writes its `wide` and `narrow` arms, so their rows count."""
    args = ()
    if not wide:
        args += ("--set", "model.wide=false")
    if target is not None:
        args += ("--set", f"phases.0.gate_density_target={target}")
    if spread is not None:
        args += ("--set", f"phases.0.spread_gate_heads={str(spread).lower()}")
    return Arm(name, DEEPMOE_RECIPE, args, description=description)


def budget_flags(finetune_factor=None):
    """The `Study.flags` of these studies: the plain recipe trains joint + fine-tune
    epochs in one phase, DeepMoE joint then fine-tune (x `finetune_factor[arm]` where
    given); the learning rate drops /10 when the joint epochs end, in both.
    These are the `deepmoe` study's flags (`deepmoe._deepmoe_args`) for its arms."""
    factors = finetune_factor or {}

    def flags(arm, budget, study_arms):
        joint, finetune = budget["joint"], budget["finetune"] * factors.get(arm, 1)
        common = ["--set", f"schedule.boundaries=[{joint}]"]
        if study_arms[arm].target == PLAIN_RECIPE:
            return ["--set", f"phases.0.epochs={joint + finetune}"] + common
        return ["--set", f"phases.0.epochs={joint}", "--set",
                f"phases.1.epochs={finetune}"] + common

    return flags


def bind_flags(flags, arms):
    """`flags` as `Study.flags(arm_name, budget)` for the arms `arms`."""
    by_name = {arm.name: arm for arm in arms}
    return lambda arm, budget: flags(arm, budget, by_name)
