"""The micro-batcher: concurrent requests grouped into batches, each answer its own."""

import asyncio

import numpy as np


def test_micro_batcher_groups_concurrent_requests_and_keeps_each_answer():
    from bakeoff.serve.batching import MicroBatcher

    seen = []

    def predict(batch):
        seen.append(len(batch))
        return batch.reshape(len(batch), -1)[:, :2] * 2  # each row's answer depends on its own input only

    async def main():
        b = MicroBatcher(predict, max_batch=8, max_wait_ms=5)
        await b.start()
        xs = [np.full((1, 2, 2), i, np.float32) for i in range(20)]
        out = await asyncio.gather(*(b.submit(x) for x in xs))
        lone = await b.submit(np.full((1, 2, 2), 99, np.float32))
        await b.stop()
        return out, lone

    out, lone = asyncio.run(main())
    assert [float(o[0]) for o in out] == [2.0 * i for i in range(20)]
    assert float(lone[0]) == 198.0
    assert max(seen) == 8 and sum(seen) == 21 and len(seen) < 21
