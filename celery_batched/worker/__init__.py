"""Where the worker's main process runs: the consumer's thread, and the result writer's.

Read in this order -- it is the data path, from a message to its acknowledgement:

1. ``strategy`` -- Celery calls it per message of a batched task: the message becomes an
   ``item.Item`` (body still encoded); revoke and expiry checks, ``task-received``, ETA.
2. ``buffer`` -- per task, items wait unacknowledged until ``max_batch_size`` or ``wait_ms``
   (with ``latency`` for ``max_latency_ms``, ``urgency`` for ``urgent_priority``); ``prefetch``
   sizes how many may wait.
3. ``dispatch`` -- a flushed ``batch.Batch`` becomes ONE pool job (``protocol.WireItem`` each);
   the pool (``celery_batched.pool``) runs it and answers one ``protocol.BatchReply``.
4. ``writer`` -- a thread of the main process stores the successes in one round trip, while the
   pool runs the next batch.
5. ``completion`` -- per item, on the consumer's thread (``handoff`` carries callbacks there):
   acks, events, worker state; what could not be stored goes back to the broker.

Around them: ``bootstep`` is the thin Celery step that builds ``service``, which wires it all
per worker and per broker connection (``Buffers``: one connection's open buffers); ``observers``
tells every batch's flush, execution and end to ``observe`` (stats, recent batches, metrics),
the latency model and users' observers; ``control`` answers the remote-control commands; ``checks`` refuses
configurations that would lose items; ``in_flight`` counts what a shutdown waits for.
"""
