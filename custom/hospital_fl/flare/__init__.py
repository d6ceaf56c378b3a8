"""Thin NVIDIA FLARE adapters: the only subpackage that imports nvflare."""
