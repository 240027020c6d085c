"""The shape PAG and SEG share: CFG plus a term against an attention-perturbed positive branch.

    out = pos + (w - 1)(pos - neg) + s (pos - perturbed)
        = neg + w (pos - neg) + s (pos - perturbed)        (diffusers' PAG / SEG's reference code)

pos = D(x, c); neg = D(x, null), evaluated only when w != 1; perturbed = D(x, c) with the
rectifier in the chosen layers, evaluated only when s != 0. Alone (w = 1) this is the papers'
pos + s (pos - perturbed). NFE: 1 + [w != 1] + [s != 0]. SLG (slg.py) has the same shape with its
perturbed term only on the steps of a `StepWindow` (the branch is not evaluated outside it).
"""

from __future__ import annotations

from erg.attention import Rectifier
from erg.guidance.base import NULL, Branch, Condition, Guidance, Linear, Perturbation, StepWindow, Term

__all__ = ["perturbed_guidance"]


def perturbed_guidance(name: str, scale: float, perturbed_scale: float, perturbation: Rectifier, layers: range,
                       origin: str, when: StepWindow | None = None) -> Guidance:  # fmt: skip
    branches = [Branch("pos")]
    terms = []
    if scale != 1.0:
        branches.append(Branch("neg", Condition(NULL)))
        terms.append(Term(scale - 1.0, "pos", "neg"))
    if perturbed_scale != 0.0:
        branches.append(Branch("perturbed", perturbation=Perturbation(perturbation, frozenset(layers), origin=origin)))
        terms.append(Term(perturbed_scale, "pos", "perturbed", when))
    return Guidance(name, tuple(branches), Linear(tuple(terms)))
