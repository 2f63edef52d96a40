"""``python -m perceptio_dist.train --recipe tiny_cpu [section.key=value ...]``: an alias of perceptio-train
(cli/train.py), the module torchrun runs on every rank."""

from ..cli.train import main

if __name__ == "__main__":
    main()
