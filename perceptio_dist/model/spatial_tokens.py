"""The spatial tokens: ``[SEG]``, ``<DEPTH_START>``, ``<DEPTH_END>`` and K code tokens ``<DEPTH_k>``.

The K code tokens get contiguous ids, so "the logits of the depth codes" is one slice of the
LM head, ``[code_start, code_start + K)``: the restricted softmax and the fused loss rely on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from .config import SpatialTokensConfig


@dataclass(frozen=True)
class SpatialTokenIds:
    seg: int
    depth_start: int
    depth_end: int
    code_start: int
    num_codes: int  # K
    num_depth_tokens: int  # N

    @property
    def code_end(self) -> int:
        return self.code_start + self.num_codes

    @property
    def first(self) -> int:
        """The lowest spatial-token id (they are added after the base vocabulary, so every row from here on)."""
        return min(self.seg, self.depth_start, self.depth_end, self.code_start)

    @property
    def structural(self) -> tuple[int, int, int]:
        """Tokens scored by the marker term: they open/close the spatial parts of the answer."""
        return (self.seg, self.depth_start, self.depth_end)

    def code_to_token(self, code: int) -> int:
        return self.code_start + code

    def is_code(self, token_id: int) -> bool:
        return self.code_start <= token_id < self.code_end


def spatial_token_strings(cfg: SpatialTokensConfig) -> list[str]:
    return [cfg.seg_token, cfg.depth_start_token, cfg.depth_end_token] + [
        cfg.depth_code_template.format(k) for k in range(cfg.num_depth_codes)
    ]


def spatial_tokens_known(tokenizer: PreTrainedTokenizerBase, cfg: SpatialTokensConfig) -> bool:
    """Whether ``tokenizer`` already has every spatial token (saved by a run that trained their rows)."""
    vocab = tokenizer.get_vocab()
    return all(s in vocab for s in spatial_token_strings(cfg))


def add_spatial_tokens(tokenizer: PreTrainedTokenizerBase, cfg: SpatialTokensConfig) -> SpatialTokenIds:
    """Add the spatial tokens to ``tokenizer`` (idempotent) and return their ids.

    A tokenizer that already has them (e.g. saved by an earlier run) is accepted as long as
    the code tokens are contiguous.
    """
    strings = spatial_token_strings(cfg)
    vocab = tokenizer.get_vocab()
    missing = [s for s in strings if s not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(strings)
    code_ids = ids[3:]
    code_start = code_ids[0]
    if code_ids != list(range(code_start, code_start + cfg.num_depth_codes)):
        raise ValueError(
            "the tokenizer's depth code tokens are not contiguous; the restricted softmax needs "
            f"<DEPTH_0..{cfg.num_depth_codes - 1}> to be one id range"
        )
    return SpatialTokenIds(
        seg=ids[0],
        depth_start=ids[1],
        depth_end=ids[2],
        code_start=code_start,
        num_codes=cfg.num_depth_codes,
        num_depth_tokens=cfg.num_depth_tokens,
    )
