"""C-ERG's reversible temperature on text-encoder attention, on tiny random transformers encoders."""

from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from erg.text_attention import AttentionTemperature  # noqa: E402


def tiny_bert(attn: str = "sdpa"):
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding in the second prompt
    return {"input_ids": ids, "attention_mask": mask}


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_tau_one_is_bit_exact_and_hooks_are_named_then_gone(tokens):
    bert = tiny_bert()
    plain = bert(**tokens).last_hidden_state
    ctx = AttentionTemperature(bert, tau=1.0, layers=(0, 3), name="bert")
    with ctx:
        assert _hooks(bert) == 3
        assert list(ctx.hooks) == [f"encoder.layer.{i}.attention.self.query" for i in range(3)]
        assert "active on" in repr(ctx)
        same = bert(**tokens).last_hidden_state
    assert torch.equal(same, plain)
    assert _hooks(bert) == 0 and "inactive" in repr(ctx)


def test_temperature_scales_the_logits_of_the_chosen_layers_only(tokens):
    """Manual forward: the attention probabilities of layer 1 are softmax(tau q k^T / sqrt(d) + mask),
    computed by hand from that layer's input; layers 0 and 2 keep tau = 1 on their own inputs."""
    bert = tiny_bert(attn="eager")
    tau = 0.3
    plain = bert(**tokens, output_hidden_states=True)
    with AttentionTemperature(bert, tau=tau, layers=(1, 2)):
        out = bert(**tokens, output_attentions=True, output_hidden_states=True)
    # layer 0 sees the same input as the plain forward and is not rectified
    torch.testing.assert_close(out.hidden_states[1], plain.hidden_states[1])
    assert not torch.allclose(out.last_hidden_state, plain.last_hidden_state)
    mask = (1.0 - tokens["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
    for layer, scale in ((0, 1.0), (1, tau), (2, 1.0)):
        attn = bert.encoder.layer[layer].attention.self
        h = out.hidden_states[layer]  # input of this layer in the rectified forward

        def heads(x):
            return x.view(2, 7, 2, 8).transpose(1, 2)

        q, k = heads(attn.query(h)), heads(attn.key(h))
        probs = torch.softmax(scale * (q @ k.transpose(-1, -2)) / math.sqrt(8) + mask, dim=-1)
        torch.testing.assert_close(out.attentions[layer], probs, atol=1e-6, rtol=1e-5)


def test_equals_scaling_the_query_weights(tokens):
    """An independent construction: multiplying the query projection's weight and bias by tau."""
    bert = tiny_bert()
    scaled = copy.deepcopy(bert)
    with torch.no_grad():
        for i in (0, 1):
            scaled.encoder.layer[i].attention.self.query.weight.mul_(0.1)
            scaled.encoder.layer[i].attention.self.query.bias.mul_(0.1)
    with AttentionTemperature(bert, tau=0.1, layers=[0, 2]):
        hooked = bert(**tokens).last_hidden_state
    torch.testing.assert_close(hooked, scaled(**tokens).last_hidden_state)


def _check_layout(model, inputs, scale_in_copy):
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scale_in_copy(scaled)
    with AttentionTemperature(model, tau=0.2, layers=(0, 2)) as ctx:
        hooked = model(**inputs).last_hidden_state
    assert len(ctx.targets) == 2 and _hooks(model) == 0
    torch.testing.assert_close(hooked, scaled(**inputs).last_hidden_state)


def test_t5_llama_clip_layouts_hook_the_query_projection():
    ids = {"input_ids": torch.randint(1, 40, (2, 5), generator=torch.Generator().manual_seed(1))}
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(
        transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0)
    ).eval()
    _check_layout(t5, ids, lambda m: [m.encoder.block[i].layer[0].SelfAttention.q.weight.mul_(0.2) for i in (0, 1)])
    llama = transformers.LlamaModel(
        transformers.LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1,
        )
    ).eval()  # fmt: skip
    _check_layout(llama, ids, lambda m: [m.layers[i].self_attn.q_proj.weight.mul_(0.2) for i in (0, 1)])
    clip = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    ).eval()  # fmt: skip
    layers = AttentionTemperature(clip, 0.2, (0, 2)).blocks_path

    def scale_clip(m):
        for i in (0, 1):
            q = (m.text_model.encoder if layers.startswith("text_model") else m.encoder).layers[i].self_attn.q_proj
            q.weight.mul_(0.2)
            q.bias.mul_(0.2)

    _check_layout(clip, ids, scale_clip)


