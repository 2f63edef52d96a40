"""Conversation -> token ids and labels, with the spatial chain of thought in the assistant turn.

Layout (ChatML, as InternVL2.5's chat template):

    <|im_start|>user\n<img><IMG_CONTEXT> x n</img>\n{question}<|im_end|>\n<|im_start|>assistant\n
    [SEG] <DEPTH_START> <DEPTH_i1> .. <DEPTH_iN> <DEPTH_END> {answer}<|im_end|>

Only the assistant turn (its spatial tokens, the answer and the closing <|im_end|>) is a target.
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
    question: str,
    spatial_ids: list[int],
    answer: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) for one image-question-answer turn."""

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    image_span = image.start + image.context * (image.per_tile * num_tiles) + image.end
    prompt = enc(f"<|im_start|>user\n{image_span}\n{question}<|im_end|>\n<|im_start|>assistant\n")
    target = spatial_ids + enc(answer) + enc("<|im_end|>")
    input_ids = torch.tensor(prompt + target, dtype=torch.long)
    labels = torch.tensor([IGNORE_INDEX] * len(prompt) + target, dtype=torch.long)
    return input_ids, labels
