"""Items fail one by one: python failures.py

A returned exception fails its item only; ``RetryItem`` re-sends one item; a call that raises
fails its whole batch, or -- with ``isolate_failures=True`` -- only the items that make it raise.
"""

from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_batched import BatchedTask, RetryItem

app = Celery("failures", broker="memory://", backend="cache+memory://")
app.conf.broker_transport_options = {"polling_interval": 0.01}


@app.task(base=BatchedTask, max_batch_size=8, wait_ms=200)
def parse(docs: list[str]) -> list[object]:
    out: list[object] = []
    for doc in docs:
        try:
            out.append(int(doc))
        except ValueError as exc:
            out.append(exc)  # this item ends FAILURE with exc; the others succeed
    return out


seen: dict[str, int] = {}


@app.task(base=BatchedTask, max_batch_size=8, wait_ms=200)
def flaky(keys: list[str]) -> list[object]:
    out: list[object] = []
    for key in keys:
        seen[key] = seen.get(key, 0) + 1
        if key == "busy" and seen[key] == 1:
            out.append(RetryItem(countdown=0.1))  # only this item runs again, later
        else:
            out.append(key.upper())
    return out


@app.task(base=BatchedTask, max_batch_size=8, wait_ms=200, isolate_failures=True)
def divide(xs: list[int]) -> list[float]:
    return [100 / x for x in xs]  # one zero makes the whole call raise


if __name__ == "__main__":
    with start_worker(app, perform_ping_check=False):
        good, bad = parse.delay("42"), parse.delay("forty-two")
        assert good.get(timeout=10) == 42
        assert bad.get(timeout=10, propagate=False).__class__ is ValueError
        print("parse:", good.state, bad.state)  # SUCCESS FAILURE

        results = flaky.map_items(["busy", "idle"])
        assert results.get(timeout=10) == ["BUSY", "IDLE"]
        assert seen == {"busy": 2, "idle": 1}
        print("flaky ran:", seen)

        results = divide.map_items([1, 0, 4, 5])
        values = results.get(timeout=10, propagate=False)
        assert values[0] == 100.0 and values[2:] == [25.0, 20.0]
        assert isinstance(values[1], ZeroDivisionError)
        print("divide:", [r.state for r in results])  # only the zero fails
