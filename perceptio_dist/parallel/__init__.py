"""DeepSpeed setup: process groups, DeepSpeed config, ZeRO-3 helpers."""
