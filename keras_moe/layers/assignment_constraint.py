"""Eigen et al.'s running-assignment constraint, the part of `MoEDense` that keeps it.

While expert `i`'s running total of gate values `G_i` exceeds the mean by more than the
margin `m`, its gate is set to zero for the example and the gate renormalised over the
others (Eigen, Ranzato & Sutskever 2013, section 3.1); the paper lifts the constraint
for a second phase.
"""

from keras import ops

from keras_moe.regularizers.reduction import add_global


class AssignmentConstraint:
    """Mixin of `MoEDense`: Eigen's constraint on soft gates (`assignment_margin`).

    The layer creates the variables `assignment_totals` (experts,) and
    `assignment_constraint_active` () when `assignment_margin` is set.
    """

    def set_assignment_constraint(self, active):
        """Switches Eigen's running-assignment constraint on or off (phase 2: off).

        Takes effect without recompiling the model: the switch is a layer variable.
        """
        if self.assignment_margin is None:
            raise ValueError(
                "This layer has no assignment constraint: build it with "
                "`assignment_margin` set to a number >= 0."
            )
        self.assignment_constraint_active.assign(1.0 if active else 0.0)

    def reset_assignment_totals(self):
        """Sets every running assignment total back to zero."""
        self.assignment_totals.assign(ops.zeros(self.assignment_totals.shape, "float32"))

    def _constrain_assignments(self, gates):
        margin = self.assignment_margin

        def step(totals, gate):
            over = (totals - ops.mean(totals)) > margin
            allowed = 1.0 - ops.cast(over, "float32")
            kept = gate * allowed
            kept = kept / ops.maximum(ops.sum(kept), 1e-30)
            return totals + kept, allowed

        start = ops.convert_to_tensor(self.assignment_totals)

        def constrained():
            totals, allowed = ops.scan(step, start, ops.stop_gradient(gates))
            kept = gates * allowed
            norm = ops.sum(kept, axis=-1, keepdims=True)
            # A row whose allowed experts all have gates that underflowed to 0 falls back
            # to uniform weights over the allowed experts instead of dividing by zero.
            uniform = allowed / ops.sum(allowed, axis=-1, keepdims=True)
            kept = ops.where(norm > 1e-30, kept / ops.maximum(norm, 1e-30), uniform)
            return kept, totals - start

        def free():
            return gates, ops.zeros_like(start)

        # The branches only compute; the running totals are updated after the cond, so
        # that on JAX no traced value escapes a branch into the variable.
        gates, added = ops.cond(self.assignment_constraint_active > 0.5, constrained, free)
        add_global(self.assignment_totals, added)
        return gates
