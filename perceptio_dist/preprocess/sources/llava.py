"""LLaVA-style conversation JSON (general VQA): a list of
``{"id", "image", "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}``.
Text-only entries are skipped (every Perceptio sample has an image)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..config import LlavaSource
from ..records import Record, safe_key


def _turns(conversations: list[dict]) -> list[list[str]]:
    turns, question = [], None
    for message in conversations:
        value = message["value"].replace("<image>", "").strip()
        if message["from"] == "human":
            question = value
        elif message["from"] == "gpt" and question is not None:
            turns.append([question, value])
            question = None
    return turns


def iter_llava(spec: LlavaSource) -> Iterator[Record]:
    path = Path(spec.path)
    images_dir = Path(spec.images) if spec.images else path.parent
    for i, entry in enumerate(json.loads(path.read_text())):
        if not entry.get("image"):
            continue
        turns = _turns(entry.get("conversations", []))
        if not turns:
            continue
        yield Record(
            key=safe_key("llava", entry.get("id", i), i),
            source="llava",
            task="vqa",
            image=str(images_dir / entry["image"]),
            turns=turns,
            meta={"id": str(entry.get("id", i))},
        )
