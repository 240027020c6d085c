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


# --- C-ERG on T5: the content term (Listing 1) or the whole logit, relative position bias included ---------
def tiny_t5(attn: str):
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=4, num_heads=2,
                                   dropout_rate=0.0, relative_attention_num_buckets=8)  # fmt: skip
    config._attn_implementation = attn
    model = transformers.T5EncoderModel(config).eval()
    with torch.no_grad():  # a bias large enough to matter next to the content term
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(20.0)
    return model


def manual_t5(model, ids, mask, tau, layers, scope):
    """T5's encoder written out (eager): logits = q k^T + b (no 1/sqrt(d)) + padding mask; in blocks
    [l_min, l_max) tau multiplies q k^T ("query", Listing 1) or q k^T + b ("logits")."""
    enc = model.encoder
    h = enc.embed_tokens(ids)
    B, L, _ = h.shape
    b = enc.block[0].layer[0].SelfAttention.compute_bias(L, L)  # (1, heads, L, L), shared by every block
    pad = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i, block in enumerate(enc.block):
        sa = block.layer[0].SelfAttention
        x = block.layer[0].layer_norm(h)
        q, k, v = (lin(x).view(B, L, sa.n_heads, sa.key_value_proj_dim).transpose(1, 2) for lin in (sa.q, sa.k, sa.v))
        content = q @ k.transpose(-1, -2)
        inside = layers[0] <= i < layers[1]
        if inside and scope == "query":
            logits = tau * content + b
        elif inside:
            logits = tau * (content + b)
        else:
            logits = content + b
        w = torch.softmax((logits + pad).float(), dim=-1)
        h = h + sa.o((w @ v).transpose(1, 2).reshape(B, L, -1))
        ff = block.layer[-1]
        h = h + ff.DenseReluDense(ff.layer_norm(h))
    return enc.final_layer_norm(h)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("scope", ["query", "logits"])
