"""The guiders of the ecosystem (CFG-Zero*, SLG / STG, FDG, TCFG, MAMBO-G) and the guidance interval.

Each combine rule against an independent formula on fixed tensors, and against diffusers' own guider
where diffusers computes the method as its paper does; each in the shared sampler (one batched forward,
the branches it does not need not evaluated). The reference-code bugs of docs/reference_bugs.md are
reproduced here on diffusers 0.42.1 (`VERIFIED`), next to the test that shows this repo does not share them;
on another release they are non-strict xfails (a fixed bug must not break this suite), and every test that
needs diffusers (an optional extra) skips without it.
"""

from __future__ import annotations

import importlib.metadata
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from erg.attention import AttentionPlan, Identity, Site, SkipBlock, SmoothedEnergy
from erg.flow import from_edm_sigma, velocity_from_x0, x0_from_velocity
from erg.guidance import GuidanceConfigError, build_guidance
from erg.guidance.base import Step, StepWindow
from erg.guidance.cfg_zero_star import optimized_scale
from erg.guidance.fdg import laplacian_pyramid, pyramid_image
from erg.guidance.interval import GuidanceInterval
from erg.guidance.tcfg import tangential_damping
from erg.sampler import GuidedSampler, SamplerConfig
from models.checkpoints import build_dit
from models.mmdit import build_mmdit
from tests.conftest import randomize

# The reference-code bugs below were reproduced on these releases (docs/reference_bugs.md). On another
# release a bug may be fixed: those tests then run as non-strict xfails instead of breaking the suite.
VERIFIED = {"diffusers": "0.42.1", "torch": "2.14.1"}


def _installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _on_verified(*packages: str) -> bool:
    return all((_installed(p) or "").split("+")[0] == VERIFIED[p] for p in packages)


def reference_bug(*packages: str):
    """Mark a test that reproduces a bug of `packages` (default: diffusers) as of VERIFIED."""
    packages = packages or ("diffusers",)
    found = ", ".join(f"{p} {_installed(p)}" for p in packages)
    verified = ", ".join(f"{p} {VERIFIED[p]}" for p in packages)
    return pytest.mark.xfail(
        not _on_verified(*packages),
        reason=f"reproduces a reference bug verified on {verified}; installed: {found} (it may be fixed there)",
        strict=False,
    )


def _diffusers() -> None:
    """diffusers is an optional extra (`pip install -e .[diffusers]`): its tests skip without it."""
    pytest.importorskip("diffusers.guiders", reason="diffusers' guiders (the optional `diffusers` extra)")


def step_with(preds: dict[str, torch.Tensor], t: float = 0.3, x=None, index: int = 5, num_steps: int = 10) -> Step:
    like = next(iter(preds.values()))
    x = torch.zeros_like(like) if x is None else x
    return Step(index, t, torch.full((like.shape[0],), t, dtype=like.dtype), x, dict(preds), num_steps=num_steps)


def vec(*values: float) -> torch.Tensor:
    """A (1, 1, 1, n) prediction: one sample, its C x H x W flattened to the given numbers."""
    return torch.tensor(values, dtype=torch.float64).view(1, 1, 1, -1)


def random_preds(shape=(3, 2, 8, 8), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g) for _ in range(3))  # pos, neg, x_t


def test_reference_bug_tests_are_strict_only_on_the_verified_releases(monkeypatch):
    versions = {"diffusers": VERIFIED["diffusers"], "torch": VERIFIED["torch"] + "+cu130"}
    monkeypatch.setitem(globals(), "_installed", lambda package: versions[package])
    assert reference_bug("diffusers", "torch").args == (False,)  # the verified releases: a bug must reproduce
    versions["diffusers"] = "0.99.0"
    mark = reference_bug()
    assert mark.args == (True,) and mark.kwargs["strict"] is False and "diffusers 0.99.0" in mark.kwargs["reason"]
    versions["diffusers"] = None  # not installed: the test skips in _diffusers(); the mark would not matter
    assert reference_bug().args == (True,)


# --- CFG-Zero* -------------------------------------------------------------------------------------
def test_cfg_zero_star_by_hand():
    g = build_guidance({"method": "cfg_zero_star", "scale": 2.0, "zero_init_steps": 1})
    pos, neg = vec(3.0, 4.0), vec(1.0, 0.0)  # s* = <pos, neg> / ||neg||^2 = 3
    assert optimized_scale(pos, neg).item() == pytest.approx(3.0)
    out = g.combine(step_with({"pos": pos, "neg": neg}, index=1), {})
    torch.testing.assert_close(out, vec(3.0, 8.0))  # s* neg + w (pos - s* neg) = (3, 0) + 2 (0, 4)
    first = step_with({"pos": pos, "neg": neg}, index=0)
    assert g.combine.needs(first) == frozenset() and torch.equal(g.combine(first, {}), torch.zeros_like(pos))
    assert g.combine.needs(step_with({"pos": pos, "neg": neg}, index=1)) == {"pos", "neg"}
    plain = build_guidance({"method": "cfg_zero_star", "scale": 2.0, "optimized_scale": False})
    torch.testing.assert_close(plain.combine(step_with({"pos": pos, "neg": neg}), {}), pos + (pos - neg))
    alone = build_guidance({"method": "cfg_zero_star", "scale": 1.0})
    assert [b.name for b in alone.branches] == ["pos"] and alone.combine.needs(first) == frozenset()


