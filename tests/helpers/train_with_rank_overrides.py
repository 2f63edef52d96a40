"""Test helper, run under torchrun: the real Trainer with per-rank config overrides.

    torchrun --nproc_per_node 2 tests/helpers/train_with_rank_overrides.py --recipe tiny_cpu \
        --rank 1 "data.task_weights={vqa: 1.0}" --dump-partition  section.key=value ...

Used to give ranks different batch layouts (the ZeRO-3 rule test) and to dump what each rank
holds of every parameter (the partitioning test).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from perceptio_dist.config import load_config
from perceptio_dist.parallel.zero import partition_report
from perceptio_dist.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="tiny_cpu")
    parser.add_argument("--rank", nargs=2, action="append", default=[], metavar=("RANK", "OVERRIDE"),
                        help="an override applied on one rank only")
    parser.add_argument("--dump-partition", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    overrides = list(args.overrides) + [o for r, o in args.rank if int(r) == rank]
    cfg = load_config(args.recipe, overrides)
    trainer = Trainer(cfg)
    out = Path(cfg.logging.output_dir)
    if args.dump_partition:
        report = [vars(p) for p in partition_report(trainer.engine.module)]
        info = {
            "parameters": report,
            "embedding_rows": trainer.model.backbone.get_input_embeddings().num_embeddings,
            "lm_head_rows": trainer.model.lm_head.weight.ds_shape[0],
            "tokenizer_size": len(trainer.tokenizer),
        }
        (out / f"partition_rank{rank}.json").write_text(json.dumps(info))
    summary = trainer.train()
    (out / f"losses_rank{rank}.json").write_text(json.dumps(summary["losses"]))


if __name__ == "__main__":
    main()
