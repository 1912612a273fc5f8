"""DeepMoE at a longer budget (issue 22, item 3): does the gap to the compute-matched
plain ResNet-8 close with training, as the paper's 350 epochs suggest? 3x the epochs of
the `deepmoe` study (21 joint + 9 fine-tune; the plain net 30, the learning rate /10
after epoch 21 in both), on the same 20,000 images.

The DeepMoE setting is chosen provisionally, before the ladder and the frontier have
measured: narrow DeepMoE-8 under the controller (target 0.75 open), the best accuracy
per MAC of the `deepmoe` study (0.8789 at 0.76x the plain net's MACs over 5 seeds);
its compute-matched baseline is the plain ResNet-8 at width x0.87 (0.77x the MACs).
Both run last in the chain; change them here (new fingerprints) once the ladder and the
frontier name a better setting.
"""

from studies.base import Comparison, Study
from studies.deepmoe import BUDGETS as DEEPMOE_BUDGETS
from studies.deepmoe import measure_deepmoe
from studies.deepmoe import study as deepmoe_study
from studies.deepmoe_arms import bind_flags, budget_flags, controller, plain

EPOCH_FACTOR = 3
MATCHED_WIDTH = 0.87
BUDGETS = {
    "long": {**DEEPMOE_BUDGETS["full"], "seeds": 3,
             "joint": EPOCH_FACTOR * DEEPMOE_BUDGETS["full"]["joint"],
             "finetune": EPOCH_FACTOR * DEEPMOE_BUDGETS["full"]["finetune"]},
    "tiny": DEEPMOE_BUDGETS["tiny"],
}


def arms():
    return [
        controller("narrow", wide=False, target=0.75,
                   description="narrow DeepMoE-8, the controller (target 0.75 open)"),
        plain("plain_matched", MATCHED_WIDTH,
              description=f"plain ResNet-8 at width x{MATCHED_WIDTH} (compute-matched)"),
    ]


def study():
    long_arms = arms()
    base = deepmoe_study()
    return Study(
        "deepmoe_long", "DeepMoE (004): 3x the epochs, against the compute-matched plain net",
        "zoo/deepmoe.md", long_arms, BUDGETS, measure_deepmoe, base.metrics,
        [Comparison("narrow - plain x0.87", "narrow", "plain_matched", "test_accuracy"),
         Comparison("narrow / plain x0.87", "narrow", "plain_matched", "macs_millions",
                    kind="ratio", decimals=3)],
        flags=bind_flags(budget_flags(), long_arms), notes=base.notes)
