"""Deployment above the api: serving and packaging a pruned model (triton/: NVIDIA Triton Inference Server)."""
