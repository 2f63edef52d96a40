"""Ray job entry points (submit with `ray job submit --working-dir . -- python -m ray_jobs.<name>`)."""
