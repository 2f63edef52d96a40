"""Do the generated depth maps depend on the image? Their error against the true depth beside a map that cannot.

A model that learns only the average room layout lowers its depth-token loss a long way and still says nothing
about this scene. The reference is the training set's mean map (the per-pixel mean of the stored depth targets,
normalised inverse depth, written by perceptio-export as mean_depth.npy). Both maps are aligned to each
held-out image's true depth by a per-image scale and shift (eval/depth_metrics.py, the MiDaS protocol) and scored
by AbsRel at the depth tokenizer's input size. A map that follows the image has a clearly lower error.
"""

from __future__ import annotations

import numpy as np

from .depth_metrics import abs_rel, align_to_depth

MEAN_DEPTH_FILE = "mean_depth.npy"


def training_mean_depth(store, max_samples: int = 4000) -> np.ndarray | None:
    """Per-pixel mean of the depth targets stored with the training shards (``store``: a ShardStore or a
    folder; None: none stored), over at most ``max_samples`` of them in shard order, so exporting an 8B run does
    not read its whole training set."""
    from ..data.shard_access import ShardStore
    from ..data.shards import npy_load, read_shard

    store = store if isinstance(store, ShardStore) else ShardStore(store)
    total, count = None, 0
    for entry in sorted(store.manifest["shards"], key=lambda e: e["path"]):
        if count >= max_samples:
            break
        for sample in read_shard(store.local_path(entry)):
            if count >= max_samples:
                break
            if not sample.depth_npy:
                continue
            depth = npy_load(sample.depth_npy).astype(np.float64)
            total = depth if total is None else total + depth
            count += 1
    return None if total is None else (total / count).astype(np.float32)


def _true_depth_at(depth: np.ndarray, size: int) -> np.ndarray:
    """Metric depth block-averaged onto size x size (the view the depth tokens have of the image)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.where(np.isfinite(depth), depth, 0).astype(np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="area")[0, 0].numpy()


def aligned_abs_rel(inverse_map: np.ndarray, true_depth: np.ndarray) -> float:
    """AbsRel of a normalised inverse-depth map against the true metric depth, after scale-and-shift alignment."""
    truth = _true_depth_at(true_depth, inverse_map.shape[0])
    valid = truth > 0
    return abs_rel(align_to_depth(inverse_map, truth, valid), truth, valid)


def depth_dependence(pairs: list[tuple[np.ndarray, np.ndarray]], mean_map: np.ndarray | None) -> dict | None:
    """``pairs``: (generated inverse map, true depth) per item. Mean AbsRel of the generated maps, of the mean
    map on the same items, and their ratio (generated / mean: under 1 means the maps follow the image)."""
    if not pairs:
        return None
    generated = [aligned_abs_rel(m, d) for m, d in pairs]
    out = {"generated_absrel": float(np.mean(generated)), "count": len(pairs)}
    if mean_map is not None:
        reference = [aligned_abs_rel(mean_map, d) for _, d in pairs]
        out["mean_map_absrel"] = float(np.mean(reference))
        out["ratio"] = out["generated_absrel"] / max(out["mean_map_absrel"], 1e-12)
    return out
