"""Checks shared by the diffusers family tests (test_flux.py, test_sd35.py, ...): what a pipeline could be left
with, counting the transformer's forwards, every sampler method with a family's overrides, and a memo of the
prompt encodings so that running every method does not re-encode the same prompts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from omegaconf import OmegaConf

from erg.guidance import build_guidance
from erg.sampler import GuidedSampler, SamplerConfig
from tests.conftest import compose


def guidance(model: str, name: str, *overrides: str) -> Any:
    """The guidance `name` as sample.py composes it for `model=<model>` (its presets included)."""
    cfg = compose("sample", [f"model={model}", "model.path=/w", f"guidance={name}", *overrides]).guidance
    return build_guidance(OmegaConf.to_container(cfg, resolve=True))


def methods(layers: str) -> dict[str, list[str]]:
    """Every method of the sampler (configs/guidance/ as sample.py names them), with a tiny model's layers."""
    image, own = [f"guidance.image.layers={layers}"], [f"guidance.layers={layers}"]
    return {
        "none": [], "cfg": [], "apg": [], "cads": [], "i_erg": image, "c_erg": [], "erg": image, "erg_apg": image,
        "erg_cads": image, "pag": own, "seg": own, "sag": own, "autoguidance": ["guidance.checkpoint=weak"],
    }  # fmt: skip


class Memo:
    """A model's conditioning, each (prompts, condition kind, C-ERG setting) encoded once across methods."""

    def __init__(self, conditioning: Any):
        self.conditioning, self.noisable, self.memo = conditioning, conditioning.noisable, {}

    def batch_size(self, conditions: Any) -> int:
        return len(conditions)

    def encode(self, conditions: Any, condition: Any) -> dict[str, torch.Tensor]:
        key = (tuple(conditions), condition.kind, condition.text)
        if key not in self.memo:
            self.memo[key] = self.conditioning.encode(conditions, condition)
        return self.memo[key]


def run_every_method(model: Any, weak: Any, family: str, layers: str, noise: torch.Tensor, prompts: list[str],
                     memo: Memo | None = None, schedule: str = "pipeline") -> dict[str, torch.Tensor]:  # fmt: skip
    """Two steps of every method (the second after ERG's kickoff); AutoGuidance with `weak` as its weak model."""
    memo = memo or Memo(model.conditioning())
    out = {}
    for name, overrides in methods(layers).items():
        g = guidance(family, name, *overrides)
        models = {"main": model, "weak": weak} if "weak" in g.models else {"main": model}
        config = SamplerConfig(steps=2, schedule=schedule)
        out[name] = GuidedSampler(g, models, {k: memo for k in models}, config=config).sample(noise, prompts)
    return out


def state(pipe: Any) -> dict[str, Any]:
    """Everything ERG could leave behind in a pipeline: processors (by identity), hooks, weights, modes."""
    parts = [getattr(pipe, n, None) for n in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")]
    modules = [m for c in parts if c is not None for m in c.modules()]
    return {
        "processors": dict(pipe.transformer.attn_processors),
        "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in modules],
        "weights": {k: v.clone() for k, v in pipe.transformer.state_dict().items()},
        "training": [m.training for m in modules],
    }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["processors"].keys() == after["processors"].keys()
    assert all(before["processors"][k] is after["processors"][k] for k in before["processors"])
    assert after["hooks"] == before["hooks"] and after["training"] == before["training"]
    assert all(torch.equal(before["weights"][k], after["weights"][k]) for k in before["weights"])


@contextmanager
def forward_rows(transformer: torch.nn.Module, key: str = "hidden_states") -> Iterator[list[int]]:
    """The batch size of every forward of `transformer` while active (one entry per forward)."""
    rows: list[int] = []
    hook = transformer.register_forward_pre_hook(lambda m, a, kw: rows.append(kw[key].shape[0]), with_kwargs=True)
    try:
        yield rows
    finally:
        hook.remove()


def attention_outputs(model: Any, modules: dict[str, torch.nn.Module], x, t, plan, **inputs) -> dict[str, Any]:
    """Each attention module's output (name -> output) in one forward of `model` with `plan`."""
    outputs: dict[str, Any] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: outputs.__setitem__(n, out)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            model(x, t, plan=plan, **inputs)
    finally:
        for h in hooks:
            h.remove()
    return outputs
