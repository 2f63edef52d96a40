"""Export a training checkpoint (any ZeRO stage or pipeline layout, any rank count) to a folder inference code loads without DeepSpeed.

    perceptio-export --checkpoint runs/tiny_cpu/checkpoints/global_step00000040 --out runs/tiny_cpu/export

The weights are consolidated with DeepSpeed's own zero_to_fp32 logic (trainable and frozen parameters,
and buffers), then written as:

    perceptio.yaml            the training config, its paths pointing into this folder
    backbone/                 InternVL in transformers format (safetensors) + the tokenizer with spatial tokens
    seg_head.safetensors      [SEG] MLP, SAM2 image encoder, prompt encoder, mask decoder
    depth_vqvae.safetensors   the depth tokenizer, with tokenizer.json beside it
    chain.json                per training task, what its answers carried: [SEG] and depth block each
                              'force' (every sample), 'forbid' (none) or 'free' (some); evaluation forces
                              only that (from the training shards' manifest; absent when they are gone)
    adapter/                  LoRA runs with ``--adapter`` only: the adapter in peft's format
                              (adapter_config.json, adapter_model.safetensors) and the trained spatial-token
                              rows (spatial_rows.safetensors), beside the merged weights above

A LoRA run (model.lora.rank > 0) is exported with its adapters merged into the base weights: the folder is a
plain model (perceptio.yaml says lora.rank 0).

``load_exported(folder)`` rebuilds the PerceptioModel from these files alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch
import yaml

from .config import ConfigError, dump_yaml
from .config.training import PerceptioConfig, config_from_dict
from .model.depth_vqvae import TOKENIZER_ID_KEY, tokenizer_identity
from .train.checkpoint import CONSOLIDATED_FILE, is_complete, newest_complete, saved_config

log = logging.getLogger(__name__)
MODEL_PREFIX = "model."  # the training module wraps the model as .model


def consolidated_state_dict(checkpoint: Path, cfg: PerceptioConfig) -> dict[str, torch.Tensor]:
    """Full weights of a DeepSpeed checkpoint folder (global_stepN), keyed as in PerceptioModel.

    ZeRO-2/3 runs: the fp32 master weights (DeepSpeed's zero_to_fp32). Pipeline runs: the stages' layer
    files (parallel/pipeline.py), in the precision the model trained in. Tensor-parallel runs: the whole weights the
    checkpoint holds beside its shards (train/checkpoint.CONSOLIDATED_FILE), in the training precision.
    """
    from .parallel.pipeline import is_pipeline_checkpoint, pipeline_state_dict

    if is_pipeline_checkpoint(checkpoint):
        return pipeline_state_dict(checkpoint, cfg.model.backbone.text.num_layers)
    if (checkpoint / CONSOLIDATED_FILE).exists():  # tensor-parallel runs: written whole at save time
        from safetensors.torch import load_file

        state = load_file(str(checkpoint / CONSOLIDATED_FILE))
        return {k[len(MODEL_PREFIX):]: v.float() for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}


def export_checkpoint(checkpoint: str | Path, out: str | Path, adapter: bool = False) -> Path:
    from .model.perceptio import build_perceptio
    from .model.tokenizer import load_tokenizer

    checkpoint, out = newest_complete(checkpoint), Path(out)
    if not is_complete(checkpoint):
        raise ConfigError(f"Config error at '--checkpoint': {checkpoint} is not a complete checkpoint (a save that "
                          "did not finish, or not a checkpoint folder).")
    cfg = config_from_dict(saved_config(checkpoint))
    tokenizer = load_tokenizer(cfg.model.backbone)
    model = build_perceptio(cfg.model, tokenizer, torch.float32, seed=cfg.train.seed)
    state = consolidated_state_dict(checkpoint, cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.lm_head.") or not model.backbone.config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.model.lora.rank:
        cfg = merged_lora_export(model, cfg, Path(out) / "adapter" if adapter else None)
    elif adapter:
        raise ConfigError(f"Config error at '--adapter': {checkpoint} was trained without LoRA (model.lora.rank 0): "
                          "there is no adapter to write.")
    write_exported(model, tokenizer, cfg, out, str(checkpoint))
    log.info("exported %s to %s", checkpoint, out)
    return out


def merged_lora_export(model, cfg: PerceptioConfig, adapter_dir: Path | None) -> PerceptioConfig:
    """Write the adapter (when asked), merge it into the base weights; returns the config of the merged model."""
    from safetensors.torch import save_file

    from .model.lora import adapter_state, merge_lora, peft_config

    lora = cfg.model.lora
    if adapter_dir is not None:
        adapter_dir.mkdir(parents=True, exist_ok=True)
        peft_config(lora).save_pretrained(str(adapter_dir))
        save_file({k: v.contiguous() for k, v in adapter_state(model.backbone).items()},
                  str(adapter_dir / "adapter_model.safetensors"))
        rows = {"embed_tokens": model.backbone.get_input_embeddings().weight[model.base_vocab_size:],
                "lm_head": model.backbone.lm_head.weight[model.base_vocab_size:]}
        save_file({k: v.detach().contiguous() for k, v in rows.items()}, str(adapter_dir / "spatial_rows.safetensors"))
    merged = merge_lora(model.backbone)
    log.info("merged %d LoRA adapters into the base weights", merged)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=dataclasses.replace(lora, rank=0)))


def write_exported(model, tokenizer, cfg: PerceptioConfig, out: Path, source: str) -> None:
    """The export folder of a PerceptioModel in memory (weights as they are now)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(out / "backbone", safe_serialization=True)
    tokenizer.save_pretrained(out / "backbone")
    save_file({k: v.contiguous() for k, v in model.seg_head.state_dict().items()}, str(out / "seg_head.safetensors"))
    vq = cfg.model.depth_vqvae
    # The tokenizer keeps its identity through the export (shards made with it stay this model's shards).
    tokenizer_id = tokenizer_identity(vq.checkpoint)
    save_file({k: v.contiguous() for k, v in model.depth_vqvae.state_dict().items()},
              str(out / "depth_vqvae.safetensors"), metadata={TOKENIZER_ID_KEY: tokenizer_id})
    (out / "tokenizer.json").write_text(json.dumps({
        "id": tokenizer_id, "depth_vqvae": dataclasses.asdict(vq) | {"checkpoint": None},
        "num_codes": cfg.model.tokens.num_depth_codes, "grid": cfg.model.tokens.depth_grid,
        "exported_from": source}, indent=1))
    exported = dataclasses.replace(
        cfg.model,
        backbone=dataclasses.replace(cfg.model.backbone, pretrained_path="backbone", tokenizer="pretrained",
                                     text=dataclasses.replace(cfg.model.backbone.text,
                                                              vocab_size=model.base_vocab_size)),
        seg_head=dataclasses.replace(cfg.model.seg_head, sam2_checkpoint=None),
        depth_vqvae=dataclasses.replace(vq, checkpoint="depth_vqvae.safetensors"),
    )
    (out / "perceptio.yaml").write_text(dump_yaml(dataclasses.replace(cfg, model=exported)))
    store = training_store(cfg)
    if store is not None:
        from .eval.depth_dependence import MEAN_DEPTH_FILE, training_mean_depth

        mean_map = training_mean_depth(store)
        if mean_map is not None:
            np.save(out / MEAN_DEPTH_FILE, mean_map)
    manifest = store.manifest if store is not None else {}  # read once (a URL's is fetched)
    questions = trained_questions(cfg, manifest)
    if questions is not None:
        (out / QUESTIONS_FILE).write_text(json.dumps(questions, indent=1))
    chain = trained_chain(cfg, manifest)
    if chain is not None:
        (out / CHAIN_FILE).write_text(json.dumps(chain, indent=1))
    else:
        log.warning("the training shards' manifest (data.shards=%s) is gone or records no chain: %s not written, "
                    "evaluation falls back to forcing [SEG] for referring and the depth block for depth tasks",
                    cfg.data.shards, CHAIN_FILE)


CHAIN_FILE = "chain.json"
QUESTIONS_FILE = "questions.json"
# The synthetic source's fields that say how relative-depth questions look (preprocess SourceConfig): evaluation
# on held-out scenes asks them the way training did.
QUESTION_FIELDS = ("questions_per_scene", "point_counts", "marker_style", "marker_grid", "marker_step",
                   "marker_step_format")


def training_store(cfg: PerceptioConfig):
    """The training shards (data/shard_access.ShardStore: a folder or a URL), None when unset or gone."""
    from .data.shard_access import ShardStore

    if not cfg.data.shards:
        return None
    try:
        return ShardStore(cfg.data.shards, cfg.data.cache_dir)
    except (FileNotFoundError, ConfigError):
        return None


def training_manifest(cfg: PerceptioConfig) -> dict:
    """The training shards' manifest ({} when data.shards is unset or gone)."""
    store = training_store(cfg)
    return store.manifest if store is not None else {}


def trained_questions(cfg: PerceptioConfig, manifest: dict | None = None) -> dict | None:
    """How the training shards' synthetic relative-depth questions were made (their manifest's config;
    ``manifest``: already read, else read from data.shards)."""
    manifest = training_manifest(cfg) if manifest is None else manifest
    sources = manifest.get("config", {}).get("sources", [])
    synthetic = [s for s in sources if s.get("type") == "synthetic"]
    if not synthetic:
        return None
    return {name: synthetic[0][name] for name in QUESTION_FIELDS if name in synthetic[0]}


def exported_questions(folder: str | Path) -> dict:
    """The question fields of an exported folder ({} when it has none: the defaults)."""
    path = Path(folder) / QUESTIONS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def trained_chain(cfg: PerceptioConfig, manifest: dict | None = None) -> dict | None:
    """Per training task, whether its answers carried [SEG] and a depth block: 'force', 'forbid' or 'free'
    (``manifest``: already read, else read from data.shards)."""
    chain = (training_manifest(cfg) if manifest is None else manifest).get("chain")
    if not chain:
        return None

    def policy(carried: int, samples: int) -> str:
        return "force" if carried == samples else ("forbid" if carried == 0 else "free")

    return {task: {"seg": policy(c["with_seg"], c["samples"]),
                   "depth": policy(c["with_depth"], c["samples"]) if cfg.data.depth_tokens else "forbid"}
            for task, c in sorted(chain.items()) if c["samples"]}


def exported_chain(folder: str | Path) -> dict | None:
    path = Path(folder) / CHAIN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def exported_config(folder: str | Path) -> PerceptioConfig:
    """The training config of an exported folder, its model paths pointing into the folder."""
    folder = Path(folder).resolve()
    data = yaml.safe_load((folder / "perceptio.yaml").read_text())
    backbone = data["model"]["backbone"]
    backbone["pretrained_path"] = str(folder / backbone["pretrained_path"])
    data["model"]["depth_vqvae"]["checkpoint"] = str(folder / data["model"]["depth_vqvae"]["checkpoint"])
    return config_from_dict(data)


def load_exported(folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
    """(PerceptioModel in eval mode, tokenizer) from an exported folder, every part created on ``device`` (None:
    the CPU) in ``dtype``."""
    from safetensors.torch import load_file

    from .model.perceptio import build_perceptio
    from .model.tokenizer import load_tokenizer

    folder = Path(folder).resolve()
    cfg = exported_config(folder)
    tokenizer = load_tokenizer(cfg.model.backbone)
    model = build_perceptio(cfg.model, tokenizer, dtype, device=device)
    model.seg_head.load_state_dict(load_file(str(folder / "seg_head.safetensors")))
    return model.eval(), tokenizer
