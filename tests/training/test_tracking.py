"""StepWindow: the data-wait fraction of a log window, and the one warning when the loader sets the speed."""

from __future__ import annotations

import time

import torch

from facesiam.training.tracking import StepWindow


def slow_batches(n: int, seconds: float):
    for i in range(n):
        time.sleep(seconds)  # a loader that cannot keep up: every batch is waited for
        yield i


def test_a_starved_loop_is_warned_about_once_after_the_first_window():
    window = StepWindow(torch.device("cpu"))
    messages = []
    for _ in range(3):
        for _ in window.timed(slow_batches(3, 0.02)):
            window.steps += 1
        stats = window.stats(images_per_step=8, processes=1)
        assert stats["data_wait_fraction"] > 0.5  # nothing but waiting
        messages.append(window.slow_data_warning(stats, num_workers=2))
        window.reset()
    assert messages[0] is None  # the first window includes the loader's start-up
    assert "waited for data" in messages[1] and "--num-workers (now 2)" in messages[1]
    assert "--augment-device cuda" in messages[1]
    assert messages[2] is None  # once per run


def test_a_fed_loop_is_not_warned_about():
    window = StepWindow(torch.device("cpu"))
    for _ in range(3):
        for _ in window.timed(range(3)):
            window.steps += 1
            time.sleep(0.02)  # the step's own work: the batches were ready
        stats = window.stats(images_per_step=8, processes=1)
        assert stats["data_wait_fraction"] < 0.1
        assert window.slow_data_warning(stats, num_workers=2) is None
        window.reset()
