"""Every place celery_batched reaches into Celery's or kombu's internals, in one package.

* ``worker``: the consumer side (strategy, ``Request`` handlers, worker state);
* ``trace``: the pool side (Celery's tracer: contexts, callbacks, failures, retries, results);
* ``client``: bulk submit and collection (``AsyncResult``, task-sent events);
* ``kombu_redis``: kombu's Redis transport (bulk fetch, bulk ack, bulk publish);
* ``redis_results``: Celery's Redis result backend (a batch stored or read in one round trip).

Each function names the function it mirrors; ``tests/test_internals.py`` pins every mirrored
function to the Celery and kombu releases CI runs and fails, naming it, when a release changes it.
"""
