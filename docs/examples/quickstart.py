"""A batched task, a worker and three callers in one file: python quickstart.py

The worker runs in a thread of this process (Celery's own ``start_worker``), on the in-memory
broker, so nothing else needs to run. Swap in your Redis URLs and ``celery -A quickstart worker``
for the real thing.
"""

from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_batched import BatchedTask

app = Celery("quickstart", broker="memory://", backend="cache+memory://")
app.conf.broker_transport_options = {"polling_interval": 0.01}

calls = []


@app.task(base=BatchedTask, max_batch_size=2, wait_ms=1000)
def batch_add(xs: list[int], ys: list[int]) -> list[int]:
    calls.append((xs, ys))
    return [x + y for x, y in zip(xs, ys)]


if __name__ == "__main__":
    with start_worker(app, perform_ping_check=False):
        results = [batch_add.delay(1, 300), batch_add.delay(2, 200),
                   batch_add.delay(3, ys=100)]
        print([r.get(timeout=10) for r in results])  # [301, 202, 103]
        # Two calls: a full batch of 2 at once, then the third alone after 1000 ms.
        print(len(calls), "calls:", calls)
    assert [r.result for r in results] == [301, 202, 103]
    assert calls == [([1, 2], [300, 200]), ([3], [100])]
