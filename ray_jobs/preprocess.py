"""``python -m ray_jobs.preprocess``: the same command as ``perceptio-preprocess`` (perceptio_dist/cli/preprocess.py),
kept for scripts that call it by this name."""

from perceptio_dist.cli.preprocess import main

if __name__ == "__main__":
    main()
