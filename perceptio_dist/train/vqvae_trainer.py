"""Training the depth tokenizer (VQ-VAE): reconstruction L1 + commitment, EMA codebook, dead-code restarts.

Data-parallel over torchrun ranks (torch DDP; the EMA statistics are all-reduced inside the
quantizer). Every step draws its batch from an RNG seeded by (seed, step, rank), so a resumed run
sees the same maps it would have seen. Depth maps go through the same normalisation as
preprocessing (data/depth.py): ground truth is inverted and min-max normalised per map, teacher
output is min-max normalised.

Outputs in ``output_dir``: ``metrics.jsonl``; ``checkpoints/step_NNNNNNN/`` (model.safetensors,
optimizer.pt, state.json written last); and the final ``tokenizer.safetensors`` with
``tokenizer.json`` (architecture, K, grid, training data identity, final metrics) and
``training_files.sha256`` (one hash per training source file, so evaluation can prove it never
saw its frames).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, check_input_paths
from ..data.shards import npy_load, read_manifest, read_shard
from ..model.depth_vqvae import TOKENIZER_ID_KEY, DepthVQVAE, new_tokenizer_id
from ..parallel.distributed import all_reduce_mean, barrier, init_distributed
from ..teachers.depth_anything import inverse_depth_target
from .metrics import MetricsLogger
from .vqvae_config import VQVAETrainConfig

log = logging.getLogger("perceptio_dist.vqvae")
TOKENIZER_WEIGHTS, TOKENIZER_META, TRAINING_FILES = "tokenizer.safetensors", "tokenizer.json", "training_files.sha256"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class DepthMapPool:
    """All training depth: raw scene depth (cropped per draw) and ready normalised maps (flipped per draw)."""

    def __init__(self, cfg: VQVAETrainConfig):
        self.cfg, self.size = cfg, cfg.depth_vqvae.input_size
        self.raw: list[np.ndarray] = []  # metric depth, cropped then normalised at draw time
        self.ready: list[np.ndarray] = []  # normalised inverse depth at the tokenizer size
        self.files: list[Path] = []
        check_input_paths(cfg, skip=("depth_vqvae.checkpoint",))  # the tokenizer being trained has no weights yet
        d = cfg.data
        if d.scenes:
            root = Path(d.scenes)
            for folder in sorted(p for p in root.iterdir() if (p / "meta.json").exists()):
                self.raw.append(np.load(folder / "depth.npy", allow_pickle=False).astype(np.float32))
                self.files += [folder / "depth.npy", folder / "rgb.png"]
        if d.shards:
            root = Path(d.shards)
            manifest = read_manifest(root)
            if manifest["depth"]["size"] != self.size:
                raise ConfigError(f"Config error at 'data.shards': its depth maps are {manifest['depth']['size']} px, "
                                  f"the tokenizer takes {self.size} px.")
            for shard in manifest["shards"]:
                for sample in read_shard(root / shard["path"]):
                    if sample.depth_npy:
                        self.ready.append(npy_load(sample.depth_npy).astype(np.float32))
                self.files.append(root / shard["path"])
        if d.image_folder:
            self._teacher_maps(d)
        excluded = {_sha256(Path(p)) for p in cfg.excluded_files if Path(p).exists()}
        self.hashes = sorted({_sha256(p) for p in self.files})
        overlap = excluded.intersection(self.hashes)
        if overlap:
            raise ConfigError(f"Config error at 'data': {len(overlap)} training file(s) are excluded evaluation files.")
        if not (self.raw or self.ready):
            raise ConfigError("Config error at 'data': no depth maps found in the configured sources.")

    def _teacher_maps(self, d) -> None:
        from PIL import Image

        from ..preprocess.sources.image_folder import IMAGE_SUFFIXES
        from ..teachers.depth_anything import DepthAnythingTeacher

        root = Path(d.image_folder)
        teacher = DepthAnythingTeacher(d.teacher, d.teacher_input_size)
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for start in range(0, len(paths), 8):
            chunk = []
            for p in paths[start:start + 8]:
                try:
                    chunk.append(np.asarray(Image.open(p).convert("RGB")))
                    self.files.append(p)
                except Exception as exc:  # an unreadable image is skipped, not fatal
                    log.warning("skipping %s: %s", p, exc)
            self.ready += teacher(chunk, self.size)

    def __len__(self) -> int:
        return len(self.raw) + len(self.ready)

    def batch(self, step: int, rank: int, size: int) -> torch.Tensor:
        """[size, 1, S, S] maps for ``step`` on ``rank``: a pure function of (seed, step, rank)."""
        rng = np.random.default_rng([self.cfg.seed, step, rank])
        low, high = self.cfg.data.crop_scale
        maps = []
        for i in rng.integers(0, len(self), size):
            if i < len(self.raw):
                depth = self.raw[i]
                h, w = depth.shape
                ch, cw = max(8, int(h * rng.uniform(low, high))), max(8, int(w * rng.uniform(low, high)))
                y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                m = inverse_depth_target(depth[y:y + ch, x:x + cw], self.size)
            else:
                m = self.ready[i - len(self.raw)]
            if self.cfg.data.flip and rng.random() < 0.5:
                m = m[:, ::-1]
            maps.append(np.ascontiguousarray(m))
        return torch.from_numpy(np.stack(maps))[:, None].float()


def _lr_factor(step: int, cfg: VQVAETrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _latest_checkpoint(folder: Path) -> Path | None:
    complete = sorted(p for p in folder.glob("step_*") if (p / "state.json").exists())
    return complete[-1] if complete else None


class VQVAETrainer:
    def __init__(self, cfg: VQVAETrainConfig):
        self.cfg = cfg
        self.dist = init_distributed("auto")
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.output_dir)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier()
        self.pool = DepthMapPool(cfg)
        self.model = DepthVQVAE(cfg.depth_vqvae, cfg.tokens.num_depth_codes, cfg.tokens.depth_grid).to(self.dist.device)
        # The codebook is a buffer that follows the EMA; Adam trains encoder and decoder.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.start = 0
        latest = _latest_checkpoint(self.out / "checkpoints")
        if latest is not None:
            self._load(latest)
        self.ddp = self.model
        if self.dist.world_size > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, broadcast_buffers=False)

    # ------------------------------------------------------------------------ checkpoints

    def _save(self, step: int) -> None:
        from safetensors.torch import save_file

        if not self.dist.is_main:
            return
        folder = self.out / "checkpoints" / f"step_{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(folder / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        (folder / "state.json").write_text(json.dumps({"step": step}))  # written last: marks it complete

    def _load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(folder / "model.safetensors")))
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.start = json.loads((folder / "state.json").read_text())["step"]
        log.info("resumed from %s (step %d)", folder, self.start)

    def _export(self, metrics: dict) -> None:
        from safetensors.torch import save_file

        if not self.dist.is_main:
            return
        tokenizer_id = new_tokenizer_id()  # what shards made with this tokenizer record (and training checks)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(self.out / TOKENIZER_WEIGHTS),
                  metadata={TOKENIZER_ID_KEY: tokenizer_id})
        (self.out / TRAINING_FILES).write_text("\n".join(self.pool.hashes) + "\n")
        meta = {
            "id": tokenizer_id,
            "depth_vqvae": dataclasses.asdict(self.cfg.depth_vqvae) | {"checkpoint": None},
            "num_codes": self.cfg.tokens.num_depth_codes, "grid": self.cfg.tokens.depth_grid,
            "steps": self.cfg.steps, "training_data": dataclasses.asdict(self.cfg.data),
            "training_maps": len(self.pool), "final_metrics": metrics,
            "normalisation": "per-map min-max of inverse depth (perceptio_dist/data/depth.py)",
        }
        (self.out / TOKENIZER_META).write_text(json.dumps(meta, indent=1))

    # ------------------------------------------------------------------------------- loop

    def train(self) -> dict:
        from tqdm import tqdm

        cfg, device, k = self.cfg, self.dist.device, self.cfg.tokens.num_depth_codes
        metrics = MetricsLogger(self.out, _logging_for(cfg), dataclasses.asdict(cfg), enabled=self.dist.is_main)
        window: deque = deque(maxlen=cfg.usage_window)
        bar = tqdm(total=cfg.steps, initial=self.start, desc="vqvae", unit="step",
                   disable=not (self.dist.is_main and cfg.progress_bar), dynamic_ncols=True)
        record: dict = {}
        self.model.train()
        for step in range(self.start, cfg.steps):
            start = time.perf_counter()
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, cfg)
            depth = self.pool.batch(step, self.dist.rank, cfg.batch_size).to(device)
            recon, codes, commitment = self.ddp(depth)
            l1 = (recon - depth).abs().mean()
            loss = l1 + cfg.commitment_weight * commitment
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            counts = torch.bincount(codes.flatten(), minlength=k).float()
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(counts)
            window.append(counts > 0)
            restarted = 0
            if cfg.restart_every and (step + 1) % cfg.restart_every == 0:
                with torch.no_grad():
                    z = self.model.encoder(depth)
                    candidates = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                generator = torch.Generator(device=device).manual_seed(cfg.seed * 100003 + step)
                restarted = self.model.quantizer.restart_dead_codes(candidates, cfg.dead_code_threshold, generator)
            probs = counts / counts.sum()
            losses = all_reduce_mean(torch.stack([l1.detach(), commitment.detach()])).tolist()
            record = {
                "recon_l1": losses[0], "commitment": losses[1],
                "usage": float(torch.stack(list(window)).any(0).float().mean()),
                "perplexity": float(torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum())),
                "restarted_codes": restarted, "lr": self.optimizer.param_groups[0]["lr"],
                "step_time_s": time.perf_counter() - start,
            }
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                metrics.log(step + 1, record)
            bar.update(1)
            bar.set_postfix(l1=f"{losses[0]:.4f}", usage=f"{record['usage']:.2f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                self._save(step + 1)
        bar.close()
        metrics.close()
        self._save(cfg.steps)
        self._export(record)
        barrier()
        return record


def _logging_for(cfg: VQVAETrainConfig):
    from .config import LoggingConfig

    return LoggingConfig(output_dir=cfg.output_dir, wandb=cfg.wandb, wandb_project="perceptio_dist_vqvae")


def load_tokenizer(folder: str | Path, device: str = "cpu") -> tuple[DepthVQVAE, dict]:
    """A trained tokenizer folder (tokenizer.safetensors + tokenizer.json) -> (model in eval mode, metadata)."""
    from ..model.config import DepthVQVAEConfig
    from ..model.depth_vqvae import load_depth_vqvae

    folder = Path(folder)
    meta = json.loads((folder / TOKENIZER_META).read_text())
    model = load_depth_vqvae(DepthVQVAEConfig(**meta["depth_vqvae"]), meta["num_codes"], meta["grid"],
                             str(folder / TOKENIZER_WEIGHTS))
    return model.to(device).eval(), meta


def training_hashes(folder: str | Path) -> set[str]:
    path = Path(folder) / TRAINING_FILES
    return set(path.read_text().split()) if path.exists() else set()
