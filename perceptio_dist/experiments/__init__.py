"""Research experiments: code that plugs into the core through its registries (perceptio_dist/registry.py) and
that the core never imports (tests/test_architecture.py checks it). Each experiment declares itself under the entry
point group ``perceptio_dist.experiments`` (pyproject.toml); importing it registers its parts.

* ``toy``: the toy world the main job (``./run_demo.sh``) trains and evaluates on two CPU ranks: the marker-step
  answer format, the demo, the sweep. Its probes are scripts in tools/toy/.
"""
