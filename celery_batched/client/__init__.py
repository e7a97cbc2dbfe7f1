"""Where the caller's code runs: sending many items at once and collecting their results.

* ``submit`` -- ``starmap_items``/``map_items``: every item checked, then sent in few round trips
  (spliced Redis pipelines, or kombu's producer); ``ItemResults.get`` collects with ``MGET``;
* ``stats`` -- ``batching_stats(app)``: ask running workers how their batches went.
"""
