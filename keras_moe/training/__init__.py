"""Training: the one phase runner, the papers' procedures, callbacks, recipe runs.

- `phases`: `run_phases`, the phase runner every way of training uses, and `apply_phase`.
- `deepmoe`: DeepMoE's Procedure 1 (`train_deepmoe_two_phase`) and the density
  controller (`GateDensityTarget`).
- `eigen`: Eigen et al.'s constrained-then-free procedure (`train_eigen_two_phase`).
- `callbacks`: expert utilisation and gate density monitors.
- `datasets`, `run_dir`, `runner`: a recipe into a run directory (`keras-moe train`).
- `custom_loop`: `fit_distributed` for `MultiWorkerMirroredStrategy`.
"""

from keras_moe.training.callbacks import (
    ExpertCollapseWarning,
    ExpertUtilizationMonitor,
    GateDensityLogger,
    gate_statistics,
)
from keras_moe.training.deepmoe import (
    DeepMoEHistory,
    GateDensityTarget,
    gating_layers,
    set_gating_trainable,
    train_deepmoe_two_phase,
)
from keras_moe.training.eigen import (
    LiftAssignmentConstraint,
    TwoPhaseHistory,
    constrained_moe_layers,
    reset_assignment_totals,
    set_assignment_constraints,
    train_eigen_two_phase,
)
from keras_moe.training.phases import PhaseHistory, apply_phase, run_phases

__all__ = [
    "DeepMoEHistory",
    "GateDensityTarget",
    "gating_layers",
    "set_gating_trainable",
    "train_deepmoe_two_phase",
    "ExpertCollapseWarning",
    "ExpertUtilizationMonitor",
    "GateDensityLogger",
    "gate_statistics",
    "LiftAssignmentConstraint",
    "TwoPhaseHistory",
    "constrained_moe_layers",
    "reset_assignment_totals",
    "set_assignment_constraints",
    "train_eigen_two_phase",
    "PhaseHistory",
    "apply_phase",
    "run_phases",
]
