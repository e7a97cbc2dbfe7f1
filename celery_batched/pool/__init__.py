"""Where a batch runs: a prefork child, a pool thread, or the worker itself with ``solo``.

In data-path order:

* ``execution`` -- the pool job: decode the bodies, ``setup()`` once, ONE call of the function,
  check what it returned (``call_batch``: OOM chunks and splits);
* ``outcomes`` -- per item: ``Outcome.STORE`` for the main process to store, or stored,
  failed or retried here the way Celery's tracer does;
* ``oom`` -- what a process remembers after an out-of-memory split;
* ``event_loop`` -- the loop an ``async def`` batched function runs on.

It answers with one ``protocol.BatchReply`` per batch.
"""
