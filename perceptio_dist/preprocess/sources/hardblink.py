"""HardBLINK (evaluation only): 3-, 4- and 5-point relative depth, markers already drawn in the images.

    questions/blink_{n}pointscenter_questions.jsonl   {"question_id", "image", "text"}
    answers/blink_{n}pointscenter_answers.jsonl       {"question_id", "text": "(A)"}
    images/blink{n}pointscenter/<image>
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..config import HardblinkSource
from ..records import Record, safe_key

POINT_COUNTS = (3, 4, 5)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def iter_hardblink(spec: HardblinkSource) -> Iterator[Record]:
    root = Path(spec.path)
    for n in POINT_COUNTS:
        questions = _jsonl(root / "questions" / f"blink_{n}pointscenter_questions.jsonl")
        answers = {a["question_id"]: a["text"] for a in _jsonl(root / "answers" / f"blink_{n}pointscenter_answers.jsonl")}
        for q in questions:
            yield Record(
                key=safe_key("hardblink", n, q["question_id"]),
                source=f"hardblink_{n}",
                task="relative_depth",
                image=str(root / "images" / f"blink{n}pointscenter" / q["image"]),
                turns=[[q["text"], answers[q["question_id"]]]],
                with_depth=True,
                split="eval",
                meta={"num_points": n, "question_id": q["question_id"]},
            )
