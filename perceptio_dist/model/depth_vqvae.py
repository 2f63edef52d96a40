"""Depth tokenizer: a convolutional VQ-VAE over one normalised inverse-depth channel.

``input_size`` x ``input_size`` in, ``grid`` x ``grid`` codes out (N = grid^2), K codes of width
``code_dim`` in an EMA codebook. Three views of the same model:

* ``encode(depth) -> codes``        [B, 1, S, S] -> [B, N] (int64)
* ``decode(codes) -> depth``        [B, N] -> [B, 1, S, S]
* ``soft_decode(probs) -> depth``   [..., N, K] -> [..., 1, S, S]: the expected code vector
  sum_k p_k * codebook[k] at every grid cell, through the decoder. It is differentiable in
  ``probs`` and equals ``decode`` for one-hot ``probs``; the reconstruction term of the
  objective back-propagates through it into the LLM.

During Perceptio training the whole module is frozen (see PerceptioModel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import DepthVQVAEConfig


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, kernel, padding=kernel // 2), nn.ReLU(),
            nn.Conv2d(channels, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _stage_channels(cfg: DepthVQVAEConfig, levels: int) -> list[int]:
    return [min(cfg.base_channels * 2**i, cfg.max_channels) for i in range(levels + 1)]


class DepthEncoder(nn.Module):
    def __init__(self, cfg: DepthVQVAEConfig, levels: int):
        super().__init__()
        ch = _stage_channels(cfg, levels)
        layers: list[nn.Module] = [nn.Conv2d(1, ch[0], 3, padding=1)]
        for i in range(levels):
            layers += [ResBlock(ch[i]) for _ in range(cfg.num_res_blocks)]
            layers.append(nn.Conv2d(ch[i], ch[i + 1], 4, stride=2, padding=1))
        layers += [ResBlock(ch[-1]) for _ in range(cfg.num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(ch[-1], cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DepthDecoder(nn.Module):
    def __init__(self, cfg: DepthVQVAEConfig, levels: int):
        super().__init__()
        ch = _stage_channels(cfg, levels)
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, ch[-1], 3, padding=1)]
        layers += [ResBlock(ch[-1]) for _ in range(cfg.num_res_blocks)]
        for i in reversed(range(levels)):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i + 1], ch[i], 3, padding=1)]
            layers += [ResBlock(ch[i]) for _ in range(cfg.num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(ch[0], 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class CellDepthDecoder(nn.Module):
    """Every code to its own (input_size / grid)-pixel patch and nothing else: 1x1 convolutions and non-overlapping
    2x2 transposed convolutions, so a code decodes to the same patch wherever it stands (depth_vqvae.decoder: cell).
    """

    def __init__(self, cfg: DepthVQVAEConfig, levels: int):
        super().__init__()
        ch = _stage_channels(cfg, levels)
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, ch[-1], 1)]
        layers += [ResBlock(ch[-1], kernel=1) for _ in range(cfg.num_res_blocks)]
        for i in reversed(range(levels)):
            layers.append(nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2))
            layers += [ResBlock(ch[i], kernel=1) for _ in range(cfg.num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(ch[0], 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


DECODERS = {"conv": DepthDecoder, "cell": CellDepthDecoder}


class EMAVectorQuantizer(nn.Module):
    """Nearest-neighbour quantiser whose codebook follows an exponential moving average of its assignments.

    The codebook is a buffer, not a parameter: it is updated by the EMA (in training mode) rather
    than by the optimizer, and it is replicated, never sharded, under ZeRO-3.
    """

    def __init__(self, num_codes: int, code_dim: int, decay: float, eps: float = 1e-5):
        super().__init__()
        self.num_codes, self.code_dim, self.decay, self.eps = num_codes, code_dim, decay, eps
        codebook = torch.randn(num_codes, code_dim) / math.sqrt(code_dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_cluster_size", torch.ones(num_codes))
        self.register_buffer("ema_code_sum", codebook.clone())

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Code index of every vector in ``z`` [M, D]."""
        cb = self.codebook.to(z.dtype)
        dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ cb.t() + cb.pow(2).sum(1)[None]
        return dist.argmin(1)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        onehot = F.one_hot(codes, self.num_codes).to(flat.dtype)
        counts, sums = onehot.sum(0), onehot.t() @ flat
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.ema_cluster_size.mul_(self.decay).add_(counts.to(self.ema_cluster_size.dtype), alpha=1 - self.decay)
        self.ema_code_sum.mul_(self.decay).add_(sums.to(self.ema_code_sum.dtype), alpha=1 - self.decay)
        n = self.ema_cluster_size.sum()
        size = (self.ema_cluster_size + self.eps) / (n + self.num_codes * self.eps) * n  # Laplace smoothing
        self.codebook.copy_(self.ema_code_sum / size[:, None])

    @torch.no_grad()
    def restart_dead_codes(self, candidates: torch.Tensor, threshold: float, generator=None) -> int:
        """Re-seed codes whose EMA usage fell below ``threshold`` with random encoder outputs.

        ``candidates`` [M, D] are current encoder vectors (the batch). A restarted code becomes one
        of them exactly, with its EMA count reset to ``threshold`` and its EMA sum to match, so it
        starts where data is and is not immediately dead again. Under torch.distributed, rank 0's
        choice is broadcast so every rank keeps the same codebook. Returns how many were restarted.
        """
        dead = (self.ema_cluster_size < threshold).nonzero(as_tuple=True)[0]
        if dead.numel() and candidates.shape[0]:
            pick = torch.randint(0, candidates.shape[0], (dead.numel(),), generator=generator,
                                 device=candidates.device)
            fresh = candidates[pick].to(self.codebook.dtype)
            self.codebook[dead] = fresh
            self.ema_cluster_size[dead] = threshold
            self.ema_code_sum[dead] = fresh * threshold
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for buffer in (self.codebook, self.ema_cluster_size, self.ema_code_sum):
                torch.distributed.broadcast(buffer, src=0)
        return int(dead.numel())

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z`` [B, D, h, w] -> (straight-through quantised z, codes [B, h*w], commitment loss)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        codes = self.nearest(flat)
        if self.training:
            self._ema_update(flat.detach().float(), codes)
        quant = self.codebook[codes].to(z.dtype).view(b, h, w, d).permute(0, 3, 1, 2)
        commitment = F.mse_loss(z, quant.detach())
        quant = z + (quant - z).detach()
        return quant, codes.view(b, h * w), commitment


