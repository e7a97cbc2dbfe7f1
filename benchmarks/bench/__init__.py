"""The code behind ``benchmarks/run.py`` (the runner: arguments, sections table, main).

Helpers (each imports only helpers listed above it, never a section or the runner; ``results``
and ``cpu`` name ``workers.Worker`` in type hints only):

    common        paths, the default Redis URL, ``log``, ``CorrectnessError``
    config        ``Config``: every size and setting of a run (``run.py`` fills it in)
    results       Redis results: count, fetch, decode, verify, wait for them
    report        the table's rows and number formats, the machine description, the markdown
    workers       ``Worker`` (a ``celery worker`` subprocess) and its ``batching_stats``
    cpu           CPU meters: by process per item (``ProcessCpu``), other programs (``CpuMeter``)
    senders       task messages put straight on a Redis queue (``RawEnqueuer``), a sender app
    cbatches      celery-batches in its own virtualenv
    timed_drain   a pre-loaded queue drained by one worker, timed and checked
    sentences     generated English sentences (embed; also ``benchmarks/policies.py``)

Sections (one ``section_<name>(cfg, rep)`` each; they import helpers, never each other):
``drain``, ``gpusim``, ``latency``, ``bulk``, ``embed``, ``rss``.
"""
