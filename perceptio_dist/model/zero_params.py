"""Editing parameters right after construction, whether or not ZeRO-3 has partitioned them."""

from __future__ import annotations

import contextlib

from torch import nn


def editable(params: list[nn.Parameter]):
    """A context in which ``params`` are whole: under ZeRO-3 (zero.Init) they are gathered and rank 0's edit is
    broadcast when the context closes; otherwise nothing happens."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()
