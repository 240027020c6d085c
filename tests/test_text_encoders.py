"""Text encoders: tiny random T5 / Llama / CLIP / BERT saved to local folders (no download), the real
MiniLM from its package, and the stack that feeds the MMDiT (layouts, per-encoder dropout, null input)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hydra.utils import instantiate  # noqa: E402

from models.mmdit import build_mmdit  # noqa: E402
from models.runtime import check_kwargs, target_of  # noqa: E402
from models.text_encoders import (  # noqa: E402
    BertTextEncoder,
    CLIPTextEncoder,
    LlamaTextEncoder,
    T5TextEncoder,
    TextCondition,
    TextConditioner,
    minilm,
    minilm_path,
)
from tests.conftest import CONFIGS, compose  # noqa: E402

VOCAB = 30522  # the tiny models use MiniLM's BERT tokenizer (the only tokenizer available offline)
PROMPTS = ["a handwritten seven", "the digit zero, drawn thick and slanted", ""]


def _tiny_config(family: str):
    common = dict(vocab_size=VOCAB, num_attention_heads=4, pad_token_id=0)
    if family == "t5":
        return transformers.T5Config(d_model=24, d_kv=6, d_ff=48, num_layers=3, num_heads=4, vocab_size=VOCAB,
                                     pad_token_id=0, decoder_start_token_id=0)  # fmt: skip
    if family == "llama":
        return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_key_value_heads=2, **common)  # fmt: skip
    if family == "clip":
        return transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           projection_dim=20, bos_token_id=101, eos_token_id=102, **common)  # fmt: skip
    return transformers.BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, **common)


FAMILIES = {
    "t5": (T5TextEncoder, transformers.T5EncoderModel),
    "llama": (LlamaTextEncoder, transformers.LlamaModel),
    "clip": (CLIPTextEncoder, transformers.CLIPTextModelWithProjection),
    "bert": (BertTextEncoder, transformers.BertModel),
}


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """family -> a local folder with a tiny random model and a tokenizer, as save_pretrained writes them."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    folders = {}
    for family, (_, model_cls) in FAMILIES.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(family)
        model_cls(_tiny_config(family)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[family] = folder
    return folders


def load(tiny_folders, family: str, **kwargs):
    kwargs.setdefault("max_length", 16)
    kwargs.setdefault("device", "cpu")
    return FAMILIES[family][0].load(str(tiny_folders[family]), **kwargs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_loads_locally_and_encodes(tiny_folders, family):
    enc = load(tiny_folders, family)
    out = enc(PROMPTS)
    d = {"t5": 24, "llama": 32, "clip": 32, "bert": 16}[family]
    assert enc.hidden_size == d and out.tokens.shape == (3, 16, d)
    assert out.pooled.shape == (3, enc.pooled_size) and enc.pooled_size == (20 if family == "clip" else d)
    real = [len(enc.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert out.mask.sum(1).tolist() == real  # the mask marks the real tokens
    again = enc(PROMPTS)
    assert torch.equal(out.tokens, again.tokens) and torch.equal(out.pooled, again.pooled)
    # Frozen: no gradients, eval mode even when a parent module is put in training mode.
    assert not any(p.requires_grad for p in enc.parameters())
    parent = torch.nn.ModuleList([enc]).train()
    assert parent.training and not enc.training and not enc.model.training
    assert torch.equal(enc(PROMPTS).tokens, out.tokens)  # no dropout


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_padding_never_changes_the_real_tokens_or_the_pooled_vector(tiny_folders, family):
    """Padding is masked (T5, BERT, Llama) or causally invisible (CLIP, Llama): more padding, same encoding."""
    short, long = load(tiny_folders, family, max_length=12), load(tiny_folders, family, max_length=20)
    a, b = short(PROMPTS), long(PROMPTS)
    for i, n in enumerate(a.mask.sum(1).tolist()):
        torch.testing.assert_close(a.tokens[i, :n], b.tokens[i, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_equals_one_by_one(tiny_folders, family):
    enc = load(tiny_folders, family)
    batched = enc(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        single = enc([prompt])
        torch.testing.assert_close(single.tokens[0], batched.tokens[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(single.pooled[0], batched.pooled[i], atol=1e-5, rtol=1e-5)


def test_outputs_are_the_documented_ones(tiny_folders):
    """Pooled = mean over real tokens (written as a loop here); CLIP: penultimate layer + projected EOS."""
    for family in ("t5", "llama", "bert"):
        enc = load(tiny_folders, family)
        out = enc(PROMPTS)
        for i, n in enumerate(out.mask.sum(1).tolist()):
            mean = out.tokens[i, :n].mean(0)
            expected = mean / mean.norm() if family == "bert" else mean  # MiniLM-style normalisation
            torch.testing.assert_close(out.pooled[i], expected, atol=1e-5, rtol=1e-5)
    clip = load(tiny_folders, "clip", hidden_layer=-2)
    ids, _ = clip.tokenize(PROMPTS)
    with torch.no_grad():
        ref = clip.model(input_ids=ids, output_hidden_states=True)
    out = clip(PROMPTS)
    torch.testing.assert_close(out.tokens, ref.hidden_states[-2])
    eos = (ids == 102).int().argmax(1)  # first end-of-text token of each row
    final = clip.model.text_model.final_layer_norm(ref.hidden_states[-1])
    torch.testing.assert_close(out.pooled, clip.model.text_projection(final[torch.arange(3), eos]))
    with pytest.raises(ValueError, match="has 3 layers"):
        load(tiny_folders, "t5", hidden_layer=7)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layers_and_query_projections_are_exposed_for_c_erg(tiny_folders, family):
    enc = load(tiny_folders, family)
    assert enc.num_layers == 3 and enc.layer_range(0, 3) == range(0, 3)
    calls = []
    handles = [
        enc.query_projection(i).register_forward_hook(lambda m, inp, out, i=i: calls.append(i)) for i in range(3)
    ]
    try:
        enc(PROMPTS[:1])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1, 2]  # each layer's query projection runs once, in order
    assert all(isinstance(enc.query_projection(i), torch.nn.Linear) for i in range(3))
    assert enc.query_projection(1) in list(enc.self_attention(1).modules())
    with pytest.raises(ValueError, match=r"layers \[1, 5\) do not fit"):
        enc.layer_range(1, 5)
    notes = enc.attention_notes
    if family == "t5":
        assert "NO 1/sqrt(d)" in notes and "position bias" in notes
    if family == "llama":
        assert "RoPE" in notes and "Grouped-query" in notes


def test_missing_weights_name_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"at {tmp_path / 'flan-t5-xl'}.*google/flan-t5-xl"):
        T5TextEncoder.load(str(tmp_path / "flan-t5-xl"), max_length=8, device="cpu")
    cfg = compose(overrides=["text_encoder=llama3_t5"])
    with pytest.raises(Exception, match="Meta-Llama-3-8B"):
        instantiate(cfg.text_encoder)


def test_real_minilm_one_embedding(monkeypatch):
    """all-MiniLM-L6-v2 from its package: shape, determinism, and sentence-transformers' embedding."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = minilm(max_length=32, device="cpu")
    out = enc(["a handwritten seven"])
    assert out.tokens.shape == (1, 32, 384) and out.pooled.shape == (1, 384) and enc.num_layers == 6
    assert torch.equal(enc(["a handwritten seven"]).pooled, out.pooled)
    torch.testing.assert_close(out.pooled.norm(dim=1), torch.ones(1))
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(
        ["a handwritten seven"], convert_to_tensor=True
    )
    torch.testing.assert_close(out.pooled, reference, atol=1e-5, rtol=1e-4)


# --- the stack ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tiny_folders):
    """Two encoders of different widths, as the paper's Llama3 + T5 (here 32 + 24 channels)."""
    return {"llama": load(tiny_folders, "llama", max_length=10), "t5": load(tiny_folders, "t5", max_length=6)}


def test_separate_layout_gives_each_encoder_its_own_channels(pair):
    cond = TextConditioner(pair)
    assert (cond.context_dim, cond.pooled_dim, cond.context_tokens) == (56, 56, 16)
    out = cond(PROMPTS)
    llama, t5 = pair["llama"](PROMPTS), pair["t5"](PROMPTS)
    assert out.context.shape == (3, 16, 56) and out.pooled.shape == (3, 56) and out.mask.shape == (3, 16)
    assert torch.equal(out.context[:, :10, :32], llama.tokens) and not out.context[:, :10, 32:].any()
    assert torch.equal(out.context[:, 10:, 32:], t5.tokens) and not out.context[:, 10:, :32].any()
    assert torch.equal(out.pooled, torch.cat([llama.pooled, t5.pooled], 1))
    assert torch.equal(out.mask, torch.cat([llama.mask, t5.mask], 1))
    # so MMDiT's context_embedder applies a separate linear map per encoder:
    proj = torch.nn.Linear(56, 8)
    torch.testing.assert_close(proj(out.context)[:, 10:], t5.tokens @ proj.weight[:, 32:].T + proj.bias)


def test_padded_layout_and_pooled_selection(pair):
    cond = TextConditioner(pair, layout="padded", pooled_from=["llama"])
    out = cond(PROMPTS)
    assert (cond.context_dim, cond.pooled_dim) == (32, 32) and out.context.shape == (3, 16, 32)
    assert torch.equal(out.context[:, 10:, :24], pair["t5"](PROMPTS).tokens) and not out.context[:, 10:, 24:].any()
    assert torch.equal(out.pooled, pair["llama"](PROMPTS).pooled)
    assert TextConditioner(pair, pooled_from=[]).pooled_dim == 0
    assert TextConditioner(pair, pooled_from=[])(PROMPTS).pooled is None


def test_dropped_rows_are_the_empty_prompt_encoding(pair):
    cond = TextConditioner(pair)
    plain = cond(PROMPTS)
    drop = {"llama": torch.tensor([True, False, False]), "t5": torch.tensor([True, True, False])}
    out = cond(PROMPTS, drop=drop)
    empty = cond([""] * 3)
    empty_alone = cond([""])  # computed as the null encoding is (batch of 1): bit-identical
    torch.testing.assert_close(empty.context, empty_alone.context.expand(3, -1, -1), atol=1e-6, rtol=1e-6)
    empty = TextCondition(empty_alone.context.expand(3, -1, -1), empty_alone.pooled.expand(3, -1), empty.mask)
    llama, t5 = slice(0, 10), slice(10, 16)
    assert torch.equal(out.context[0], empty.context[0]) and torch.equal(out.pooled[0], empty.pooled[0])
    assert torch.equal(out.context[1, llama], plain.context[1, llama])
    assert torch.equal(out.context[1, t5], empty.context[1, t5])
    assert torch.equal(out.pooled[1, :32], plain.pooled[1, :32])
    assert torch.equal(out.pooled[1, 32:], empty.pooled[1, 32:])
    assert torch.equal(out.context[2], plain.context[2]) and torch.equal(out.mask[1, t5], empty.mask[1, t5])
    uncond = cond.unconditional(3)
    assert torch.equal(uncond.context, empty.context) and torch.equal(uncond.pooled, empty.pooled)
    zeros = TextConditioner(pair, null_input="zeros")
    out = zeros(PROMPTS, drop=drop)
    assert not out.context[1, t5].any() and not out.pooled[1, 32:].any()
    assert torch.equal(out.context[1, llama], plain.context[1, llama])
    assert not zeros.unconditional(2).context.any()


def test_dropout_rates_are_sqrt_point_one_each_and_point_one_both(pair):
    cond = TextConditioner(pair)
    assert cond.drop_prob == pytest.approx(math.sqrt(0.1))
    n = 40_000
    mask = cond.drop_mask(n, torch.Generator().manual_seed(0))
    sigma = math.sqrt(0.1 * 0.9 / n)  # binomial standard error of the 10% rate
    for name in ("llama", "t5"):
        assert abs(mask[name].float().mean().item() - math.sqrt(0.1)) < 0.01
    both = (mask["llama"] & mask["t5"]).float().mean().item()
    assert abs(both - 0.1) < 4 * sigma
    again = cond.drop_mask(n, torch.Generator().manual_seed(0))
    assert all(torch.equal(mask[k], again[k]) for k in mask)  # reproducible from the generator
    assert not TextConditioner(pair, drop_prob=0.0).drop_mask(100)["t5"].any()


def test_conditions_batch_and_feed_the_mmdit(pair):
    cond = TextConditioner(pair)
    c = cond(PROMPTS)
    both = TextCondition.cat([c, cond.unconditional(3)])
    assert len(both) == 6 and torch.equal(both.rows(slice(0, 3)).context, c.context)
    wide = both.to(torch.float64)
    assert wide.context.dtype == wide.pooled.dtype == torch.float64 and wide.mask.dtype == torch.bool
    model = build_mmdit(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=4,
                        context_dim=cond.context_dim, pooled_dim=cond.pooled_dim)  # fmt: skip
    v = model(torch.randn(6, 4, 8, 8), torch.rand(6), both.context, both.pooled)
    assert v.shape == (6, 4, 8, 8)


def test_bad_stack_arguments(pair):
    with pytest.raises(ValueError, match=r"drop_prob must be in \[0, 1\)"):
        TextConditioner(pair, drop_prob=1.0)
    with pytest.raises(ValueError, match="null_input must be"):
        TextConditioner(pair, null_input="noise")
    with pytest.raises(ValueError, match="layout must be"):
        TextConditioner(pair, layout="interleaved")
    with pytest.raises(ValueError, match="unknown encoders"):
        TextConditioner(pair, pooled_from=["clip"])
    cond = TextConditioner(pair)
    with pytest.raises(ValueError, match="unknown encoders"):
        cond(PROMPTS, drop={"clip": torch.zeros(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"must have shape \(3,\)"):
        cond(PROMPTS, drop={"t5": torch.zeros(2, dtype=torch.bool)})
    with pytest.raises(TypeError, match="single string"):
        cond("a seven")


# --- configs -----------------------------------------------------------------------------------------
STACKS = sorted(p.stem for p in (CONFIGS / "text_encoder").glob("*.yaml"))


@pytest.mark.parametrize("stack", STACKS)
def test_every_text_encoder_config_composes_with_valid_keys(stack):
    cfg = compose(overrides=[f"text_encoder={stack}"]).text_encoder
    check_kwargs(cfg, target_of(cfg), "text_encoder")
    assert cfg.encoders
    for name, node in cfg.encoders.items():
        target = target_of(node)
        check_kwargs(node, getattr(target, "__func__", target), f"text_encoder.encoders.{name}")


def test_the_papers_stack_from_local_folders(tiny_folders, monkeypatch):
    """`text_encoder=llama3_t5` with its paths pointed at local folders builds the stack; the MiniLM config
    runs the real model with no download."""
    tiny = [
        "text_encoder=llama3_t5", f"text_encoder.encoders.llama3_8b.path={tiny_folders['llama']}",
        f"text_encoder.encoders.flan_t5_xl.path={tiny_folders['t5']}", "text_encoder.encoders.llama3_8b.max_length=8",
        "text_encoder.encoders.flan_t5_xl.max_length=8",
    ]  # fmt: skip
    # the config declares the real models' widths (6144), which the model config reads: tiny models differ
    with pytest.raises(Exception, match=r"text_encoder.context_dim=6144 but its encoders give 56"):
        instantiate(compose(overrides=tiny).text_encoder)
    cfg = compose(overrides=[*tiny, "text_encoder.context_dim=null", "text_encoder.pooled_dim=null"])
    cond = instantiate(cfg.text_encoder)
    assert list(cond.encoders) == ["llama3_8b", "flan_t5_xl"] and cond.context_dim == 32 + 24
    assert cond.drop_prob == pytest.approx(math.sqrt(0.1)) and cond(PROMPTS).context.shape == (3, 16, 56)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    quick = instantiate(compose(overrides=["text_encoder=minilm"]).text_encoder)
    assert (quick.context_dim, quick.pooled_dim, quick.context_tokens) == (384, 384, 32)


@pytest.mark.gpu
def test_encoders_run_in_bf16_on_the_gpu(tiny_folders):
    """dtype=auto on a GPU: bf16 weights and outputs, close to the float32 CPU encoding."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gpu, cpu = load(tiny_folders, "t5", device="cuda"), load(tiny_folders, "t5")
    assert gpu.dtype == torch.bfloat16 and cpu.dtype == torch.float32
    out = gpu(PROMPTS)
    assert out.tokens.dtype == torch.bfloat16
    torch.testing.assert_close(out.tokens.float().cpu(), cpu(PROMPTS).tokens, atol=0.1, rtol=0.05)
