"""COCO-format instance annotations: one referring-segmentation record per category that occurs
exactly once in an image (so "the <category>" is unambiguous). Polygons and RLE (crowd) both decode
through pycocotools at preprocessing time; crowd regions are never targets.

    path:   instances.json
    images: the images folder (default: the folder of the json)
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Iterator

from ..config import CocoSource
from ..records import Record, safe_key
from .refcoco import coco_mask

MIN_AREA = 100.0  # pixels; smaller objects make poor targets


def iter_coco(spec: CocoSource) -> Iterator[Record]:
    path = Path(spec.path)
    data = json.loads(path.read_text())
    images_dir = Path(spec.images) if spec.images else path.parent
    names = {c["id"]: c["name"] for c in data["categories"]}
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    for image in sorted(data["images"], key=lambda im: im["id"]):
        anns = by_image.get(image["id"], [])
        per_category: dict[int, list[dict]] = defaultdict(list)
        for ann in anns:
            per_category[ann["category_id"]].append(ann)
        for category, group in sorted(per_category.items()):
            if len(group) != 1 or group[0].get("iscrowd", 0) or group[0].get("area", MIN_AREA) < MIN_AREA:
                continue
            name = names[category]
            yield Record(
                key=safe_key("coco", image["id"], group[0]["id"]),
                source="coco",
                task="referring_seg",
                image=str(images_dir / image["file_name"]),
                turns=[[f"Please segment the {name} in this image.", f"Sure, it is the {name}."]],
                with_seg=True,
                mask=coco_mask(group[0], image),
                meta={"image_id": image["id"], "ann_id": group[0]["id"], "category": name},
            )
