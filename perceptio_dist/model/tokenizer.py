"""Tokenizer loading: a local HF tokenizer folder, or the small BPE shipped for tests and the demo.

Spatial tokens are added elsewhere (model/spatial_tokens.py); here we only make sure the chat
and image placeholder tokens InternVL needs exist.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .config import BackboneConfig

# ChatML turn markers used by InternVL2.5's chat template (and by Qwen2.5).
CHAT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_BPE_DIR = "tokenizers/tiny_bpe"


def load_builtin_tokenizer(name: str) -> PreTrainedTokenizerFast:
    if name != "tiny_bpe":
        raise ValueError(f"unknown builtin tokenizer '{name}' (known: tiny_bpe)")
    folder = resources.files("perceptio_dist.recipes").joinpath(TINY_BPE_DIR)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(folder.joinpath("tokenizer.json")),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    return tok


def load_tokenizer(backbone: BackboneConfig) -> PreTrainedTokenizerBase:
    """The backbone's tokenizer, with InternVL's image tokens present (added when missing)."""
    source = backbone.tokenizer
    if source.startswith("builtin:"):
        tok = load_builtin_tokenizer(source.split(":", 1)[1])
    else:
        folder = backbone.pretrained_path if source == "pretrained" else source
        path = folder  # resolved when the config was loaded
        # trust_remote_code stays off: only tokenizers transformers implements natively are accepted.
        tok = AutoTokenizer.from_pretrained(str(Path(path)), trust_remote_code=False)
    missing = [t for t in (backbone.image_start_token, backbone.image_end_token, backbone.image_token)
               if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
