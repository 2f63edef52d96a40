"""Perceptio as a DeepSpeed ``PipelineModule`` (parallel.mode=pipeline), cut from the same model code.

The layer sequence (DeepSpeed builds only the layers of its own stage):

    0        token embeddings                       (input_ids, attention_mask, pixel_values) -> (embeds, ...)
    1        vision tower + projector, image features scattered into the image-token positions -> (h, mask)
    2..L+1   decoder layer i (rotary embeddings and causal mask rebuilt from the mask)          -> (h, mask)
    L+2      final norm; the loss function then runs the LM head terms, SAM2 on the [SEG] hidden
             states and the VQ-VAE soft decode, exactly as the ZeRO path (losses/objective.objective_outputs)

With tied embeddings the embedding is a ``TiedLayerSpec`` that the last stage holds too (DeepSpeed
all-reduces the tied weight's gradient between the two stages); the head reads its weight from there.

Between stages only (hidden states, attention mask) travel: the hidden states carry gradient, the
int64 mask does not. Shapes may change from micro-batch to micro-batch (``dynamic_shape``): batches are
padded to their longest sample, not to data.max_seq_len. The last stage reads everything it needs
for the loss (labels, input_ids for the [SEG] positions, SAM2 images, mask and depth targets) from the
data iterator itself; the frozen SAM2 image encoder therefore sits on the last stage, next to the mask
decoder it feeds, and never sends its features anywhere.

Stages take their modules from one full ``PerceptioModel`` built on every rank with the run's seed, so
initial weights are those of a ZeRO run with the same seed; modules of other stages are freed once the
PipelineModule exists (a rank briefly holds the whole model in host memory while it is built).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.internvl.modeling_internvl import InternVLModel

from ..config import ConfigError
from ..config.training import PerceptioConfig
from ..losses.lm_head_module import LMHeadTermsModule
from ..losses.objective import PerceptioObjective, objective_outputs
from ..model.perceptio import PerceptioModel, keep_frozen_parts_in_eval, segment_seg_tokens

TIED_KEY = "embed"
FIRST_STAGE_LAYERS = 2  # token embedding + vision merge always share the first stage


# ----------------------------------------------------------------------------------------------- layers


class ModelSource:
    """What the LayerSpecs hold instead of the model: emptied once the stage is built, so the layers of other
    stages are freed (DeepSpeed keeps the specs, and their arguments, for the module's lifetime)."""

    def __init__(self, model: PerceptioModel):
        self.model: PerceptioModel | None = model
        self.decoder_context = DecoderContext()  # shared by this rank's decoder layers


class DecoderContext:
    """Position ids, rotary embeddings and causal masks of the micro-batch a stage is running: computed by its
    first decoder layer, reused by the others. The attention mask tensor passes unchanged through a stage's
    layers, so its identity marks the micro-batch (DeepSpeed hands each micro-batch a fresh copy)."""

    def __init__(self):
        self._mask: torch.Tensor | None = None  # held, so its identity cannot be reused while cached
        self._cached: dict = {}

    def get(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layer_type: str, config, rotary_emb):
        key = (hidden.shape[1], hidden.dtype, hidden.device)
        if attention_mask is not self._mask or self._cached.get("key") != key:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            self._mask = attention_mask
            self._cached = {"key": key, "position_ids": position_ids,
                            "position_embeddings": rotary_emb(hidden, position_ids)}
        if layer_type not in self._cached:
            make_mask = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
            self._cached[layer_type] = make_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask,
                                                 cache=None, position_ids=self._cached["position_ids"])
        return self._cached["position_ids"], self._cached["position_embeddings"], self._cached[layer_type]


class TokenEmbeddingPipe(nn.Module):
    MODEL_KEYS = {"embed_tokens.": "backbone.model.language_model.embed_tokens."}

    def __init__(self, source: ModelSource):
        super().__init__()
        self.embed_tokens = source.model.backbone.model.language_model.embed_tokens

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        batch = dict(zip(FIRST_STAGE_INPUTS, inputs))
        input_ids = batch["input_ids"]
        return self.embed_tokens(input_ids), input_ids, batch["attention_mask"], batch["pixel_values"]


