"""Conversation -> token ids and labels, with the spatial chain of thought in the assistant turn.

Layout (ChatML, as InternVL2.5's chat template):

    <|im_start|>user\n<img><IMG_CONTEXT> x n</img>\n{question}<|im_end|>\n<|im_start|>assistant\n
    [SEG] <DEPTH_START> <DEPTH_i1> .. <DEPTH_iN> <DEPTH_END> {answer}<|im_end|>

or, with ``model.backbone.image_position: after_question``, ``{question}\n<img>..</img>`` in the user turn: then
the distance from image token i to depth token i no longer depends on the question's length.

Only assistant turns (spatial tokens, the answer and the closing <|im_end|>) are targets; later
turns of a multi-turn conversation follow the same pattern without the image and spatial tokens.
Spatial tokens are inserted as ids, never parsed back out of text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from ..losses.objective import IGNORE_INDEX
from ..model.spatial_tokens import SpatialTokenIds


@dataclass(frozen=True)
class ImageTokens:
    start: str
    context: str
    end: str
    per_tile: int  # image tokens per tile after pixel shuffle
    after_question: bool = False  # model.backbone.image_position == "after_question"

    def first_user_turn(self, num_tiles: int, question: str) -> str:
        span = self.start + self.context * (self.per_tile * num_tiles) + self.end
        return f"{question}\n{span}" if self.after_question else f"{span}\n{question}"


def spatial_answer_ids(ids: SpatialTokenIds, with_seg: bool, depth_codes: Sequence[int] | None) -> list[int]:
    out = [ids.seg] if with_seg else []
    if depth_codes is not None:
        if len(depth_codes) != ids.num_depth_tokens:
            raise ValueError(f"a depth block needs N={ids.num_depth_tokens} codes, got {len(depth_codes)}")
        if any(not 0 <= int(c) < ids.num_codes for c in depth_codes):
            raise ValueError(f"depth codes must be in [0, {ids.num_codes})")
        out += [ids.depth_start] + [ids.code_to_token(int(c)) for c in depth_codes] + [ids.depth_end]
    return out


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    image: ImageTokens,
    num_tiles: int,
    turns: Sequence[Sequence[str]],
    spatial_ids: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) for an image conversation; the image opens (or, ``image.after_question``, closes) the
    first question and the spatial tokens open the first answer. Every assistant turn (with its <|im_end|>) is
    a target, nothing else."""

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    input_ids: list[int] = []
    labels: list[int] = []
    for i, (question, answer) in enumerate(turns):
        user = image.first_user_turn(num_tiles, question) if i == 0 else question
        prompt = enc(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
        target = (spatial_ids if i == 0 else []) + enc(answer) + enc("<|im_end|>")
        newline = enc("\n") if i < len(turns) - 1 else []
        input_ids += prompt + target + newline
        labels += [IGNORE_INDEX] * len(prompt) + target + [IGNORE_INDEX] * len(newline)
    return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, image: ImageTokens, num_tiles: int, question: str) -> torch.Tensor:
    """The first user turn and the assistant header: what generation continues (the layout above)."""
    text = f"<|im_start|>user\n{image.first_user_turn(num_tiles, question)}<|im_end|>\n<|im_start|>assistant\n"
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