def test_cfg_zero_star_is_diffusers_guider():
    _diffusers()
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    pos, neg, _ = random_preds()
    ours = build_guidance({"method": "cfg_zero_star", "scale": 4.0, "zero_init_steps": 2}).combine
    ref = ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=2)
    for i in range(4):
        ref.set_state(step=i, num_inference_steps=4, timestep=torch.tensor(0))
        expected = ref.forward(pos, neg).pred
        torch.testing.assert_close(ours(step_with({"pos": pos, "neg": neg}, index=i, num_steps=4), {}), expected)
    # the velocity convention does not matter: diffusers' v = -v gives the negated combination
    torch.testing.assert_close(ours(step_with({"pos": -pos, "neg": -neg}, index=3), {}), -expected)


# --- TCFG ------------------------------------------------------------------------------------------
def test_tcfg_by_hand_against_numpys_svd():
    u, c = vec(1.0, 0.0, 2.0), vec(1.0, 1.0, 1.0)
    _, _, vh = np.linalg.svd(np.stack([u.flatten().numpy(), c.flatten().numpy()]))  # A = [u; c]
    v1 = vh[0]
    expected_u = (u.flatten().numpy() @ v1) * v1  # eq. (3): u V^T [v_1, 0]
    torch.testing.assert_close(tangential_damping(u, c).flatten(), torch.from_numpy(expected_u))
    g = build_guidance({"method": "tcfg", "scale": 3.0})
    out = g.combine(step_with({"pos": c, "neg": u}), {})
    damped = torch.from_numpy(expected_u).view_as(u)
    torch.testing.assert_close(out, damped + 3.0 * (c - damped))  # eq. (4)
    # an unconditional prediction along the conditional one has no tangential part: TCFG = CFG
    torch.testing.assert_close(tangential_damping(2.0 * c, c), 2.0 * c)
    torch.testing.assert_close(tangential_damping(vec(0.0, 2.0), vec(3.0, 0.0)), vec(0.0, 0.0))  # c dominates


def test_tcfg_is_diffusers_normalized_guidance():
    _diffusers()
    from diffusers.guiders.tangential_classifier_free_guidance import normalized_guidance

    pos, neg, _ = random_preds()
    ours = build_guidance({"method": "tcfg", "scale": 5.0}).combine(step_with({"pos": pos, "neg": neg}), {})
    torch.testing.assert_close(ours, normalized_guidance(pos, neg, 5.0), atol=2e-5, rtol=1e-5)


@reference_bug()
def test_reference_bug_diffusers_tcfg_is_conditional_reads_a_missing_attribute():
    """docs/reference_bugs.md, TCFG 1: the guider's `is_conditional` reads `_num_outputs_prepared`, which
    BaseGuidance never sets (every other guider counts `_count_prepared`)."""
    _diffusers()
    from diffusers.guiders import TangentialClassifierFreeGuidance

    guider = TangentialClassifierFreeGuidance(guidance_scale=5.0)
    with pytest.raises(AttributeError, match="no attribute 'is_conditional'"):  # what a caller sees
        _ = guider.is_conditional
    with pytest.raises(AttributeError, match="_num_outputs_prepared"):  # why
        TangentialClassifierFreeGuidance.is_conditional.fget(guider)
    g = build_guidance({"method": "tcfg"})  # ours: branches by name, no call counter
    assert [(b.name, b.condition.kind) for b in g.branches] == [("pos", "cond"), ("neg", "null")]


# --- MAMBO-G ---------------------------------------------------------------------------------------
def test_mambo_g_by_hand():
    g = build_guidance({"method": "mambo_g", "scale": 3.0, "alpha": 0.5})
    pos, neg = vec(1.0, 2.0), vec(1.0, 0.0)  # r = ||(0, 2)|| / ||(1, 0)|| = 2
    w = 1 + (3.0 - 1) * math.exp(-0.5 * 2)
    torch.testing.assert_close(g.combine(step_with({"pos": pos, "neg": neg}), {}), vec(1.0, 2 * w))
    cfg = build_guidance({"method": "mambo_g", "scale": 3.0, "alpha": 0.0})  # alpha = 0: CFG with w_max
    torch.testing.assert_close(cfg.combine(step_with({"pos": pos, "neg": neg}), {}), neg + 3.0 * (pos - neg))


@reference_bug("diffusers", "torch")
def test_mambo_g_is_diffusers_guider_and_takes_image_latents():
    """docs/reference_bugs.md, MAMBO-G 1: diffusers' `mambo_guidance` takes torch.norm's default Frobenius
    norm over dims 1..n, which torch 2.14 refuses for more than two dims: it works on packed (B, N, C)
    latents (Qwen-Image, Flux) but not on (B, C, H, W) ones (SD3.5) or video."""
    _diffusers()
    from diffusers.guiders.magnitude_aware_guidance import mambo_guidance

    pos, neg, _ = random_preds()
    ours = build_guidance({"method": "mambo_g", "scale": 10.0, "alpha": 8.0}).combine
    packed = lambda z: z.flatten(2)  # (B, C, H W): the same per-sample norms
    expected = mambo_guidance(packed(pos), packed(neg), 10.0, 8.0).view_as(pos)
    torch.testing.assert_close(ours(step_with({"pos": pos, "neg": neg}), {}), expected)
    with pytest.raises(RuntimeError, match="dim must be a 2-tuple"):
        mambo_guidance(pos, neg, 10.0, 8.0)


