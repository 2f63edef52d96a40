"""perceptio_dist: distributed training of Perceptio-style spatial vision-language models.

Importing the package has no side effects; heavy dependencies load in the modules that use them.
"""

__version__ = "0.1.0"
