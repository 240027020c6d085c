"""Skip-layer guidance: SLG (Stability AI, SD3.5's reference code) and STG (Hyung et al., CVPR 2025).

A perturbed branch is the conditional prediction of the model with chosen transformer blocks skipped:

    out = pos + (w - 1)(pos - neg) + s (pos - skipped)        on the steps of the window
        = neg + w (pos - neg) + s (pos - skipped)             (sd3_impls.SkipLayerCFGDenoiser)
    out = pos + (w - 1)(pos - neg)                            elsewhere (the skipped branch is not evaluated)

`skip` says what is skipped in blocks [l_min, l_max):
- "block" (default): the whole block is the identity, both streams of a joint block (SD3.5's
  `mmditx.py`: `if i in skip_layers: continue`; STG-R, the residual skip Res'(z_l) = z_l, the mode of
  STG's released pipelines). `erg.attention.SkipBlock`: the block runs in the same batched forward and
  its input is put back for the skipped rows, so the skip costs no extra forward.
- "attention": the attention map is the identity, out = V (STG-A; diffusers' skip_attention_scores),
  i.e. PAG's perturbation (`erg.attention.Identity`: image queries; text queries of a joint attention
  keep plain attention).

The window is SD3.5's, in steps: start N < i < stop N for step i of N (strict on both sides, so
start = 0.01, stop = 0.2 at N = 50 is steps 1..9; `erg.guidance.base.StepWindow`). SD3.5-medium's
setting (sd3_infer.py CONFIGS): layers 7, 8, 9 ([7, 10)), s = 2.5, start 0.01, stop 0.2, CFG 4.0. STG
guides every step (start -1, stop 1). NFE: 3 on the window's steps with CFG, 2 elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from erg.attention import Identity, SkipBlock
from erg.guidance.base import Guidance, StepWindow
from erg.guidance.config import GuidanceConfigError, finite, layer_range
from erg.guidance.perturbed import perturbed_guidance

__all__ = ["SKIP_MODES", "SLGConfig", "build_slg"]

SKIP_MODES = {"block": SkipBlock, "attention": Identity}


@dataclass
class SLGConfig:
    scale: float = 3.0  # w of the CFG term (1: SLG alone)
    slg_scale: float = 2.5  # s (SD3.5-medium's skip_layer_config scale)
    layers: Any = (12, 15)  # [l_min, l_max): the skipped blocks
    skip: str = "block"  # block (SLG, STG-R) | attention (STG-A)
    start: float = 0.01  # the window: start N < step < stop N (SD3.5's; -1 and 1: every step, STG)
    stop: float = 0.2

    def __post_init__(self) -> None:
        finite(self.scale, "guidance.scale")
        finite(self.slg_scale, "guidance.slg_scale")
        self.layers = layer_range(list(self.layers), "guidance.layers")
        if self.skip not in SKIP_MODES:
            raise GuidanceConfigError(f"guidance.skip must be one of {sorted(SKIP_MODES)}, got {self.skip!r}")
        for key in ("start", "stop"):
            if not (isinstance(getattr(self, key), int | float) and math.isfinite(getattr(self, key))):
                raise GuidanceConfigError(f"guidance.{key} must be a number (a fraction of the steps)")
        if not (self.start < self.stop <= 1.0):
            raise GuidanceConfigError(
                f"guidance.start < guidance.stop <= 1 needed (skip-layer guidance acts at steps start N < i < stop N), "
                f"got start={self.start}, stop={self.stop}"
            )


def build_slg(cfg: SLGConfig, name: str = "slg") -> Guidance:
    window = StepWindow(float(cfg.start), float(cfg.stop))
    rectifier = SKIP_MODES[cfg.skip]()
    return perturbed_guidance(name, cfg.scale, cfg.slg_scale, rectifier, cfg.layers, "guidance.layers", when=window)
