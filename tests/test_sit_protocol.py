"""Sampling the public SiT-XL/2 as SiT does (issue 11.6): its `forward_with_cfg` guides only the first 3 of
the 4 latent channels (the published SiT / DiT FIDs use it), and its `--num-sampling-steps N` is
`torch.linspace(0, 1, N)` for torchdiffeq's fixed-grid Euler, i.e. N - 1 Euler steps.

`model=sit_xl2` makes guided_channels = 3 the default of every guidance method (configs/presets/model/),
in sample.py, its grid mode and the imagenet256 sweep; our sampler with steps = N - 1 then equals a
transcription of SiT's sample.py loop."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from erg.guidance import build_guidance
from erg.sampler import GuidedSampler, SamplerConfig
from erg.sampling import sample_noise
from models.checkpoints import build_dit
from models.generation import compose_guidance
from tests.conftest import compose, randomize

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIT = ["model=sit_xl2", "model.checkpoint=/w/SiT-XL-2-256x256.pt"]
GUIDANCE = sorted(p.stem for p in (CONFIGS / "guidance").glob("*.yaml"))


@pytest.mark.parametrize("name", GUIDANCE)
def test_every_method_guides_three_channels_when_sampling_the_public_sit(name):
    assert compose("sample", [*SIT, f"guidance={name}"]).guidance.guided_channels == 3
    # a checkpoint of this repo (or any other model) keeps the method as written: every channel
    assert compose("sample", ["checkpoint=x", f"guidance={name}"]).guidance.guided_channels is None


def test_the_default_can_be_turned_off_and_reaches_grid_mode():
    off = compose("sample", [*SIT, "guidance=erg", "guidance.guided_channels=null"]).guidance
    assert off.guided_channels is None
    assert compose_guidance("erg scale=2", model="sit_xl2")[1]["guided_channels"] == 3
    assert compose_guidance("erg scale=2")[1]["guided_channels"] is None
    # the model's other presets reach grid mode too: SD3's ERG row
    assert compose_guidance("erg", model="sd3_medium")[1]["name"] == "erg_sd3"


def test_the_imagenet256_sweep_samples_sit_as_published(tmp_path):
    from eval.sweep import point_configs, validate

    extra = [
        "sample.model.checkpoint=/w/SiT-XL-2-256x256.pt", "sample.autoencoder.path=/w/sd-vae-ft-ema",
        "evaluate.reference.path=/d/VIRTUAL_imagenet256_labeled.npz", "evaluate.features.weights=/w/inception.pth",
        "grid.autoguidance.checkpoint=/w/weak.ckpt",
    ]  # fmt: skip
    cfg = compose("sweep", ["sweeps=imagenet256", f"sweep_dir={tmp_path}", *extra])
    points = validate(cfg)
    assert {point_configs(cfg, p)[0].guidance.guided_channels for p in points} == {3}


# --- SiT's own sampler, transcribed ----------------------------------------------------------------------
def forward_with_cfg(model, x, t, y, cfg_scale):
    """SiT's models.py `forward_with_cfg`: both halves get the first half's x; guidance on channels [0, 3)."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = model(combined, t, y)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def sit_sample(model, z, labels, cfg_scale, num_sampling_steps):
    """SiT's sample.py (ODE, Euler, Linear path, velocity model): z and y doubled with the null class,
    transport's `ode` integrates on t = linspace(0, 1, num_sampling_steps) (check_interval gives t0 = 0,
    t1 = 1), torchdiffeq's fixed-grid Euler y += (t_{i+1} - t_i) f(t_i, y), then the null half is dropped."""
    n = len(labels)
    x = torch.cat([z, z], 0)
    y = torch.cat([torch.tensor(labels), torch.full((n,), model.null_class)], 0)
    ts = torch.linspace(0, 1, num_sampling_steps)
    for t0, t1 in itertools.pairwise(ts):
        x = x + (t1 - t0) * forward_with_cfg(model, x, torch.ones(2 * n) * t0, y, cfg_scale)
    return x.chunk(2, dim=0)[0]


@torch.no_grad()
def test_our_sampler_equals_sits_with_one_step_less():
    model = build_dit(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=4,
                      num_classes=5, learn_sigma=True)  # fmt: skip
    model = randomize(model, seed=2).eval()
    labels, n_sit = [0, 3, 4], 6  # SiT's --num-sampling-steps 6
    z = sample_noise(range(3), (4, 8, 8), base_seed=1)
    reference = sit_sample(model, z, labels, cfg_scale=4.0, num_sampling_steps=n_sit)

    def ours(steps, guided_channels):
        cfg = {"method": "cfg", "scale": 4.0, "guided_channels": guided_channels}
        sampler = GuidedSampler(build_guidance(cfg), model, config=SamplerConfig(steps=steps))
        return sampler.sample(z, labels)

    torch.testing.assert_close(ours(n_sit - 1, 3), reference, atol=1e-5, rtol=1e-5)
    # neither all channels nor N steps is SiT's sampler
    assert (ours(n_sit - 1, None) - reference).abs().max() > 1e-3
    assert (ours(n_sit, 3) - reference).abs().max() > 1e-3


def test_sit_model_config_says_so():
    text = OmegaConf.to_yaml(compose("sample", SIT).guidance)
    assert "guided_channels: 3" in text
