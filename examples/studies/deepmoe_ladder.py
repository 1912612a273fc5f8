"""DeepMoE's ablation ladder (issue 22): from the plain ResNet-8 to the full CPU recipe,
one change per rung, at the `deepmoe` study's budget, to find the step that costs the
accuracy (wide-DeepMoE-8 is 2.69 points below the plain net there).

Rungs (wide DeepMoE unless said): plain ResNet-8; the gates free (lambda = 0, no
controller) with mu = 0, then mu = 1; lambda fixed (the paper's way, no controller, heads
as initialised) at `LADDER_LAMBDA`, meant to land near the controller's density
(0.50-0.69 over the `deepmoe` study's 5 seeds); the controller (the recipe: heads
spread) and the controller with the heads as initialised; fine-tuning 3x as long.
The plain and controller rungs are the `deepmoe` study's `baseline` and `wide` arms
(their rows count here), the fixed-lambda rung is the frontier's `wide_lambda3` arm.
"""

from studies.base import Comparison, Study
from studies.deepmoe import BUDGETS as DEEPMOE_BUDGETS
from studies.deepmoe import measure_deepmoe
from studies.deepmoe import study as deepmoe_study
from studies.deepmoe_arms import bind_flags, budget_flags, controller, fixed_lambda, plain

# Fixed lambda of the ladder (ours; the paper's 3/288 = 0.010). Probes (wide, seed 0,
# 20,000 images, 7 joint + 1 fine-tune epochs, no controller; zoo/deepmoe.md): lambda 5
# stays open 3 epochs, then closes (density 0.31, 0.08, 0.04, 0.03 at epochs 4-7);
# lambda 2.5 starts closing only in the 7th (0.93). Closing starts at about 16/lambda
# epochs, so 3 should close during the last joint epochs, near the controller's 0.57.
LADDER_LAMBDA = 3.0
FINETUNE_FACTOR = 3
# The deepmoe study's budgets (same flags: its rows count), 3 seeds at the full one.
BUDGETS = {"full": {**DEEPMOE_BUDGETS["full"], "seeds": 3}, "tiny": DEEPMOE_BUDGETS["tiny"]}


def arms():
    return [
        plain("baseline", description="ResNet-8, no gates (the deepmoe study's baseline)"),
        fixed_lambda("wide_free_mu0", 0.0, mu=0.0,
                     description="wide DeepMoE-8, gates free: lambda 0, mu 0, no controller"),
        fixed_lambda("wide_free", 0.0,
                     description="wide DeepMoE-8, gates free: lambda 0, mu 1, no controller"),
        fixed_lambda("wide_lambda3", LADDER_LAMBDA),
        controller("wide", description="wide DeepMoE-8, the controller steers lambda to 0.5 "
                                       "open, heads spread (the recipe; the deepmoe study's "
                                       "wide)"),
        controller("wide_unspread", spread=False,
                   description="the controller, gate heads as initialised (not spread)"),
        controller("wide_finetune_x3",
                   description=f"the recipe, fine-tuning {FINETUNE_FACTOR}x as long"),
    ]


def study():
    ladder = arms()
    flags = bind_flags(budget_flags({"wide_finetune_x3": FINETUNE_FACTOR}), ladder)
    base = deepmoe_study()
    rungs = [("wide_free_mu0", "baseline", "gates free, mu 0 - plain"),
             ("wide_free", "wide_free_mu0", "mu 1 - mu 0"),
             ("wide_lambda3", "wide_free", f"lambda {LADDER_LAMBDA:g} fixed - lambda 0"),
             ("wide", "wide_lambda3", "controller - fixed lambda"),
             ("wide_unspread", "wide", "heads as initialised - spread (controller)"),
             ("wide_finetune_x3", "wide", f"fine-tune x{FINETUNE_FACTOR} - x1")]
    comparisons = []
    for a, b, label in rungs:
        comparisons.append(Comparison(label, a, b, "test_accuracy"))
        comparisons.append(Comparison(label, a, b, "macs_millions", kind="ratio", decimals=3))
    comparisons += [Comparison("wide - plain", "wide", "baseline", "test_accuracy"),
                    Comparison("wide, lambda fixed - plain", "wide_lambda3", "baseline",
                               "test_accuracy")]
    return Study(
        "deepmoe_ladder", "DeepMoE (004): the ablation ladder, plain ResNet-8 to the recipe",
        "zoo/deepmoe.md", ladder, BUDGETS, measure_deepmoe, base.metrics, comparisons,
        flags=flags, reuses=("deepmoe", "deepmoe_frontier"),
        notes="One change per rung; each comparison pairs a rung with the one before it "
              "by seed. lambda is ours (the paper's x 288 gated channels). " + base.notes)
