"""StepWindow: the data-wait fraction of a log window, and the one warning when the loader sets the speed."""

from __future__ import annotations

import pytest
import torch

from facesiam.training.tracking import DATA_WAIT_WARNING, StepWindow


class FakeClock:
    """A clock that moves only when told: the window's times are exactly what the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def batches(clock: FakeClock, n: int, wait: float):
    """A loader whose every batch takes ``wait`` seconds to arrive."""
    for i in range(n):
        clock.advance(wait)
        yield i


def run_window(window: StepWindow, clock: FakeClock, *, steps: int, wait: float, work: float) -> dict:
    for _ in window.timed(batches(clock, steps, wait)):
        clock.advance(work)  # the step's own work
        window.steps += 1
    return window.stats(images_per_step=8, processes=2)


def test_window_stats_come_from_the_clock():
    clock = FakeClock()
    window = StepWindow(torch.device("cpu"), clock=clock)
    clock.advance(0.5)  # before the first batch is asked for: neither waiting nor a step, but the window's time
    window.loss += 12.0
    stats = run_window(window, clock, steps=4, wait=0.25, work=0.75)
    elapsed = 0.5 + 4 * (0.25 + 0.75)
    assert stats["data_wait_fraction"] == pytest.approx(4 * 0.25 / elapsed)
    assert stats["images_per_s_per_process"] == pytest.approx(4 * 8 / elapsed)
    assert stats["images_per_s"] == pytest.approx(2 * 4 * 8 / elapsed)
    assert stats["loss"] == pytest.approx(12.0 / 4)
    window.reset()  # a new window starts now, with nothing counted
    stats = run_window(window, clock, steps=2, wait=0.0, work=1.0)
    assert stats["data_wait_fraction"] == 0.0 and stats["images_per_s_per_process"] == pytest.approx(8.0)


def test_a_starved_loop_is_warned_about_once_after_the_first_window():
    clock = FakeClock()
    window = StepWindow(torch.device("cpu"), clock=clock)
    messages = []
    for _ in range(3):
        stats = run_window(window, clock, steps=3, wait=0.02, work=0.005)  # mostly waiting for the loader
        assert stats["data_wait_fraction"] == pytest.approx(0.02 / 0.025)
        messages.append(window.slow_data_warning(stats, num_workers=2))
        window.reset()
    assert messages[0] is None  # the first window includes the loader's start-up
    assert "waited for data" in messages[1] and "--num-workers (now 2)" in messages[1]
    assert "--augment-device cuda" in messages[1]
    assert messages[2] is None  # once per run


def test_a_fed_loop_is_not_warned_about():
    clock = FakeClock()
    window = StepWindow(torch.device("cpu"), clock=clock)
    for _ in range(3):
        # waiting just under the threshold's share of the window: fed
        wait = DATA_WAIT_WARNING * 0.9
        stats = run_window(window, clock, steps=3, wait=wait, work=1.0 - wait)
        assert stats["data_wait_fraction"] == pytest.approx(wait)
        assert window.slow_data_warning(stats, num_workers=2) is None
        window.reset()
    # and just over it is starved (after the first window): the threshold is the one the check uses
    stats = run_window(window, clock, steps=3, wait=DATA_WAIT_WARNING * 1.1, work=1.0 - DATA_WAIT_WARNING * 1.1)
    assert window.slow_data_warning(stats, num_workers=2) is not None
