"""The MMDiT family: sizes, SD3 equivalence, joint attention segments, the attention plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from erg.attention import AttentionPlan, Rectifier, Site, Temperature
from models.dit import count_parameters
from models.mmdit import MMDIT_PRESETS, MMDiT, MMDiTBlock, build_mmdit, mmdit_flops_per_forward, mmdit_preset
from tests.conftest import compose, randomize

TINY = dict(
    depth=3, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=4, context_dim=12, pooled_dim=6
)


@pytest.fixture
def tiny_mmdit():
    return randomize(build_mmdit(**TINY)).eval()


def inputs(batch: int = 4, tokens: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.rand(batch, generator=g)
    context = torch.randn(batch, tokens, 12, generator=g)
    pooled = torch.randn(batch, 6, generator=g)
    return x, t, context, pooled


def expected_parameters(depth, hidden_size, num_heads, patch_size, in_channels, context_dim, pooled_dim, mlp_ratio=4):
    """Parameter count of an SD3-style MMDiT written out from the architecture description."""
    d, hd, m = hidden_size, hidden_size // num_heads, int(hidden_size * mlp_ratio)
    linear = lambda i, o: i * o + o
    full_stream = linear(d, 6 * d) + linear(d, 3 * d) + 2 * hd + linear(d, d) + linear(d, m) + linear(m, d)
    pre_only_stream = linear(d, 2 * d) + linear(d, 3 * d) + 2 * hd  # adaLN (shift, scale), qkv, qk-norm
    blocks = depth * full_stream + (depth - 1) * full_stream + pre_only_stream
    p2c = patch_size**2 * in_channels
    embed = linear(p2c, d) + linear(256, d) + linear(d, d) + linear(context_dim, d)
    if pooled_dim:
        embed += linear(pooled_dim, d) + linear(d, d)
    final = linear(d, 2 * d) + linear(d, p2c)
    return blocks + embed + final


@pytest.mark.parametrize("arch", sorted(MMDIT_PRESETS))
def test_every_preset_shapes_and_parameter_count(arch):
    spec = mmdit_preset(arch)
    with torch.device("meta"):
        model = build_mmdit(arch, input_size=32, in_channels=16, context_dim=4096, pooled_dim=2048)
    assert model.num_attention_layers == spec["depth"] == len(model.blocks)
    assert [b.layer for b in model.blocks] == list(range(spec["depth"]))
    assert [b.text.pre_only for b in model.blocks] == [False] * (spec["depth"] - 1) + [True]
    assert count_parameters(model) == expected_parameters(**spec, in_channels=16, context_dim=4096, pooled_dim=2048)
    x = torch.empty(2, 16, 32, 32, device="meta")
    ctx = torch.empty(2, 7, 4096, device="meta")
    out = model(x, torch.empty(2, device="meta"), ctx, torch.empty(2, 2048, device="meta"))
    assert out.shape == (2, 16, 32, 32)


def test_sd3_tied_sizes_and_papers_models():
    assert mmdit_preset("MMDiT-d24") == {"depth": 24, "hidden_size": 1536, "num_heads": 24, "patch_size": 2}
    assert mmdit_preset("MMDiT-d7")["hidden_size"] == 448  # any depth: hidden = 64 x depth
    assert mmdit_preset("MMDiT-38x1536") == {"depth": 38, "hidden_size": 1536, "num_heads": 24, "patch_size": 2}
    assert mmdit_preset("MMDiT-B/2")["depth"] >= 18  # Table 7 rectifies its blocks 10..17
    with pytest.raises(ValueError, match="unknown MMDiT architecture"):
        mmdit_preset("MMDiT-Q/2")


def test_papers_38x1536_model_counted_without_allocating():
    """The paper's text-to-image size with its encoders (Llama3-8B 4096 + Flan-T5-XL 2048 channels).

    The paper reports "approx 1.9B"; SD3's block at 38 x 1536 has 3.2B (see models/mmdit.py)."""
    cfg = compose(overrides=["model=mmdit_38x1536"])
    with torch.device("meta"):
        model = build_mmdit(cfg.model.arch, input_size=32, in_channels=16, context_dim=cfg.model.context_dim,
                            pooled_dim=cfg.model.pooled_dim)  # fmt: skip
    assert all(p.is_meta for p in model.parameters())
    n = count_parameters(model)
    assert n == expected_parameters(38, 1536, 24, 2, 16, 6144, 6144)
    assert 3.2e9 < n < 3.25e9
    # Without any MLP, the two streams' adaLN + attention projections alone exceed 1.79B:
    per_block_no_mlp = 2 * (6 + 3 + 1) * 1536**2
    assert 38 * per_block_no_mlp > 1.79e9