def test_t5_temperature_matches_a_manual_forward(attn, scope):
    t5 = tiny_t5(attn)
    ids = torch.randint(1, 40, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding in the second prompt
    with torch.no_grad():
        plain = t5(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(plain, manual_t5(t5, ids, mask, 1.0, (0, 0), scope), atol=1e-5, rtol=1e-5)
        with AttentionTemperature(t5, tau=0.1, layers=(1, 3), scope=scope) as ctx:  # not block 0, not block 3
            hooked = t5(input_ids=ids, attention_mask=mask).last_hidden_state
            assert len(ctx.hooks) == (2 if scope == "query" else 6) and "scope=" + scope in repr(ctx)
        torch.testing.assert_close(hooked, manual_t5(t5, ids, mask, 0.1, (1, 3), scope), atol=1e-5, rtol=1e-5)
        # block 0 computes the bias: scaling it there must not leak into the blocks after the range
        with AttentionTemperature(t5, tau=0.1, layers=(0, 1), scope=scope):
            first = t5(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(first, manual_t5(t5, ids, mask, 0.1, (0, 1), scope), atol=1e-5, rtol=1e-5)
        assert _hooks(t5) == 0
        assert torch.equal(t5(input_ids=ids, attention_mask=mask).last_hidden_state, plain)


def test_the_two_scopes_differ_on_t5_and_agree_where_the_logits_have_no_bias(tokens):
    t5 = tiny_t5("eager")
    ids = torch.randint(1, 40, (2, 7), generator=torch.Generator().manual_seed(4))
    out = {}
    with torch.no_grad():
        for scope in ("query", "logits"):
            with AttentionTemperature(t5, tau=0.01, layers=(0, 4), scope=scope):
                out[scope] = t5(input_ids=ids).last_hidden_state
        assert (out["query"] - out["logits"]).abs().max() > 1e-2
        plain = t5(input_ids=ids).last_hidden_state
        with AttentionTemperature(t5, tau=1.0, layers=(0, 4), scope="logits"):  # tau = 1: exactly plain
            assert torch.equal(t5(input_ids=ids).last_hidden_state, plain)
        bert = tiny_bert()  # no additive bias: the whole logit is the content term
        with AttentionTemperature(bert, 0.2, (0, 2), scope="query"):
            query = bert(**tokens).last_hidden_state
        with AttentionTemperature(bert, 0.2, (0, 2), scope="logits") as ctx:
            logits = bert(**tokens).last_hidden_state
            assert len(ctx.hooks) == 2
        assert torch.equal(query, logits)
    with pytest.raises(ValueError, match="scope of t5 must be one of"):
        AttentionTemperature(t5, 0.1, (0, 1), name="t5", scope="bias")


def test_the_scope_reaches_the_encoders_from_the_config():
    from erg.conditioning import Prompts
    from erg.guidance import GuidanceConfigError, build_guidance

    cfg = {"method": "erg", "image": None, "text": {"tau": 0.1, "layers": {"t5": [0, 4]}}}
    assert build_guidance(cfg).branch("neg").condition.text.scope == "query"  # Listing 1 by default
    whole = build_guidance({**cfg, "text": {**cfg["text"], "scope": "logits"}}).branch("neg").condition
    assert whole.text.scope == "logits"
    with pytest.raises(GuidanceConfigError, match="guidance.text.scope must be one of query, logits"):
        build_guidance({**cfg, "text": {**cfg["text"], "scope": "all"}})
    t5 = tiny_t5("eager")
    ids = torch.randint(1, 40, (2, 5), generator=torch.Generator().manual_seed(5))
    cond = Prompts(lambda prompts: {"context": t5(input_ids=ids[: len(prompts)]).last_hidden_state}, {"t5": t5})
    with torch.no_grad():
        weak = cond.encode(["a", "b"], whole)["context"]
        with AttentionTemperature(t5, 0.1, (0, 4), scope="logits"):
            expected = t5(input_ids=ids).last_hidden_state
    assert torch.equal(weak, expected)


# --- C-ERG on UMT5 (Wan's encoder): every block computes its own relative position bias --------------------
def tiny_umt5(attn: str):
    torch.manual_seed(0)
    config = transformers.UMT5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=4, num_heads=2,
                                     dropout_rate=0.0, relative_attention_num_buckets=8)  # fmt: skip
    config._attn_implementation = attn
    model = transformers.UMT5EncoderModel(config).eval()
    with torch.no_grad():  # biases large enough to matter next to the content term
        for block in model.encoder.block:
            block.layer[0].SelfAttention.relative_attention_bias.weight.mul_(20.0)
    return model


def manual_umt5(model, ids, mask, tau, layers, scope):
    """UMT5's encoder written out: as `manual_t5`, but block i adds its own bias b_i (its own embedding)."""
    enc = model.encoder
    h = enc.embed_tokens(ids)
    B, L, _ = h.shape
    pad = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i, block in enumerate(enc.block):
        sa = block.layer[0].SelfAttention
        b = sa.compute_bias(L, L)
        x = block.layer[0].layer_norm(h)
        q, k, v = (lin(x).view(B, L, sa.n_heads, sa.key_value_proj_dim).transpose(1, 2) for lin in (sa.q, sa.k, sa.v))
        content = q @ k.transpose(-1, -2)
        inside = layers[0] <= i < layers[1]
        logits = (tau * content + b if scope == "query" else tau * (content + b)) if inside else content + b
        w = torch.softmax((logits + pad).float(), dim=-1)
        h = h + sa.o((w @ v).transpose(1, 2).reshape(B, L, -1))
        ff = block.layer[-1]
        h = h + ff.DenseReluDense(ff.layer_norm(h))
    return enc.final_layer_norm(h)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("scope", ["query", "logits"])
def test_umt5_temperature_matches_a_manual_forward(attn, scope):
    """UMT5 takes no position_bias argument (it computes one per block): scope='logits' scales each block's own."""
    umt5 = tiny_umt5(attn)
    ids = torch.randint(1, 40, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        plain = umt5(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(plain, manual_umt5(umt5, ids, mask, 1.0, (0, 0), scope), atol=1e-5, rtol=1e-5)
        with AttentionTemperature(umt5, tau=0.1, layers=(1, 3), scope=scope) as ctx:
            hooked = umt5(input_ids=ids, attention_mask=mask).last_hidden_state
            assert len(ctx.hooks) == (2 if scope == "query" else 4)
        torch.testing.assert_close(hooked, manual_umt5(umt5, ids, mask, 0.1, (1, 3), scope), atol=1e-5, rtol=1e-5)
        assert _hooks(umt5) == 0
        assert torch.equal(umt5(input_ids=ids, attention_mask=mask).last_hidden_state, plain)
