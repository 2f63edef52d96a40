"""An image folder (e.g. ADE20K images) for depth-only samples: the teacher provides the target."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..config import ImageFolderSource
from ..records import DEPTH_ANSWER, DEPTH_QUESTION, Record, safe_key

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def iter_image_folder(spec: ImageFolderSource) -> Iterator[Record]:
    root = Path(spec.path)
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        rel = path.relative_to(root)
        yield Record(
            key=safe_key("images", rel.with_suffix("")),
            source=f"image_folder:{root.name}",
            task="depth",
            image=str(path),
            turns=[[DEPTH_QUESTION, DEPTH_ANSWER]],
            with_depth=True,
            meta={"file": str(rel)},
        )
