"""Test helper, run under torchrun: the real Trainer with per-rank config overrides.

    torchrun --nproc_per_node 2 tests/helpers/train_with_rank_overrides.py --recipe tiny_cpu \
        --rank 1 "data.task_weights={vqa: 1.0}" --dump-partition  section.key=value ...

Used to give ranks different batch layouts (the ZeRO-3 rule test), to dump what each rank
holds of every parameter (the partitioning test) and the full gradients of the first optimizer step
(the normalisation tests: --dump-grads, names as in the ZeRO module, also for pipeline stages).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from perceptio_dist.config.training import load_config
from perceptio_dist.parallel.zero import partition_report
from perceptio_dist.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="tiny_cpu")
    parser.add_argument("--rank", nargs=2, action="append", default=[], metavar=("RANK", "OVERRIDE"),
                        help="an override applied on one rank only")
    parser.add_argument("--dump-partition", action="store_true")
    parser.add_argument("--nan-at", default="", help="comma-separated forward calls (0-based) whose loss rank 1 "
                        "turns into NaN, to test non-finite handling")
    parser.add_argument("--dump-logits", action="store_true", help="after training, write rank 0's logits on a "
                        "fixed micro-batch to logits.pt")
    parser.add_argument("--dump-grads", action="store_true", help="write this rank's full gradients of the first "
                        "optimizer step, before the update, to grads_rank<r>.pt")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    rank = int(os.environ["RANK"])
    overrides = list(args.overrides) + [o for r, o in args.rank if int(r) == rank]
    cfg = load_config(args.recipe, overrides)
    trainer = Trainer(cfg)
    if args.nan_at and rank == 1:
        poison = {int(x) for x in args.nan_at.split(",")}
        module = trainer.engine.module
        original, calls = module.forward, [0]

        def forward(*a, **kw):
            loss, terms, counts = original(*a, **kw)
            calls[0] += 1
            return (loss * float("nan") if calls[0] - 1 in poison else loss), terms, counts

        module.forward = forward
    out = Path(cfg.logging.output_dir)
    if args.dump_grads:
        dump_first_gradients(trainer, cfg, out / f"grads_rank{rank}.pt")
    if args.dump_partition:
        report = [vars(p) for p in partition_report(trainer.engine.module)]
        info = {
            "parameters": report,
            "embedding_rows": trainer.engine.module.model.backbone.get_input_embeddings().num_embeddings,
            "lm_head_rows": trainer.engine.module.model.lm_head.weight.ds_shape[0],
            "tokenizer_size": len(trainer.tokenizer),
        }
        (out / f"partition_rank{rank}.json").write_text(json.dumps(info))
    summary = trainer.train()
    (out / f"losses_rank{rank}.json").write_text(json.dumps(summary["losses"]))
    if args.dump_logits:
        dump_logits(trainer, out / "logits.pt")


def dump_first_gradients(trainer, cfg, path) -> None:
    """Wrap the engine's update so that the first one first writes every trainable parameter's full gradient."""
    import torch
    from deepspeed.utils import safe_get_full_grad

    from perceptio_dist.parallel.pipeline import _layer_module_keys, layer_kinds

    engine, pipeline = trainer.engine, cfg.parallel.mode == "pipeline"
    kinds = layer_kinds(cfg.model.backbone.text.num_layers, cfg.model.backbone.tie_word_embeddings)

    def model_name(name: str) -> str:
        if not pipeline:
            return name
        index, rest = name.split(".", 1)
        keys = _layer_module_keys(kinds[int(index)], cfg.model.backbone.tie_word_embeddings)
        prefix = next(p for p in keys if rest.startswith(p))
        return "model." + keys[prefix] + rest[len(prefix):]

    def dump() -> None:
        grads = {}
        for name, param in engine.module.named_parameters():  # every rank in the same order (ZeRO-3 gathers)
            if param.requires_grad:
                grad = safe_get_full_grad(param)
                if grad is not None:
                    grads[model_name(name)] = grad.detach().double().cpu().clone()
        torch.save(grads, path)

    done = []
    if pipeline:  # the pipe engine applies the update through _take_model_step, after reducing the gradients
        original = engine._take_model_step

        def take_model_step(*a, **kw):
            if not done:
                dump()
                done.append(True)
            return original(*a, **kw)

        engine._take_model_step = take_model_step
        return
    original_step = engine.step

    def step(*a, **kw):
        if not done and engine.is_gradient_accumulation_boundary():
            dump()
            done.append(True)
        return original_step(*a, **kw)

    engine.step = step


def dump_logits(trainer, path) -> None:
    """Logits of the trained model (ZeRO-partitioned, every rank takes part) on rank 0's first micro-batch."""
    import deepspeed
    import torch

    trainer.loader.rank = 0  # every rank builds the same batch
    batch = trainer.loader.micro_batch(0).batch
    model = trainer.engine.module.model.eval()
    with torch.no_grad():
        out = model(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.sam_images)
        with deepspeed.zero.GatheredParameters([model.lm_head.weight]):
            logits = out.hidden_states @ model.lm_head.weight.t()
    if torch.distributed.get_rank() == 0:
        torch.save({"logits": logits, "input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                    "pixel_values": batch.pixel_values, "sam_images": batch.sam_images,
                    "mask_logits": out.mask_logits}, path)


if __name__ == "__main__":
    main()
