"""Cadence: when to validate and checkpoint. Every N steps (0: never on steps alone), at every epoch end and at the
last step, each at most once per step; a resumed run repeats neither for its checkpoint's step; validation off
still checkpoints."""

from __future__ import annotations

import pytest

from facesiam.training.cadence import Cadence


def schedule(cadence: Cadence, steps: range, boundaries=()) -> tuple[list[int], list[int]]:
    """(steps validated, steps checkpointed) when ``due`` is asked once after each step."""
    validated, checkpointed = [], []
    for step in steps:
        validate, checkpoint = cadence.due(step, boundary=step in boundaries)
        if validate:
            validated.append(step)
        if checkpoint:
            checkpointed.append(step)
    return validated, checkpointed


@pytest.mark.parametrize("val_every,ckpt_every", [(3, 2), (5, 5), (1, 4), (7, 0), (0, 3), (0, 0)])
def test_every_n_steps_and_zero_is_never(val_every, ckpt_every):
    validated, checkpointed = schedule(Cadence(val_every, ckpt_every), range(1, 22))
    assert validated == [s for s in range(1, 22) if val_every and s % val_every == 0]
    assert checkpointed == [s for s in range(1, 22) if ckpt_every and s % ckpt_every == 0]


def test_epoch_ends_and_the_last_step_validate_and_checkpoint_off_the_grid():
    steps_per_epoch, last = 4, 10  # epochs end at 4 and 8; the run stops at 10, mid-epoch
    boundaries = {s for s in range(1, last + 1) if s % steps_per_epoch == 0} | {last}
    validated, checkpointed = schedule(Cadence(3, 5), range(1, last + 1), boundaries)
    assert validated == sorted({s for s in range(1, last + 1) if s % 3 == 0} | boundaries)
    assert checkpointed == sorted({s for s in range(1, last + 1) if s % 5 == 0} | boundaries)
    # with nothing on steps alone, exactly the boundaries
    assert schedule(Cadence(0, 0), range(1, last + 1), boundaries) == (sorted(boundaries), sorted(boundaries))


def test_each_at_most_once_per_step():
    cadence = Cadence(3, 3)
    assert cadence.due(3, boundary=False) == (True, True)
    assert cadence.due(3, boundary=False) == (False, False)  # asked again for the same step
    # an epoch end that is also the last step: the loop may ask twice with boundary=True, the second is a no-op
    assert cadence.due(8, boundary=True) == (True, True)
    assert cadence.due(8, boundary=True) == (False, False)
    assert cadence.due(9, boundary=False) == (True, True)  # the next step on the grid is due again


def test_a_resumed_run_repeats_neither_for_its_checkpoint():
    cadence = Cadence(4, 4)
    cadence.resumed_at(8)  # step-8's checkpoint exists and was validated before it was saved
    assert cadence.due(8, boundary=True) == (False, False)
    assert schedule(cadence, range(9, 17)) == ([12, 16], [12, 16])
    # a resumed cadence behaves like one that ran through step 8
    straight = Cadence(4, 4)
    schedule(straight, range(1, 9))
    assert (straight.last_validated, straight.last_checkpointed) == (8, 8)


def test_validation_disabled_still_checkpoints():
    cadence = Cadence(2, 3, validation=False)
    validated, checkpointed = schedule(cadence, range(1, 13), boundaries={5, 12})
    assert validated == []
    assert checkpointed == sorted({s for s in range(1, 13) if s % 3 == 0} | {5, 12})
