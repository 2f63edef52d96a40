"""The toy world: a tiny Perceptio trained and evaluated on rendered scenes on two CPU ranks (docs/research/).

Importing the package registers its parts with the core: its config fields (config_fields.py), the initialisers
of a fresh model (initialisers.py), its sample options (sample_options.py), the marker-step answer format and its
evaluation diagnostic (marker_step.py). The demo (demo.py, ``perceptio-demo``) and the sweep (sweep.py, ``perceptio-sweep``)
are its commands.
"""

from . import config_fields, initialisers, marker_step, sample_options  # noqa: F401  (each registers its parts)
