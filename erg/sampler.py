"""The one sampler every guidance method runs in.

    x <- noise (per-sample seeds);  for t_i in time_grid(steps, shift):         t = 0 noise -> 1 data
        for each stage (SAG's degraded branch is a second stage):
            for each model (main, weak): ONE forward over the rows of all its branches the combine
                rule needs at this step (guidance.needed(step): all of them, except in SLG's step window,
                CFG-Zero*'s zero-init steps and outside a guidance interval),
                rows [j B, (j + 1) B) = branch j, each with its own attention rules (AttentionPlan)
        v = guidance.combine(predictions)            (velocity; APG converts to x0 and back)
        x <- x + (t_{i+1} - t_i) v

The state starts as the noise itself, unless the model says how its noise looks in our space at the grid's
first time (`initial_noise_scale(t_0)`: a DDPM model, erg/integrations/pixart.py, starts at t_0 > 0 from
m(t_0) noise, m = sqrt(t_0^2 + (1 - t_0)^2), which is its pipeline's latents = noise in its own space).

So ERG costs what CFG costs: two rows per image, one forward per step. Conditions are encoded once
per run per condition kind; CADS noise is drawn per sample and step from the sample's seed (one draw
per condition tensor, the same for every branch it noises), so a sample's result depends only on its
seed and condition, never on its batch mates. The model runs
under bf16 autocast on CUDA; the state x and the combination stay in float32.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from erg.attention import AttentionMaps, AttentionPlan, Capture, Rule, SkipBlock
from erg.conditioning import Conditioning, conditioning_for
from erg.flow import flow_match_euler_times, time_grid
from erg.guidance.base import Branch, Guidance, Step
from erg.sampling import sample_noise, sample_seed

__all__ = ["GuidedSampler", "SamplerConfig"]

OnStep = Callable[[Step, Tensor], None]


@dataclass(frozen=True)
class SamplerConfig:
    """steps: Euler steps; shift: SD3's schedule shift (1 = uniform in t); schedule: "uniform" (times
    i / steps, shifted: `erg.flow.time_grid`), "flow_match_euler" (the grid of diffusers'
    FlowMatchEulerDiscreteScheduler that SD3's pipelines use: `erg.flow.flow_match_euler_times`) or
    "pipeline" (the model's own grid, `model.time_grid(steps)`: a diffusers family samples the times its
    pipeline's scheduler sets, resolution-dependent shifts included; `shift` is then unused);
    bf16: autocast on CUDA; batch_branches: evaluate the branches sharing a model in one forward
    (False: one forward per branch, the reference the batched path is tested against); compile: call
    the models through `torch.compile` (the modules themselves are left as they are)."""

    steps: int = 50
    shift: float = 1.0
    schedule: str = "uniform"
    bf16: bool = True
    batch_branches: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"sampler.steps must be an integer >= 1, got {self.steps!r}")
        if not self.shift > 0:
            raise ValueError(f"sampler.shift must be > 0, got {self.shift}")
        if self.schedule not in ("uniform", "flow_match_euler", "pipeline"):
            raise ValueError(
                f"sampler.schedule must be 'uniform', 'flow_match_euler' or 'pipeline', got {self.schedule!r}"
            )

    def times(self, model: nn.Module | None = None) -> torch.Tensor:
        """The steps + 1 times t_0 = 0 (noise) ... t_steps = 1 (data), float64 on the host
        ("pipeline": the model's `time_grid(steps)`)."""
        if self.schedule == "pipeline":
            if not callable(getattr(model, "time_grid", None)):
                raise ValueError(
                    f"sampler.schedule=pipeline samples the model's own scheduler grid, but {type(model).__name__} "
                    "has no time_grid(steps) (only the diffusers families do); use schedule=uniform or flow_match_euler"
                )
            return model.time_grid(self.steps).to(torch.float64).cpu()
        if self.schedule == "flow_match_euler":
            return flow_match_euler_times(self.steps, self.shift, dtype=torch.float64)
        return time_grid(self.steps, self.shift, dtype=torch.float64)


def _num_layers(model: nn.Module) -> int:
    n = getattr(model, "num_attention_layers", None)
    if n is None:
        raise ValueError(f"{type(model).__name__} does not report num_attention_layers; guidance needs it")
    return int(n)


class GuidedSampler:
    """Samples a model with a guidance method.

    models: {"main": model, "weak": model} ("weak" only for AutoGuidance). Each model takes
        `forward(x, t, plan=..., **inputs)` and predicts the velocity (erg/flow.py).
    conditionings: per model, how conditions become inputs (default: from the model, see
        `erg.conditioning.conditioning_for`).
    Every layer the guidance names is checked against its model here, before any sampling.
    """

    def __init__(
        self,
        guidance: Guidance,
        models: Mapping[str, nn.Module] | nn.Module,
        conditionings: Mapping[str, Conditioning] | None = None,
        config: SamplerConfig | None = None,
    ):
        self.models = dict(models) if isinstance(models, Mapping) else {"main": models}
        self.guidance = guidance
        self.config = config or SamplerConfig()
        conditionings = dict(conditionings or {})
        for name in guidance.models:
            if name not in self.models:
                hint = " (AutoGuidance: guidance.checkpoint names the weak checkpoint)" if name == "weak" else ""
                raise ValueError(f"guidance {guidance.name} needs a {name!r} model{hint}")
            conditionings.setdefault(name, conditioning_for(self.models[name]))
        self.conditionings = conditionings
        self._check(guidance)
        if self.config.schedule == "pipeline":
            self.config.times(self.models["main"])  # a model without its own grid fails here, before sampling
        self._call = {k: torch.compile(m) if self.config.compile else m for k, m in self.models.items()}
        self.nfe_per_step: list[int] = []  # branches evaluated per image at each step of the last run

    def _check(self, guidance: Guidance) -> None:
        for b in guidance.branches:
            n = _num_layers(self.models[b.model])
            for layers, origin in ((b.perturbation.layers, b.perturbation.origin) if b.perturbation else ((), ""),
                                   (b.capture, "guidance.layers")):  # fmt: skip
                bad = sorted(i for i in layers if not 0 <= i < n)
                if bad:
                    lo, hi = min(layers), max(layers) + 1
                    mid = round(n * 12 / 28)  # the paper's [12, 15) of 28 blocks, scaled to this depth
                    raise ValueError(
                        f"{origin}=[{lo}, {hi}] but the {b.model} model has {n} attention layers "
                        f"(blocks 0..{n - 1}): layers {bad} do not exist. Choose a range inside the model, "
                        f"e.g. its middle blocks {origin}=[{mid},{max(round(n * 15 / 28), mid + 1)}]"
                    )
            if b.perturbation is not None and isinstance(b.perturbation.rectifier, SkipBlock):
                model = self.models[b.model]
                if not getattr(model, "supports_block_skip", False):
                    raise ValueError(
                        f"guidance {guidance.name} skips whole blocks (skip-layer guidance, guidance.skip=block), "
                        f"but {type(model).__name__} does not apply erg.attention.skip_blocks; use "
                        "guidance.skip=attention (the attention map replaced by the identity) on this model"
                    )
            check_text = getattr(self.conditionings[b.model], "check", None)
            if b.condition.text is not None and check_text is not None:  # C-ERG layers: now, not mid-run
                check_text(b.condition.text)
            if b.condition.noise is not None:
                keys = b.condition.noise.keys or self.conditionings[b.model].noisable
                if not keys:
                    raise ValueError(
                        f"guidance {guidance.name}: CADS noises the condition of branch {b.name!r}, but the "
                        f"{b.model} model is unconditional"
                    )

    @property
    def device(self) -> torch.device:
        """Where the state lives: the model's `execution_device` if it has one (a diffusers family whose
        components are offloaded to the CPU between uses), else the device of its parameters."""
        model = self.models["main"]
        device = getattr(model, "execution_device", None)
        return torch.device(device) if device is not None else next(model.parameters()).device

    # --- one step ----------------------------------------------------------------------------------
    def _autocast(self) -> Any:
        if self.config.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _inputs(self, b: Branch, step: Step, encoded: dict[Any, dict[str, Tensor]], seeds: Sequence[int]) -> dict:
        inputs = encoded[(b.model, b.condition.encoding)]
        noise = b.condition.noise
        if noise is None:
            return inputs
        keys = noise.keys or self.conditionings[b.model].noisable
        missing = [k for k in keys if k not in inputs]
        if missing:
            raise ValueError(f"CADS: branch {b.name!r}'s condition has no tensor(s) {missing} (has {list(inputs)})")
        out = dict(inputs)
        for key in keys:
            # One noise stream per tensor, shared by every branch CADS noises (branch=both: pos and neg see the
            # same n, so they differ only in what the method changes, e.g. ERG's rectified attention). Named
            # "pos/<key>" as when only pos was noised, so pos-only CADS draws the same n as before.
            stream = zlib.crc32(f"pos/{key}".encode())
            n = torch.stack(
                [
                    torch.randn(
                        inputs[key].shape[1:],
                        generator=torch.Generator().manual_seed(sample_seed(sample_seed(s, step.index), stream)),
                    )
                    for s in seeds
                ]
            ).to(inputs[key].device, inputs[key].dtype)
            out[key] = noise(inputs[key], step.time, n)
        return out

    def _forward(self, group: list[Branch], step: Step, encoded: dict, seeds: Sequence[int]) -> None:
        """ONE forward of a model over the stacked rows of `group`."""
        B = step.x.shape[0]
        xs, conds, rules, sinks = [], [], [], {}
        for j, b in enumerate(group):
            rows = slice(j * B, (j + 1) * B)
            xs.append(b.input(step) if b.input is not None else step.x)
            conds.append(self._inputs(b, step, encoded, seeds))
            p = b.perturbation
            if p is not None and p.window.contains(step.time):
                rules.append(Rule(p.rectifier, p.layers, rows))
            if b.capture:
                sinks[b.name] = AttentionMaps()
                rules.append(Rule(Capture(sinks[b.name], b.capture_max_gb), b.capture, rows))
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        t = step.t.repeat(len(group))
        inputs = {k: torch.cat([c[k] for c in conds]) if len(conds) > 1 else conds[0][k] for k in conds[0]}
        plan = AttentionPlan(tuple(rules)) if rules else None
        with self._autocast():
            out = self._call[group[0].model](x, t, plan=plan, **inputs)
        out = out.float()
        for j, b in enumerate(group):
            step.preds[b.name] = out[j * B : (j + 1) * B]
        step.maps.update(sinks)

    def evaluate(self, step: Step, encoded: dict, seeds: Sequence[int]) -> None:
        """Fill `step.preds` (and `step.maps`) with the prediction of every branch the guidance needs at
        this step (`Guidance.needed`); the others are not evaluated at all."""
        needed = self.guidance.needed(step)
        self.nfe_per_step.append(len(needed))
        for stage in (0, 1):
            branches = [b for b in needed if b.stage == stage]
            for model in dict.fromkeys(b.model for b in branches):
                group = [b for b in branches if b.model == model]
                if self.config.batch_branches:
                    self._forward(group, step, encoded, seeds)
                else:
                    for b in group:
                        self._forward([b], step, encoded, seeds)

    def velocity(self, step: Step, state: dict[str, Any]) -> Tensor:
        """The guided velocity of an evaluated step. With the DiT channel quirk the combine rule runs on
        the first `guided_channels` channels alone (its statistics are theirs) and the other channels take
        the positive prediction; a step that evaluated nothing (CFG-Zero*'s zero-init) is the rule's
        output on every channel."""
        n = self.guidance.guided_channels
        if n is None or n >= step.x.shape[1] or "pos" not in step.preds:
            return self.guidance.combine(step, state)
        guided = replace(step, x=step.x[:, :n], preds={k: p[:, :n] for k, p in step.preds.items()})
        return torch.cat([self.guidance.combine(guided, state), step.preds["pos"][:, n:]], dim=1)

    # --- a run -------------------------------------------------------------------------------------
    def encode(self, conditions: Any) -> dict[Any, dict[str, Tensor]]:
        """Every (model, condition) the branches need, encoded once for the run."""
        encoded: dict[Any, dict[str, Tensor]] = {}
        with torch.no_grad(), self._autocast():
            for b in self.guidance.branches:
                key = (b.model, b.condition.encoding)
                if key not in encoded:
                    encoded[key] = self.conditionings[b.model].encode(conditions, b.condition)
        return encoded

    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        conditions: Any = None,
        seeds: Sequence[int] | None = None,
        on_step: OnStep | None = None,
    ) -> Tensor:
        """Integrate from `noise` (B, C, H, W) at t = 0 to t = 1.

        conditions: one class label / prompt per sample (None for unconditional models).
        seeds: one seed per sample for the per-step randomness of CADS (default: 0..B-1).
        on_step(step, v): called after each step's combination (analyses, progress).
        """
        B = noise.shape[0]
        n_cond = self.conditionings["main"].batch_size(conditions)
        if n_cond is not None and n_cond != B:
            raise ValueError(f"{n_cond} conditions for {B} noises: give one condition per sample")
        seeds = list(seeds) if seeds is not None else list(range(B))
        encoded = self.encode(conditions)
        state = self.guidance.combine.new_state()  # fresh per run (APG's momentum starts at zero)
        self.nfe_per_step = []
        times = self.config.times(self.models["main"])  # host copy: no syncs per step
        ts = times.to(self.device, torch.float32)
        x = noise.to(self.device, torch.float32)
        noise_scale = getattr(self.models["main"], "initial_noise_scale", None)
        if noise_scale is not None:  # a DDPM model: its pure noise at t_0 > 0, in our space
            x = x * float(noise_scale(float(times[0])))
        for i in range(self.config.steps):
            step = Step(i, float(times[i]), ts[i].expand(B), x, num_steps=self.config.steps)
            self.evaluate(step, encoded, seeds)
            v = self.velocity(step, state)
            if on_step is not None:
                on_step(step, v)
            x = x + (ts[i + 1] - ts[i]) * v
        return x

    def sample_indices(
        self, indices: Sequence[int], conditions: Any = None, base_seed: int = 0, on_step: OnStep | None = None
    ) -> Tensor:
        """Sample the given sample indices: noise and per-step randomness from (base_seed, index)."""
        model = self.models["main"]
        shape = getattr(model, "latent_shape", None) or (model.in_channels, model.input_size, model.input_size)
        noise = sample_noise(indices, shape, base_seed=base_seed, device=self.device)
        seeds = [sample_seed(base_seed, int(i)) for i in indices]
        return self.sample(noise, conditions, seeds, on_step)
