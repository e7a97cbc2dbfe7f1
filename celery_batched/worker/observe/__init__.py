"""What a worker tells about its batches: the ``inspect batching_stats`` records and the
Prometheus metrics, both fed by ``observers.Observers``."""
