"""Before launch: what fits where. Per-GPU memory and step time of a recipe on a cluster, by layout.

    perceptio-plan --recipe perceptio_8b --nodes 2 --gpus-per-node 8 --gpu-memory-gb 80

Layouts: ZeRO-2, ZeRO-3 and pipeline stages x ZeRO-1 (PP x ZeRO-1; the stages hold the first stage's
vision tower, projector and embeddings, the decoder layers balanced by trainable parameters as the
trainer splits them (parallel/pipeline.py), and on the last stage the final norm, LM head, SAM2 and the
VQ-VAE).

Model states, bf16 mixed precision with AdamW, in bytes per parameter (P = all parameters, P_t the
trainable ones, N the data-parallel ranks holding a partition), written to agree with DeepSpeed's own
estimators (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`), which
count every parameter as trainable; frozen parameters (SAM2's image encoder, the VQ-VAE) here keep only
their bf16 copy:

* ZeRO-2:  params 2 P (replicated); grads (2 bf16 + 4 fp32) P_t / N; optimizer 12 P_t / N (fp32 master, m, v)
* ZeRO-3:  params 2 P / N; grads 4 P_t / N; optimizer 12 P_t / N; plus 4 x the largest layer (its bf16
           parameters and gradients gathered in full)
* PP x ZeRO-1 (per stage s with P_s, P_s,t): params 2 P_s; grads 2 P_s,t (bf16, full) + 4 P_s,t / dp;
           optimizer 12 P_s,t / dp

Activations per sample of T tokens and V vision tokens (bf16, flash attention so no T^2 term): a
decoder layer keeps 6d + 2kv + 4I values per token for its backward (norm inputs, q/k/v, attention
output, SwiGLU gate, up, activation and product); with activation checkpointing only its d-wide input
is kept and one layer's full set exists during its recompute. The vision tower is counted the same way
(8 d_v + 3 I_v per patch token), the fused loss adds one chunk of fp32 logits and their gradient, and
SAM2's frozen encoder leaves only its 256 x 64 x 64 image embedding. A pipeline stage s of S holds
S - s micro-batches in flight under 1F1B. These are estimates to rank layouts and choose a
micro-batch, not promises: CUDA context, allocator fragmentation and communication buckets take what
`--reserve-gb` leaves aside.

With data.packing the unit of activation memory is a packed row of data.max_tokens_per_row tokens holding
``row // mean sample tokens`` samples (``--mean-sample-tokens``, default data.max_seq_len: one sample per row), and
the largest micro-batch is reported in samples. FLOPs count real tokens only: a sample of the mean length
(attention per sample, as flash-attention's varlen kernel computes it), never padding.

Step time = model FLOPs of the global batch (the PaLM-style count of train/flops.py) / (GPUs x peak x MFU);
the communication volume per GPU and its time at the given bandwidths are shown beside it (overlapped
with compute when the time is smaller).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .config import ConfigError

GB = 1024 ** 3


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    inter_node_gbps: float = 50.0   # GB/s per GPU across nodes (400 Gb/s InfiniBand per GPU)
    intra_node_gbps: float = 300.0  # GB/s per GPU inside a node (NVLink, achieved all-gather bandwidth)
    peak_tflops: float = 989.0      # dense bf16 per GPU (H100 SXM)
    mfu: float = 0.40
    reserve_gb: float = 6.0         # CUDA context, allocator slack, communication buckets

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def bandwidth(self) -> float:
        return (self.inter_node_gbps if self.nodes > 1 else self.intra_node_gbps) * 1e9


@dataclass(frozen=True)
class Block:
    """A run of modules placed together in a pipeline: its parameters and per-sample activation bytes."""

    name: str
    params: int
    trainable: int
    activation_bytes: float  # per sample, kept between forward and backward
    recompute_bytes: float = 0.0  # per sample, the extra peak while this block is recomputed


@dataclass(frozen=True)
class ModelSizes:
    total: int
    trainable: int
    largest_layer: int
    blocks: tuple[Block, ...]
    fixed_activation_bytes: float  # per sample, independent of placement (loss chunk, SAM2 embedding)
    flops_per_sample: float  # of a sample of the mean length (real tokens)
    samples_per_row: int = 1  # packed rows: samples of the mean length per activation unit (1: padded samples)
    hidden: int = 0  # LLM width, for tensor-parallel all-reduce volume
    unit_tokens: int = 0  # tokens per activation unit
    heads: tuple[int, int, int] = (0, 0, 0)  # attention heads, KV heads, MLP width: what tensor parallelism divides


@dataclass
class LayoutPlan:
    layout: str
    params_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_per_sample_gb: float
    max_micro_batch: int
    step_seconds: float | None
    comm_gb_per_step: float
    comm_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def model_states_gb(self) -> float:
        return self.params_gb + self.grads_gb + self.optimizer_gb


def _count(module) -> tuple[int, int]:
    total = trainable = 0
    for p in module.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def model_sizes(cfg, mean_sample_tokens: int | None = None) -> ModelSizes:
    """Sizes of a recipe's model from a meta-device build (no weights, no memory). ``mean_sample_tokens``: the data's
    mean sample length (default data.max_seq_len), for FLOPs and for how many samples a packed row holds."""
    from .model.perceptio import build_perceptio_meta
    from .train.flops import flops_model_for

    model_cfg = cfg.model
    if model_cfg.backbone.text.vocab_size is None:  # the vocabulary comes from the tokenizer (tiny recipes)
        from .model.tokenizer import load_tokenizer

        text = dataclasses.replace(model_cfg.backbone.text, vocab_size=len(load_tokenizer(model_cfg.backbone)))
        model_cfg = dataclasses.replace(model_cfg, backbone=dataclasses.replace(model_cfg.backbone, text=text))
    model = build_perceptio_meta(model_cfg)
    bb = model.backbone
    inner = bb.model
    text = bb.config.text_config
    vision = bb.config.vision_config
    lm = inner.language_model
    checkpointing = cfg.train.activation_checkpointing
    mean_tokens = mean_sample_tokens or cfg.data.max_seq_len
    if not 0 < mean_tokens <= cfg.data.max_seq_len:
        raise ConfigError(f"--mean-sample-tokens must be in (0, data.max_seq_len={cfg.data.max_seq_len}], got "
                          f"{mean_tokens}.")
    # Activation memory per unit: a padded sample of up to max_seq_len tokens, or a packed row of its budget.
    seq = (cfg.data.max_tokens_per_row or cfg.data.max_seq_len) if cfg.data.packing else cfg.data.max_seq_len
    samples_per_row = max(1, seq // mean_tokens) if cfg.data.packing else 1
    tiles = cfg.model.backbone.max_tiles + (1 if cfg.model.backbone.max_tiles > 1 else 0)
    patches = (vision.image_size[0] // vision.patch_size[0]) ** 2 + 1
    # Per unit: a padded sample has up to max_tiles (+ thumbnail); a packed row's samples have theirs, but never more
    # tiles than the row has tokens for (each tile is image_tokens_per_tile of them).
    from .model.backbone import image_tokens_per_tile

    tiles_per_unit = tiles if not cfg.data.packing else min(tiles * samples_per_row,
                                                             seq // image_tokens_per_tile(cfg.model.backbone))
    vision_tokens = tiles_per_unit * patches

    d, inter = text.hidden_size, text.intermediate_size
    kv = text.num_key_value_heads * (d // text.num_attention_heads)
    layer_full = 2.0 * seq * (6 * d + 2 * kv + 4 * inter)
    layer_kept = 2.0 * seq * d if checkpointing else layer_full
    dv, iv = vision.hidden_size, vision.intermediate_size
    vit_full = 2.0 * vision_tokens * (8 * dv + 3 * iv)
    vit_kept = 2.0 * vision_tokens * dv if checkpointing else vit_full

    # The modules on the meta model are used only for their parameter counts (whatever the names).
    vision_p = _count(inner.vision_tower)
    projector_p = _count(inner.multi_modal_projector)
    embed_p = _count(lm.embed_tokens)
    blocks = [Block("vision_tower", *vision_p, vit_kept * vision.num_hidden_layers,
                    vit_full if checkpointing else 0.0),
              Block("projector+embeddings", projector_p[0] + embed_p[0], projector_p[1] + embed_p[1],
                    2.0 * seq * d)]
    largest = embed_p[0]  # DeepSpeed's "largest layer": the biggest module gathered at once
    for i, layer in enumerate(lm.layers):
        p = _count(layer)
        largest = max(largest, p[0])
        blocks.append(Block(f"decoder.{i}", *p, layer_kept, layer_full if checkpointing else 0.0))
    head_total, head_trainable = _count(lm.norm)
    if bb.lm_head.weight is not lm.embed_tokens.weight:
        n = int(bb.lm_head.weight.numel())
        head_total += n
        head_trainable += n if bb.lm_head.weight.requires_grad else 0
        largest = max(largest, n)
    seg_p, vq_p = _count(model.seg_head), _count(model.depth_vqvae)
    vq_p = (vq_p[0] + model.depth_vqvae.quantizer.codebook.numel(), vq_p[1])  # the EMA codebook is a buffer
    blocks.append(Block("norm+lm_head+sam2+vqvae", head_total + seg_p[0] + vq_p[0],
                        head_trainable + seg_p[1] + vq_p[1], 2.0 * seq * d))
    vocab = bb.lm_head.weight.shape[0]
    loss_chunk = 2 * 4.0 * min(cfg.objective.chunk_size, seq) * vocab  # fp32 logits and their gradient
    sam2_embedding = 2.0 * 256 * 64 * 64 * 3  # bf16 image embedding and two high-resolution feature maps
    total = sum(b.params for b in blocks)
    trainable = sum(b.trainable for b in blocks)
    # The LM head runs on the rows that predict a label: at most the sample's tokens outside its image tiles.
    answer_rows = max(1, mean_tokens - tiles * image_tokens_per_tile(cfg.model.backbone))
    flops = flops_model_for(model).step_flops([mean_tokens], tiles, target_rows=answer_rows)
    # Per unit (a padded sample or a packed row): the SAM2 embedding is per sample, the loss chunk per unit.
    fixed = loss_chunk + sam2_embedding * samples_per_row
    return ModelSizes(total, trainable, largest, tuple(blocks), fixed, flops, samples_per_row, d, seq,
                      (text.num_attention_heads, text.num_key_value_heads, inter))


def split_stages(blocks: tuple[Block, ...], stages: int, partition: str = "parameters",
                 layers_per_stage: list[int] | None = None) -> list[list[Block]]:
    """The trainer's split (parallel/pipeline.split_layers): the vision tower, projector and embeddings on the
    first stage, the head (norm, LM head, SAM2, VQ-VAE) on the last, decoder layers balanced by trainable
    parameters (or as given), at least one on every middle stage."""
    from .parallel.pipeline import split_layers

    layers = len(blocks) - 3
    if not 2 <= stages <= layers + 1:
        raise ValueError(f"{stages} pipeline stages for {layers} decoder layers")
    bounds = split_layers([int(b.trainable) for b in blocks], layers, stages, partition, layers_per_stage)
    return [list(blocks[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _largest_micro_batch(free_bytes: float, per_sample: float) -> int:
    if free_bytes <= 0 or per_sample <= 0:
        return 0
    return int(free_bytes // per_sample)


def plan(sizes: ModelSizes, cluster: Cluster, global_batch: int, pp_stages: list[int], partition: str = "parameters",
         layers_per_stage: list[int] | None = None, tp_sizes: list[int] = ()) -> list[LayoutPlan]:
    """Plans for ZeRO-2, ZeRO-3, each pipeline depth and each tensor-parallel size (x ZeRO-2); ``layers_per_stage``
    (the recipe's) applies to the depth of its length, other depths are split by ``partition``."""
    n = cluster.gpus
    usable = cluster.gpu_memory_gb * GB - cluster.reserve_gb * GB
    all_activations = sum(b.activation_bytes for b in sizes.blocks) + sizes.fixed_activation_bytes
    recompute_peak = max(b.recompute_bytes for b in sizes.blocks)
    compute = sizes.flops_per_sample * global_batch / (n * cluster.peak_tflops * 1e12 * cluster.mfu)
    ring = (n - 1) / n if n > 1 else 0.0
    plans = []

    def finish(name, params, grads, optim, per_sample, extra, comm_bytes, notes):
        free = usable - params - grads - optim - extra
        mb = _largest_micro_batch(free, per_sample) * sizes.samples_per_row  # in samples
        comm_s = comm_bytes / cluster.bandwidth
        plans.append(LayoutPlan(name, params / GB, grads / GB, optim / GB, per_sample / GB, mb,
                                max(compute, comm_s) if mb else None, comm_bytes / GB, comm_s, notes))

    accum = max(1, math.ceil(global_batch / n))
    # ZeRO-2: one all-gather of bf16 parameters per step, a reduce-scatter of bf16 gradients per micro-step.
    finish("zero2", 2.0 * sizes.total, 6.0 * sizes.trainable / n, 12.0 * sizes.trainable / n,
           all_activations, recompute_peak, ring * (2.0 * sizes.total + accum * 2.0 * sizes.trainable), [])
    # ZeRO-3: parameters gathered in forward and again in backward, gradients reduce-scattered, per micro-step.
    finish("zero3", 2.0 * sizes.total / n + 2.0 * sizes.largest_layer,
           4.0 * sizes.trainable / n + 2.0 * sizes.largest_layer, 12.0 * sizes.trainable / n,
           all_activations, recompute_peak, ring * accum * (4.0 * sizes.total + 2.0 * sizes.trainable), [])
    # Tensor parallelism x ZeRO-2 (parallel.tp_size; DeepSpeed AutoTP takes ZeRO <= 2): the decoder layers' weights
    # (their projections are nearly all of them) split over tp ranks of a node, the rest replicated; gradients and
    # optimizer states partitioned over the n / tp data-parallel replicas. Activations: a decoder layer's inner
    # values (q, k, v, attention, MLP) are split, its d-wide inputs kept whole (about 2 d of its 6 d + 2 kv + 4 I per
    # token), so with checkpointing (only the input kept) they do not shrink. Each layer all-reduces its activations
    # twice forward and twice backward inside the group, on the intra-node bandwidth.
    for tp in tp_sizes:
        heads, kv_heads, inter = sizes.heads
        if tp < 2 or n % tp or tp > cluster.gpus_per_node or heads % tp or kv_heads % tp or inter % tp:
            continue
        dp = n // tp
        decoder = [b for b in sizes.blocks if b.name.startswith("decoder.")]
        dec_p, dec_t = sum(b.params for b in decoder), sum(b.trainable for b in decoder)
        params = sizes.total - dec_p + dec_p / tp
        trainable = sizes.trainable - dec_t + dec_t / tp
        d = sizes.hidden
        kv = kv_heads * (d // heads)
        shrink = 1.0 - (1.0 - 2.0 * d / (6 * d + 2 * kv + 4 * inter)) * (1 - 1 / tp)  # a layer's full set, split
        activations = all_activations - sum(b.activation_bytes * (1 - shrink) for b in decoder if not b.recompute_bytes)
        recompute = max([b.recompute_bytes * shrink for b in decoder]
                        + [b.recompute_bytes for b in sizes.blocks if not b.name.startswith("decoder.")])
        dp_ring = (dp - 1) / dp if dp > 1 else 0.0
        tp_ring = (tp - 1) / tp
        accum_tp = max(1, math.ceil(global_batch / dp))
        allreduce = 4 * len(decoder) * 2.0 * sizes.unit_tokens * sizes.hidden * 2 * tp_ring * accum_tp
        comm = dp_ring * (2.0 * params + accum_tp * 2.0 * trainable) + allreduce
        compute_tp = sizes.flops_per_sample * global_batch / (n * cluster.peak_tflops * 1e12 * cluster.mfu)
        free = usable - 2.0 * params - 6.0 * trainable / dp - 12.0 * trainable / dp - recompute
        mb = _largest_micro_batch(free, activations) * sizes.samples_per_row
        comm_s = comm / (cluster.intra_node_gbps * 1e9 if cluster.nodes == 1 else cluster.bandwidth)
        plans.append(LayoutPlan(f"tp{tp}xzero2", 2.0 * params / GB, 6.0 * trainable / dp / GB,
                                12.0 * trainable / dp / GB, activations / GB, mb,
                                max(compute_tp, comm_s) if mb else None, comm / GB, comm_s,
                                [f"{dp} data-parallel replicas; decoder layers split {tp} ways inside a node"]))
    for stages in pp_stages:
        if n % stages or stages > len(sizes.blocks) - 3:
            continue
        dp = n // stages
        explicit = layers_per_stage if layers_per_stage and len(layers_per_stage) == stages else None
        try:
            split = split_stages(sizes.blocks, stages, partition, explicit)
        except ConfigError:
            continue  # too few layers to balance at this depth
        worst = None
        for s, stage in enumerate(split):
            p = sum(b.params for b in stage)
            t = sum(b.trainable for b in stage)
            in_flight = stages - s
            per_sample = in_flight * sum(b.activation_bytes for b in stage)
            if s == stages - 1:
                per_sample += sizes.fixed_activation_bytes
            recompute = max((b.recompute_bytes for b in stage), default=0.0)
            states = 2.0 * p + 2.0 * t + 4.0 * t / dp + 12.0 * t / dp
            candidate = (states + per_sample + recompute, s, p, t, per_sample, recompute)
            worst = candidate if worst is None or candidate[0] > worst[0] else worst
        _, s, p, t, per_sample, recompute = worst
        dp_ring = (dp - 1) / dp if dp > 1 else 0.0
        # Bubble: (S - 1) / (m + S - 1) of the time with m micro-batches per replica.
        micro = max(1, math.ceil(global_batch / dp))
        bubble = (stages - 1) / (micro + stages - 1)
        layers = [len([b for b in st if b.name.startswith("decoder.")]) for st in split]
        finish(f"pp{stages}xzero1", 2.0 * p, 2.0 * t + 4.0 * t / dp, 12.0 * t / dp, per_sample, recompute,
               dp_ring * 2.0 * 2.0 * t,
               [f"decoder layers per stage {layers}; heaviest stage {s}; bubble {bubble:.0%} at {micro} micro-batches"])
        plans[-1].step_seconds = (plans[-1].step_seconds / (1 - bubble)) if plans[-1].step_seconds else None
    return plans


def format_table(plans: list[LayoutPlan], cluster: Cluster, sizes: ModelSizes) -> str:
    head = (f"{cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs x {cluster.gpu_memory_gb:g} GB, "
            f"{sizes.total / 1e9:.2f}B parameters ({sizes.trainable / 1e9:.2f}B trainable), "
            f"MFU {cluster.mfu:.0%} of {cluster.peak_tflops:g} TFLOP/s")
    rows = ["| layout | params GB | grads GB | optimizer GB | model states GB | activations GB/sample "
            "| largest micro-batch | step s | comm GB/step | comm s | notes |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for p in plans:
        step = f"{p.step_seconds:.1f}" if p.step_seconds else "does not fit"
        rows.append(f"| {p.layout} | {p.params_gb:.1f} | {p.grads_gb:.1f} | {p.optimizer_gb:.1f} | "
                    f"{p.model_states_gb:.1f} | {p.activations_per_sample_gb:.2f} | {p.max_micro_batch} | {step} | "
                    f"{p.comm_gb_per_step:.0f} | {p.comm_seconds:.2f} | {'; '.join(p.notes)} |")
    return head + "\n\n" + "\n".join(rows)