def test_qk_norm_architectures_scale_the_normalised_query():
    """Qwen3 normalises q after its projection: a hook on q_proj would be undone, so the layout hooks q_norm."""
    if not hasattr(transformers, "Qwen3Config"):
        pytest.skip("this transformers has no Qwen3")
    ids = {"input_ids": torch.randint(1, 40, (2, 5), generator=torch.Generator().manual_seed(1))}
    torch.manual_seed(0)
    qwen = transformers.Qwen3Model(
        transformers.Qwen3Config(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        )
    ).eval()  # fmt: skip
    _check_layout(qwen, ids, lambda m: [m.layers[i].self_attn.q_norm.weight.mul_(0.2) for i in (0, 1)])


def test_bad_settings_are_clear_errors(tokens):
    bert = tiny_bert()
    with pytest.raises(ValueError, match=r"layers \[2, 5\) of bert are not a range inside its 3 blocks"):
        AttentionTemperature(bert, 0.1, (2, 5), name="bert")
    with pytest.raises(ValueError, match="l_min < l_max"):
        AttentionTemperature(bert, 0.1, (2, 2))
    with pytest.raises(ValueError, match="tau_c must be > 0"):
        AttentionTemperature(bert, 0.0, (0, 1))
    with pytest.raises(ValueError, match="no attention layout known"):
        AttentionTemperature(torch.nn.Linear(2, 2), 0.1, (0, 1))


def test_hooks_are_removed_when_the_body_raises(tokens):
    bert = tiny_bert()
    with pytest.raises(RuntimeError, match="boom"), AttentionTemperature(bert, 0.5, (0, 3)):
        raise RuntimeError("boom")
    assert _hooks(bert) == 0


def test_prompt_conditioning_encodes_c_erg_under_the_temperature():
    from erg.conditioning import Prompts
    from erg.guidance.base import NULL, RECTIFIED, Condition, TextTemperature

    bert = tiny_bert()

    def encode(prompts):  # a stand-in tokenizer: characters -> ids, padded to 6
        ids = torch.zeros(len(prompts), 6, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            codes = [ord(c) % 38 + 1 for c in p[:6]] or [1]
            ids[i, : len(codes)], mask[i, : len(codes)] = torch.tensor(codes), 1
        return {"context": bert(input_ids=ids, attention_mask=mask).last_hidden_state}

    cond = Prompts(encode, {"bert": bert})
    prompts = ["a cat", "two dogs"]
    assert torch.equal(cond.encode(prompts, Condition())["context"], encode(prompts)["context"])
    assert torch.equal(cond.encode(prompts, Condition(NULL))["context"], encode(["", ""])["context"])
    text = TextTemperature(0.1, (("bert", (0, 2)),))
    weak = cond.encode(prompts, Condition(RECTIFIED, text=text))["context"]
    with AttentionTemperature(bert, 0.1, (0, 2)):
        expected = encode(prompts)["context"]
    assert torch.equal(weak, expected) and not torch.allclose(weak, encode(prompts)["context"])
    assert _hooks(bert) == 0
    with pytest.raises(ValueError, match=r"names text encoder 't5'; this model's encoders are \['bert'\]"):
        cond.encode(prompts, Condition(RECTIFIED, text=TextTemperature(0.1, (("t5", (0, 2)),))))
