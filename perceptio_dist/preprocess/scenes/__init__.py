"""Synthetic spatial scenes: pybullet rendering and the samples built from them."""
