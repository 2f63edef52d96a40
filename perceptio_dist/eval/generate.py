"""Generation with the spatial chain of thought, constrained, and its decoded outputs.

After <DEPTH_START> only depth codes are allowed, exactly N of them, then <DEPTH_END> is forced; codes
and <DEPTH_END> never appear elsewhere; [SEG] and the depth block appear at most once, and a policy per
benchmark can force them at the start of the answer (the order training uses: [SEG], depth block,
text) or forbid them (the ablation without depth tokens). Generation runs through transformers'
`generate` (KV cache, greedy or sampling, batched with left padding). The mask comes from the [SEG]
hidden state exactly as in training: one teacher-forced forward of the PerceptioModel over prompt and
answer; the depth map is the VQ-VAE decode of the generated codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

from ..model.spatial_tokens import SpatialTokenIds

Policy = Literal["force", "forbid", "free"]


@dataclass(frozen=True)
class SpatialPolicy:
    seg: Policy = "free"
    depth: Policy = "free"


class SpatialConstraint(LogitsProcessor):
    """Masks the scores of each row by the state of its answer so far (tokens after the prompt)."""

    def __init__(self, ids: SpatialTokenIds, prompt_length: int, policy: SpatialPolicy, never: tuple[int, ...] = ()):
        """``never``: tokens an answer may not hold at all (the image-context token: the model replaces every one
        of them with image features, so an answer holding one cannot be read back)."""
        self.ids, self.prompt_length, self.policy, self.never = ids, prompt_length, policy, list(never)

    def allowed(self, generated: list[int], vocab: int) -> torch.Tensor:
        ids, policy = self.ids, self.policy
        allow = torch.ones(vocab, dtype=torch.bool)
        allow[self.never] = False
        only = torch.zeros(vocab, dtype=torch.bool)
        if ids.depth_start in generated and ids.depth_end not in generated:
            codes = len(generated) - 1 - generated.index(ids.depth_start)
            if codes < ids.num_depth_tokens:
                only[ids.code_start:ids.code_end] = True
            else:
                only[ids.depth_end] = True
            return only
        seg_done, depth_done = ids.seg in generated, ids.depth_end in generated
        if policy.seg == "force" and not seg_done:
            only[ids.seg] = True
            return only
        if policy.depth == "force" and not depth_done:
            only[ids.depth_start] = True
            return only
        allow[ids.code_start:ids.code_end] = False
        allow[ids.depth_end] = False
        if depth_done or policy.depth == "forbid":
            allow[ids.depth_start] = False
        if seg_done or policy.seg == "forbid":
            allow[ids.seg] = False
        return allow

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            generated = input_ids[row, self.prompt_length:].tolist()
            keep = self.allowed(generated, scores.shape[-1]).to(scores.device)
            scores[row] = scores[row].masked_fill(~keep, float("-inf"))
        return scores


@dataclass
class GenerationSettings:
    max_new_tokens: int = 160  # text tokens; the spatial tokens the policy allows come on top
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Prediction:
    text: str  # the answer without spatial tokens
    token_ids: list[int]  # everything generated
    depth_codes: list[int] | None  # the N generated codes
    depth: np.ndarray | None  # decoded depth (normalised inverse depth, VQ-VAE input size)
    mask: np.ndarray | None  # bool, the original image size


def _pad_left(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.numel():] = r
        mask[i, width - r.numel():] = 1
    return ids, mask


@torch.no_grad()
def generate(model, tokenizer, prompts: list[torch.Tensor], pixel_values: list[torch.Tensor],
             sam_images: list[torch.Tensor], image_sizes: list[tuple[int, int]], policy: SpatialPolicy,
             settings: GenerationSettings) -> list[Prediction]:
    """Answers for a batch of prompts (token ids ending with the assistant header) and their images."""
    ids = model.token_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    device = model_device(model)
    input_ids, attention = (t.to(device) for t in _pad_left(prompts, pad))
    pixels = torch.cat(pixel_values).to(device, model.backbone.dtype)
    torch.manual_seed(settings.seed)
    spatial = (0 if policy.seg == "forbid" else 1) + (0 if policy.depth == "forbid" else ids.num_depth_tokens + 2)
    out = model.backbone.generate(
        input_ids=input_ids, attention_mask=attention, pixel_values=pixels,
        logits_processor=LogitsProcessorList([SpatialConstraint(ids, input_ids.shape[1], policy,
                                                                never=(model.backbone.config.image_token_id,))]),
        max_new_tokens=settings.max_new_tokens + spatial, do_sample=settings.do_sample,
        temperature=settings.temperature if settings.do_sample else None,
        top_p=settings.top_p if settings.do_sample else None, top_k=None,
        eos_token_id=end_id, pad_token_id=pad, use_cache=True,
    )
    answers = out[:, input_ids.shape[1]:]
    predictions = []
    for row in range(len(prompts)):
        generated = answers[row].tolist()
        if end_id in generated:
            generated = generated[:generated.index(end_id) + 1]
        text_ids = [t for t in generated if t < model.base_vocab_size and t != end_id]
        codes = None
        if ids.depth_start in generated and ids.depth_end in generated:
            start = generated.index(ids.depth_start)
            codes = [t - ids.code_start for t in generated[start + 1:generated.index(ids.depth_end)]]
        depth = None
        if codes is not None and len(codes) == ids.num_depth_tokens:
            depth = model.depth_vqvae.decode(torch.tensor([codes], device=device))[0, 0].float().cpu().numpy()
        mask = None
        if ids.seg in generated:
            mask = _mask_for(model, prompts[row], generated, pixel_values[row], sam_images[row], image_sizes[row],
                             device)
        predictions.append(Prediction(tokenizer.decode(text_ids, skip_special_tokens=True).strip(), generated,
                                      codes, depth, mask))
    return predictions


def _mask_for(model, prompt: torch.Tensor, generated: list[int], pixel_values: torch.Tensor, sam_image: torch.Tensor,
              size: tuple[int, int], device: torch.device) -> np.ndarray:
    """The training path: the PerceptioModel over prompt + answer prompts SAM2 with the [SEG] hidden state."""
    sequence = torch.cat([prompt, torch.tensor(generated, dtype=torch.long)])[None].to(device)
    out = model(sequence, torch.ones_like(sequence), pixel_values.to(device), sam_image[None].to(device))
    logits = out.mask_logits[:1].float()
    full = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0, 0]
    return (torch.sigmoid(full) > 0.5).cpu().numpy()


def model_device(model) -> torch.device:
    """Where the model's weights are (inputs go there; results come back to the CPU)."""
    return next(model.parameters()).device