# --- FDG -------------------------------------------------------------------------------------------
def _kornia():
    return pytest.importorskip("kornia", reason="the FDG paper's pyramid (kornia) is a test dependency")


@pytest.mark.parametrize(("size", "levels"), [(16, 2), (16, 3), (12, 2), (8, 2), (8, 3), (16, 4)])
def test_laplacian_pyramid_is_the_papers_kornia_pyramid(size, levels):
    kornia = _kornia()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    ours, ref = laplacian_pyramid(x, levels), kornia.geometry.transform.build_laplacian_pyramid(x, levels)
    assert [p.shape for p in ours] == [p.shape for p in ref]  # 12x12: both reflect-padded to 16x16
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pyramid_image(ours, (size, size)), x, atol=1e-5, rtol=1e-5)  # psi^-1 psi = id


def _paper_fdg_x0(x0_c, x0_u, scales, parallel=None):
    """Sadat et al., Algorithm 1 on x0 with kornia's pyramid (the paper's Algorithm 2), written here."""
    kornia = _kornia()
    pyr = kornia.geometry.transform.build_laplacian_pyramid
    guided = []
    for k, (c, u) in enumerate(zip(pyr(x0_c, len(scales)), pyr(x0_u, len(scales)))):
        d = (c - u).double()
        if parallel is not None:
            unit = c.double() / c.double().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            par = (d * unit).sum(dim=(1, 2, 3), keepdim=True) * unit
            d = parallel[k] * par + (d - par)
        guided.append(c + (scales[k] - 1) * d.float())
    img = guided[-1]
    for level in reversed(guided[:-1]):
        img = kornia.geometry.pyrup(img) + level
    return img


@pytest.mark.parametrize("parallel", [None, (0.5, 0.0)])
def test_fdg_is_the_papers_algorithm_on_x0(parallel):
    pos, neg, x = random_preds()
    t = 0.3
    cfg = {"method": "fdg", "scales": [3.0, 1.5], "parallel_weights": None if parallel is None else list(parallel)}
    out = build_guidance(cfg).combine(step_with({"pos": pos, "neg": neg}, t=t, x=x), {})
    x0 = _paper_fdg_x0(x0_from_velocity(x, pos, t), x0_from_velocity(x, neg, t), (3.0, 1.5), parallel)
    torch.testing.assert_close(out, velocity_from_x0(x, x0, t), atol=2e-5, rtol=1e-5)


def test_fdg_is_diffusers_guider_without_parallel_weights_and_cfg_with_equal_scales():
    _kornia()
    _diffusers()
    from diffusers.guiders import FrequencyDecoupledGuidance

    pos, neg, x = random_preds()
    ours = build_guidance({"method": "fdg", "scales": [4.0, 2.0]}).combine(step_with({"pos": pos, "neg": neg}, x=x), {})
    # linear in the predictions: FDG on x0 (ours, the paper) = FDG on the velocities (diffusers)
    ref = FrequencyDecoupledGuidance(guidance_scales=[4.0, 2.0]).forward(pos, neg).pred
    torch.testing.assert_close(ours, ref, atol=5e-5, rtol=1e-5)
    same = build_guidance({"method": "fdg", "scales": [2.5, 2.5]}).combine(step_with({"pos": pos, "neg": neg}, x=x), {})
    torch.testing.assert_close(same, pos + 1.5 * (pos - neg), atol=5e-5, rtol=1e-5)


def test_fdg_on_video_latents_is_the_papers_fdg_on_each_frame():
    """(B, C, F, H, W) video latents (Wan): each frame gets the 2D pyramid; without parallel weights that is the
    paper's FDG on every frame's image, and with them the projection is per video (all frames together)."""
    pos, neg, x = random_preds((2, 2, 3, 8, 8))
    t, scales = 0.3, (3.0, 1.5)
    out = build_guidance({"method": "fdg", "scales": list(scales)}).combine(step_with({"pos": pos, "neg": neg}, t=t,
                                                                                      x=x), {})  # fmt: skip
    x0p, x0n = x0_from_velocity(x, pos, t), x0_from_velocity(x, neg, t)
    frames = [_paper_fdg_x0(x0p[:, :, i], x0n[:, :, i], scales) for i in range(3)]
    torch.testing.assert_close(out, velocity_from_x0(x, torch.stack(frames, dim=2), t), atol=2e-5, rtol=1e-5)
    with_parallel = {"method": "fdg", "scales": list(scales), "parallel_weights": [0.0, 1.0]}
    projected = build_guidance(with_parallel).combine(step_with({"pos": pos, "neg": neg}, t=t, x=x), {})
    assert projected.shape == pos.shape and torch.isfinite(projected).all()
    assert (projected - out).abs().max() > 1e-3  # the high band's parallel part is dropped


