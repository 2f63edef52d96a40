"""Typed configuration: dataclasses, YAML recipes, dotted overrides, validation.

Every field carries its documentation in ``metadata["doc"]``; ``perceptio-config --explain``
and the configuration reference (docs/configuration.md) are generated from it. Loading is strict:
unknown keys, wrong types and inconsistent values raise :class:`ConfigError` with a
one-paragraph message that names the field, never a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


SHARD_URL_SCHEMES = ("http://", "https://", "s3://", "gs://", "gcs://", "file://", "az://", "abfs://")


class ConfigError(ValueError):
    """A user mistake in a recipe or an override. The message is meant to be read as is."""


def doc_field(text: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING, **metadata):
    """A dataclass field with its documentation (``metadata["doc"]``), the one way config fields are declared."""
    kwargs = {"metadata": {"doc": text, **metadata}}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    return field(**kwargs)


@dataclass(frozen=True)
class PathSpec:
    """What a path field holds, read by :func:`resolve_paths` (at load) and :func:`check_input_paths` (at start).

    ``input`` paths are expanded ($VARS, ~) and resolved against the working directory, then the repository
    root; ``output`` paths are expanded only. ``keywords`` and ``prefixes`` mark values that are not paths
    ('auto', 'pretrained', 'builtin:...'). ``must_exist``: refused at start when missing, with ``purpose``
    (what the file is) and ``remedy`` (what to do) in the message.
    """

    kind: Literal["input", "output"] = "input"
    purpose: str = ""
    remedy: str = ""
    keywords: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    must_exist: bool = True
    folder: bool = False

    def is_path(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value) and value not in self.keywords and not value.startswith(
            self.prefixes)


WEIGHTS_REMEDY = "Point it at a local copy (no weights are downloaded) or set it to null to use random weights."


def path_field(text: str, default: Any = dataclasses.MISSING, **spec):
    """A documented field holding a path; ``spec`` are :class:`PathSpec` fields."""
    return doc_field(text, default, path=PathSpec(**spec))


# ----------------------------------------------------------------------------- model


@dataclass
class VisionArchitecture:
    """InternViT vision tower (transformers' ``InternVLVisionConfig``)."""

    hidden_size: int = doc_field("Width of the vision transformer (1024 for InternViT-300M).", 1024)
    num_layers: int = doc_field("Number of vision transformer layers.", 24)
    num_heads: int = doc_field("Attention heads in the vision transformer.", 16)
    intermediate_size: int = doc_field("MLP width of the vision transformer.", 4096)
    image_size: int = doc_field("Tile size in pixels seen by the vision tower (448 for InternVL2.5).", 448)
    patch_size: int = doc_field("Patch size in pixels.", 14)
    norm_type: Literal["layer_norm", "rms_norm"] = doc_field("Normalisation layer of the vision tower.", "layer_norm")
    use_qk_norm: bool = doc_field("Normalise queries and keys (InternViT-6B uses it, InternViT-300M does not).", False)
    position_init: Literal["random", "sincos_2d"] = doc_field(
        "Start of a random-weight tower's patch position embeddings (a checkpoint's win). random: transformers' "
        "init. sincos_2d: fixed-frequency 2D sines and cosines of row and column (as MAE), so where a patch is "
        "can be read out linearly from the first step; they stay trainable.", "random")


@dataclass
class TextArchitecture:
    """The language model inside InternVL (a transformers causal-LM config)."""

    model_type: Literal["qwen2", "llama"] = doc_field(
        "transformers model type of the LLM: 'llama' for InternLM2.5 converted to HF format, 'qwen2' for Qwen2.5.",
        "llama",
    )
    hidden_size: int = doc_field("LLM hidden width d.", 4096)
    num_layers: int = doc_field("LLM decoder layers.", 32)
    num_heads: int = doc_field("LLM attention heads.", 32)
    num_kv_heads: int = doc_field("LLM key/value heads (grouped-query attention).", 8)
    intermediate_size: int = doc_field("LLM MLP width.", 14336)
    vocab_size: Optional[int] = doc_field(
        "Vocabulary size of the base checkpoint, before spatial tokens are added. null: the tokenizer's size.", None
    )
    rope_theta: float = doc_field("Rotary embedding base.", 1_000_000.0)
    max_position_embeddings: int = doc_field("Longest sequence the LLM supports.", 32768)
    rms_norm_eps: float = doc_field("Epsilon of the LLM's RMSNorm layers.", 1e-5)


@dataclass
class BackboneConfig:
    """InternVL backbone: transformers' native ``InternVLForConditionalGeneration``."""

    pretrained_path: Optional[str] = path_field(
        "Local folder of an HF-native InternVL checkpoint (e.g. InternVL2.5-8B converted with transformers' "
        "converter, or InternVL3-8B-hf). null: build from `vision`/`text` below with random weights. "
        "Environment variables ($VAR) are expanded.",
        None, purpose="the folder of the InternVL backbone's weights", remedy=WEIGHTS_REMEDY, folder=True,
    )
    tokenizer: str = path_field(
        "Where the tokenizer comes from: 'pretrained' (the checkpoint folder), 'builtin:tiny_bpe' (a small BPE "
        "shipped with the package, for tests and the demo) or a local folder.",
        "pretrained", keywords=("pretrained",), prefixes=("builtin:",), folder=True,
        purpose="the tokenizer folder (tokenizer.json and its config)",
        remedy="Point it at a local tokenizer folder, or use 'pretrained' (the backbone's) or 'builtin:tiny_bpe'.",
    )
    vision: VisionArchitecture = doc_field("Vision tower architecture (checked against the checkpoint when one is loaded).",
                                      default_factory=VisionArchitecture)
    text: TextArchitecture = doc_field("LLM architecture (checked against the checkpoint when one is loaded).",
                                  default_factory=TextArchitecture)
    downsample_ratio: float = doc_field("Pixel-shuffle factor between vision tower and projector (0.5: 4x fewer tokens).", 0.5)
    tie_word_embeddings: bool = doc_field("Share the input embedding and LM head (InternLM2.5 and Qwen2.5-7B: false).", False)
    image_token: str = doc_field("Placeholder token replaced by image features.", "<IMG_CONTEXT>")
    image_start_token: str = doc_field("Token opening an image span.", "<img>")
    image_end_token: str = doc_field("Token closing an image span.", "</img>")
    image_position: Literal["before_question", "after_question"] = doc_field(
        "Where the image span sits in the first user turn. before_question: InternVL's chat template "
        "('<image>\\n{question}'). after_question: '{question}\\n<image>', so the distance from image token i to "
        "depth token i is the same for every question whatever its length (a lever of the toy world, docs/research). "
        "Training and evaluation read it from the same config.", "before_question")
    max_tiles: int = doc_field("Most 448-px tiles per image in dynamic tiling (a thumbnail is added when > 1).", 12)
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = doc_field(
        "Attention kernel. 'auto': flash_attention_2 when flash-attn imports and a GPU is present, else sdpa.", "auto"
    )
    flatten_packed_rows: Optional[bool] = doc_field(
        "Run a packed micro-batch (data.packing) as one flattened row with restarting positions: flash-attention-2 "
        "separates packed samples (its varlen kernel) only in a batch of one row. null: when the attention is "
        "flash_attention_2. Same losses either way; sdpa and eager keep the rows.", None)
    freeze_vision_tower: bool = doc_field("Keep the InternViT weights fixed.", False)
    freeze_language_model: bool = doc_field("Keep the LLM decoder weights fixed (spatial-token rows stay trainable only "
                                       "if the embeddings are trainable).", False)


@dataclass
class SpatialTokensConfig:
    """Spatial tokens added to the tokenizer; embeddings and LM head are resized, new rows trainable."""

    num_depth_codes: int = doc_field("K: size of the depth codebook, one token <DEPTH_k> per code.", 128)
    depth_grid: int = doc_field("The depth map is tokenised on a depth_grid x depth_grid grid: N = depth_grid^2 tokens.", 10)
    seg_token: str = doc_field("Token whose last hidden state prompts the SAM2 mask decoder.", "[SEG]")
    depth_start_token: str = doc_field("Token opening a depth block.", "<DEPTH_START>")
    depth_end_token: str = doc_field("Token closing a depth block.", "<DEPTH_END>")
    depth_code_template: str = doc_field("Format of the K code tokens; '{}' is replaced by the code index.", "<DEPTH_{}>")
    code_embedding_init: Literal["mean", "depth_order"] = doc_field(
        "How a fresh model's code-token rows (input embedding and LM head) start. mean: the mean of the other rows "
        "(transformers' resizing). depth_order: plus a shared direction scaled by the depth each code decodes to, "
        "so nearer/farther is readable from the first step (model/code_embeddings.py). A checkpoint's rows win.",
        "mean")

    @property
    def num_depth_tokens(self) -> int:
        """N, the number of code tokens in one depth block."""
        return self.depth_grid * self.depth_grid


@dataclass
class SegHeadConfig:
    """[SEG] -> MLP -> SAM2 mask decoder, from the official `sam2` package."""

    sam2_config: str = path_field(
        "SAM2 model config: a name from the sam2 package (e.g. 'configs/sam2.1/sam2.1_hiera_l.yaml'), a config "
        "shipped here (e.g. 'sam2_tiny', in perceptio_dist/recipes/sam2/) or a path to a yaml file.",
        "configs/sam2.1/sam2.1_hiera_l.yaml", must_exist=False,  # a name is not a file
    )
    sam2_checkpoint: Optional[str] = path_field(
        "Local SAM2 checkpoint (.pt as released: a dict with key 'model'). null: random weights.", None,
        purpose="the SAM2 checkpoint (.pt)", remedy=WEIGHTS_REMEDY,
    )
    mlp_hidden_size: Optional[int] = doc_field("Hidden width of the 2-layer [SEG] MLP; null: the LLM hidden size.", None)


@dataclass
class DepthVQVAEConfig:
    """Convolutional VQ-VAE over a normalised inverse-depth map; frozen during Perceptio training."""

    input_size: int = doc_field("Side of the square depth map the tokenizer sees; input_size/depth_grid must be a power of 2.", 320)
    code_dim: int = doc_field("Width of each codebook vector.", 512)
    base_channels: int = doc_field("Channels after the stem conv; doubled at each downsampling, capped at max_channels.", 64)
    max_channels: int = doc_field("Cap on the channel count of the conv stages.", 512)
    num_res_blocks: int = doc_field("Residual blocks per resolution level.", 1)
    ema_decay: float = doc_field("EMA decay of the codebook updates (training the tokenizer only).", 0.99)
    decoder: Literal["conv", "cell"] = doc_field(
        "conv: 3x3 convolutions at every level, so a cell's decoded depth also depends on its neighbours' codes. "
        "cell: every code decodes to its own grid cell only (1x1 convolutions, non-overlapping 2x2 upsampling), so "
        "a code means one depth patch wherever it stands and a cell's depth can be read from its code alone.",
        "conv")
    checkpoint: Optional[str] = path_field(
        "Trained tokenizer weights (safetensors). null: random weights.", None,
        purpose="the trained depth tokenizer's weights (safetensors)",
        remedy="Train one with `perceptio-vqvae train` (the demo does), or set it to null for a random tokenizer.")


LORA_PARTS = ("language_model", "vision_tower")


@dataclass
class LoraConfig:
    """LoRA adapters through peft (model/lora.py). With rank > 0 the backbone's own weights are frozen; the adapters,
    the spatial-token rows of the embedding and LM head, the projector (lora.train_projector), the SAM2 mask decoder
    and prompt encoder and the [SEG] MLP train."""

    rank: int = doc_field("LoRA rank r; 0: no adapters (the backbone trains as model.backbone.freeze_* say).", 0)
    alpha: float = doc_field("LoRA alpha: the update is scaled by alpha / rank (Sa2VA: r 128, alpha 256).", 16.0)
    dropout: float = doc_field("Dropout on the adapter's input, in [0, 1).", 0.05)
    target_modules: list[str] = doc_field(
        "Names of the linear layers that get adapters, inside the parts in lora.apply_to (matched against the "
        "last component of the module name).",
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    apply_to: list[str] = doc_field(
        "Backbone parts whose target modules get adapters: language_model and/or vision_tower (InternViT's layers "
        "are attention.{q,k,v}_proj, attention.projection_layer, mlp.fc1, mlp.fc2).",
        default_factory=lambda: ["language_model"])
    train_projector: bool = doc_field("Train the vision-language projector in full beside the adapters.", True)


@dataclass
class ModelConfig:
    backbone: BackboneConfig = doc_field("InternVL backbone.", default_factory=BackboneConfig)
    tokens: SpatialTokensConfig = doc_field("Spatial tokens.", default_factory=SpatialTokensConfig)
    seg_head: SegHeadConfig = doc_field("Segmentation head.", default_factory=SegHeadConfig)
    depth_vqvae: DepthVQVAEConfig = doc_field("Depth tokenizer.", default_factory=DepthVQVAEConfig)
    lora: LoraConfig = doc_field("LoRA adapters (peft).", default_factory=LoraConfig)


# ------------------------------------------------------------------------- objective


@dataclass
class ObjectiveConfig:
    """Weights and options of the composite objective (DESIGN.md section 2, losses/objective.py)."""

    text_weight: float = doc_field("Weight of next-token cross-entropy on answer text tokens.", 1.0)
    marker_weight: float = doc_field("Weight of full-vocabulary CE at [SEG], <DEPTH_START>, <DEPTH_END> targets.", 1.0)
    token_weight: float = doc_field("Weight of the restricted (K-way) CE at <DEPTH_k> targets.", 1.0)
    count_weight: float = doc_field("Weight of the depth-token count penalty.", 1.0)
    reconstruction_weight: float = doc_field("Weight of the soft-merge depth reconstruction L1.", 1.0)
    mask_weight: float = doc_field("Weight of the mask term as a whole.", 1.0)
    mask_bce_weight: float = doc_field("Factor of BCE inside the mask term.", 2.0)
    mask_dice_weight: float = doc_field("Factor of Dice inside the mask term.", 0.5)
    mask_point_samples: int = doc_field(
        "Mask losses use this many random points per mask when the target has more pixels; 0: always dense.", 12544
    )
    z_loss_weight: float = doc_field("Optional z-loss (mean squared log-partition) on all target positions; 0 disables.", 0.0)
    text_weighting: Literal["token", "sample", "square"] = doc_field(
        "How answer tokens weigh in the text term, which is a mean over the whole optimizer step (every micro-batch "
        "and rank, like every term). 'token': each token the same; 'sample': a sample's tokens 1/n each, so every "
        "sample counts the same whatever its answer length; 'square': 1/sqrt(n), InternVL 2.5's square averaging.",
        "token")
    implementation: Literal["auto", "reference", "fused_torch", "fused_triton"] = doc_field(
        "How the LM-head terms are computed. 'auto': fused_triton on GPUs with triton installed, else fused_torch "
        "(chunked, never the full logits); 'reference': the full fp32 logits of the target rows (tests, debugging).",
        "auto",
    )
    chunk_size: int = doc_field("Rows per chunk of the fused LM-head terms (a chunk holds rows x vocabulary fp32 logits).",
                           1024)
    lm_head_matmul: Literal["fp32", "tf32", "bf16"] = doc_field(
        "Precision of the fused back ends' LM-head GEMMs (logits, dH, dW); softmax statistics and the terms stay fp32. "
        "'tf32': TF32 tensor cores on GPUs for these GEMMs only (plain fp32 on the CPU); 'bf16': bf16 operands, fp32 "
        "accumulation and output; 'fp32': no reduced precision. Error against fp64: docs/training.md.", "tf32")


# ------------------------------------------------------------------------------ data


TASKS = ("referring_seg", "relative_depth", "depth", "vqa")


@dataclass
class CurriculumPhase:
    until_step: int = doc_field("The phase holds for the optimizer steps before this one (after the previous "
                                "phase's); data.task_weights hold after the last phase.")
    task_weights: dict[str, float] = doc_field(
        "The phase's sampling weight per task, as data.task_weights; tasks missing here are weighted 0.",
        default_factory=dict)


@dataclass
class DataConfig:
    shards: Optional[str] = path_field(
        "Folder written by the preprocessing job (preprocess/job.py, `perceptio-preprocess`): manifest.json and <task>/*.tar shards; "
        "or a URL of that folder (https://, s3://, gs://, file://: anything fsspec opens), whose shards are fetched "
        "whole into data.cache_dir and checked against the manifest's sha256.", None,
        purpose="the folder of preprocessed training shards (manifest.json and <task>/*.tar)", folder=True,
        prefixes=SHARD_URL_SCHEMES,
        remedy="Write the shards with `perceptio-preprocess --recipe <preprocess recipe>` and set "
               "data.shards to that job's output_dir.",
    )
    cache_dir: Optional[str] = path_field(
        "Where shards of a URL data.shards are kept once fetched (a subfolder per URL); null: "
        "~/.cache/perceptio_dist/shards. Unused for a local folder.", None, kind="output")
    shuffle_window: int = doc_field(
        "Shards whose samples are shuffled together within an epoch (shards are visited in a new random order "
        "every epoch). A step reads from one window per task, so a rank keeps about 2 x this many shards per task "
        "open; the shard count of the largest task gives a full shuffle.", 4)
    damaged_shards: Literal["stop", "skip"] = doc_field(
        "A shard whose bytes do not match the manifest (size, or sha256 with data.verify=sha256 or a URL). stop: "
        "the run stops with a message naming the shard. skip: its samples are dropped and counted in "
        "data/skipped_samples. A malformed sample inside a good shard is always dropped and counted.", "stop")
    verify: Literal["size", "sha256"] = doc_field(
        "Check of a local shard when a worker opens it: size (a stat, also done by every rank at start) or sha256 "
        "(reads the whole shard once per worker). Shards fetched from a URL are always checked by sha256.", "size")
    task_weights: dict[str, float] = doc_field(
        "Relative sampling weight per task (referring_seg, relative_depth, depth, vqa); tasks missing from the "
        "shards or weighted 0 are not drawn.",
        default_factory=lambda: {"referring_seg": 1.0, "relative_depth": 1.0, "depth": 0.5, "vqa": 0.5},
    )
    curriculum: list[CurriculumPhase] = doc_field(
        "Earlier phases with their own task weights, e.g. [{until_step: 750, task_weights: {relative_depth: 1}}]: "
        "relative-depth questions only for the first 750 steps, then data.task_weights (AURORA's depth-first "
        "curriculum). Every task of any phase needs samples; resume and rank splits stay exact. []: none.",
        default_factory=list)
    num_workers: int = doc_field("DataLoader worker processes per rank (0: load in the training process).", 2)
    seed: int = doc_field("Seed of the task mixing and of the shard/sample shuffles (with the epoch).", 1234)
    max_seq_len: int = doc_field("Longest tokenised sample; longer samples are skipped and counted, not truncated.", 4096)
    packing: bool = doc_field(
        "Pack each micro-batch's samples into the fewest, evenly filled rows of at most data.max_tokens_per_row tokens "
        "(data/packing.py), instead of one padded row per sample. Same samples, same loss and gradients (attention "
        "never crosses samples; positions restart per sample); fewer padding tokens. Raise train.micro_batch_size "
        "with it to fill the rows. Mode zero only.", False)
    max_tokens_per_row: Optional[int] = doc_field(
        "Token budget of a packed row (data.packing); at least data.max_seq_len, so every sample fits a row. null: "
        "data.max_seq_len.", None)
    depth_tokens: bool = doc_field(
        "Put the depth block into assistant turns that have one. false: the no-depth-token ablation (same samples, "
        "the answer follows directly).", True
    )
    depth_context_noise: float = doc_field(
        "Training only: probability that each depth code in a block's *input* is replaced by a random code (the "
        "labels keep the true codes), so the block cannot be predicted from its own earlier codes alone and must "
        "be read from the image (a toy-world lever; drawn per sample key, so resume stays exact). 0: off.",
        0.0)
    depth_context_noise_tasks: Optional[list[str]] = doc_field(
        "The tasks whose depth blocks get data.depth_context_noise; null: every task. A task left out keeps its true "
        "codes in the input, so an answer after the block can learn to read them: under the noise an answer can only "
        "trust what the image says, and then random or true codes in its chain change nothing (docs/research, the "
        "toy world).", None)


# ----------------------------------------------------------------------------- train


@dataclass
class TrainConfig:
    max_steps: int = doc_field("Optimizer steps to run.", 1000)
    micro_batch_size: int = doc_field("Samples per rank per forward/backward.", 1)
    grad_accum_steps: int = doc_field("Micro-batches accumulated per optimizer step.", 1)
    global_batch_size: Optional[int] = doc_field(
        "Samples per optimizer step over all ranks. Must equal micro_batch_size x grad_accum_steps x ranks; "
        "null: derived.", None
    )
    lr: float = doc_field("Peak learning rate (AdamW).", 2e-5)
    min_lr_ratio: float = doc_field("Cosine schedule floor as a fraction of lr.", 0.1)
    warmup_steps: int = doc_field("Linear warmup steps from 0 to lr.", 100)
    weight_decay: float = doc_field("AdamW weight decay (not applied to biases, norms and embeddings).", 0.0)
    betas: list[float] = doc_field("AdamW betas.", default_factory=lambda: [0.9, 0.95])
    eps: float = doc_field("AdamW epsilon.", 1e-8)
    grad_clip: float = doc_field("Clip the global gradient norm to this value; 0 disables.", 1.0)
    precision: Literal["fp32", "bf16"] = doc_field("Parameter/activation precision (bf16 keeps fp32 master weights).", "bf16")
    activation_checkpointing: bool = doc_field("Recompute LLM and vision layers in backward to save activation memory.", False)
    seed: int = doc_field("Seed of parameter initialisation and of any training-time randomness.", 42)
    deterministic: bool = doc_field(
        "Deterministic kernels only (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG): on GPUs the losses "
        "after a resume then equal an uninterrupted run's bit for bit. Off, they agree to float round-off (atomics in "
        "some CUDA kernels reorder sums). Slower; a kernel with no deterministic version fails.", False)
    max_nonfinite_in_a_row: int = doc_field(
        "A micro-batch whose loss is not finite on any rank is skipped by every rank (no backward) and counted; "
        "after this many in a row the run saves a diagnostic checkpoint and stops with exit status 3.", 3)


@dataclass
class ParallelConfig:
    mode: Literal["zero", "pipeline"] = doc_field(
        "'zero': data parallel with ZeRO-2/3 on the whole model. 'pipeline': DeepSpeed PipelineModule, the model cut "
        "into parallel.pp_stages stages, ZeRO-1 (or 0) across the data-parallel replicas of each stage.", "zero")
    zero_stage: Literal[0, 1, 2, 3] = doc_field(
        "DeepSpeed ZeRO stage: 3 shards parameters too (default for 8B), 2 shards gradients and optimizer states "
        "(mode zero); 1 shards optimizer states, 0 nothing (mode pipeline: DeepSpeed refuses 2 and 3 there).", 3)
    pp_stages: int = doc_field("Pipeline stages (mode pipeline); ranks / pp_stages data-parallel replicas. Stage s holds "
                          "ranks s x replicas ... (s + 1) x replicas - 1.", 1)
    tp_size: int = doc_field(
        "Tensor parallelism for the LLM (DeepSpeed AutoTP training): each decoder layer's q/k/v, gate and up "
        "projections column-sharded and o and down row-sharded over tp_size consecutive ranks; the vision tower, "
        "projector, embeddings, LM head, SAM2 and the VQ-VAE replicated. Mode zero with ZeRO-2 only (DeepSpeed's "
        "AutoTP takes ZeRO <= 2); ranks / tp_size data-parallel replicas. 1: off.", 1)
    pp_partition: Literal["parameters", "uniform"] = doc_field(
        "How decoder layers are dealt to stages when pp_layers_per_stage is null: balanced by trainable parameters "
        "(embedding + vision tower count for the first stage; LM head, SAM2 decoder for the last) or the same number "
        "of layers each.", "parameters")
    pp_layers_per_stage: Optional[list[int]] = doc_field(
        "Decoder layers per stage, e.g. [14, 18]; sums to model.backbone.text.num_layers. The first stage also holds "
        "the vision tower, projector and embeddings; the last the final norm, LM head, SAM2 and the VQ-VAE.", None)
    deepspeed_config: Optional[str] = path_field(
        "DeepSpeed JSON with ZeRO tuning (bucket sizes, prefetch, overlap). Batch sizes, precision, clipping and "
        "stage come from this config; a JSON value that contradicts them is an error. Relative paths are resolved "
        "against the working directory, then the repository root.",
        None, purpose="the DeepSpeed JSON with ZeRO tuning",
        remedy="Point it at one of ds_configs/*.json (or your own), or set it to null for DeepSpeed's defaults.",
    )
    backend: Literal["auto", "nccl", "gloo"] = doc_field("torch.distributed backend; 'auto': nccl on GPUs, gloo on CPU.", "auto")
    zero_init: bool = doc_field("Under ZeRO-3, create the backbone already partitioned (deepspeed.zero.Init), so no rank "
                           "ever holds the full model.", True)
    timeout_minutes: float = doc_field(
        "Collective timeout: a rank that waits longer for its peers (a hung, frozen or cut-off node) fails instead of "
        "hanging, and the job ends so that it can resume. Fractions are allowed (0.5: 30 s). Set it above the longest "
        "wait that is not a failure: a checkpoint save or the first step's compilation.", 30.0)


@dataclass
class CheckpointConfig:
    dir: Optional[str] = path_field("Checkpoint folder; null: <logging.output_dir>/checkpoints.", None, kind="output")
    save_every_steps: int = doc_field("Save a DeepSpeed sharded checkpoint every N optimizer steps; 0: off.", 0)
    save_every_minutes: float = doc_field("Also save when this many minutes passed since the last save; 0: off.", 0.0)
    save_final: bool = doc_field("Save a checkpoint when training ends.", True)
    keep_last: int = doc_field("Keep the newest N complete checkpoints; older ones are deleted.", 3)
    resume: str = path_field(
        "'none': start fresh; 'auto': continue from the newest complete checkpoint in the folder, falling back past "
        "damaged ones (fresh start if there is none); or the path of one checkpoint (a global_stepN folder). A "
        "different rank count converts it to DeepSpeed's universal format first.", "none",
        keywords=("none", "auto"), must_exist=False)  # verified by the checkpoint code, with its own message
    verify_checksums: bool = doc_field("Check every file's sha256 against the checkpoint's marker before resuming "
                                       "(sizes always).", True)


@dataclass
class LoggingConfig:
    output_dir: str = path_field("Run folder: resolved config, metrics.jsonl, wandb files, checkpoints.", "runs/default",
                                 kind="output")
    log_every_steps: int = doc_field("Write metrics every N optimizer steps.", 1)
    wandb: Literal["auto", "online", "offline", "disabled"] = doc_field(
        "Weights & Biases mode. 'auto': online when WANDB_API_KEY is set, else offline (files under the run folder).",
        "auto",
    )
    wandb_project: str = doc_field("wandb project name.", "perceptio_dist")
    run_name: Optional[str] = doc_field("wandb run name; null: the output folder's name.", None)
    peak_tflops_per_device: Optional[float] = doc_field(
        "Peak dense TFLOP/s of one device for MFU. null: known GPUs from a table (bf16 dense), CPUs measured by a "
        "short matmul at start.", None
    )
    progress_bar: bool = doc_field("Show a progress bar on rank 0.", True)
    log_samples: bool = doc_field("Write the sample keys of every micro-batch to <output_dir>/samples/rank<r>.jsonl.", False)


@dataclass
class PerceptioConfig:
    model: ModelConfig = doc_field("The model.", default_factory=ModelConfig)
    objective: ObjectiveConfig = doc_field("The composite objective.", default_factory=ObjectiveConfig)
    data: DataConfig = doc_field("Training data.", default_factory=DataConfig)
    train: TrainConfig = doc_field("Optimisation.", default_factory=TrainConfig)
    parallel: ParallelConfig = doc_field("Parallelism.", default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = doc_field("Checkpoints.", default_factory=CheckpointConfig)
    logging: LoggingConfig = doc_field("Metrics and outputs.", default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable short hash of the resolved config (recorded in checkpoints and metrics)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ------------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"a mapping of {_type_name(key)} to {_type_name(value)}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (ints widened to floats)."""

    def fail() -> ConfigError:
        shown = repr(value) if not isinstance(value, dict) else "a mapping"
        return ConfigError(
            f"Config error at '{path}': expected {_type_name(tp)}, got {shown} ({type(value).__name__}). "
            f"Fix it in the recipe or override it on the command line, e.g. {path}=<value>."
        )

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        return _build_dataclass(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            if value is None:
                raise fail()
            try:
                return _coerce(value, non_none[0], path)
            except ConfigError:
                raise fail() from None
        raise fail()
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise fail()
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise fail()
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, f"{path}.{k}"): _coerce(v, value_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # a bug in this module, not a user mistake


def _build_dataclass(cls: type, data: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{path}.{key}" if path else key
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else ""
            known = ", ".join(sorted(fields))
            raise ConfigError(f"Config error: unknown key '{where}'.{hint} Known keys here: {known}.")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"Config error: required key '{sub}' is missing ({f.metadata.get('doc', '')}).")
    return cls(**kwargs)


# -------------------------------------------------------------------------- loading


def recipe_names(kind: str = "") -> list[str]:
    """Shipped recipes: training ones at the top of recipes/, others in a subfolder (e.g. 'preprocess')."""
    folder = resources.files("perceptio_dist.recipes").joinpath(kind) if kind else resources.files("perceptio_dist.recipes")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_recipe(recipe: str, kind: str = "") -> dict:
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text = path.read_text()
    elif recipe in recipe_names(kind):
        text = resources.files("perceptio_dist.recipes").joinpath(kind, f"{recipe}.yaml").read_text()
    else:
        raise ConfigError(
            f"Config error: recipe '{recipe}' is neither a shipped recipe ({', '.join(recipe_names(kind))}) "
            f"nor an existing .yaml file."
        )
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config error: recipe '{recipe}' is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config error: recipe '{recipe}' must be a mapping at the top level.")
    return data


def apply_override(data: dict, override: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML (``1e-4``, ``true``, ``[1,2]``)."""
    if "=" not in override:
        raise ConfigError(f"Config error: override '{override}' must look like section.key=value (e.g. train.lr=1e-4).")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|\d+))*", key):
        raise ConfigError(f"Config error: '{key}' in override '{override}' is not a dotted key.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node: Any = data
    parts = key.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):  # list items are addressed by index: sources.0.path=...
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"Config error: override '{override}': '{where}' is not an item of a "
                                  f"{len(node)}-item list.")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"Config error: override '{override}': '{'.'.join(parts[:depth])}' is a value, not a "
                              "section.")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def _normalise_numbers(data: Any) -> Any:
    """YAML 1.1 reads '1e-4' as a string; turn such strings back into floats before type checking."""
    if isinstance(data, dict):
        return {k: _normalise_numbers(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_normalise_numbers(v) for v in data]
    if isinstance(data, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", data):
        return float(data)
    return data


def is_overlay(override: str) -> bool:
    """An override argument that names a YAML file (no ``=``) is an overlay: a partial recipe merged over it."""
    return "=" not in override and override.endswith((".yaml", ".yml"))


def merge_overlay(data: dict, overlay: dict) -> None:
    """Deep-merge ``overlay`` into ``data`` in place: sections merge key by key, any other value replaces."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            merge_overlay(data[key], value)
        else:
            data[key] = value


def apply_overlay(data: dict, path: str) -> None:
    if not Path(path).is_file():
        raise ConfigError(f"Config error: overlay '{path}' does not exist (an argument ending in .yaml is an overlay "
                          "file merged over the recipe).")
    try:
        overlay = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config error: overlay '{path}' is not valid YAML: {exc}") from None
    if not isinstance(overlay, dict):
        raise ConfigError(f"Config error: overlay '{path}' must be a mapping at the top level.")
    merge_overlay(data, overlay)


def load_typed_config(cls: type, recipe: str, overrides: Optional[list[str]] = None, kind: str = ""):
    """Read a recipe (shipped name or yaml path) into the dataclass ``cls``, type-checked. ``overrides`` are applied
    in order: ``section.key=value`` pairs, and overlay files (``path.yaml``, merged section by section)."""
    data = _read_recipe(recipe, kind)
    for override in overrides or []:
        if is_overlay(override):
            apply_overlay(data, override)
        else:
            apply_override(data, override)
    return resolve_paths(_build_dataclass(cls, _normalise_numbers(data), ""))


def load_config(recipe: str, overrides: Optional[list[str]] = None) -> PerceptioConfig:
    """Read a training recipe (shipped name or yaml path), apply dotted overrides, type-check and validate."""
    cfg = load_typed_config(PerceptioConfig, recipe, overrides)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> PerceptioConfig:
    cfg = resolve_paths(_build_dataclass(PerceptioConfig, _normalise_numbers(data), ""))
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------- validation


def is_power_of_two(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def check_depth_downsampling(input_size: int, depth_grid: int, where: str) -> None:
    """The VQ-VAE encoder halves the depth map down to the grid: input_size / depth_grid must be a power of two >= 2.

    One rule for every config that pairs a depth tokenizer with a grid (training, preprocessing, tokenizer training).
    """
    ratio = input_size / depth_grid
    if ratio != int(ratio) or not is_power_of_two(int(ratio)) or int(ratio) < 2:
        raise ConfigError(f"Config error at '{where}': input_size/depth_grid = {input_size}/{depth_grid} must be a "
                          "power of two >= 2 (the encoder halves the map that many times).")


def validate(cfg: PerceptioConfig) -> None:
    """Checks that need no file system and no process group (see :func:`validate_runtime` for those)."""

    def err(path: str, msg: str) -> ConfigError:
        return ConfigError(f"Config error at '{path}': {msg}")

    b, tok, vq = cfg.model.backbone, cfg.model.tokens, cfg.model.depth_vqvae
    positive = {
        "model.backbone.vision.hidden_size": b.vision.hidden_size,
        "model.backbone.vision.num_layers": b.vision.num_layers,
        "model.backbone.vision.num_heads": b.vision.num_heads,
        "model.backbone.text.hidden_size": b.text.hidden_size,
        "model.backbone.text.num_layers": b.text.num_layers,
        "model.backbone.text.num_heads": b.text.num_heads,
        "model.backbone.text.num_kv_heads": b.text.num_kv_heads,
        "model.backbone.max_tiles": b.max_tiles,
        "model.tokens.num_depth_codes": tok.num_depth_codes,
        "model.tokens.depth_grid": tok.depth_grid,
        "model.depth_vqvae.input_size": vq.input_size,
        "model.depth_vqvae.code_dim": vq.code_dim,
        "train.max_steps": cfg.train.max_steps,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.grad_accum_steps": cfg.train.grad_accum_steps,
        "logging.log_every_steps": cfg.logging.log_every_steps,
    }
    for path, value in positive.items():
        if value <= 0:
            raise err(path, f"must be positive, got {value}.")
    if b.vision.hidden_size % b.vision.num_heads:
        raise err("model.backbone.vision.num_heads", f"must divide vision.hidden_size={b.vision.hidden_size}.")
    if b.text.hidden_size % b.text.num_heads:
        raise err("model.backbone.text.num_heads", f"must divide text.hidden_size={b.text.hidden_size}.")
    if b.text.num_heads % b.text.num_kv_heads:
        raise err("model.backbone.text.num_kv_heads", f"must divide text.num_heads={b.text.num_heads}.")
    grid = b.vision.image_size // b.vision.patch_size
    if b.vision.image_size % b.vision.patch_size:
        raise err("model.backbone.vision.patch_size", f"must divide vision.image_size={b.vision.image_size}.")
    shuffled = grid * b.downsample_ratio
    if not (0 < b.downsample_ratio <= 1) or shuffled != int(shuffled):
        raise err("model.backbone.downsample_ratio",
                  f"{b.downsample_ratio} must be in (0, 1] and turn the {grid}x{grid} patch grid into whole tokens.")
    if b.tokenizer == "pretrained" and b.pretrained_path is None:
        raise err("model.backbone.tokenizer",
                  "'pretrained' needs model.backbone.pretrained_path; without a checkpoint use 'builtin:tiny_bpe' "
                  "or a local tokenizer folder.")
    if "{}" not in tok.depth_code_template:
        raise err("model.tokens.depth_code_template", "must contain '{}' where the code index goes.")
    check_depth_downsampling(vq.input_size, tok.depth_grid, "model.depth_vqvae.input_size")
    if not 0 < vq.ema_decay < 1:
        raise err("model.depth_vqvae.ema_decay", f"must be in (0, 1), got {vq.ema_decay}.")
    weightings = [("data.task_weights", cfg.data.task_weights)] + [
        (f"data.curriculum[{i}].task_weights", phase.task_weights) for i, phase in enumerate(cfg.data.curriculum)]
    for where, weights in weightings:
        unknown = sorted(set(weights) - set(TASKS))
        if unknown:
            raise err(where, f"unknown task(s) {unknown}; tasks are {list(TASKS)}.")
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise err(where, "weights must be >= 0 with at least one positive.")
    previous = 0
    for i, phase in enumerate(cfg.data.curriculum):
        if not previous < phase.until_step < cfg.train.max_steps:
            raise err(f"data.curriculum[{i}].until_step",
                      f"{phase.until_step} must lie after the previous phase's end ({previous}) and before "
                      f"train.max_steps={cfg.train.max_steps}, or data.task_weights would never be used.")
        previous = phase.until_step
    if cfg.data.shuffle_window < 1:
        raise err("data.shuffle_window", f"must be >= 1 shard, got {cfg.data.shuffle_window}.")
    if not 0.0 <= cfg.data.depth_context_noise <= 1.0:
        raise err("data.depth_context_noise", f"must be in [0, 1], got {cfg.data.depth_context_noise}.")
    if cfg.data.depth_context_noise_tasks is not None:
        bad = sorted(set(cfg.data.depth_context_noise_tasks) - set(TASKS))
        if bad:
            raise err("data.depth_context_noise_tasks", f"unknown task(s) {bad}; tasks are {list(TASKS)}.")
    if cfg.data.num_workers < 0:
        raise err("data.num_workers", "must be >= 0.")
    if cfg.data.max_tokens_per_row is not None and cfg.data.max_tokens_per_row < cfg.data.max_seq_len:
        raise err("data.max_tokens_per_row", f"{cfg.data.max_tokens_per_row} is below data.max_seq_len="
                  f"{cfg.data.max_seq_len}: a sample that long would fit no row. Raise it, or lower data.max_seq_len.")
    lora = cfg.model.lora
    if lora.rank < 0:
        raise err("model.lora.rank", f"must be >= 0 (0: no adapters), got {lora.rank}.")
    if lora.rank:
        if lora.alpha <= 0:
            raise err("model.lora.alpha", f"must be positive, got {lora.alpha}.")
        if not 0 <= lora.dropout < 1:
            raise err("model.lora.dropout", f"must be in [0, 1), got {lora.dropout}.")
        if not lora.target_modules:
            raise err("model.lora.target_modules", "name at least one linear layer (e.g. q_proj).")
        unknown_parts = sorted(set(lora.apply_to) - set(LORA_PARTS))
        if unknown_parts or not lora.apply_to:
            raise err("model.lora.apply_to", f"{lora.apply_to}: choose from {list(LORA_PARTS)} (at least one).")
        if cfg.parallel.mode == "pipeline":
            raise err("model.lora.rank", "LoRA runs in parallel.mode=zero (ZeRO-2 or ZeRO-3); the pipeline's stage "
                      "modules are not built for adapters. Set parallel.mode=zero, or model.lora.rank=0.")
    if cfg.data.packing and cfg.parallel.mode == "pipeline":
        raise err("data.packing", "the pipeline (parallel.mode=pipeline) does not pack: its stages rebuild a padded "
                  "causal mask from the attention mask, which cannot keep packed samples apart. Set data.packing="
                  "false, or train with parallel.mode=zero.")
    t = cfg.train
    if t.warmup_steps < 0 or t.warmup_steps >= t.max_steps:
        raise err("train.warmup_steps", f"must be in [0, train.max_steps={t.max_steps}), got {t.warmup_steps}.")
    if not 0 <= t.min_lr_ratio <= 1:
        raise err("train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}.")
    if len(t.betas) != 2 or not all(0 <= x < 1 for x in t.betas):
        raise err("train.betas", f"must be two numbers in [0, 1), got {t.betas}.")
    if t.lr <= 0:
        raise err("train.lr", f"must be positive, got {t.lr}.")
    if t.grad_clip < 0:
        raise err("train.grad_clip", f"must be >= 0, got {t.grad_clip}.")
    if t.global_batch_size is not None and t.global_batch_size % (t.micro_batch_size * t.grad_accum_steps):
        raise err("train.global_batch_size",
                  f"{t.global_batch_size} is not a multiple of micro_batch_size x grad_accum_steps = "
                  f"{t.micro_batch_size} x {t.grad_accum_steps}, so no number of ranks can match it.")
    if cfg.objective.chunk_size <= 0:
        raise err("objective.chunk_size", "must be positive.")
    if cfg.objective.mask_point_samples < 0:
        raise err("objective.mask_point_samples", "must be >= 0.")
    weights = {f.name: getattr(cfg.objective, f.name) for f in dataclasses.fields(ObjectiveConfig)
               if f.name.endswith("_weight")}
    for name, value in weights.items():
        if value < 0:
            raise err(f"objective.{name}", f"must be >= 0, got {value}.")
    if cfg.checkpoint.save_every_steps < 0 or cfg.checkpoint.save_every_minutes < 0:
        raise err("checkpoint.save_every_steps", "save intervals must be >= 0.")
    if cfg.checkpoint.keep_last < 1:
        raise err("checkpoint.keep_last", "must be at least 1.")
    if cfg.train.max_nonfinite_in_a_row < 1:
        raise err("train.max_nonfinite_in_a_row", "must be at least 1.")
    if cfg.parallel.timeout_minutes <= 0:
        raise err("parallel.timeout_minutes", "must be positive.")
    _validate_parallel(cfg, err)


def _validate_parallel(cfg: PerceptioConfig, err) -> None:
    par, num_layers = cfg.parallel, cfg.model.backbone.text.num_layers
    if par.tp_size < 1:
        raise err("parallel.tp_size", f"must be >= 1 (1: no tensor parallelism), got {par.tp_size}.")
    if par.tp_size > 1:
        text = cfg.model.backbone.text
        if par.mode != "zero" or par.zero_stage != 2:
            raise err("parallel.tp_size", f"tensor parallelism runs with parallel.mode=zero and parallel.zero_stage=2 "
                      f"(DeepSpeed's AutoTP training takes ZeRO <= 2), got mode {par.mode!r}, stage {par.zero_stage}.")
        for name in ("num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(text, name) % par.tp_size:
                raise err("parallel.tp_size", f"{par.tp_size} does not divide model.backbone.text.{name}="
                          f"{getattr(text, name)}: every rank needs whole heads and an equal share of the MLP.")
        if cfg.model.lora.rank:
            raise err("parallel.tp_size", "LoRA and tensor parallelism together are not supported (AutoTP shards the "
                      "base linear layers peft wraps). Use ZeRO-2/3 without tensor parallelism for LoRA.")
    if par.mode == "zero":
        if par.zero_stage not in (2, 3):
            raise err("parallel.zero_stage", f"mode 'zero' runs ZeRO-2 or ZeRO-3, got {par.zero_stage} (stages 0 and 1 "
                      "are for parallel.mode=pipeline).")
        if par.pp_stages != 1 or par.pp_layers_per_stage is not None:
            raise err("parallel.pp_stages", "pipeline stages need parallel.mode=pipeline.")
        return
    if par.zero_stage not in (0, 1):
        raise err("parallel.zero_stage", f"DeepSpeed pipelines run with ZeRO-1 or 0, got {par.zero_stage}: set "
                  "parallel.zero_stage=1.")
    if par.pp_stages < 2:
        raise err("parallel.pp_stages", f"mode 'pipeline' needs at least 2 stages, got {par.pp_stages}.")
    if par.pp_stages > num_layers + 1:
        raise err("parallel.pp_stages", f"{par.pp_stages} stages but only {num_layers} decoder layers: every stage "
                  "between the first and the last needs at least one.")
    counts = par.pp_layers_per_stage
    if counts is not None:
        if len(counts) != par.pp_stages or sum(counts) != num_layers or any(c < 0 for c in counts):
            raise err("parallel.pp_layers_per_stage", f"{counts} must have parallel.pp_stages={par.pp_stages} "
                      f"non-negative entries summing to model.backbone.text.num_layers={num_layers}.")
        if any(c == 0 for c in counts[1:-1]):
            raise err("parallel.pp_layers_per_stage", f"{counts}: a middle stage with no decoder layer has nothing "
                      "to run.")


def parallel_layout(cfg: PerceptioConfig, world_size: int):
    """The run's layout on ``world_size`` ranks (parallel/layout.py), or a config error naming the field that does
    not divide the ranks."""
    from .parallel.layout import ParallelLayout

    if world_size % cfg.parallel.pp_stages:
        raise ConfigError(f"Config error at 'parallel.pp_stages': {world_size} ranks cannot be split into "
                          f"{cfg.parallel.pp_stages} pipeline stages of equal size.")
    if world_size % cfg.parallel.tp_size:
        raise ConfigError(f"Config error at 'parallel.tp_size': {world_size} ranks cannot be split into tensor-parallel "
                          f"groups of {cfg.parallel.tp_size}.")
    return ParallelLayout(world_size, cfg.parallel.pp_stages, cfg.parallel.tp_size)


def data_parallel_size(cfg: PerceptioConfig, world_size: int) -> int:
    """Replicas of the model: every rank in mode zero, ranks / pp_stages in mode pipeline, ranks / tp_size with
    tensor parallelism."""
    return parallel_layout(cfg, world_size).replicas


def validate_runtime(cfg: PerceptioConfig, world_size: int) -> None:
    """Checks that need the file system or the number of ranks. Called once at training start."""
    t = cfg.train
    replicas = data_parallel_size(cfg, world_size)
    derived = t.micro_batch_size * t.grad_accum_steps * replicas
    if t.global_batch_size is not None and t.global_batch_size != derived:
        raise ConfigError(
            f"Config error at 'train.global_batch_size': {t.global_batch_size} != micro_batch_size x "
            f"grad_accum_steps x data-parallel replicas = {t.micro_batch_size} x {t.grad_accum_steps} x {replicas} = "
            f"{derived}. Change one of them (e.g. train.grad_accum_steps="
            f"{max(1, t.global_batch_size // (t.micro_batch_size * replicas))}) or set train.global_batch_size=null."
        )
    if cfg.data.shards is None:
        raise ConfigError(
            "Config error at 'data.shards': training needs preprocessed shards. Write them with "
            "`perceptio-preprocess --recipe <preprocess recipe>` and set data.shards=<its output_dir>."
        )
    check_input_paths(cfg, first=("data.shards",))


# ------------------------------------------------------------------------ paths

REPO_ROOT = Path(__file__).resolve().parent.parent
_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def _expand(value: str) -> str:
    return os.path.expanduser(os.path.expandvars(value))


def _resolve_input(value: str) -> str:
    """Relative to the working directory when it exists there, else to the repository root when it exists there."""
    path = Path(value)
    if path.is_absolute() or path.exists():
        return value
    candidate = REPO_ROOT / path
    return str(candidate) if candidate.exists() else value


def _path_fields(obj: Any, prefix: str = ""):
    """(owner, field name, dotted name, PathSpec) for every path field of a config tree, lists of sections included."""
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if "path" in f.metadata:
            yield obj, f.name, name, f.metadata["path"]
        elif dataclasses.is_dataclass(value):
            yield from _path_fields(value, name + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from _path_fields(item, f"{name}[{i}].")


def resolve_paths(cfg: Any) -> Any:
    """Expand $VARS and ~ in every path field and resolve input paths (working directory, then repository root).

    Done once, when a config is loaded: code below ``config`` receives paths it can open as they are. A path
    whose variable is not set stays as written; :func:`check_input_paths` refuses it with the variable's name.
    """
    for owner, name, _, spec in _path_fields(cfg):
        value = getattr(owner, name)
        if not spec.is_path(value):
            continue
        expanded = _expand(value)
        if _VARIABLE.search(expanded):
            continue
        setattr(owner, name, _resolve_input(expanded) if spec.kind == "input" else expanded)
    return cfg


def unset_variable(value: str) -> Optional[str]:
    """The first environment variable a (resolved) path still names, i.e. one that was not set at load."""
    match = _VARIABLE.search(value) if isinstance(value, str) else None
    return match.group(1) if match else None


def check_input_paths(cfg: Any, skip: tuple[str, ...] = (), first: tuple[str, ...] = ()) -> None:
    """Every input path the config needs exists (and is a folder where one is expected), else a message that says
    what the path is for and what to do. Output paths with an unset variable are refused too. Fields in ``first``
    are checked before the others (the data before the weights: without data nothing else matters)."""
    fields = sorted(_path_fields(cfg), key=lambda item: item[2] not in first)
    for owner, name, dotted, spec in fields:
        value = getattr(owner, name)
        if dotted in skip or not spec.is_path(value):
            continue
        variable = unset_variable(value)
        if variable:
            raise ConfigError(
                f"Config error at '{dotted}': '{value}' uses the environment variable ${variable}, which is not set. "
                f"Export it or override the field, e.g. {dotted}=/path/to/it.")
        if spec.kind != "input" or not spec.must_exist:
            continue
        what = f" It should be {spec.purpose}." if spec.purpose else ""
        if not Path(value).exists():
            raise ConfigError(f"Config error at '{dotted}': '{value}' does not exist.{what} {spec.remedy}".rstrip())
        if spec.folder and not Path(value).is_dir():
            raise ConfigError(f"Config error at '{dotted}': '{value}' is a file, not a folder.{what}")


# ---------------------------------------------------------------- documentation


def iter_field_docs(cls: type = PerceptioConfig, prefix: str = ""):
    """Yield (dotted name, type name, default, doc) for every leaf field, for --explain and docs/configuration.md."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_field_docs(tp, name + ".")
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if item is not None and dataclasses.is_dataclass(item):
            yield name, f"a list of {item.__name__}", [], f.metadata.get("doc", "")
            yield from iter_field_docs(item, name + "[].")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        yield name, _type_name(tp), default, f.metadata.get("doc", "")


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
