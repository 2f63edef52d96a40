"""``python -m perceptio_dist.train --recipe tiny_cpu [section.key=value ...]`` (run under torchrun for several ranks)."""

from ..cli import train_main

if __name__ == "__main__":
    train_main()
