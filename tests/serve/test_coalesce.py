"""The coalescer merges the batches that wait for a busy model, keeps each caller's results, and never exceeds the size."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cobra_scale.serve.coalesce import Coalescer


class Model:
    """Squares its items; records each call's size; the first call blocks until released."""

    def __init__(self):
        self.calls: list[int] = []
        self.release = threading.Event()

    def __call__(self, items):
        self.calls.append(len(items))
        if len(self.calls) == 1:
            self.release.wait(5)
        return [x * x for x in items]


def run(coro):
    return asyncio.run(coro)


def test_batches_that_wait_merge_into_one_call_and_answer_their_own_callers():
    model = Model()

    async def main():
        c = Coalescer(model, ThreadPoolExecutor(1), lambda: 32)
        first = asyncio.create_task(c.submit([1]))
        await asyncio.sleep(0.05)  # the model is now busy with [1]
        waiting = [asyncio.create_task(c.submit([i, i + 100])) for i in range(2, 9)]  # 7 batches, 14 items
        await asyncio.sleep(0.05)
        model.release.set()
        return await first, await asyncio.gather(*waiting), c.stats

    first, rest, stats = run(main())
    assert first == [1]
    assert rest == [[i * i, (i + 100) ** 2] for i in range(2, 9)]
    assert model.calls == [1, 14]  # the 7 waiting batches ran as one call
    assert stats["batches"] == 2 and stats["requests"] == 15 and stats["seconds"] > 0


@pytest.mark.parametrize("limit,expected", [(5, [1, 4, 4, 4, 2]), (1, [1] + [1] * 14)])
def test_a_call_never_exceeds_max_size_and_size_one_never_merges(limit, expected):
    model = Model()

    async def main():
        c = Coalescer(model, ThreadPoolExecutor(1), lambda: limit)
        first = asyncio.create_task(c.submit([0]))
        await asyncio.sleep(0.05)
        sizes = [2] * 7 if limit > 1 else [1] * 14
        waiting = [asyncio.create_task(c.submit(list(range(n)))) for n in sizes]
        await asyncio.sleep(0.05)
        model.release.set()
        await first
        return await asyncio.gather(*waiting)

    out = run(main())
    assert all(r == [x * x for x in range(len(r))] for r in out)
    assert model.calls == expected
    assert max(model.calls) <= limit


def test_an_error_reaches_the_callers_of_that_call_only():
    calls = []

    def model(items):
        calls.append(list(items))
        if -1 in items:
            raise ValueError("bad item")
        time.sleep(0.01)
        return items

    async def main():
        c = Coalescer(model, ThreadPoolExecutor(1), lambda: 2)
        bad = asyncio.create_task(c.submit([-1]))
        good = asyncio.create_task(c.submit([3]))
        later = asyncio.create_task(c.submit([4, 5]))
        return await asyncio.gather(bad, good, later, return_exceptions=True)

    bad, good, later = run(main())
    assert isinstance(bad, ValueError) and isinstance(good, ValueError)  # merged with the bad one
    assert later == [4, 5]


def test_a_cancelled_caller_does_not_break_the_others():
    model = Model()

    async def main():
        c = Coalescer(model, ThreadPoolExecutor(1), lambda: 8)
        first = asyncio.create_task(c.submit([1]))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(c.submit([2]))
        kept = asyncio.create_task(c.submit([3]))
        await asyncio.sleep(0.01)
        gone.cancel()
        model.release.set()
        return await first, await kept

    assert run(main()) == ([1], [9])