def test_sd3_medium_size_matches_diffusers():
    """Our MMDiT-d24 has SD3-medium's parameters (diffusers' count) plus the qk-norm gains SD3-medium lacks."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        sd3 = diffusers.SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
        )  # fmt: skip
        ours = build_mmdit("MMDiT-d24", input_size=128, in_channels=16, context_dim=4096, pooled_dim=2048)
    qk_norm_gains = 24 * 2 * 2 * 64  # blocks x streams x (q, k) x head_dim
    assert count_parameters(sd3) == 2_028_328_000
    assert count_parameters(ours) == count_parameters(sd3) + qk_norm_gains


def _from_diffusers(sd3, ours: MMDiT) -> None:
    """Copy a diffusers SD3 transformer's weights into our layout (test-only converter)."""
    s = sd3.state_dict()
    swap = lambda w: torch.cat(w.chunk(2, dim=0)[::-1])
    new = {
        "x_embedder.proj.weight": s["pos_embed.proj.weight"], "x_embedder.proj.bias": s["pos_embed.proj.bias"],
        "context_embedder.weight": s["context_embedder.weight"], "context_embedder.bias": s["context_embedder.bias"],
        "final_layer.linear.weight": s["proj_out.weight"], "final_layer.linear.bias": s["proj_out.bias"],
        "final_layer.adaLN_modulation.1.weight": swap(s["norm_out.linear.weight"]),
        "final_layer.adaLN_modulation.1.bias": swap(s["norm_out.linear.bias"]),
    }  # fmt: skip
    for ours_name, theirs in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        for i, j in ((0, 1), (2, 2)):
            for p in ("weight", "bias"):
                new[f"{ours_name}.mlp.{i}.{p}"] = s[f"time_text_embed.{theirs}.linear_{j}.{p}"]
    for i, block in enumerate(ours.blocks):
        b = f"transformer_blocks.{i}"
        names = {
            "image": ("norm1", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), "to_out.0", "ff"),
            "text": ("norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"),
                     ("norm_added_q", "norm_added_k"), "to_add_out", "ff_context"),
        }  # fmt: skip
        for stream, (norm, qkv, qk_norm, out, ff) in names.items():
            pre_only = getattr(block, stream).pre_only
            for p in ("weight", "bias"):
                mod = s[f"{b}.{norm}.linear.{p}"]
                new[f"blocks.{i}.{stream}.adaLN_modulation.1.{p}"] = swap(mod) if pre_only else mod
                new[f"blocks.{i}.{stream}.attn.qkv.{p}"] = torch.cat([s[f"{b}.attn.{n}.{p}"] for n in qkv])
                if not pre_only:
                    new[f"blocks.{i}.{stream}.attn.proj.{p}"] = s[f"{b}.attn.{out}.{p}"]
                    new[f"blocks.{i}.{stream}.mlp.fc1.{p}"] = s[f"{b}.{ff}.net.0.proj.{p}"]
                    new[f"blocks.{i}.{stream}.mlp.fc2.{p}"] = s[f"{b}.{ff}.net.2.{p}"]
            new[f"blocks.{i}.{stream}.attn.q_norm.weight"] = s[f"{b}.attn.{qk_norm[0]}.weight"]
            new[f"blocks.{i}.{stream}.attn.k_norm.weight"] = s[f"{b}.attn.{qk_norm[1]}.weight"]
    new["pos_embed"] = sd3.pos_embed.cropped_pos_embed(ours.input_size, ours.input_size).reshape(ours.pos_embed.shape)
    ours.load_state_dict(new, strict=True)


