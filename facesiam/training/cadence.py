"""When to validate and when to checkpoint: the one place that decides.

Both happen every N steps (0: never on steps alone), at every epoch end and at the end of training, and each at
most once per step (an epoch end that is also the last step validates once).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Cadence:
    """Tracks the last step validated and checkpointed; ``due`` says what to do now."""

    val_every_steps: int
    checkpoint_every_steps: int
    validation: bool = True
    last_validated: int = -1
    last_checkpointed: int = -1

    def resumed_at(self, step: int) -> None:
        """The checkpoint of ``step`` exists and was validated before it was saved: neither is repeated."""
        self.last_validated = self.last_checkpointed = step

    def due(self, step: int, *, boundary: bool) -> tuple[bool, bool]:
        """(validate now, checkpoint now) after optimizer step ``step``; ``boundary``: an epoch end or the last step.

        Validation comes first, so a checkpoint always holds the best-so-far it was taken with.
        """
        validate = (self.validation and step != self.last_validated
                    and (boundary or _every(step, self.val_every_steps)))
        checkpoint = step != self.last_checkpointed and (boundary or _every(step, self.checkpoint_every_steps))
        if validate:
            self.last_validated = step
        if checkpoint:
            self.last_checkpointed = step
        return validate, checkpoint


def _every(step: int, n: int) -> bool:
    return bool(n) and step % n == 0
