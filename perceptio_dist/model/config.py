"""The model's config: the InternVL backbone, the spatial tokens, the SAM2 head, the depth tokenizer and LoRA.

Each section checks its own values (``check(at)``, ``at`` being where the section sits in the recipe); rules that
join sections of different components live in config/rules.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..config import WEIGHTS_REMEDY, check_positive, config_error, doc_field, path_field


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

    def check(self, at: str) -> None:
        vision, text = self.vision, self.text
        check_positive({f"{at}.vision.hidden_size": vision.hidden_size, f"{at}.vision.num_layers": vision.num_layers,
                        f"{at}.vision.num_heads": vision.num_heads, f"{at}.text.hidden_size": text.hidden_size,
                        f"{at}.text.num_layers": text.num_layers, f"{at}.text.num_heads": text.num_heads,
                        f"{at}.text.num_kv_heads": text.num_kv_heads, f"{at}.max_tiles": self.max_tiles})
        if vision.hidden_size % vision.num_heads:
            raise config_error(f"{at}.vision.num_heads", f"must divide vision.hidden_size={vision.hidden_size}.")
        if text.hidden_size % text.num_heads:
            raise config_error(f"{at}.text.num_heads", f"must divide text.hidden_size={text.hidden_size}.")
        if text.num_heads % text.num_kv_heads:
            raise config_error(f"{at}.text.num_kv_heads", f"must divide text.num_heads={text.num_heads}.")
        grid = vision.image_size // vision.patch_size
        if vision.image_size % vision.patch_size:
            raise config_error(f"{at}.vision.patch_size", f"must divide vision.image_size={vision.image_size}.")
        shuffled = grid * self.downsample_ratio
        if not (0 < self.downsample_ratio <= 1) or shuffled != int(shuffled):
            raise config_error(f"{at}.downsample_ratio", f"{self.downsample_ratio} must be in (0, 1] and turn the "
                               f"{grid}x{grid} patch grid into whole tokens.")
        if self.tokenizer == "pretrained" and self.pretrained_path is None:
            raise config_error(f"{at}.tokenizer", f"'pretrained' needs {at}.pretrained_path; without a checkpoint "
                               "use 'builtin:tiny_bpe' or a local tokenizer folder.")


@dataclass
class DepthCodesConfig:
    """The depth codes' geometry: K codes on a grid x grid grid. Preprocessing, the tokenizer's training and the
    model must agree on it; the two jobs take only this, the model adds its tokens' spelling (below)."""

    num_depth_codes: int = doc_field("K: size of the depth codebook, one token <DEPTH_k> per code.", 128)
    depth_grid: int = doc_field("The depth map is tokenised on a depth_grid x depth_grid grid: N = depth_grid^2 tokens.", 10)

    @property
    def num_depth_tokens(self) -> int:
        """N, the number of code tokens in one depth block."""
        return self.depth_grid * self.depth_grid

    def check(self, at: str) -> None:
        check_positive({f"{at}.num_depth_codes": self.num_depth_codes, f"{at}.depth_grid": self.depth_grid})


@dataclass
class SpatialTokensConfig(DepthCodesConfig):
    """Spatial tokens added to the tokenizer; embeddings and LM head are resized, new rows trainable."""

    seg_token: str = doc_field("Token whose last hidden state prompts the SAM2 mask decoder.", "[SEG]")
    depth_start_token: str = doc_field("Token opening a depth block.", "<DEPTH_START>")
    depth_end_token: str = doc_field("Token closing a depth block.", "<DEPTH_END>")
    depth_code_template: str = doc_field("Format of the K code tokens; '{}' is replaced by the code index.", "<DEPTH_{}>")

    def check(self, at: str) -> None:
        super().check(at)
        if "{}" not in self.depth_code_template:
            raise config_error(f"{at}.depth_code_template", "must contain '{}' where the code index goes.")


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

    def check(self, at: str) -> None:
        check_positive({f"{at}.input_size": self.input_size, f"{at}.code_dim": self.code_dim})
        if not 0 < self.ema_decay < 1:
            raise config_error(f"{at}.ema_decay", f"must be in (0, 1), got {self.ema_decay}.")


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

    def check(self, at: str) -> None:
        if self.rank < 0:
            raise config_error(f"{at}.rank", f"must be >= 0 (0: no adapters), got {self.rank}.")
        if not self.rank:
            return
        if self.alpha <= 0:
            raise config_error(f"{at}.alpha", f"must be positive, got {self.alpha}.")
        if not 0 <= self.dropout < 1:
            raise config_error(f"{at}.dropout", f"must be in [0, 1), got {self.dropout}.")
        if not self.target_modules:
            raise config_error(f"{at}.target_modules", "name at least one linear layer (e.g. q_proj).")
        unknown_parts = sorted(set(self.apply_to) - set(LORA_PARTS))
        if unknown_parts or not self.apply_to:
            raise config_error(f"{at}.apply_to", f"{self.apply_to}: choose from {list(LORA_PARTS)} (at least one).")


@dataclass
class ModelConfig:
    backbone: BackboneConfig = doc_field("InternVL backbone.", default_factory=BackboneConfig)
    tokens: SpatialTokensConfig = doc_field("Spatial tokens.", default_factory=SpatialTokensConfig)
    seg_head: SegHeadConfig = doc_field("Segmentation head.", default_factory=SegHeadConfig)
    depth_vqvae: DepthVQVAEConfig = doc_field("Depth tokenizer.", default_factory=DepthVQVAEConfig)
    lora: LoraConfig = doc_field("LoRA adapters (peft).", default_factory=LoraConfig)

    def check(self, at: str = "model") -> None:
        self.backbone.check(f"{at}.backbone")
        self.tokens.check(f"{at}.tokens")
        self.depth_vqvae.check(f"{at}.depth_vqvae")
        check_depth_downsampling(self.depth_vqvae.input_size, self.tokens.depth_grid, f"{at}.depth_vqvae.input_size")
        self.lora.check(f"{at}.lora")


def is_power_of_two(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def check_depth_downsampling(input_size: int, depth_grid: int, where: str) -> None:
    """The VQ-VAE encoder halves the depth map down to the grid: input_size / depth_grid must be a power of two >= 2.

    One rule for every config that pairs a depth tokenizer with a grid (training, preprocessing, tokenizer training).
    """
    ratio = input_size / depth_grid
    if ratio != int(ratio) or not is_power_of_two(int(ratio)) or int(ratio) < 2:
        raise config_error(where, f"input_size/depth_grid = {input_size}/{depth_grid} must be a power of two >= 2 "
                           "(the encoder halves the map that many times).")