def test_same_function_as_diffusers_sd3_transformer():
    """An independent implementation of the SD3 block (diffusers, with SD3.5's qk RMSNorm) computes the
    same function as ours once the weights are renamed; time: their timestep = our t x time_scale."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    sd3 = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=32, pooled_projection_dim=6, out_channels=4,
        pos_embed_max_size=16, qk_norm="rms_norm",
    ).eval()  # fmt: skip
    randomize(sd3, std=0.2)
    ours = build_mmdit(**TINY).eval()
    _from_diffusers(sd3, ours)
    x, t, context, pooled = inputs()
    with torch.no_grad():
        theirs = sd3(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                     timestep=t * ours.time_scale).sample  # fmt: skip
        torch.testing.assert_close(ours(x, t, context, pooled), theirs, atol=1e-5, rtol=1e-4)


class Recorder(Rectifier):
    """Plain attention that records the sites it is called at."""

    def __init__(self):
        self.sites: list[Site] = []

    def __call__(self, q, k, v, site):
        self.sites.append(site)
        return F.scaled_dot_product_attention(q, k, v)


def test_plan_reaches_the_right_layers_with_the_segments(tiny_mmdit):
    x, t, context, pooled = inputs(tokens=5)
    rec = Recorder()
    with torch.no_grad():
        plain = tiny_mmdit(x, t, context, pooled)
        out = tiny_mmdit(x, t, context, pooled, plan=AttentionPlan.single(rec, [0, 2]))
    assert torch.equal(out, plain)
    assert [s.layer for s in rec.sites] == [0, 2]
    n = 16  # 8x8 input, patch 2 -> 4x4 image tokens
    assert all(s.image == slice(0, n) and s.text == slice(n, n + 5) and s.grid == (4, 4) for s in rec.sites)


def test_plan_rows_and_layers(tiny_mmdit):
    x, t, context, pooled = inputs()
    with torch.no_grad():
        plain = tiny_mmdit(x, t, context, pooled)
        assert torch.equal(tiny_mmdit(x, t, context, pooled, plan=AttentionPlan()), plain)
        tau_one = AttentionPlan.single(Temperature(1.0), [0, 1, 2], rows=slice(2, 4)) + AttentionPlan.single(
            Temperature(1.0, segment="text"), [0, 1, 2], rows=slice(0, 2)
        )
        assert torch.equal(tiny_mmdit(x, t, context, pooled, plan=tau_one), plain)
        for layer in range(3):
            for rect in (Temperature(0.05), Temperature(0.05, gamma=1.5)):  # fused and general path
                out = tiny_mmdit(x, t, context, pooled, plan=AttentionPlan.single(rect, [layer], rows=slice(2, 4)))
                assert torch.equal(out[:2], plain[:2])
                assert not torch.allclose(out[2:], plain[2:])
        with pytest.raises(ValueError, match="model has 3 attention layers"):
            tiny_mmdit(x, t, context, pooled, plan=AttentionPlan.single(Temperature(0.05), [3]))


def test_text_plan_on_the_last_block_leaves_the_output_unchanged(tiny_mmdit):
    """The last block's text outputs are discarded: rectifying text queries there changes nothing,
    rectifying image queries there does; earlier, text rectification reaches the image through attention."""
    x, t, context, pooled = inputs()
    with torch.no_grad():
        plain = tiny_mmdit(x, t, context, pooled)
        text_last = AttentionPlan.single(Temperature(0.05, segment="text"), [2])
        assert torch.equal(tiny_mmdit(x, t, context, pooled, plan=text_last), plain)
        image_last = AttentionPlan.single(Temperature(0.05), [2])
        assert not torch.allclose(tiny_mmdit(x, t, context, pooled, plan=image_last), plain)
        text_first = AttentionPlan.single(Temperature(0.05, segment="text"), [0])
        assert not torch.allclose(tiny_mmdit(x, t, context, pooled, plan=text_first), plain)


@pytest.mark.parametrize("rect", [Temperature(0.05), Temperature(0.05, gamma=1.5, steps=2)])
def test_joint_attention_segments_are_independent(tiny_mmdit, rect):
    """In one joint attention, a text-only plan leaves the image tokens' outputs untouched and vice versa."""
    block: MMDiTBlock = tiny_mmdit.blocks[0]
    g = torch.Generator().manual_seed(1)
    img_qkv = tuple(torch.randn(4, 2, 16, 16, generator=g) for _ in range(3))
    txt_qkv = tuple(torch.randn(4, 2, 5, 16, generator=g) for _ in range(3))
    image_rect = rect
    text_rect = Temperature(rect.tau, rect.alpha, rect.gamma, rect.steps, segment="text")
    img_plain, txt_plain = block.joint_attention(img_qkv, txt_qkv, (4, 4), None)
    img_out, txt_out = block.joint_attention(img_qkv, txt_qkv, (4, 4), AttentionPlan.single(text_rect, [0]))
    assert torch.equal(img_out, img_plain) and not torch.allclose(txt_out, txt_plain)
    img_out, txt_out = block.joint_attention(img_qkv, txt_qkv, (4, 4), AttentionPlan.single(image_rect, [0]))
    assert torch.equal(txt_out, txt_plain) and not torch.allclose(img_out, img_plain)


