"""Evaluation: real RGB-D frames and depth metrics, the depth tokenizer report."""
