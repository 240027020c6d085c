"""Guidance = named branches + a combine rule; the vocabulary every method is written in.

A *branch* is one prediction the sampler evaluates per step and per image: which condition it
sees (the user's condition, the null one, the C-ERG-encoded one, optionally CADS-noised), which
model (the main one, or AutoGuidance's weak checkpoint), which attention perturbation it runs with
(a rectifier on a layer range, active in a time window), whether the sampler records its attention
maps (SAG), and, for SAG's degraded branch, an input computed from the branches evaluated before it.

A *combine rule* turns the branches' predictions into the velocity the sampler steps with.
`Linear` covers CFG, I-ERG/C-ERG/ERG (eq. (10)), AutoGuidance and the extra terms of PAG, SEG, SAG
and SLG: out = pos + sum_j s_j (plus_j - minus_j). `APG` (apg.py) replaces the pos/neg term; the
other rules (CFG-Zero*, FDG, TCFG, MAMBO-G) have their own file. A rule also says, per step, which
branches it `needs`: the sampler evaluates only those (SLG's step window, CFG-Zero*'s zero-init
steps, the guidance interval).

Branches are always addressed by name ("pos", "neg", "perturbed", "degraded", "weak"), never by
their position in a batch. Times are this project's: t = 0 noise, t = 1 data (erg/flow.py).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from erg.attention import AttentionMaps, Rectifier
from erg.flow import eps_from_velocity, x0_from_velocity

__all__ = [
    "COND",
    "CONDITION_KINDS",
    "NULL",
    "RECTIFIED",
    "Branch",
    "Combine",
    "Condition",
    "ConditionNoise",
    "Guidance",
    "Linear",
    "Perturbation",
    "Step",
    "StepWindow",
    "Term",
    "TextTemperature",
    "TimeWindow",
]

COND, NULL, RECTIFIED = "cond", "null", "c_erg"
CONDITION_KINDS = (COND, NULL, RECTIFIED)


@dataclass(frozen=True)
class TimeWindow:
    """Times at which an attention perturbation is active: after < t <= until (t = 0 noise).

    ERG's kickoff kappa is `TimeWindow(after=kappa)`: I-ERG acts exactly when t > kappa, so
    kappa >= 1 never acts, kappa < 0 always, and kappa = 0 acts on every step but the first (t = 0).
    """

    after: float = -math.inf
    until: float = math.inf

    def contains(self, t: float) -> bool:
        return self.after < t <= self.until


@dataclass(frozen=True)
class Perturbation:
    """`rectifier` in `layers` of the branch's rows while the time window contains t.

    origin: the config key the layers came from (named in errors about layers the model lacks).
    """

    rectifier: Rectifier
    layers: frozenset[int]
    window: TimeWindow = TimeWindow()
    origin: str = "layers"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", frozenset(int(i) for i in self.layers))


@dataclass(frozen=True)
class TextTemperature:
    """C-ERG: temperature `tau` on the self-attention logits of text-encoder blocks [l_min, l_max).

    layers: ((encoder name, (l_min, l_max)), ...), one entry per text encoder of the model.
    scope: "query" (the paper's Listing 1: q scaled, so T5's relative position bias is not) or "logits"
        (the whole logit, T5's bias included); erg/text_attention.py.
    """

    tau: float
    layers: tuple[tuple[str, tuple[int, int]], ...]
    scope: str = "query"


class ConditionNoise(ABC):
    """A per-step transformation of a branch's encoded condition (CADS)."""

    keys: tuple[str, ...] | None = None  # condition tensors to transform (None: the conditioning's choice)

    @abstractmethod
    def __call__(self, y: Tensor, t: float, noise: Tensor) -> Tensor:
        """y: (B, ...) one encoded condition tensor; noise: standard normal like y."""


@dataclass(frozen=True)
class Condition:
    """What a branch is conditioned on.

    kind: "cond" (the user's class / prompt), "null" (null class / empty prompt), or "c_erg" (the
        user's condition encoded with C-ERG's `text` temperature, phi_c^tau of eq. (10); without a
        temperature or a text encoder to put it in, the condition itself: erg/conditioning.py).
    noise: CADS' annealed noise on the encoded condition, per step.
    """

    kind: str = COND
    text: TextTemperature | None = None
    noise: ConditionNoise | None = None

    def __post_init__(self) -> None:
        if self.kind not in CONDITION_KINDS:
            raise ValueError(f"condition must be one of {CONDITION_KINDS}, got {self.kind!r}")
        if self.text is not None and self.kind != RECTIFIED:
            raise ValueError(f"a C-ERG text temperature needs the condition kind {RECTIFIED!r}, not {self.kind!r}")

    @property
    def encoding(self) -> tuple[str, TextTemperature | None]:
        """What identifies the encoded condition (the noise is applied per step on top)."""
        return self.kind, self.text


InputFn = Callable[["Step"], Tensor]


@dataclass(frozen=True)
class Branch:
    """One named prediction per image and step.

    model: "main" or "weak" (AutoGuidance's weaker checkpoint).
    capture: layers whose attention maps (head-averaged, image queries) the sampler records for
        this branch into `Step.maps[name]` (SAG).
    capture_max_gb: the largest map one layer may need (`erg.attention.Capture.max_gb`); None: no limit.
    input: computes this branch's model input from the branches evaluated before it (SAG's
        degraded input); such a branch runs in a second forward after the others.
    """

    name: str
    condition: Condition = Condition()
    model: str = "main"
    perturbation: Perturbation | None = None
    capture: frozenset[int] = frozenset()
    input: InputFn | None = None
    capture_max_gb: float | None = None

    @property
    def stage(self) -> int:
        return 1 if self.input is not None else 0


@dataclass
class Step:
    """What a combine rule sees at one sampling step.

    index: step number; time: t as a Python float (time windows, CADS); t: (B,) the same time as a
    tensor on the device; x: (B, C, H, W) the current state x_t; preds: velocity of every branch
    evaluated at this step; maps: attention maps recorded for branches with `capture`; num_steps: the
    run's number of steps (windows given as fractions of the steps, SLG's).
    """

    index: int
    time: float
    t: Tensor
    x: Tensor
    preds: dict[str, Tensor] = field(default_factory=dict)
    maps: dict[str, AttentionMaps] = field(default_factory=dict)
    num_steps: int | None = None

    def x0(self, name: str) -> Tensor:
        """Denoised prediction of a branch: x0 = x_t + (1 - t) v."""
        return x0_from_velocity(self.x, self.preds[name], self.t)

    def eps(self, name: str) -> Tensor:
        """Noise prediction of a branch: eps = x_t - t v."""
        return eps_from_velocity(self.x, self.preds[name], self.t)


class Combine(ABC):
    """Turns a step's branch predictions into the velocity to step with."""

    def new_state(self) -> dict[str, Any]:
        """Fresh per-run state (e.g. APG's momentum buffer): created at the start of every sampling run."""
        return {}

    @abstractmethod
    def __call__(self, step: Step, state: dict[str, Any]) -> Tensor: ...

    @property
    @abstractmethod
    def uses(self) -> frozenset[str]:
        """Names of the branches this rule reads."""

    def needs(self, step: Step) -> frozenset[str]:
        """The branches this rule reads at `step` (before any is evaluated): the sampler evaluates
        these only. Default: every branch it uses, at every step."""
        return self.uses


@dataclass(frozen=True)
class StepWindow:
    """Steps i of an N-step run with start * N < i < stop * N (fractions of the steps, strict on both
    sides as SD3.5's skip-layer guidance: `sd3_impls.SkipLayerCFGDenoiser`). A start below 0 includes
    the first step."""

    start: float = 0.0
    stop: float = 1.0

    def contains(self, step: Step) -> bool:
        if step.num_steps is None:
            raise ValueError("a step window needs Step.num_steps (the sampler sets it)")
        return self.start * step.num_steps < step.index < self.stop * step.num_steps


@dataclass(frozen=True)
class Term:
    """scale * (plus - minus), in velocity space; only at the steps of `when` if given."""

    scale: float
    plus: str
    minus: str
    when: StepWindow | None = None

    def active(self, step: Step) -> bool:
        return self.when is None or self.when.contains(step)


def add_terms(out: Tensor, terms: tuple[Term, ...], step: Step) -> Tensor:
    for term in terms:
        if term.active(step):
            out = out + term.scale * (step.preds[term.plus] - step.preds[term.minus])
    return out


def term_branches(terms: tuple[Term, ...], step: Step) -> frozenset[str]:
    """The branches the active terms read at `step`."""
    return frozenset(name for t in terms if t.active(step) for name in (t.plus, t.minus))


@dataclass(frozen=True)
class Linear(Combine):
    """out = base + sum_j scale_j (plus_j - minus_j).

    CFG: base pos, term (w - 1)(pos - neg); ERG eq. (10): w pos + (1 - w) neg is the same sum.
    Linear in the predictions, so combining velocities equals combining x0 or eps predictions at a
    fixed t (the maps between them are affine with the same coefficients for every branch).
    """

    terms: tuple[Term, ...] = ()
    base: str = "pos"

    def __call__(self, step: Step, state: dict[str, Any]) -> Tensor:
        return add_terms(step.preds[self.base], self.terms, step)

    @property
    def uses(self) -> frozenset[str]:
        return frozenset([self.base, *(t.plus for t in self.terms), *(t.minus for t in self.terms)])

    def needs(self, step: Step) -> frozenset[str]:
        return frozenset([self.base]) | term_branches(self.terms, step)


@dataclass(frozen=True)
class Guidance:
    """A guidance method: its branches and how to combine them.

    name: the method's name in tables ("cfg", "erg_apg", ...).
    guided_channels: DiT/SiT's quirk of guiding only the first channels (3 of 4); the remaining
        channels take the positive prediction. The combine rule sees only the guided channels, so its
        statistics (CFG-Zero*'s s*, TCFG's SVD, MAMBO-G's ratio, APG's norms) are theirs, and a step
        where it needs no branch (CFG-Zero*'s zero-init) evaluates nothing and is the rule's output on
        every channel. None guides every channel (the default, except when sampling the public
        SiT-XL/2: configs/presets/model/for_sit_xl2.yaml sets 3).
    """

    name: str
    branches: tuple[Branch, ...]
    combine: Combine
    guided_channels: int | None = None

    def __post_init__(self) -> None:
        names = [b.name for b in self.branches]
        if len(set(names)) != len(names):
            raise ValueError(f"guidance {self.name}: branch names must be unique, got {names}")
        if "pos" not in names:
            raise ValueError(f"guidance {self.name}: needs a 'pos' branch (the prediction being guided)")
        missing = sorted(self.combine.uses - set(names))
        if missing:
            raise ValueError(f"guidance {self.name}: the combine rule reads branches {missing} that do not exist")
        if self.guided_channels is not None and self.guided_channels < 1:
            raise ValueError(f"guided_channels must be >= 1 or null, got {self.guided_channels}")

    def branch(self, name: str) -> Branch:
        for b in self.branches:
            if b.name == name:
                return b
        raise KeyError(f"guidance {self.name} has no branch {name!r} (branches: {[b.name for b in self.branches]})")

    @property
    def nfe(self) -> int:
        """Function evaluations per image and step (the paper's NFE column); steps where the combine rule
        needs fewer branches (SLG's window, CFG-Zero*'s zero-init, the guidance interval) cost less."""
        return len(self.branches)

    def needed(self, step: Step) -> tuple[Branch, ...]:
        """The branches to evaluate at `step`: those the combine rule needs, and 'pos' wherever DiT's
        channel quirk takes its remaining channels from it (not on a step that needs nothing)."""
        names = self.combine.needs(step)
        if names and self.guided_channels is not None:
            names = names | {"pos"}
        return tuple(b for b in self.branches if b.name in names)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.model for b in self.branches))

    def with_branch(self, name: str, **changes: Any) -> Guidance:
        """A copy with one branch changed (composition: CADS on the positive branch, ...)."""
        self.branch(name)  # raises if absent
        branches = tuple(replace(b, **changes) if b.name == name else b for b in self.branches)
        return replace(self, branches=branches)