@reference_bug()
def test_reference_bugs_diffusers_fdg_parallel_weights_and_padding():
    """docs/reference_bugs.md, FDG 1-3: with parallel weights diffusers computes neg + w d' (not the paper's
    pos + (w - 1) d') on the raw prediction (not x0); for sides that are not powers of two it returns the
    padded pyramid's size."""
    _kornia()
    _diffusers()
    from diffusers.guiders import FrequencyDecoupledGuidance

    pos, neg, x = random_preds()
    scales, parallel = (3.0, 1.5), (0.5, 0.0)
    ref = FrequencyDecoupledGuidance(guidance_scales=list(scales), parallel_weights=list(parallel))
    diffusers_out = ref.forward(pos, neg).pred
    paper_on_velocities = _paper_fdg_x0(pos, neg, scales, parallel)  # Algorithm 2, but fed velocities
    assert (diffusers_out - paper_on_velocities).abs().max() > 0.1  # neg + w d' != pos + (w - 1) d'
    paper = velocity_from_x0(x, _paper_fdg_x0(x0_from_velocity(x, pos, 0.3), x0_from_velocity(x, neg, 0.3),
                                               scales, parallel), 0.3)  # fmt: skip
    cfg = {"method": "fdg", "scales": list(scales), "parallel_weights": list(parallel)}
    ours = build_guidance(cfg).combine(step_with({"pos": pos, "neg": neg}, x=x), {})
    torch.testing.assert_close(ours, paper, atol=2e-5, rtol=1e-5)
    assert (ours - diffusers_out).abs().max() > 0.1

    pos12, neg12, x12 = random_preds((2, 2, 12, 12))  # 96 x 96 latents (768 px) have the same problem
    assert FrequencyDecoupledGuidance(guidance_scales=[3.0, 1.5]).forward(pos12, neg12).pred.shape[-1] == 16
    ours12 = build_guidance({"method": "fdg", "scales": [3.0, 1.5]}).combine(step_with({"pos": pos12, "neg": neg12},
                                                                                      x=x12), {})  # fmt: skip
    assert ours12.shape == pos12.shape
    padded = _paper_fdg_x0(x0_from_velocity(x12, pos12, 0.3), x0_from_velocity(x12, neg12, 0.3), (3.0, 1.5))
    torch.testing.assert_close(ours12, velocity_from_x0(x12, padded[..., :12, :12], 0.3), atol=2e-5, rtol=1e-5)


def test_fdg_config_errors():
    with pytest.raises(GuidanceConfigError, match="guidance.parallel_weights needs one weight per level"):
        build_guidance({"method": "fdg", "scales": [2.0, 1.0], "parallel_weights": [0.5]})
    with pytest.raises(GuidanceConfigError, match="guidance.scales must be a non-empty list"):
        build_guidance({"method": "fdg", "scales": 2.0})
    # the blur runs down to side >> (levels - 2): 8x8 has a 3-level pyramid (8, 4, 2; blurred at 8 and 4, as
    # kornia's), not a 4-level one (blurred at 2x2)
    assert [tuple(g.shape[-2:]) for g in laplacian_pyramid(torch.zeros(1, 1, 8, 8), 3)] == [(8, 8), (4, 4), (2, 2)]
    with pytest.raises(ValueError, match="blurs a 2x2 level.*fewer scales"):
        laplacian_pyramid(torch.zeros(1, 1, 8, 8), 4)
    with pytest.raises(ValueError, match="fewer scales"):
        laplacian_pyramid(torch.zeros(1, 1, 4, 4), 3)


# --- SLG / STG -------------------------------------------------------------------------------------
def _window_steps(window: StepWindow, n: int) -> list[int]:
    return [i for i in range(n) if window.contains(Step(i, 0.0, torch.zeros(1), torch.zeros(1), num_steps=n))]


@reference_bug()
def test_slg_window_is_sd35s_and_diffusers_drops_a_step():
    """SD3.5's sd3_impls.py: step > start * N and step < stop * N. docs/reference_bugs.md, SLG 2: diffusers'
    guider truncates int(stop * N) and loses the last step whenever stop * N is not an integer."""
    _diffusers()
    from diffusers.guiders import SkipLayerGuidance

    window = StepWindow(0.01, 0.2)  # SD3.5-medium
    assert _window_steps(window, 50) == list(range(1, 10))
    assert _window_steps(window, 28) == [1, 2, 3, 4, 5]  # 0.28 < i < 5.6
    ref = SkipLayerGuidance(guidance_scale=4.0, skip_layer_guidance_scale=2.5, skip_layer_guidance_layers=[7, 8, 9])
    enabled = []
    for i in range(28):
        ref.set_state(step=i, num_inference_steps=28, timestep=torch.tensor(0))
        enabled.append(ref._is_slg_enabled())
    assert [i for i, on in enumerate(enabled) if on] == [1, 2, 3, 4]
    assert _window_steps(StepWindow(-1.0, 1.0), 7) == list(range(7))  # STG: every step


