"""The guidance interval (Kynkäänniemi et al., NeurIPS 2024): guidance only for t in a window.

    t_lo <= t < t_hi:  the method's combination of its branches
    otherwise:         out = pos, the conditional prediction; no other branch is evaluated (NFE 1)

Any method takes it (`guidance.interval=[t_lo, t_hi]`, null = everywhere): it wraps the method's
combine rule, whose `needs` then asks the sampler for 'pos' alone outside the window.

The paper states its intervals in EDM noise levels, guidance applied for sigma in (sigma_lo, sigma_hi].
In this project's time (t = 0 noise) sigma = (1 - t) / t, so sigma_hi -> t_lo = 1 / (1 + sigma_hi) and
sigma_lo -> t_hi = 1 / (1 + sigma_lo) (`erg.flow.from_edm_sigma`; `GuidanceInterval.from_sigma`), and
the half-open side moves with it: sigma > sigma_lo <=> t < t_hi, sigma <= sigma_hi <=> t >= t_lo.
The authors' released setting for EDM2-XXL's best FID (github.com/kynkaat/guidance-interval,
`generate_zip.py --guidance_interval="[17, 22]"`, guidance 2.0) guides steps 17..22 of their 32-step EDM
schedule (sigma_max 80, sigma_min 0.002, rho 7: `sampling/edm_sampler.py`, `i >= start and i <= stop`).
Their Heun sampler evaluates each step at its start and, for the correction, at its end, so the guided
evaluations run from sigma_17 = 1.61 down to sigma_23 = 0.19 (step 22's correction), t from 0.38 to 0.84.
configs/guidance/cfg_interval.yaml's [0.38, 0.78] covers the steps' starts, sigma 1.61 .. 0.28, which is
where our Euler sampler evaluates; it is an approximation of their window, also because t = 1 / (1 + sigma)
maps EDM's sigma exactly only for data at EDM2's own scale (sigma_data 0.5): for latents of another scale
the same signal-to-noise ratio is another t. The window is a property of a model and its schedule: the
paper finds it by a sweep, and so should a new model.

Outside the window stateful rules do not update their state (APG's momentum sees guided steps only).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from erg.flow import from_edm_sigma
from erg.guidance.base import Combine, Guidance, Step
from erg.guidance.config import GuidanceConfigError

__all__ = ["GuidanceInterval", "Interval", "parse_interval", "with_interval"]


@dataclass(frozen=True)
class GuidanceInterval:
    """Times t_lo <= t < t_hi (t = 0 noise, 1 data) at which guidance acts."""

    t_lo: float
    t_hi: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.t_lo < self.t_hi <= 1.0:
            raise ValueError(f"a guidance interval needs 0 <= t_lo < t_hi <= 1, got [{self.t_lo}, {self.t_hi}]")

    def contains(self, t: float) -> bool:
        return self.t_lo <= t < self.t_hi

    @classmethod
    def from_sigma(cls, sigma_lo: float, sigma_hi: float) -> GuidanceInterval:
        """The paper's sigma in (sigma_lo, sigma_hi] (EDM noise levels) in our time."""
        return cls(from_edm_sigma(sigma_hi), from_edm_sigma(sigma_lo))


@dataclass(frozen=True)
class Interval(Combine):
    """`inner` inside the interval, the positive prediction outside it."""

    inner: Combine
    interval: GuidanceInterval
    base: str = "pos"

    def new_state(self) -> dict[str, Any]:
        return self.inner.new_state()

    def __call__(self, step: Step, state: dict[str, Any]) -> Tensor:
        if self.interval.contains(step.time):
            return self.inner(step, state)
        return step.preds[self.base]

    @property
    def uses(self) -> frozenset[str]:
        return self.inner.uses | {self.base}

    def needs(self, step: Step) -> frozenset[str]:
        return self.inner.needs(step) if self.interval.contains(step.time) else frozenset([self.base])


def parse_interval(value: Any) -> GuidanceInterval | None:
    """`guidance.interval`: null, or [t_lo, t_hi] in our time."""
    if value is None:
        return None
    if not (isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int | float) for v in value)):
        raise GuidanceConfigError(
            f"guidance.interval must be [t_lo, t_hi] (guidance for t_lo <= t < t_hi, t = 0 noise) or null, got "
            f"{value!r}; from the paper's sigma interval (sigma_lo, sigma_hi]: t_lo = 1 / (1 + sigma_hi), "
            "t_hi = 1 / (1 + sigma_lo)"
        )
    try:
        return GuidanceInterval(float(value[0]), float(value[1]))
    except ValueError as err:
        raise GuidanceConfigError(f"guidance.interval: {err}") from None


def with_interval(guidance: Guidance, interval: GuidanceInterval) -> Guidance:
    """Restrict any method's guidance to the interval (outside it: the conditional prediction alone)."""
    return replace(guidance, combine=Interval(guidance.combine, interval))
