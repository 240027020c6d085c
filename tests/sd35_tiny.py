"""Tiny Stable Diffusion 3.5 pipelines built from configs (no download): SD3.5-medium's layout (qk RMSNorm; the
extra image self-attention in its first blocks, here blocks 0..3 of 8) and SD3.5-large's (qk RMSNorm, no extra
attention), every width tiny, the text encoders of tests/sd3_tiny.py (SD3.5 uses SD3's three)."""

from __future__ import annotations

from tests.sd3_tiny import PROMPTS, tiny_sd3_pipeline

__all__ = ["DUAL", "PROMPTS", "tiny_sd35_pipeline"]

DUAL = (0, 1, 2, 3)  # blocks with the extra self-attention in the tiny medium (the real one: 0..12 of 24)


def tiny_sd35_pipeline(variant: str = "medium", seed: int = 0):
    """StableDiffusion3Pipeline with an SD3.5 transformer: 8 blocks of width 16, 16x16 images."""
    return tiny_sd3_pipeline(seed=seed, dual_attention_layers=DUAL if variant == "medium" else ())
