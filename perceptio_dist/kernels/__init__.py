"""Triton kernels (GPU; on CPU they run under TRITON_INTERPRET=1 in the tests)."""
