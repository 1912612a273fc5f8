"""Training procedures of the papers (phases) and callbacks for monitoring MoE models."""

from keras_moe.training.callbacks import (
    ExpertCollapseWarning,
    ExpertUtilizationMonitor,
    gate_statistics,
)
from keras_moe.training.deepmoe import (
    DeepMoEHistory,
    GateDensityTarget,
    gating_layers,
    set_gating_trainable,
    train_deepmoe_two_phase,
)
from keras_moe.training.phases import (
    LiftAssignmentConstraint,
    TwoPhaseHistory,
    constrained_moe_layers,
    reset_assignment_totals,
    set_assignment_constraints,
    train_eigen_two_phase,
)

__all__ = [
    "DeepMoEHistory",
    "GateDensityTarget",
    "gating_layers",
    "set_gating_trainable",
    "train_deepmoe_two_phase",
    "ExpertCollapseWarning",
    "ExpertUtilizationMonitor",
    "gate_statistics",
    "LiftAssignmentConstraint",
    "TwoPhaseHistory",
    "constrained_moe_layers",
    "reset_assignment_totals",
    "set_assignment_constraints",
    "train_eigen_two_phase",
]
