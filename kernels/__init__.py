"""Fused Triton kernels with plain-torch references."""
