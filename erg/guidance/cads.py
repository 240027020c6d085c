"""Condition-annealed diffusion sampler (Sadat et al., ICLR 2024): annealed noise on the condition.

In diffusion time s (s = 1 noise, the CADS paper's convention) the schedule is

    gamma(s) = 1 if s <= tau1;  0 if s >= tau2;  (tau2 - s) / (tau2 - tau1) in between

so the condition is pure noise at the start of sampling and clean at the end. We convert tau1 and
tau2 to our time (t = 0 noise) with `erg.flow.from_diffusion_time` and evaluate gamma at t:

    y_hat = sqrt(gamma) y + noise_scale * sqrt(1 - gamma) n,       n ~ N(0, I)
    y_out = psi * rescale(y_hat) + (1 - psi) * y_hat,   rescale: y_hat standardised, then given y's
                                                        mean and std (when `rescale` is on)

Mean and std are taken per sample (over all non-batch dimensions); the reference code takes them
over the whole batch, which makes a sample depend on its batch mates: per sample keeps batched ==
one by one, and equals the reference for a batch of one. The noise n is drawn per sample and step
from the sample's seed (the sampler does it), so it does not depend on the batch either.

Which branch is noised is an option (implementations disagree): "pos" by default, as the ERG paper
(appendix D) noises the positive prediction's condition; "both" gives both branches the same noise n
(the sampler draws one per sample, step and tensor), which erg_cads.yaml uses on class-conditional
models, where ERG's negative is the class itself and noising pos alone would guide away from it.
Which tensors: the model's conditioning says (class embedding for DiT, text tokens for text models),
`keys` overrides it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from erg.flow import from_diffusion_time
from erg.guidance.base import ConditionNoise, Guidance
from erg.guidance.config import GuidanceConfigError, finite

__all__ = ["CADS", "CADSConfig", "with_cads"]


@dataclass(frozen=True)
class CADS(ConditionNoise):
    tau1: float = 0.6
    tau2: float = 0.9
    noise_scale: float = 0.25  # s
    psi: float = 1.0
    rescale: bool = True
    keys: tuple[str, ...] | None = None

    def gamma(self, t: float) -> float:
        """Share of the clean condition at our time t (0 noise, 1 data)."""
        t_clean, t_noise = from_diffusion_time(self.tau1), from_diffusion_time(self.tau2)  # t_noise <= t_clean
        if t >= t_clean:  # s <= tau1
            return 1.0
        if t <= t_noise:  # s >= tau2
            return 0.0
        return (t - t_noise) / (t_clean - t_noise)  # = (tau2 - s) / (tau2 - tau1)

    def __call__(self, y: Tensor, t: float, noise: Tensor) -> Tensor:
        g = self.gamma(t)
        y_hat = math.sqrt(g) * y + self.noise_scale * math.sqrt(1.0 - g) * noise
        if not self.rescale:
            return y_hat
        dims = tuple(range(1, y.ndim))
        mean, std = y.mean(dim=dims, keepdim=True), y.std(dim=dims, keepdim=True)
        mean_hat, std_hat = y_hat.mean(dim=dims, keepdim=True), y_hat.std(dim=dims, keepdim=True)
        scaled = (y_hat - mean_hat) / std_hat.clamp_min(1e-12) * std + mean
        return self.psi * scaled + (1.0 - self.psi) * y_hat


@dataclass
class CADSConfig:
    tau1: float = 0.6  # diffusion time (1 = noise): clean condition for s <= tau1
    tau2: float = 0.9  # diffusion time: pure noise for s >= tau2
    noise_scale: float = 0.25  # s
    psi: float = 1.0  # mix of the rescaled and the raw noised condition
    rescale: bool = True
    branch: str = "pos"  # pos | neg | both
    keys: Any = None  # condition tensors to noise (null: the model's conditioning decides)

    def __post_init__(self) -> None:
        for key in ("tau1", "tau2"):
            value = getattr(self, key)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise GuidanceConfigError(f"guidance.cads.{key} must be in [0, 1] (diffusion time), got {value!r}")
        if self.tau1 > self.tau2:
            raise GuidanceConfigError(f"guidance.cads needs tau1 <= tau2, got tau1={self.tau1}, tau2={self.tau2}")
        finite(self.noise_scale, "guidance.cads.noise_scale")
        if not 0.0 <= self.psi <= 1.0:
            raise GuidanceConfigError(f"guidance.cads.psi must be in [0, 1], got {self.psi!r}")
        if self.branch not in ("pos", "neg", "both"):
            raise GuidanceConfigError(f"guidance.cads.branch must be pos, neg or both, got {self.branch!r}")
        if self.keys is not None:
            self.keys = tuple(str(k) for k in self.keys)


def with_cads(guidance: Guidance, cfg: CADSConfig) -> Guidance:
    """Add CADS' condition noise to the chosen branch(es) of any method (CFG -> CADS, ERG -> ERG + CADS)."""
    noise = CADS(cfg.tau1, cfg.tau2, cfg.noise_scale, cfg.psi, cfg.rescale, cfg.keys)
    names = ("pos", "neg") if cfg.branch == "both" else (cfg.branch,)
    for name in names:
        try:
            branch = guidance.branch(name)
        except KeyError as err:
            raise GuidanceConfigError(
                f"guidance.cads.branch={cfg.branch}: method {guidance.name} has no {name!r} branch"
            ) from err
        guidance = guidance.with_branch(name, condition=replace(branch.condition, noise=noise))
    return guidance
