"""AutoGuidance (Karras et al., NeurIPS 2024): guide with a weaker model given the same condition.

    out = pos + (w - 1)(pos - weak),   weak = D_weak(x, c)

The weak model (e.g. an earlier checkpoint, ~1/16 of training in the ERG paper) is loaded by the
caller (sample.py: `guidance.checkpoint`) and handed to the sampler as the "weak" model. The
combination is written on velocities; it equals Karras' denoised-space form at a fixed t because
the velocity -> x0 map is affine with the same coefficients for both predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

from erg.guidance.base import Branch, Guidance
from erg.guidance.cfg import linear_pair
from erg.guidance.config import GuidanceConfigError, finite

__all__ = ["AutoGuidanceConfig", "build_autoguidance"]


@dataclass
class AutoGuidanceConfig:
    scale: float = 3.0  # w
    checkpoint: str | None = None  # the weak model's checkpoint (read by sample.py)

    def __post_init__(self) -> None:
        finite(self.scale, "guidance.scale")
        if not self.checkpoint:
            raise GuidanceConfigError(
                "guidance.checkpoint must name the weak model's checkpoint for AutoGuidance, e.g. "
                "guidance.checkpoint=runs/quickstart/checkpoints/step_0000250.ckpt"
            )


def build_autoguidance(cfg: AutoGuidanceConfig, name: str = "autoguidance") -> Guidance:
    return linear_pair(name, cfg.scale, Branch("weak", model="weak"))
