"""``python -m perceptio_dist.vqvae train|eval|ablate ...``: an alias of perceptio-vqvae (cli/vqvae.py);
``torchrun ... -m perceptio_dist.vqvae train`` for DDP."""

from .cli.vqvae import main

if __name__ == "__main__":
    main()
