"""Small real-format datasets built by the tests: RefCOCO (refer layout), COCO, LLaVA, an image folder,
and a tiny random Depth Anything V2 saved the way real checkpoints are."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def _image(path: Path, seed: int, size=(96, 72)) -> Path:
    rng = np.random.default_rng(seed)
    array = np.full((size[1], size[0], 3), rng.integers(40, 200, 3), dtype=np.uint8)
    array[20:50, 30:70] = rng.integers(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)
    return path


def box_polygon(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def make_refcoco(root: Path) -> Path:
    """<root>/refcoco/refs(unc).p + instances.json, images in <root>/images (2 refs, 3 sentences, 1 in val)."""
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": 72, "width": 96} for i in (1, 2)]
    for im in images:
        _image(root / "images" / im["file_name"], im["id"])
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [box_polygon(30, 20, 70, 50)], "area": 1200.0,
         "bbox": [30, 20, 40, 30], "iscrowd": 0},
        {"id": 11, "image_id": 2, "category_id": 2, "segmentation": [box_polygon(5, 5, 25, 30)], "area": 500.0,
         "bbox": [5, 5, 20, 25], "iscrowd": 0},
    ]
    (root / "refcoco").mkdir(parents=True, exist_ok=True)
    (root / "refcoco" / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "cup"}]}))
    refs = [
        {"ref_id": 100, "ann_id": 10, "image_id": 1, "split": "train", "category_id": 1,
         "sentences": [{"sent": "the coloured box", "raw": "The coloured box"}, {"sent": "box in the middle"}]},
        {"ref_id": 101, "ann_id": 11, "image_id": 2, "split": "train", "category_id": 2,
         "sentences": [{"sent": "small cup top left"}]},
        {"ref_id": 102, "ann_id": 11, "image_id": 2, "split": "val", "category_id": 2,
         "sentences": [{"sent": "validation only"}]},
    ]
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return root


def make_coco(root: Path) -> Path:
    """instances.json: a usable polygon, a crowd RLE (never a target), a degenerate polygon and a missing image."""
    from pycocotools import mask as coco_mask

    images = [{"id": i, "file_name": f"{i:06d}.jpg", "height": 72, "width": 96} for i in (1, 2, 3)]
    for im in images[:2]:
        _image(root / im["file_name"], 100 + im["id"])
    crowd = np.zeros((72, 96), dtype=np.uint8, order="F")
    crowd[40:60, 10:40] = 1
    rle = coco_mask.encode(crowd)
    rle["counts"] = rle["counts"].decode()
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [box_polygon(30, 20, 70, 50)], "area": 1200.0,
         "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "segmentation": rle, "area": 600.0, "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 3, "segmentation": [[10, 10, 10, 10, 10, 10]], "area": 150.0,
         "iscrowd": 0},  # zero-area polygon: decodes to an empty mask
        {"id": 4, "image_id": 3, "category_id": 1, "segmentation": [box_polygon(1, 1, 40, 40)], "area": 1500.0,
         "iscrowd": 0},  # its image file does not exist
    ]
    categories = [{"id": 1, "name": "dog"}, {"id": 2, "name": "people"}, {"id": 3, "name": "kite"}]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path


def make_llava(root: Path) -> Path:
    _image(root / "a.jpg", 200)  # next to the json, where the adapter looks by default
    entries = [
        {"id": "a1", "image": "a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A box."},
            {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Grey."}]},
        {"id": "t1", "conversations": [{"from": "human", "value": "Text only?"}, {"from": "gpt", "value": "Yes."}]},
    ]
    path = root / "llava.json"
    path.write_text(json.dumps(entries))
    return path


def make_image_folder(root: Path) -> Path:
    for i in range(3):
        _image(root / f"img_{i}.jpg", 300 + i)
    (root / "broken.jpg").write_bytes(b"this is not a jpeg")
    return root


def save_tiny_depth_anything(path: Path) -> Path:
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(0)
    config = DepthAnythingConfig(
        backbone_config=Dinov2Config(image_size=56, patch_size=14, hidden_size=16, num_hidden_layers=4,
                                     num_attention_heads=2, intermediate_size=32,
                                     out_features=["stage1", "stage2", "stage3", "stage4"],
                                     reshape_hidden_states=False),
        reassemble_hidden_size=16, neck_hidden_sizes=[8, 16, 16, 16], fusion_hidden_size=16, head_hidden_size=8,
        patch_size=14, depth_estimation_type="relative",
    )
    DepthAnythingForDepthEstimation(config).save_pretrained(path)
    return path
