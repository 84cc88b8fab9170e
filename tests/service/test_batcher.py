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
    out = asyncio.run(run(Batcher(fake_model(calls), max_batch=max_batch, max_wait_ms=50), requests))
    for req, res in zip(requests, out):
        assert [float(r[0]) for r in res] == [float(x) for x in req]
    assert sum(calls) == 24 and max(calls) <= max_batch
    # all 12 requests arrive together: full batches (max_batch 1: one pass per image)
    assert len(calls) == -(-24 // max_batch)


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
