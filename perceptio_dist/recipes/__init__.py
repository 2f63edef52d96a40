"""YAML recipes shipped with the package (every field is documented in perceptio_dist/config.py)."""