def test_slg_combines_cfg_and_the_skipped_branch_on_its_window():
    g = build_guidance({"method": "slg", "scale": 2.0, "slg_scale": 3.0, "layers": [1, 3], "start": 0.2, "stop": 0.6})
    assert [b.name for b in g.branches] == ["pos", "neg", "perturbed"] and g.nfe == 3
    assert isinstance(g.branch("perturbed").perturbation.rectifier, SkipBlock)
    assert g.branch("perturbed").condition.kind == "cond"
    pos, neg, skipped = vec(1.0), vec(0.25), vec(0.5)
    inside = step_with({"pos": pos, "neg": neg, "perturbed": skipped}, index=3, num_steps=10)
    assert g.combine.needs(inside) == {"pos", "neg", "perturbed"}
    # neg + w (pos - neg) + s (pos - skipped) = 0.25 + 2 * 0.75 + 3 * 0.5
    assert g.combine(inside, {}).item() == pytest.approx(3.25)
    outside = step_with({"pos": pos, "neg": neg}, index=6, num_steps=10)  # 6 < 0.6 * 10 is false
    assert g.combine.needs(outside) == {"pos", "neg"} and g.combine(outside, {}).item() == pytest.approx(1.75)
    attention = build_guidance({"method": "slg", "skip": "attention", "layers": [1, 3]})
    assert isinstance(attention.branch("perturbed").perturbation.rectifier, Identity)  # STG-A = PAG's map
    with pytest.raises(GuidanceConfigError, match="guidance.skip must be one of"):
        build_guidance({"method": "slg", "skip": "heads"})
    with pytest.raises(GuidanceConfigError, match="start < guidance.stop"):
        build_guidance({"method": "slg", "start": 0.5, "stop": 0.2})


def _dit():
    return randomize(build_dit(depth=4, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=2,
                               num_classes=5)).eval()  # fmt: skip


def _dit_skipping(model, x, t, y, skip):
    """DiT's forward written out with SD3.5's `if i in skip_layers: continue`."""
    c = model.t_embedder(t * model.time_scale) + model.y_embedder(y)
    tokens = model.x_embedder(x) + model.pos_embed
    for i, block in enumerate(model.blocks):
        if i not in skip:
            tokens = block(tokens, c, model.grid)
    out = model.unpatchify(model.final_layer(tokens, c))
    return out[:, : model.in_channels]


def test_block_skip_on_dit_is_the_reference_skip_and_leaves_other_rows_alone():
    model = _dit()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 2, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([1, 3])
    x4, t4, y4 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y])
    plan = AttentionPlan.single(SkipBlock(), {1, 2}, rows=slice(2, 4))
    with torch.no_grad():
        out = model(x4, t4, y4, plan=plan)
        assert torch.equal(out[:2], model(x4, t4, y4)[:2])  # untouched rows: bit for bit
        torch.testing.assert_close(out[2:], _dit_skipping(model, x, t, y, {1, 2}), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[2:], out[:2], atol=1e-3)


def _mmdit():
    return randomize(build_mmdit(depth=3, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=4,
                                 context_dim=12, pooled_dim=6)).eval()  # fmt: skip


def _mmdit_skipping(model, x, t, context, pooled, skip):
    """MMDiT's forward with whole joint blocks skipped, both streams (SD3.5's mmditx.py)."""
    c = model.t_embedder(t * model.time_scale) + model.y_embedder(pooled)
    img, txt = model.x_embedder(x) + model.pos_embed, model.context_embedder(context)
    for i, block in enumerate(model.blocks):
        if i not in skip:
            img, txt = block(img, txt, c, model.grid)
    return model.unpatchify(model.final_layer(img, c))


@pytest.mark.parametrize("skip", [{0}, {1}, {2}, {0, 1}])
def test_block_skip_on_mmdit_keeps_both_streams_in_place(skip):
    """docs/reference_bugs.md, SLG 1: diffusers' block-skip hook returns SD3's two streams swapped; here a
    skipped joint block leaves image and text tokens where they were (the last block included)."""
    model = _mmdit()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g)
    ctx, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 6, generator=g)
    plan = AttentionPlan.single(SkipBlock(), skip, rows=slice(2, 4))
    with torch.no_grad():
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, ctx]), torch.cat([pooled, pooled]), plan=plan)
        torch.testing.assert_close(out[2:], _mmdit_skipping(model, x, t, ctx, pooled, skip), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:2], _mmdit_skipping(model, x, t, ctx, pooled, set()), atol=1e-5, rtol=1e-5)


def _tiny_sd3_transformer():
    _diffusers()
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                 pooled_projection_dim=6, out_channels=4, pos_embed_max_size=8).eval()  # fmt: skip


@reference_bug()
def test_reference_bug_diffusers_slg_layers_argument_fails():
    """docs/reference_bugs.md, SLG 3: `skip_layer_guidance_layers=[7, 8, 9]` (the docstring's recommendation)
    becomes one LayerSkipConfig per layer with an int `indices`, and the hook fails on `len(indices)` at the
    first skip-layer batch."""
    _diffusers()
    from diffusers.guiders import SkipLayerGuidance

    guider = SkipLayerGuidance(skip_layer_guidance_layers=[1], skip_layer_guidance_stop=1.0)
    assert [c.indices for c in guider.skip_layer_config] == [1]  # an int, not [1]
    guider.set_state(step=1, num_inference_steps=4, timestep=torch.tensor(0))
    tr = _tiny_sd3_transformer()
    guider.prepare_models(tr), guider.prepare_models(tr)  # cond, uncond
    with pytest.raises(TypeError, match="has no len"):
        guider.prepare_models(tr)  # the skip-layer batch
    assert build_guidance({"method": "slg", "layers": [7, 10]}).branch("perturbed").perturbation.layers == {7, 8, 9}