def test_batched_equals_one_by_one(tiny_mmdit):
    x, t, context, pooled = inputs()
    plan = AttentionPlan.single(Temperature(0.1), [1], rows=slice(2, 4))
    row_plan = AttentionPlan.single(Temperature(0.1), [1])
    with torch.no_grad():
        batched = tiny_mmdit(x, t, context, pooled, plan=plan)
        single = torch.cat([
            tiny_mmdit(x[i : i + 1], t[i : i + 1], context[i : i + 1], pooled[i : i + 1],
                       plan=row_plan if i >= 2 else None)
            for i in range(4)
        ])  # fmt: skip
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_qk_norm_is_applied(tiny_mmdit):
    """Every stream normalises each head's q and k with RMSNorm: scaling the q and k projections changes nothing."""
    for block in tiny_mmdit.blocks:
        for stream in (block.image, block.text):
            assert isinstance(stream.attn.q_norm, torch.nn.RMSNorm) and stream.attn.q_norm.normalized_shape == (16,)
            assert isinstance(stream.attn.k_norm, torch.nn.RMSNorm)
    x, t, context, pooled = inputs()
    with torch.no_grad():
        plain = tiny_mmdit(x, t, context, pooled)
        for block in tiny_mmdit.blocks:
            for stream in (block.image, block.text):
                stream.attn.qkv.weight[: 2 * 32] *= 7.0  # q and k rows of the fused projection
                stream.attn.qkv.bias[: 2 * 32] *= 7.0
        torch.testing.assert_close(tiny_mmdit(x, t, context, pooled), plain, atol=1e-4, rtol=1e-4)
        tiny_mmdit.blocks[0].image.attn.q_norm.weight.mul_(3.0)  # the learned gain is used
        assert not torch.allclose(tiny_mmdit(x, t, context, pooled), plain, atol=1e-3)


def test_flops_formula_matches_torch_flop_counter(tiny_mmdit):
    x, t, context, pooled = inputs(batch=1, tokens=5)
    # The math SDPA backend runs attention as matmuls the counter sees (the fused CPU kernel it does not).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        tiny_mmdit(x, t, context, pooled)
    assert mmdit_flops_per_forward(tiny_mmdit, context_tokens=5) == counter.get_total_flops()


