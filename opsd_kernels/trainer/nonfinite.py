"""Steps whose loss or gradient norm is NaN or Inf: skipped (no optimizer, scheduler or teacher
update), reported with their step number; training stops after ``max_nonfinite_steps`` in a
row, since weights stepped on NaN gradients are lost."""

from __future__ import annotations

import math


class TrainingStopped(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


class NonFiniteSteps:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0

    def allow(self, step: int, loss: float, grad_norm: float) -> bool:
        """Whether step ``step``'s update may be applied; raises `TrainingStopped` on the
        ``limit``-th non-finite step in a row."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise TrainingStopped(
                f"step {step}: {self.in_a_row} steps in a row with a non-finite loss or gradient "
                f"norm (loss {loss}, grad norm {grad_norm}); look for NaN / Inf in the data or "
                "the model, lower learning_rate, or raise max_nonfinite_steps")
        return False
