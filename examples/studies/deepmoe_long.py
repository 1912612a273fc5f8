"""DeepMoE at a longer budget (issue 22, item 3): does the gap to the compute-matched
plain ResNet-8 close with training, as the paper's 350 epochs suggest? 3x the epochs of
the `deepmoe` study (21 joint + 9 fine-tune; the plain net 30, the learning rate /10
after epoch 21 in both), on the same 20,000 images.

The DeepMoE setting is the frontier's best measured one: wide DeepMoE-8 with lambda
fixed at 3 (ours) and the heads spread, 0.884 test accuracy at 10.5M effective MACs
(0.84x the plain net's) and 0.48 of the gates open over 3 seeds, the only fixed-lambda
setting whose density did not depend on the seed; its compute-matched baseline is the
plain ResNet-8 at width x0.92 (about 0.85x the MACs; MACs scale about as width^2).

A fixed lambda keeps closing gates for as long as it trains: seed 0 ended the 21 joint
epochs at 0.022 open (1.22M effective MACs), not 0.48, so the long budget also trains
the plain net at width x0.3 (`plain_w0p3`), the width whose MACs are nearest that.
The recipe's default, wide with lambda fixed at 3.5 and the heads as initialised (the
frontier's nearest arm to the plain line, chosen after this study began), trains at the
same budget as `wide_lambda3p5` and is compared with the same plain net at x0.3.
"""

from studies.base import Comparison, Study
from studies.deepmoe import BUDGETS as DEEPMOE_BUDGETS
from studies.deepmoe import measure_deepmoe
from studies.deepmoe import study as deepmoe_study
from studies.deepmoe_arms import bind_flags, budget_flags, fixed_lambda, plain

EPOCH_FACTOR = 3
MATCHED_WIDTH = 0.92
LOW_WIDTH = 0.3
DEEPMOE_ARM = "wide_spread_lambda3"
DEFAULT_ARM = "wide_lambda3p5"  # zoo/deepmoe_resnet8_fashion_mnist.toml's setting
BUDGETS = {
    "long": {**DEEPMOE_BUDGETS["full"], "seeds": 3,
             "joint": EPOCH_FACTOR * DEEPMOE_BUDGETS["full"]["joint"],
             "finetune": EPOCH_FACTOR * DEEPMOE_BUDGETS["full"]["finetune"]},
    "tiny": DEEPMOE_BUDGETS["tiny"],
}


def arms():
    return [
        fixed_lambda(DEEPMOE_ARM, 3.0, spread=True),
        fixed_lambda(DEFAULT_ARM, 3.5),
        plain("plain_matched", MATCHED_WIDTH,
              description=f"plain ResNet-8 at width x{MATCHED_WIDTH} (compute-matched)"),
        plain("plain_w0p3", LOW_WIDTH,
              description=f"plain ResNet-8 at width x{LOW_WIDTH} (matched to the density "
                          "the fixed lambda reaches at this budget)"),
    ]


def study():
    long_arms = arms()
    base = deepmoe_study()
    return Study(
        "deepmoe_long", "DeepMoE (004): 3x the epochs, against the compute-matched plain net",
        "zoo/deepmoe.md", long_arms, BUDGETS, measure_deepmoe, base.metrics,
        [Comparison(f"{DEEPMOE_ARM} - plain x{MATCHED_WIDTH}", DEEPMOE_ARM, "plain_matched",
                    "test_accuracy"),
         Comparison(f"{DEEPMOE_ARM} / plain x{MATCHED_WIDTH}", DEEPMOE_ARM, "plain_matched",
                    "macs_millions",
                    kind="ratio", decimals=3),
         Comparison(f"{DEEPMOE_ARM} - plain x{LOW_WIDTH}", DEEPMOE_ARM, "plain_w0p3",
                    "test_accuracy"),
         Comparison(f"{DEEPMOE_ARM} / plain x{LOW_WIDTH}", DEEPMOE_ARM, "plain_w0p3",
                    "macs_millions", kind="ratio", decimals=3),
         Comparison(f"{DEFAULT_ARM} - plain x{LOW_WIDTH}", DEFAULT_ARM, "plain_w0p3",
                    "test_accuracy"),
         Comparison(f"{DEFAULT_ARM} / plain x{LOW_WIDTH}", DEFAULT_ARM, "plain_w0p3",
                    "macs_millions", kind="ratio", decimals=3)],
        flags=bind_flags(budget_flags(), long_arms), notes=base.notes)
