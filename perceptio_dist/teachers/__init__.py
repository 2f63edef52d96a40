"""Teachers that label data during preprocessing (Depth Anything V2 for depth)."""
