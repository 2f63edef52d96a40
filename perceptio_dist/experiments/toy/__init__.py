"""The toy world: a tiny Perceptio trained and evaluated on rendered scenes on two CPU ranks (docs/research/).

Importing the package registers its parts with the core: the marker-step answer format and its evaluation
diagnostic (marker_step.py). The demo (demo.py, ``perceptio-demo``) and the sweep (sweep.py, ``perceptio-sweep``)
are its commands.
"""

from . import marker_step  # noqa: F401  (registers the answer format and the diagnostic)
