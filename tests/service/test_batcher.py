"""Batcher: requests that arrive together share one pass, in order, and a failing pass fails only its requests."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from facesiam.service.batcher import Batcher, NoFace


def fake_model(calls: list):
    def embed_many(images):
        calls.append(len(images))
        return [NoFace("no face") if x < 0 else np.full(4, x, np.float32) for x in images]
    return embed_many


async def run(batcher: Batcher, requests: list[list[int]]):
    await batcher.start()
    try:
        return await asyncio.gather(*(batcher.embed(r) for r in requests), return_exceptions=True)
    finally:
        await batcher.stop()


@pytest.mark.parametrize("max_batch", [1, 4, 64])
def test_concurrent_requests_share_passes_and_keep_their_order(max_batch):
    calls: list[int] = []
    requests = [[i * 10 + j for j in range(1 + i % 3)] for i in range(12)]  # 24 images in 12 requests
    # no time budget at all: what is already waiting when a batch starts joins it at once
    out = asyncio.run(run(Batcher(fake_model(calls), max_batch=max_batch, max_wait_ms=0), requests))
    for req, res in zip(requests, out):
        assert [float(r[0]) for r in res] == [float(x) for x in req]
    # all 12 requests arrive together: full batches (max_batch 1: one pass per image), the last one the rest
    full, rest = divmod(24, max_batch)
    assert calls == [max_batch] * full + ([rest] if rest else [])


class SteppingClock:
    """A fake monotonic clock: frozen, or moving ``step`` seconds every time it is read."""

    def __init__(self, step: float = 0.0):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


async def until(condition, tries: int = 1000) -> None:
    """Let the event loop run until ``condition()`` holds (a bounded number of turns: never hangs). Only for
    conditions the event loop alone brings about: what waits on the model thread is awaited instead."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the batcher never got there")


@pytest.mark.parametrize("clock_step,want", [(0.0, [2]), (7200.0, [1, 1])])
def test_a_batch_waits_for_late_requests_until_its_clock_deadline(clock_step, want):
    """max_wait one hour: a frozen clock never reaches the deadline, so a request that comes later joins the waiting
    batch; a clock that moves two hours between reads is past it at once, so the first image goes alone."""
    calls: list[int] = []

    async def scenario():
        b = Batcher(fake_model(calls), max_batch=2, max_wait_ms=3_600_000, clock=SteppingClock(clock_step))
        await b.start()
        try:
            first = asyncio.ensure_future(b.embed([1]))
            await until(lambda: b._queue.qsize() == 1)  # image 1 is queued
            await until(lambda: b._queue.empty())  # and the worker has taken it
            for _ in range(10):  # the worker is now waiting for more (or has gone with image 1 alone)
                await asyncio.sleep(0)
            if not clock_step:
                assert not first.done()  # held back for company
            second = await b.embed([2])  # a later request
            return await first, second
        finally:
            await b.stop()

    first, second = asyncio.run(scenario())
    assert float(first[0][0]) == 1.0 and float(second[0][0]) == 2.0
    assert calls == want


def test_no_face_is_an_answer_and_a_model_error_fails_only_its_batch():
    calls: list[int] = []

    def flaky(images):
        if 99 in images:
            raise RuntimeError("model failed")
        return fake_model(calls)(images)

    async def scenario():
        b = Batcher(flaky, max_batch=8, max_wait_ms=0)
        await b.start()
        try:
            first = await b.embed([1, -1])
            with pytest.raises(RuntimeError, match="model failed"):
                await b.embed([99])
            after = await b.embed([2])
            return first, after, b.stats.as_dict()
        finally:
            await b.stop()

    first, after, stats = asyncio.run(scenario())
    assert float(first[0][0]) == 1.0 and isinstance(first[1], NoFace)
    assert float(after[0][0]) == 2.0  # the service goes on after a failed pass
    assert stats["batches"] == 3 and stats["images"] == 4


def test_hurry_and_stop_run_what_waits_for_company():
    """A drain (service/lifecycle.py): a batch held back for company (max_wait one hour on a frozen clock) goes at
    once on hurry(); stop() runs every image queued before it, then refuses new ones."""
    calls: list[int] = []

    async def scenario():
        b = Batcher(fake_model(calls), max_batch=8, max_wait_ms=3_600_000, clock=SteppingClock(0.0))
        await b.start()
        first = asyncio.ensure_future(b.embed([1, 2]))
        await until(lambda: b._queue.empty() and b.queued == 2)  # gathered by the worker, still waiting: counted
        for _ in range(10):
            await asyncio.sleep(0)
        assert not first.done()
        b.hurry()
        got_first = await first
        # after hurry() a batch is what waits when it starts: these three go together, without waiting an hour
        later = [asyncio.ensure_future(b.embed([x])) for x in (3, 4, 5)]
        # awaited, not polled: the pass runs on the model thread, which a loaded machine may not schedule within
        # any fixed number of event-loop turns (the 10 s bound only keeps a broken batcher from hanging the test)
        await asyncio.wait_for(asyncio.gather(*later), 10)
        queued = [asyncio.ensure_future(b.embed([x])) for x in (6, 7)]
        await asyncio.sleep(0)
        await b.stop()  # queued before the stop: run, not dropped (their answers are set)
        await asyncio.wait_for(asyncio.gather(*queued), 10)
        with pytest.raises(RuntimeError, match="stopped"):
            await b.embed([8])
        return got_first, [f.result() for f in later + queued], b.running

    got_first, rest, running = asyncio.run(scenario())
    assert [float(r[0]) for r in got_first] == [1.0, 2.0]
    assert [float(r[0][0]) for r in rest] == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert calls == [2, 3, 2] and not running