@reference_bug()
def test_reference_bug_diffusers_block_skip_hook_swaps_sd3_streams():
    _diffusers()
    from diffusers.hooks.layer_skip import LayerSkipConfig, _apply_layer_skip_hook

    tr = _tiny_sd3_transformer()
    x, ctx, pooled, t = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 12), torch.randn(1, 6), torch.tensor([500.0])
    block = tr.transformer_blocks[1]
    h, e, temb = torch.randn(1, 16, 16), torch.randn(1, 5, 16), torch.randn(1, 16)
    with torch.no_grad():
        assert [o.shape[1] for o in block(hidden_states=h, encoder_hidden_states=e, temb=temb)] == [5, 16]
        tr(x, ctx, pooled, t, return_dict=False, skip_layers=[1])  # the pipeline's own skip works
        _apply_layer_skip_hook(tr, LayerSkipConfig([1], fqn="auto"), name="slg")  # SkipLayerGuidance's default
        assert [o.shape[1] for o in block(hidden_states=h, encoder_hidden_states=e, temb=temb)] == [16, 5]  # swapped
        with pytest.raises(RuntimeError, match="invalid for input of size"):
            tr(x, ctx, pooled, t, return_dict=False)


# --- in the shared sampler -------------------------------------------------------------------------
class RowSpy(torch.nn.Module):
    """Delegates to a model; records the rows of every forward."""

    def __init__(self, model, block_skip: bool = True):
        super().__init__()
        self.model, self.rows = model, []
        self.num_attention_layers = model.num_attention_layers
        self.in_channels, self.input_size = model.in_channels, model.input_size
        self.supports_block_skip = block_skip

    def forward(self, x, t, plan=None, **inputs):
        self.rows.append(x.shape[0])
        return self.model(x, t, plan=plan, **inputs)


def _sampler(model, cfg, steps=5, **kw):
    from erg.conditioning import conditioning_for

    inner = model.model if isinstance(model, RowSpy) else model
    return GuidedSampler(build_guidance(cfg), {"main": model}, {"main": conditioning_for(inner)},
                         SamplerConfig(steps=steps, **kw))  # fmt: skip


LABELS = [0, 3]


def test_slg_in_the_sampler_one_forward_and_the_branch_only_on_its_window():
    spy = RowSpy(_dit())
    cfg = {"method": "slg", "scale": 2.0, "layers": [1, 3], "start": 0.2, "stop": 0.8}  # N = 5: steps 2 and 3
    s = _sampler(spy, cfg)
    s.sample_indices(range(2), LABELS)
    assert s.nfe_per_step == [2, 2, 3, 3, 2] and spy.rows == [4, 4, 6, 6, 4]  # one forward per step
    with pytest.raises(ValueError, match="guidance.skip=attention"):
        _sampler(RowSpy(_dit(), block_skip=False), cfg)
    attention = _sampler(RowSpy(_dit(), block_skip=False), {**cfg, "skip": "attention"})  # any seam model
    assert attention.sample_indices(range(2), LABELS).shape == (2, 2, 8, 8)


def test_slg_attention_mode_on_every_step_is_pag():
    model = _dit()
    slg = {"method": "slg", "scale": 2.0, "slg_scale": 1.5, "layers": [1, 3], "skip": "attention", "start": -1,
           "stop": 1}  # fmt: skip
    pag = {"method": "pag", "scale": 2.0, "pag_scale": 1.5, "layers": [1, 3]}
    assert torch.equal(_sampler(model, slg).sample_indices(range(2), LABELS),
                       _sampler(model, pag).sample_indices(range(2), LABELS))  # fmt: skip


def test_cfg_zero_star_evaluates_nothing_on_its_zero_init_steps():
    spy = RowSpy(_dit())
    s = _sampler(spy, {"method": "cfg_zero_star", "scale": 2.0, "zero_init_steps": 2})
    captured = []
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    out = s.sample(noise, LABELS, on_step=lambda step, v: captured.append((step.x.clone(), v.clone())))
    assert s.nfe_per_step == [0, 0, 2, 2, 2] and spy.rows == [4, 4, 4]
    assert torch.equal(captured[2][0], noise)  # the first two steps did not move the state
    assert torch.equal(captured[0][1], torch.zeros_like(noise)) and out.shape == noise.shape