class VisionMergePipe(nn.Module):
    """InternVL's image path (transformers' own ``get_image_features``) and the scatter into the sequence."""

    MODEL_KEYS = {"vision_tower.": "backbone.model.vision_tower.",
                  "multi_modal_projector.": "backbone.model.multi_modal_projector."}
    # transformers' methods, used as they are: they need only these attributes and self.config.
    get_image_features = InternVLModel.get_image_features
    pixel_shuffle = InternVLModel.pixel_shuffle

    def __init__(self, source: ModelSource):
        super().__init__()
        inner = source.model.backbone.model
        self.vision_tower = inner.vision_tower
        self.multi_modal_projector = inner.multi_modal_projector
        self.config = inner.config
        self.image_token_id = inner.config.image_token_id

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, input_ids, attention_mask, pixel_values = inputs
        features = self.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        features = features.to(embeds.device, embeds.dtype)
        is_image = input_ids == self.image_token_id
        if int(is_image.sum()) * embeds.shape[-1] != features.numel():
            raise ValueError(f"{int(is_image.sum())} image tokens but {features.shape[0] * features.shape[1]} image "
                             "features in the micro-batch")
        hidden = embeds.masked_scatter(is_image.unsqueeze(-1), features)
        return hidden, attention_mask


class DecoderLayerPipe(nn.Module):
    """One LLM decoder layer. Position ids, rotary embeddings and the causal mask are built as the language model
    builds them (right-padded batches: positions 0..T-1), once per micro-batch and stage (DecoderContext)."""

    def __init__(self, source: ModelSource, index: int):
        super().__init__()
        lm = source.model.backbone.model.language_model
        self.layer = lm.layers[index]
        self.rotary_emb = lm.rotary_emb  # no persistent state; shared by the layers of a stage
        self.config = lm.config
        self.context = source.decoder_context
        self.index = index
        self.layer_type = lm.config.layer_types[index] if getattr(lm.config, "layer_types", None) else "full_attention"

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, attention_mask = inputs
        position_ids, position_embeddings, mask = self.context.get(hidden, attention_mask, self.layer_type,
                                                                   self.config, self.rotary_emb)
        hidden = self.layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                            position_ids=position_ids, cache=None, use_cache=False)
        return hidden, attention_mask


class HeadPipe(nn.Module):
    """Final norm in ``forward``; the objective in ``loss`` (called by DeepSpeed's loss_fn with the labels)."""

    def __init__(self, source: ModelSource, objective: PerceptioObjective, lm_head_terms: LMHeadTermsModule,
                 tied: bool):
        super().__init__()
        model = source.model
        self.norm = model.backbone.model.language_model.norm
        self.lm_head = None if tied else model.backbone.lm_head
        self.seg_head = model.seg_head
        self.depth_vqvae = model.depth_vqvae
        self.lm_head_terms = lm_head_terms
        self.objective = objective
        self.seg_id = model.token_ids.seg
        # Tied only: the stage's copy of the embedding, bound after the PipelineModule is built. Kept in a tuple so
        # it is not registered as a submodule here too (it belongs to the PipelineModule's tied_modules).
        self.tied_embedding: tuple[nn.Embedding, ...] = ()

    def train(self, mode: bool = True) -> "HeadPipe":
        super().train(mode)
        keep_frozen_parts_in_eval(self.seg_head, self.depth_vqvae)
        return self

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.tied_embedding[0].weight

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, _ = inputs
        return self.norm(hidden)

    def loss(self, hidden: torch.Tensor, labels: tuple[torch.Tensor, ...]):
        batch = dict(zip(LAST_STAGE_LABELS, labels))
        mask_logits, num_seg = segment_seg_tokens(self.seg_head, self.seg_id, hidden, batch["input_ids"],
                                                  batch["sample_index"], batch["sam_images"])
        return objective_outputs(self.objective, self.lm_head_terms, hidden, self.lm_head_weight,
                                 self.depth_vqvae.soft_decode, mask_logits, num_seg, batch["labels"],
                                 batch["seg_masks"], batch["teacher_depth"], batch["has_teacher_depth"],
                                 batch["sample_index"])


def _pass_through(module: nn.Module, inputs):
    """The last stage's use of the tied embedding: none in forward (the head reads its weight)."""
    return inputs


# ------------------------------------------------------------------------------------------- the module