def test_fresh_model_predicts_zero_and_meta_build_materialises():
    """adaLN-Zero: a fresh model outputs 0. Built on the meta device (FSDP's deferred init), then
    materialised and initialised, it is the same kind of model (sin-cos positions, zero modulation)."""
    fresh = build_mmdit(**TINY)
    x, t, context, pooled = inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, context, pooled), torch.zeros_like(x))
    with torch.device("meta"):
        model = build_mmdit(**TINY)
    model.to_empty(device="cpu")
    model.initialize_weights()
    torch.testing.assert_close(model.pos_embed, fresh.pos_embed)
    assert all(torch.count_nonzero(b.image.adaLN_modulation[-1].weight) == 0 for b in model.blocks)
    assert MMDiT.wrap_modules() == {MMDiTBlock}
    assert all(isinstance(b, MMDiTBlock) for b in model.blocks)


def test_unconditional_pooled_free_model_and_bad_inputs():
    model = build_mmdit(**{**TINY, "pooled_dim": 0})
    assert model.y_embedder is None
    x, t, context, pooled = inputs()
    assert model(x, t, context).shape == x.shape
    with pytest.raises(ValueError, match="pooled_dim=0"):
        model(x, t, context, pooled)
    model = build_mmdit(**TINY)
    with pytest.raises(ValueError, match=r"model\.context_dim"):
        model(x, t, torch.randn(4, 5, 7), pooled)
    with pytest.raises(ValueError, match=r"model\.pooled_dim"):
        model(x, t, context)
    with pytest.raises(ValueError, match="expects inputs of shape"):
        model(torch.randn(4, 3, 8, 8), t, context, pooled)
    with pytest.raises(ValueError, match="one time per sample"):
        model(x, t[:1], context, pooled)
    with pytest.raises(ValueError, match="needs `arch`"):
        build_mmdit(depth=2, hidden_size=32)
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        build_mmdit(**{**TINY, "num_heads": 3})


def test_activation_checkpointing_gives_the_same_gradients(tiny_mmdit):
    x, t, context, pooled = inputs(batch=2)
    tiny_mmdit.train()
    tiny_mmdit(x, t, context, pooled).square().mean().backward()
    grads = [p.grad.clone() for p in tiny_mmdit.parameters()]
    assert all(g is not None for g in grads)  # no unused parameters (DDP/FSDP need this)
    tiny_mmdit.zero_grad()
    tiny_mmdit.grad_checkpointing = True
    tiny_mmdit(x, t, context, pooled).square().mean().backward()
    for g, p in zip(grads, tiny_mmdit.parameters()):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("option", ["mmdit_b2", "mmdit_38x1536", "mmdit_sd3_d24"])
def test_configs_name_the_papers_sizes(option):
    cfg = compose(overrides=[f"model={option}"])
    spec = mmdit_preset(cfg.model.arch)
    expected = {"mmdit_b2": (28, 768), "mmdit_38x1536": (38, 1536), "mmdit_sd3_d24": (24, 1536)}[option]
    assert (spec["depth"], spec["hidden_size"]) == expected


def test_fsdp2_sharding_by_blocks_gives_the_same_forward_and_gradients(tmp_path):
    """FSDP-ready: every `MMDiT.wrap_modules()` unit (and the root) sharded with FSDP2's fully_shard
    (one CPU process, gloo) computes the same output and gradients as the plain model."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    ref = randomize(build_mmdit(**TINY))
    sharded = randomize(build_mmdit(**TINY))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for module in sharded.modules():
            if type(module) in MMDiT.wrap_modules():
                fully_shard(module)
        fully_shard(sharded)
        x, t, context, pooled = inputs(batch=2)
        out = sharded(x, t, context, pooled)
        out.square().mean().backward()
        expected = ref(x, t, context, pooled)
        expected.square().mean().backward()
        torch.testing.assert_close(out, expected)
        for (name, p), q in zip(sharded.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=name)
    finally:
        dist.destroy_process_group()
