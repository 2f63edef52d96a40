"""perceptio-sweep: train a list of configurations on a short budget and write one table (perceptio_dist/experiments/toy/sweep.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError
from . import CONFIG_ERROR_EXIT
from ..experiments.toy.sweep import __doc__ as sweep_doc
from ..experiments.toy.sweep import load_sweep, run_sweep


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="perceptio-sweep", description=sweep_doc.split("\n\n")[0],
                                     epilog="The sweep file's format: perceptio_dist/experiments/toy/sweep.py.")
    parser.add_argument("--sweep", required=True, help="the sweep file (yaml), e.g. tools/sweeps/toy_spatial.yaml")
    parser.add_argument("--out", required=True, help="folder of the runs and of sweep.md / sweep.json")
    parser.add_argument("--only", nargs="*", default=None, help="run only the configurations of these names")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
    except ConfigError as exc:
        print(f"perceptio-sweep: {exc}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
    if args.only:
        missing = sorted(set(args.only) - {e.name for e in sweep.configurations})
        if missing:
            sys.exit(f"perceptio-sweep: --only names no configuration {missing}; they are "
                     f"{[e.name for e in sweep.configurations]}")
        sweep.configurations = [e for e in sweep.configurations if e.name in args.only]
    try:
        run_sweep(sweep, Path(args.out))
    except RuntimeError as exc:
        sys.exit(f"perceptio-sweep: {exc}")
    print(f"[sweep] table: {Path(args.out) / 'sweep.md'}")


if __name__ == "__main__":
    main()
