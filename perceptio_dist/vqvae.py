"""``python -m perceptio_dist.vqvae train|eval|ablate ...`` (``torchrun ... -m perceptio_dist.vqvae train`` for DDP)."""

from .cli import vqvae_main

if __name__ == "__main__":
    vqvae_main()
