"""RefCOCO / RefCOCO+ / RefCOCOg in the refer toolkit's layout.

    <path>/<dataset>/refs(<split_by>).p    list of refs: ref_id, ann_id, image_id, split, sentences[{sent}]
    <path>/<dataset>/instances.json        COCO-format images and annotations (polygons or RLE)
    <images>/<file_name>                   COCO train2014 images (default: <path>/images)

The pickle is read with a restricted unpickler (plain containers and scalars only). A JSON
conversion, refs(<split_by>).json, is accepted as well and preferred when both exist.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..config import RefcocoSource
from ..records import Record, safe_key
from ..restricted_pickle import load_plain_pickle


def load_refs(folder: Path, split_by: str) -> list[dict]:
    as_json = folder / f"refs({split_by}).json"
    if as_json.exists():
        return json.loads(as_json.read_text())
    as_pickle = folder / f"refs({split_by}).p"
    if not as_pickle.exists():
        raise FileNotFoundError(f"no refs({split_by}).p or .json in {folder}")
    return load_plain_pickle(as_pickle.read_bytes())


def coco_mask(annotation: dict, image: dict) -> dict:
    """The annotation's segmentation in Record form (polygons or RLE), with the image size for decoding."""
    seg = annotation["segmentation"]
    size = [image["height"], image["width"]]
    return {"rle": seg, "size": size} if isinstance(seg, dict) else {"polygons": seg, "size": size}


def iter_refcoco(spec: RefcocoSource) -> Iterator[Record]:
    folder = Path(spec.path) / spec.dataset
    images_dir = Path(spec.images) if spec.images else Path(spec.path) / "images"
    instances = json.loads((folder / "instances.json").read_text())
    anns = {a["id"]: a for a in instances["annotations"]}
    images = {im["id"]: im for im in instances["images"]}
    keep = set(spec.splits)
    for ref in load_refs(folder, spec.split_by):
        if ref["split"] not in keep:
            continue
        ann, image = anns[ref["ann_id"]], images[ref["image_id"]]
        for i, sentence in enumerate(ref["sentences"]):
            text = sentence["sent"].strip()
            yield Record(
                key=safe_key(spec.dataset, ref["ref_id"], i),
                source=spec.dataset,
                task="referring_seg",
                image=str(images_dir / image["file_name"]),
                turns=[[f"Please segment {text} in this image.", f"Sure, it is {text}."]],
                with_seg=True,
                mask=coco_mask(ann, image),
                meta={"ref_id": ref["ref_id"], "ann_id": ref["ann_id"], "image_id": ref["image_id"],
                      "split": ref["split"], "expression": text},
            )