class DepthVQVAE(nn.Module):
    def __init__(self, cfg: DepthVQVAEConfig, num_codes: int, grid: int):
        super().__init__()
        levels = int(round(math.log2(cfg.input_size // grid)))
        self.input_size, self.grid, self.num_codes = cfg.input_size, grid, num_codes
        self.encoder = DepthEncoder(cfg, levels)
        self.quantizer = EMAVectorQuantizer(num_codes, cfg.code_dim, cfg.ema_decay)
        self.decoder = DECODERS[cfg.decoder](cfg, levels)

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def _check_depth(self, depth: torch.Tensor) -> None:
        if depth.dim() != 4 or depth.shape[1] != 1 or depth.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"depth maps must be [B, 1, {self.input_size}, {self.input_size}], got {tuple(depth.shape)}")

    def encode(self, depth: torch.Tensor) -> torch.Tensor:
        self._check_depth(depth)
        z = self.encoder(depth)
        b, d, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h * w)

    def _decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """[..., N, D] code vectors -> [..., 1, S, S] depth."""
        lead = vectors.shape[:-2]
        z = vectors.reshape(-1, self.grid, self.grid, vectors.shape[-1]).permute(0, 3, 1, 2)
        out = self.decoder(z)
        return out.reshape(*lead, 1, self.input_size, self.input_size)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self._decode_vectors(self.quantizer.codebook[codes])

    def soft_decode(self, probs: torch.Tensor) -> torch.Tensor:
        if probs.shape[-2:] != (self.num_tokens, self.num_codes):
            raise ValueError(f"probs must be [..., {self.num_tokens}, {self.num_codes}], got {tuple(probs.shape)}")
        vectors = probs @ self.quantizer.codebook.to(probs.dtype)
        dtype = next(self.decoder.parameters()).dtype
        return self._decode_vectors(vectors.to(dtype))

    def forward(self, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokenizer training pass: (reconstruction, codes, commitment loss)."""
        self._check_depth(depth)
        quant, codes, commitment = self.quantizer(self.encoder(depth))
        return self.decoder(quant), codes, commitment


def load_depth_vqvae(cfg: DepthVQVAEConfig, num_codes: int, grid: int, weights: str) -> DepthVQVAE:
    """A trained tokenizer from ``weights`` (safetensors), checked against the recipe's architecture.

    ``perceptio-vqvae train`` writes ``tokenizer.json`` beside the weights; when present, every
    architecture field must agree with the recipe, so a wrong file fails with a readable message.
    """
    import json
    from dataclasses import asdict
    from pathlib import Path

    from safetensors.torch import load_file

    from ..config import ConfigError

    path = Path(weights)
    meta_path = path.with_name("tokenizer.json")
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        expected = {**{k: v for k, v in asdict(cfg).items() if k not in ("checkpoint", "ema_decay")},
                    "num_codes": num_codes, "grid": grid}
        # A field the file does not name (written before the field existed) had its default then.
        defaults = asdict(DepthVQVAEConfig())
        found = {**{k: meta["depth_vqvae"].get(k, defaults[k]) for k in expected if k not in ("num_codes", "grid")},
                 "num_codes": meta["num_codes"], "grid": meta["grid"]}
        diffs = [f"{k}: recipe {expected[k]}, tokenizer {found[k]}" for k in expected if expected[k] != found[k]]
        if diffs:
            raise ConfigError(f"Config error at 'model.depth_vqvae.checkpoint': {path} was trained with another "
                              f"architecture ({'; '.join(diffs)}).")
    model = DepthVQVAE(cfg, num_codes, grid)
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise ConfigError(f"Config error at 'model.depth_vqvae.checkpoint': {path} does not fit the recipe's "
                          f"depth_vqvae architecture ({str(exc).splitlines()[0]})") from None
    return model


# The tokenizer's identity: an id written into its own files when it is trained (the safetensors metadata and
# tokenizer.json), carried through exports. Shards record the id of the tokenizer that made their codes, and
# training compares it with the model's. Not a hash of the weights: an export re-saves them (another dtype).
TOKENIZER_ID_KEY = "perceptio_tokenizer_id"
RANDOM_TOKENIZER = "random"
TRAINED_ID_PREFIX = "vqvae-"


def new_tokenizer_id() -> str:
    import uuid

    return f"{TRAINED_ID_PREFIX}{uuid.uuid4().hex[:16]}"


def is_trained_tokenizer_id(identity: str | None) -> bool:
    """An id written by ``perceptio-vqvae train`` (not random weights, not a file without an id)."""
    return bool(identity) and identity.startswith(TRAINED_ID_PREFIX)


def tokenizer_identity(weights: str | None) -> str:
    """The id of the tokenizer whose weights are at ``weights``: RANDOM_TOKENIZER for none (random weights, tests),
    "unknown:<file name>" for a file that carries no id (trained before ids existed, or made elsewhere)."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    if not weights:
        return RANDOM_TOKENIZER
    path = Path(weights)
    try:
        with safe_open(str(path), framework="pt") as f:
            found = (f.metadata() or {}).get(TOKENIZER_ID_KEY)
    except (OSError, ValueError, RuntimeError):
        found = None
    if not found and path.with_name("tokenizer.json").exists():
        found = json.loads(path.with_name("tokenizer.json").read_text()).get("id")
    return found or f"unknown:{path.name}"
