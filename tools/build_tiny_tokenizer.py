"""Regenerate the small byte-level BPE shipped in perceptio_dist/recipes/tokenizers/tiny_bpe.

It is trained with the `tokenizers` library on generated text shaped like the training
conversations (questions about objects, colours, positions and depth), so the tiny model's
sequences stay short. Deterministic: running it twice writes the same file.

    python tools/build_tiny_tokenizer.py
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parent.parent / "perceptio_dist/recipes/tokenizers/tiny_bpe"
VOCAB_SIZE = 640
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]

COLOURS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple", "grey", "brown", "pink", "cyan"]
OBJECTS = ["sphere", "box", "cube", "duck", "teddy", "table", "chair", "cylinder", "mug", "bottle", "block", "ball"]
RELATIONS = ["left of", "right of", "in front of", "behind", "above", "below", "next to", "closest to", "farthest from"]
QUESTIONS = [
    "Segment the {c} {o}.",
    "Please segment the {c} {o} {r} the {o2}.",
    "Where is the {c} {o}? Give a mask.",
    "Which point is the closest to the camera?",
    "Multiple points are circled on the image, labeled by letters beside each circle. Which point is the closest to the camera?",
    "Estimate the depth of the scene.",
    "What colour is the {o}?",
    "How many objects are on the table?",
    "Is the {c} {o} closer than the {o2}?",
    "Describe the image.",
]
ANSWERS = [
    "It is the {c} {o}.", "Here is the mask.", "({l})", "Point {l} is closest.", "The {o} is {c}.",
    "There are {n} objects.", "Yes.", "No.", "A {c} {o} {r} a {o2}.", "Sure, here it is.",
]


def corpus() -> list[str]:
    lines = []
    for i, (c, o, r, o2) in enumerate(itertools.product(COLOURS, OBJECTS, RELATIONS[:4], OBJECTS[:4])):
        q = QUESTIONS[i % len(QUESTIONS)]
        a = ANSWERS[i % len(ANSWERS)]
        fill = dict(c=c, o=o, r=r, o2=o2, l="ABCDE"[i % 5], n=i % 9)
        lines.append(q.format(**fill) + " " + a.format(**fill))
    lines += [f"{d}" for d in range(1000)]
    return lines


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tok = build()
    data = json.loads(tok.to_str())
    (OUT / "tokenizer.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT / 'tokenizer.json'} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