def test_sit_channel_quirk_keeps_zero_init_steps_free_and_the_statistics_on_the_guided_channels():
    """guided_channels (the public SiT-XL/2's 3 of 4): CFG-Zero*'s zero-init steps still evaluate nothing and
    give a zero velocity; elsewhere every rule sees only the guided channels (s*, TCFG's SVD, MAMBO-G's ratio,
    APG's norm over them), the others take pos."""
    spy = RowSpy(_dit())
    s = _sampler(spy, {"method": "cfg_zero_star", "scale": 2.0, "zero_init_steps": 2, "guided_channels": 1})
    captured = []
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    s.sample(noise, LABELS, on_step=lambda step, v: captured.append(v.clone()))
    assert s.nfe_per_step == [0, 0, 2, 2, 2] and spy.rows == [4, 4, 4]
    assert torch.equal(captured[0], torch.zeros_like(noise)) and torch.equal(captured[1], torch.zeros_like(noise))

    for cfg in ({"method": "cfg_zero_star", "scale": 3.0}, {"method": "tcfg", "scale": 3.0},
                {"method": "mambo_g", "scale": 6.0, "alpha": 2.0},
                {"method": "cfg", "scale": 3.0, "apg": {"norm_threshold": 0.5}}):  # fmt: skip
        seen = []
        _sampler(_dit(), {**cfg, "guided_channels": 1}, steps=3).sample(
            noise, LABELS, on_step=lambda step, v, seen=seen: seen.append((step, v))
        )
        step, v = seen[1]  # a step after CFG-Zero*'s zero-init one
        preds = {k: p[:, :1] for k, p in step.preds.items()}
        alone = build_guidance(cfg)  # the rule on a one-channel model whose only channel is the guided one
        state = alone.combine.new_state()
        if "apg" in cfg:  # APG's momentum: replay the first step on its channel too
            first = seen[0][0]
            alone.combine(step_with({k: p[:, :1] for k, p in first.preds.items()}, t=first.time, x=first.x[:, :1],
                                    index=0, num_steps=3), state)  # fmt: skip
        expected = alone.combine(step_with(preds, t=step.time, x=step.x[:, :1], index=1, num_steps=3), state)
        torch.testing.assert_close(v[:, :1], expected, atol=1e-5, rtol=1e-5, msg=str(cfg))
        assert torch.equal(v[:, 1:], step.preds["pos"][:, 1:])
        everything = build_guidance(cfg).combine(step_with(dict(step.preds), t=step.time, x=step.x, index=1,
                                                           num_steps=3), {})  # fmt: skip
        assert (everything[:, :1] - expected).abs().max() > 1e-4, cfg  # statistics over all channels differ


def test_neutral_settings_of_the_new_guiders_reduce_to_cfg():
    model = _dit()
    run = lambda cfg: _sampler(model, cfg, steps=4).sample_indices(range(2), LABELS, base_seed=1)
    cfg = run({"method": "cfg", "scale": 2.0})
    assert torch.equal(run({"method": "slg", "scale": 2.0, "layers": [1, 3], "slg_scale": 0.0}), cfg)
    assert torch.equal(run({"method": "slg", "scale": 2.0, "layers": [1, 3], "start": 0.9, "stop": 1.0}), cfg)
    assert torch.equal(run({"method": "cfg", "scale": 2.0, "interval": [0.0, 1.0]}), cfg)
    for neutral in (
        {"method": "cfg_zero_star", "scale": 2.0, "zero_init_steps": 0, "optimized_scale": False},
        {"method": "fdg", "scales": [2.0, 2.0]},
        {"method": "mambo_g", "scale": 2.0, "alpha": 0.0},
    ):
        torch.testing.assert_close(run(neutral), cfg, atol=1e-5, rtol=1e-5)
    none = run({"method": "none"})
    for unguided in ({"method": "tcfg", "scale": 1.0}, {"method": "fdg", "scales": [1.0, 1.0]},
                     {"method": "mambo_g", "scale": 1.0}):  # fmt: skip
        assert torch.equal(run(unguided), none)