@dataclass
class StageLoss:
    """DeepSpeed's loss_fn: runs the head's objective and keeps each micro-batch's terms for the trainer's log."""

    head: HeadPipe | None = None

    def __post_init__(self):
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, outputs: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        total, terms, counts = self.head.loss(outputs, labels)
        self.records.append((terms, counts))
        return total

    def take_records(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        records, self.records = self.records, []
        return records


def layer_kinds(num_layers: int, tied: bool) -> list[str]:
    """The pipeline's layer sequence by kind; the checkpoint's layer_NN files follow these indices."""
    kinds = ["embed", "vision"] + [f"decoder:{i}" for i in range(num_layers)]
    return kinds + (["tied_embed", "head"] if tied else ["head"])


def stage_bounds(cfg: PerceptioConfig, layer_params: list[int]) -> list[int]:
    """Layer index where each stage starts, plus the end, for the run's parallel settings."""
    par = cfg.parallel
    return split_layers(layer_params, cfg.model.backbone.text.num_layers, par.pp_stages, par.pp_partition,
                        par.pp_layers_per_stage)


def split_layers(layer_params: list[int], num_layers: int, stages: int, partition: str = "parameters",
                 layers_per_stage: list[int] | None = None) -> list[int]:
    """Stage bounds over the layer sequence [embed, vision, decoder 0..L-1, (tied embed,) head]: embed and vision
    always on the first stage, the head on the last, decoder layers as given or balanced by trainable parameters
    (DeepSpeed's partition_balanced over the units [embed+vision], each decoder layer, [head]) or uniformly.
    Shared with the planner (plan.py), so it plans the split the trainer runs."""
    from deepspeed.runtime import utils as ds_utils

    n = num_layers
    tail = len(layer_params) - FIRST_STAGE_LAYERS - n  # head (and tied embedding)
    if layers_per_stage is not None:
        counts = list(layers_per_stage)
    else:
        units = [sum(layer_params[:FIRST_STAGE_LAYERS])] + list(layer_params[FIRST_STAGE_LAYERS:FIRST_STAGE_LAYERS + n])
        units.append(sum(layer_params[FIRST_STAGE_LAYERS + n:]))
        if partition == "uniform":
            parts = ds_utils.partition_uniform(num_items=len(units), num_parts=stages)
        else:
            parts = ds_utils.partition_balanced(weights=units, num_parts=stages)
        # Unit bounds -> decoder layers per stage (the first unit and the last are not decoder layers).
        counts = [max(0, int(min(parts[s + 1], n + 1) - max(parts[s], 1))) for s in range(stages)]
        if sum(counts) != n or any(c == 0 for c in counts[1:-1]):
            raise ConfigError(f"Config error at 'parallel.pp_stages': cannot balance {n} decoder layers over {stages} "
                              "stages by parameters; set parallel.pp_layers_per_stage explicitly.")
    bounds = [0]
    for s, c in enumerate(counts):
        bounds.append(bounds[-1] + c + (FIRST_STAGE_LAYERS if s == 0 else 0) + (tail if s == stages - 1 else 0))
    return bounds


def build_pipeline_module(cfg: PerceptioConfig, model: PerceptioModel, objective: PerceptioObjective,
                          lm_head_terms: LMHeadTermsModule, world_size: int):
    """(PipelineModule holding this rank's stage, its StageLoss). ``model`` may be dropped afterwards."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    par = cfg.parallel
    tied = model.backbone.lm_head.weight is model.backbone.model.language_model.embed_tokens.weight
    n = cfg.model.backbone.text.num_layers
    source = ModelSource(model)
    embed = (TiedLayerSpec(TIED_KEY, TokenEmbeddingPipe, source, tied_weight_attr=["embed_tokens.weight"]) if tied
             else LayerSpec(TokenEmbeddingPipe, source))
    specs = [embed, LayerSpec(VisionMergePipe, source)] + [LayerSpec(DecoderLayerPipe, source, i) for i in range(n)]
    if tied:
        specs.append(TiedLayerSpec(TIED_KEY, TokenEmbeddingPipe, source, forward_fn=_pass_through,
                                   tied_weight_attr=["embed_tokens.weight"]))
    specs.append(LayerSpec(HeadPipe, source, objective, lm_head_terms, tied))

    def trainable(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    inner = model.backbone.model
    params = [trainable(inner.language_model.embed_tokens),
              trainable(inner.vision_tower) + trainable(inner.multi_modal_projector)]
    params += [trainable(layer) for layer in inner.language_model.layers]
    if tied:
        params.append(0)
    params.append(trainable(inner.language_model.norm) + (0 if tied else trainable(model.backbone.lm_head))
                  + trainable(model.seg_head))
    bounds = stage_bounds(cfg, params)
    loss = StageLoss()
    topology = PipeDataParallelTopology(num_pp=par.pp_stages, num_dp=cfg.parallel.layout(world_size).replicas)
    pipe = _pipeline_module_class()(bounds, layers=specs, topology=topology, loss_fn=loss,
                                     partition_method="explicit", dynamic_shape=True)
    source.model = None
    heads = [f for f in pipe.forward_funcs if isinstance(f, HeadPipe)]
    if heads:
        loss.head = heads[0]
        if tied:
            heads[0].tied_embedding = (pipe.tied_modules[TIED_KEY].embed_tokens,)
    return pipe, loss


@functools.cache
def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class PerceptioPipelineModule(PipelineModule):
        """DeepSpeed's PipelineModule with stage bounds computed by ``stage_bounds`` (first/last stage rules)."""

        def __init__(self, bounds: list[int], **kwargs):
            self._perceptio_bounds = bounds  # read by _partition_layers during super().__init__
            super().__init__(**kwargs)

        def _partition_layers(self, method: str = "explicit") -> None:
            self.parts = list(self._perceptio_bounds)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    return PerceptioPipelineModule


# The batch fields the pipe engine hands the first stage (inputs) and the last stage (labels), in tuple order: the
# one place that order is written (pipeline_batches packs by it, the stages unpack by it).
FIRST_STAGE_INPUTS = ("input_ids", "attention_mask", "pixel_values")
LAST_STAGE_LABELS = ("labels", "input_ids", "sample_index", "sam_images", "seg_masks", "teacher_depth",
                     "has_teacher_depth")


def pipeline_batches(batches: Iterator, on_batch=None) -> Iterator[tuple[tuple, tuple]]:
    """Batches as DeepSpeed's pipe engine reads them: (first-stage inputs, last-stage labels)."""
    for batch in batches:
        if on_batch is not None:
            on_batch(batch)
        yield (tuple(getattr(batch, name) for name in FIRST_STAGE_INPUTS),
               tuple(getattr(batch, name) for name in LAST_STAGE_LABELS))


# ------------------------------------------------------------------------------------------ checkpoints


def _layer_module_keys(kind: str, tied: bool) -> dict[str, str]:
    if kind in ("embed", "tied_embed"):
        return TokenEmbeddingPipe.MODEL_KEYS
    if kind == "vision":
        return VisionMergePipe.MODEL_KEYS
    if kind.startswith("decoder:"):
        return {"layer.": f"backbone.model.language_model.layers.{int(kind.split(':')[1])}."}
    keys = {"norm.": "backbone.model.language_model.norm.", "seg_head.": "seg_head.", "depth_vqvae.": "depth_vqvae."}
    if not tied:
        keys["lm_head."] = "backbone.lm_head."
    return keys


def pipeline_state_dict(checkpoint, num_layers: int) -> dict[str, torch.Tensor]:
    """Full weights of a pipeline checkpoint (its layer_NN-model_states.pt files), keyed as in PerceptioModel.

    The layer files hold the module weights the stages computed with (fp32 runs: exactly the master weights).
    With tied embeddings the head is one index further (after the last stage's tied embedding, which DeepSpeed
    does not save twice).
    """
    checkpoint = Path(checkpoint)
    tied = any(checkpoint.glob(f"layer_{FIRST_STAGE_LAYERS + num_layers + 1:02d}-*model_states.pt"))
    state: dict[str, torch.Tensor] = {}
    for index, kind in enumerate(layer_kinds(num_layers, tied)):
        files = sorted(checkpoint.glob(f"layer_{index:02d}-*model_states.pt"))
        if not files:
            if kind == "tied_embed":
                continue  # the first stage saved the tied embedding
            raise FileNotFoundError(f"{checkpoint} has no layer_{index:02d} file ({kind}): not a complete pipeline "
                                    "checkpoint of this model")
        layer_state = torch.load(files[0], map_location="cpu", weights_only=True)
        keys = _layer_module_keys(kind, tied)
        for key, value in layer_state.items():
            prefix = next((p for p in keys if key.startswith(p)), None)
            if prefix is None:
                raise KeyError(f"{files[0].name}: unexpected weight {key} for a {kind} layer")
            state[keys[prefix] + key[len(prefix):]] = value
    return state


def is_pipeline_checkpoint(checkpoint) -> bool:
    return any(Path(checkpoint).glob("layer_*-model_states.pt"))
