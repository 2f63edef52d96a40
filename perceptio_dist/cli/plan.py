"""perceptio-plan: per-GPU memory and step time of a recipe for ZeRO-2, ZeRO-3 and pipeline layouts."""

from __future__ import annotations

from ..plan import Cluster, format_table, model_sizes, plan
from ..plan import __doc__ as plan_module_doc
from ..config import ConfigError
from . import load_or_exit, recipe_parser

plan_doc = plan_module_doc.split("\n\n")[0]


def main(argv: list[str] | None = None) -> None:
    parser = recipe_parser("perceptio-plan", plan_doc, default="perceptio_8b")
    defaults = Cluster()
    parser.add_argument("--nodes", type=int, default=defaults.nodes)
    parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node)
    parser.add_argument("--gpu-memory-gb", type=float, default=defaults.gpu_memory_gb)
    parser.add_argument("--inter-node-gbps", type=float, default=defaults.inter_node_gbps,
                        help="GB/s per GPU between nodes")
    parser.add_argument("--intra-node-gbps", type=float, default=defaults.intra_node_gbps,
                        help="GB/s per GPU inside a node")
    parser.add_argument("--peak-tflops", type=float, default=defaults.peak_tflops)
    parser.add_argument("--mfu", type=float, default=defaults.mfu)
    parser.add_argument("--reserve-gb", type=float, default=defaults.reserve_gb)
    parser.add_argument("--global-batch", type=int, default=None,
                        help="samples per optimizer step (default: the recipe's, else 2 per GPU)")
    parser.add_argument("--pp-stages", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument("--tp-sizes", type=int, nargs="*", default=[2, 4, 8],
                        help="tensor-parallel sizes to plan (x ZeRO-2, inside a node)")
    parser.add_argument("--mean-sample-tokens", type=int, default=None,
                        help="mean tokens per sample of the data (default: data.max_seq_len); FLOPs count these "
                             "real tokens, and with data.packing a row holds row // mean samples")
    args = parser.parse_args(argv)
    for name in ("nodes", "gpus_per_node", "gpu_memory_gb", "peak_tflops", "mfu"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    cfg = load_or_exit(args.recipe, args.overrides)
    cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.inter_node_gbps, args.intra_node_gbps,
                      args.peak_tflops, args.mfu, args.reserve_gb)
    global_batch = args.global_batch or cfg.train.global_batch_size or 2 * cluster.gpus
    try:
        sizes = model_sizes(cfg, args.mean_sample_tokens)
    except ConfigError as exc:
        parser.error(str(exc))
    par = cfg.parallel
    stages = sorted(set(args.pp_stages) | ({par.pp_stages} if par.mode == "pipeline" else set()))
    tp_sizes = sorted(set(args.tp_sizes) | ({par.tp_size} if par.tp_size > 1 else set()))
    print(format_table(plan(sizes, cluster, global_batch, stages, par.pp_partition, par.pp_layers_per_stage,
                            tp_sizes), cluster, sizes))
    mean = args.mean_sample_tokens or cfg.data.max_seq_len
    unit = (f"activations per packed row of {cfg.data.max_tokens_per_row or cfg.data.max_seq_len} tokens "
            f"({sizes.samples_per_row} samples); largest micro-batch in samples" if cfg.data.packing
            else f"activations per sample padded to {cfg.data.max_seq_len} tokens")
    print(f"\nglobal batch {global_batch} samples of {mean} real tokens on average (FLOPs count these); {unit}; "
          f"activation checkpointing {'on' if cfg.train.activation_checkpointing else 'off'}")


if __name__ == "__main__":
    main()
