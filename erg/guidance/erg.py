"""Entropy Rectifying Guidance: I-ERG, C-ERG and ERG (the paper, eq. (10)).

    out = w D(x, phi_c) + (1 - w) D^xi(x, phi_c^tau) = pos + (w - 1)(pos - neg)

The negative branch `neg` is the same model with
- I-ERG (`image`): Algorithm 1 (temperature tau, K energy steps with alpha, gamma) on the image
  tokens of blocks [l_min, l_max), active exactly when t > kappa (t = 0 noise: after the kickoff);
  `update=listing2` runs the paper's Listing 2 instead (Q scaled by tau before the energy steps; the
  two differ when gamma != 1, e.g. Table 7's text-to-image gamma 1.5; erg.attention.Temperature);
- C-ERG (`text`): the prompt encoded with temperature tau_c on the self-attention logits of the
  chosen text-encoder blocks (erg/text_attention.py), at every step; `scope` = query (default, the
  paper's Listing 1: T5's relative position bias stays unscaled) or logits (the whole logit).
`condition` chooses what `neg` is conditioned on, by one rule on every kind of model:
- "c_erg" (ERG, eq. (10)): the user's condition through C-ERG, phi_c^tau; with no `text` temperature,
  or no text encoder (class-conditional models), the condition itself, so tau_i = 1 gives the
  conditional prediction (no guidance) everywhere. On a class-conditional model ERG is then I-ERG.
- "cond" (I-ERG alone): the condition itself, only the image rectification differs from pos.
- "null": the null class / empty prompt, rectified: section 3.1's other reading, "the
  negative/unconditional prediction part of CFG" (`erg_null.yaml`; tau_i = 1 gives CFG).

Both halves in one negative branch: two rows per image, one forward per step, as CFG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from erg.attention import UPDATES, Temperature
from erg.guidance.base import (
    CONDITION_KINDS,
    NULL,
    RECTIFIED,
    Branch,
    Condition,
    Guidance,
    Perturbation,
    TextTemperature,
    TimeWindow,
)
from erg.guidance.cfg import linear_pair
from erg.guidance.config import GuidanceConfigError, finite, layer_range, parse, positive
from erg.text_attention import SCOPES

__all__ = ["ERGConfig", "ImageERG", "TextERG", "build_erg"]


@dataclass
class ImageERG:
    """I-ERG settings (Table 7, class-conditional DiT-XL/2 defaults)."""

    tau: float = 0.01  # tau_i, temperature on the attention logits
    alpha: float = 1.0  # pattern-matching weight
    gamma: float = 1.0  # energy step size
    steps: int = 1  # K energy steps
    layers: Any = (12, 15)  # [l_min, l_max)
    kappa: float = 0.3  # kickoff: active when t > kappa (t = 0 noise)
    update: str = "algorithm1"  # algorithm1 | listing2: the paper's two writings, differ when gamma != 1

    def __post_init__(self) -> None:
        positive(self.tau, "guidance.image.tau")
        positive(self.gamma, "guidance.image.gamma")
        finite(self.alpha, "guidance.image.alpha")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise GuidanceConfigError(f"guidance.image.steps (K) must be an integer >= 1, got {self.steps!r}")
        self.layers = layer_range(list(self.layers), "guidance.image.layers")
        if self.update not in UPDATES:
            raise GuidanceConfigError(
                f"guidance.image.update must be one of {', '.join(UPDATES)} (Algorithm 1, or the paper's Listing 2 "
                f"which scales Q by tau before the energy steps), got {self.update!r}"
            )
        if not (isinstance(self.kappa, int | float) and -1.0 <= self.kappa <= 1.0):
            raise GuidanceConfigError(
                f"guidance.image.kappa must be in [-1, 1] (I-ERG acts when t > kappa; 1 = never, < 0 = every "
                f"step), got {self.kappa!r}"
            )


@dataclass
class TextERG:
    """C-ERG settings: tau_c on blocks [l_min, l_max) of each named text encoder."""

    tau: float = 0.01
    layers: Any = None  # {encoder name: [l_min, l_max]}
    scope: str = "query"  # query (Listing 1: T5's position bias unscaled) | logits (the whole logit)

    def __post_init__(self) -> None:
        positive(self.tau, "guidance.text.tau")
        if self.scope not in SCOPES:
            raise GuidanceConfigError(
                f"guidance.text.scope must be one of {', '.join(SCOPES)} (query: the paper's Listing 1, a hook on "
                f"the query projection; logits: tau on the whole logit, T5's relative position bias too), got "
                f"{self.scope!r}"
            )
        if not isinstance(self.layers, dict) or not self.layers:
            raise GuidanceConfigError(
                f"guidance.text.layers must map text encoder names to [l_min, l_max], e.g. "
                f"{{t5: [0, 24]}}, got {self.layers!r}"
            )
        self.layers = {
            str(k): layer_range(list(v) if v is not None else v, f"guidance.text.layers.{k}")
            for k, v in self.layers.items()
        }


@dataclass
class ERGConfig:
    scale: float = 3.0  # w
    condition: str = RECTIFIED
    image: Any = None  # ImageERG settings, or null for C-ERG alone
    text: Any = None  # TextERG settings, or null (no text encoder / I-ERG alone)

    def __post_init__(self) -> None:
        finite(self.scale, "guidance.scale")
        if self.condition is None:  # `guidance.condition=null` on a command line / a bare YAML null
            self.condition = NULL
        if self.condition not in CONDITION_KINDS:
            raise GuidanceConfigError(f"guidance.condition must be one of {CONDITION_KINDS}, got {self.condition!r}")
        self.image = parse(ImageERG, self.image, "guidance.image") if self.image is not None else None
        self.text = parse(TextERG, self.text, "guidance.text") if self.text is not None else None
        if self.text is not None and self.condition != RECTIFIED:
            raise GuidanceConfigError(
                f"guidance.text (C-ERG) acts on the negative condition: it needs guidance.condition={RECTIFIED}, "
                f"got {self.condition!r}"
            )


def build_erg(cfg: ERGConfig, name: str = "erg") -> Guidance:
    text = None
    if cfg.text is not None:
        layers = tuple((enc, (r.start, r.stop)) for enc, r in cfg.text.layers.items())
        text = TextTemperature(cfg.text.tau, layers, cfg.text.scope)
    perturbation = None
    if cfg.image is not None:
        im = cfg.image
        perturbation = Perturbation(
            Temperature(im.tau, alpha=im.alpha, gamma=im.gamma, steps=im.steps, update=im.update),
            frozenset(im.layers),
            TimeWindow(after=im.kappa),
            origin="guidance.image.layers",
        )
    neg = Branch("neg", Condition(cfg.condition, text=text), perturbation=perturbation)
    return linear_pair(name, cfg.scale, neg)
