"""Data: records and sources, synthetic scenes, preprocessing stages, shards, the training loader.

Knows nothing of training or parallelism.
"""
