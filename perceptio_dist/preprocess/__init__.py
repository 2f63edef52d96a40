"""What the preprocessing job runs (preprocess/job.py, `perceptio-preprocess`): source adapters, synthetic scenes,
records, the decode / depth / code / write stages and their config.

Sits above ``perceptio_dist.data``: it writes the shards that ``data`` reads, using the shard format
(``data/shards.py``) and the depth teacher (``teachers/``); ``data`` imports nothing from here.
"""
