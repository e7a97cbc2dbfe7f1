"""A batched task whose worker has batch observers of the app's own (``batching_observers``)."""

from __future__ import annotations

from celery_batched import BatchedTask, BatchObserver

from ._common import make_app, redis_client

_redis = redis_client()


class Recorder(BatchObserver):
    """Writes every call to Redis: the test compares them with what ran."""

    def flushed(self, batch):  # noqa: ANN001, ANN201
        _redis.rpush("obs:flushed", f"{batch.id}|{len(batch.items)}|{batch.reason}|"
                                    + ",".join(it.id for it in batch.items))

    def executed(self, batch, runtime_s):  # noqa: ANN001, ANN201
        _redis.rpush("obs:executed", f"{batch.id}|{runtime_s >= 0}")

    def finished(self, batch, outcome):  # noqa: ANN001, ANN201
        _redis.rpush("obs:finished", f"{batch.id}|{outcome.succeeded}|{outcome.failed}|"
                                     f"{outcome.retried}|{outcome.handed_back}")


class Broken(BatchObserver):
    """Raises on every flush: batching must go on (the error is logged)."""

    def flushed(self, batch):  # noqa: ANN001, ANN201
        raise RuntimeError("an observer's bug")


app = make_app("observed", batching_observers=["tests.apps.observed:Broken",
                                               "tests.apps.observed:Recorder"])


@app.task(base=BatchedTask, max_batch_size=8, wait_ms=100)
def halve(xs: list[int]) -> list[object]:
    return [ValueError(f"{x} is odd") if x % 2 else x // 2 for x in xs]