# --- the guidance interval -------------------------------------------------------------------------
def test_interval_in_our_time_from_the_papers_sigma():
    assert from_edm_sigma(0.0) == 1.0 and from_edm_sigma(float("inf")) == 0.0
    assert from_edm_sigma(1.0) == pytest.approx(0.5)  # x_t / t = x + ((1 - t) / t) eps
    interval = GuidanceInterval.from_sigma(0.28, 5.42)  # sigma in (0.28, 5.42]
    assert (interval.t_lo, interval.t_hi) == pytest.approx((1 / 6.42, 1 / 1.28))
    assert interval.contains(1 / 6.42) and not interval.contains(1 / 1.28)  # sigma_hi in, sigma_lo out
    # the authors' EDM2-XXL FID setting: steps 17..22 of their 32-step schedule (configs/guidance/cfg_interval.yaml)
    ramp = [(80 ** (1 / 7) + i / 31 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(32)]
    t = [from_edm_sigma(s) for s in ramp]
    window = GuidanceInterval(0.38, 0.78)
    assert [i for i in range(32) if window.contains(t[i])] == list(range(17, 23))  # the guided steps' starts
    # their Heun correction of step 22 (guided too: `i >= start and i <= stop`) evaluates at sigma_23 = 0.19, which
    # our Euler grid never visits in that window: the config is an approximation (erg/guidance/interval.py)
    assert ramp[23] == pytest.approx(0.189, abs=1e-3) and t[23] == pytest.approx(0.841, abs=1e-3)
    assert not window.contains(t[23])


@pytest.mark.parametrize(
    "cfg",
    [
        {"method": "cfg", "scale": 2.0},
        {"method": "cfg", "scale": 2.0, "apg": {}},
        {"method": "erg", "scale": 2.0, "image": {"layers": [1, 3], "kappa": 0.0}},
        {"method": "pag", "scale": 2.0, "layers": [1, 3]},
        {"method": "sag", "scale": 2.0, "layers": [1, 3], "blur_kernel": 3},
        {"method": "slg", "scale": 2.0, "layers": [1, 3], "start": -1, "stop": 1},
        {"method": "cfg_zero_star", "scale": 2.0, "zero_init_steps": 0},
        {"method": "fdg", "scales": [3.0, 1.5]},
        {"method": "tcfg", "scale": 2.0},
        {"method": "mambo_g", "scale": 3.0, "alpha": 1.0},
    ],
    ids=lambda c: c["method"] + ("+apg" if "apg" in c else ""),
)
def test_any_method_outside_its_interval_is_the_conditional_prediction_at_nfe_1(cfg):
    model = _dit()
    interval = [0.3, 0.7]  # steps at t = 0, 0.2, 0.4, 0.6, 0.8: guided at 0.4 and 0.6 only
    spy = RowSpy(model)
    s = _sampler(spy, {**cfg, "interval": interval})
    captured = []
    s.sample_indices(range(2), LABELS, on_step=lambda step, v: captured.append((dict(step.preds), v)))
    nfe = build_guidance(cfg).nfe
    assert s.nfe_per_step == [1, 1, nfe, nfe, 1]
    for i in (0, 1, 4):
        preds, v = captured[i]
        assert list(preds) == ["pos"] and torch.equal(v, preds["pos"])  # the conditional prediction alone
    # nowhere in the interval: the whole run is the unguided sampler, bit for bit
    never = _sampler(model, {**cfg, "interval": [0.9, 1.0]}).sample_indices(range(2), LABELS)
    assert torch.equal(never, _sampler(model, {"method": "none"}).sample_indices(range(2), LABELS))


def test_interval_config_errors_say_how_to_fix():
    with pytest.raises(GuidanceConfigError, match=r"t_lo = 1 / \(1 \+ sigma_hi\)"):
        build_guidance({"method": "cfg", "interval": 0.5})
    with pytest.raises(GuidanceConfigError, match="0 <= t_lo < t_hi <= 1"):
        build_guidance({"method": "cfg", "interval": [0.8, 0.2]})


# --- SEG: diffusers' hook swaps sigma = inf and finite, and its guider never attaches it --------------
@reference_bug()
def test_reference_bug_diffusers_seg_guider_never_attaches_its_hook():
    """docs/reference_bugs.md, SEG 2: SmoothedEnergyGuidance.prepare_models never counts its calls, so the
    condition `_count_prepared > 1` for the perturbed batch never holds: the "SEG" batch is the plain
    conditional prediction. SkipLayerGuidance, written the same way, counts and hooks."""
    _diffusers()
    from diffusers.guiders import SkipLayerGuidance, SmoothedEnergyGuidance
    from diffusers.hooks.layer_skip import LayerSkipConfig

    hooked = lambda model: [n for n, m in model.named_modules() if getattr(m, "_diffusers_hook", None) is not None]
    slg = SkipLayerGuidance(skip_layer_config=LayerSkipConfig([1], fqn="auto"), skip_layer_guidance_stop=1.0)
    for guider, expect in ((SmoothedEnergyGuidance(seg_guidance_layers=[1]), False), (slg, True)):
        tr = _tiny_sd3_transformer()
        guider.set_state(step=1, num_inference_steps=4, timestep=torch.tensor(0))
        for _ in range(guider.num_conditions):  # the pipeline prepares the model once per batch
            guider.prepare_models(tr)
        assert bool(hooked(tr)) is expect, type(guider).__name__
    assert SmoothedEnergyGuidance(seg_guidance_layers=[1])._count_prepared == 0
    # ours: the perturbed branch carries its rectifier explicitly, whatever the order of evaluation
    seg = build_guidance({"method": "seg", "layers": [1, 2]})
    assert isinstance(seg.branch("perturbed").perturbation.rectifier, SmoothedEnergy)


@reference_bug()
def test_reference_bug_diffusers_seg_swaps_infinite_and_finite_blur():
    """docs/reference_bugs.md, SEG 1: diffusers' `_gaussian_blur_2d` replaces the queries by their mean for a
    finite sigma and blurs them when sigma exceeds the "infinite" threshold; ours does the opposite, as SEG."""
    _diffusers()
    from diffusers.hooks.smoothed_energy_guidance_utils import _gaussian_blur_2d

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 4, generator=g) for _ in range(3))  # 2 heads, an 8 x 8 grid, head dim 4
    site = Site(layer=0, grid=(8, 8))
    flat = lambda z: z.permute(0, 2, 1, 3).reshape(1, 64, 8)  # (B, N, heads * d): to_q's layout
    heads = lambda z: z.view(1, 64, 2, 4).permute(0, 2, 1, 3)
    attend = lambda queries: F.scaled_dot_product_attention(queries, k, v)
    mean_q = q.mean(dim=2, keepdim=True).expand_as(q)
    ours_inf = SmoothedEnergy(float("inf"))(q, k, v, site)
    torch.testing.assert_close(ours_inf, attend(mean_q))  # SEG: sigma = inf is uniform attention
    diffusers_finite = heads(_gaussian_blur_2d(flat(q).clone(), 7, 1.0, 9999.9))  # sigma 1 < threshold
    torch.testing.assert_close(diffusers_finite, mean_q)  # ... yet diffusers takes the mean
    ours_blur = SmoothedEnergy(1.0)(q, k, v, site)
    forced = heads(_gaussian_blur_2d(flat(q).clone(), 7, 1.0, 0.5))  # the "infinite" branch: a Gaussian blur
    torch.testing.assert_close(ours_blur, attend(forced), atol=1e-5, rtol=1e-5)
    assert (ours_blur - ours_inf).abs().max() > 1e-3
