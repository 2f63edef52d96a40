"""What training reads: shards and their manifest, sample building (tiling, conversation, targets),
batches and the resumable shard loader.

Knows nothing of training, parallelism or preprocessing (that is ``perceptio_dist.preprocess``).
"""
