"""Logging for every entry point: one format, rank 0 at INFO and the others at WARNING, noisy libraries quieted."""

from __future__ import annotations

import logging

NOISY = ("DeepSpeed", "deepspeed", "transformers", "torch.distributed")


def configure_logging(rank: int = 0) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
