"""The DiT family: shapes, parameter counts, public checkpoint layout, the attention plan."""

from __future__ import annotations

import argparse

import pytest
import torch

from erg.attention import AttentionPlan, Temperature
from models.checkpoints import build_dit, read_state_dict
from models.dit import DIT_PRESETS, DiT, count_parameters, dit_flops_per_forward
from models.runtime import ConfigError
from tests.conftest import compose, randomize
from tests.reference_dit import ReferenceDiT, public_dit_keys


@pytest.mark.parametrize("arch", sorted(DIT_PRESETS))
def test_every_preset_shapes_and_attention_layers(arch):
    with torch.device("meta"):
        model = build_dit(arch, input_size=32, in_channels=4, num_classes=1000)
    spec = DIT_PRESETS[arch]
    assert model.num_attention_layers == spec["depth"] == len(model.blocks)
    assert [b.attn.layer for b in model.blocks] == list(range(spec["depth"]))
    assert model.pos_embed.shape == (1, (32 // spec["patch_size"]) ** 2, spec["hidden_size"])
    x = torch.empty(2, 4, 32, 32, device="meta")
    out = model(x, torch.empty(2, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"))
    assert out.shape == (2, 4, 32, 32)


def test_dit_xl2_size_and_flops_without_allocating():
    with torch.device("meta"):
        model = build_dit("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == (28, 1152, 16, 2)
    # DiT's published count (its pos_embed is a frozen Parameter, here a buffer): 675,129,632.
    assert count_parameters(model, include_buffers=True) == 675_129_632
    assert dit_flops_per_forward(model) / 1e9 == pytest.approx(237, rel=0.01)  # 118.6 GMACs


def test_small_presets_run_on_cpu():
    model = build_dit("DiT-S/8", input_size=16, in_channels=3, num_classes=10)
    out = model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([3, 10]))
    assert out.shape == (2, 3, 16, 16)


def test_state_dict_has_the_public_layout():
    model = build_dit(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=10)
    assert sorted(model.state_dict()) == sorted(public_dit_keys(2))


def _reference(learn_sigma_model_kwargs=None):
    torch.manual_seed(0)
    ref = ReferenceDiT(input_size=8, patch=2, in_ch=4, d=32, depth=2, heads=2, num_classes=10)
    return randomize(ref, std=0.2).eval()


def test_public_checkpoint_loads_strictly_and_predicts_the_same_velocity(tmp_path):
    """A SiT-layout state dict (learned sigma, 2C outputs) loads with strict=True; our output equals
    the first C channels of an independent timm-based forward (SiT's velocity)."""
    ref = _reference()
    path = tmp_path / "SiT-tiny.pt"
    torch.save(ref.state_dict(), path)
    ours = build_dit(
        depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=10,
        learn_sigma=True, checkpoint=str(path),
    ).eval()  # fmt: skip
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 0.4, 1.0]), torch.tensor([1, 7, 10])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), ref(x, t, y)[:, :4], atol=2e-5, rtol=1e-4)


def test_fresh_pos_embed_matches_the_published_sincos():
    """Our initial pos_embed equals MAE/DiT's get_2d_sincos_pos_embed (checked against a direct formula)."""
    model = build_dit(depth=1, hidden_size=16, num_heads=2, patch_size=2, input_size=6, in_channels=1, num_classes=0)
    grid = 3
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    rows = []
    for i in range(grid):
        for j in range(grid):
            col_part = torch.cat([torch.sin(j * omega), torch.cos(j * omega)])
            row_part = torch.cat([torch.sin(i * omega), torch.cos(i * omega)])
            rows.append(torch.cat([col_part, row_part]))
    torch.testing.assert_close(model.pos_embed[0], torch.stack(rows).float())


def test_checkpoint_formats(tmp_path, tiny_dit):
    sd = tiny_dit.state_dict()
    shifted = {k: v + 1 for k, v in sd.items()}
    torch.save(
        {"model": sd, "ema": shifted, "opt": {}, "args": argparse.Namespace(model="DiT-XL/2")},
        tmp_path / "dit.pt",
    )
    assert torch.equal(read_state_dict(tmp_path / "dit.pt")["pos_embed"], shifted["pos_embed"])  # EMA preferred
    assert torch.equal(read_state_dict(tmp_path / "dit.pt", prefer_ema=False)["pos_embed"], sd["pos_embed"])
    lightning = {
        "state_dict": {
            **{f"model.{k}": v for k, v in sd.items()},
            **{f"ema.{k}": v for k, v in shifted.items()},
        }
    }
    torch.save(lightning, tmp_path / "ours.ckpt")
    assert torch.equal(read_state_dict(tmp_path / "ours.ckpt")["pos_embed"], shifted["pos_embed"])
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    assert read_state_dict(tmp_path / "w.safetensors").keys() == sd.keys()
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        read_state_dict(tmp_path / "missing.pt")


def test_mismatched_checkpoint_names_the_problem(tmp_path, tiny_dit):
    torch.save(tiny_dit.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"does not fit the configured model.*num_classes 5 in the checkpoint vs 7"):
        build_dit(depth=3, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=2, num_classes=7,
                  checkpoint=str(tmp_path / "w.pt"))  # fmt: skip


def test_sit_config_loads_a_checkpoint(tmp_path):
    """`model=sit_xl2 model.checkpoint=PATH` is the route to the public SiT weights (tiny size here)."""
    from hydra.utils import instantiate

    ref = _reference()
    torch.save(ref.state_dict(), tmp_path / "sit.pt")
    cfg = compose(overrides=[
        "model=sit_xl2", f"model.checkpoint={tmp_path / 'sit.pt'}", "model.arch=null", "+model.depth=2",
        "+model.hidden_size=32", "+model.num_heads=2", "+model.patch_size=2", "data.image_size=8",
        "data.channels=4",
    ])  # fmt: skip
    model = instantiate(cfg.model).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 9])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), ref(x, t, y)[:, :4], atol=2e-5, rtol=1e-4)


def test_plan_reaches_every_layer_and_only_its_rows(tiny_dit):
    x, t, y = torch.randn(4, 2, 8, 8), torch.rand(4), torch.tensor([0, 1, 5, 5])
    with torch.no_grad():
        plain = tiny_dit(x, t, y)
        assert torch.equal(tiny_dit(x, t, y, plan=AttentionPlan()), plain)
        assert torch.equal(tiny_dit(x, t, y, plan=AttentionPlan.single(Temperature(1.0), [0, 1, 2])), plain)
        for layer in range(3):
            plan = AttentionPlan.single(Temperature(0.05), [layer], rows=slice(2, 4))
            out = tiny_dit(x, t, y, plan=plan)
            assert torch.equal(out[:2], plain[:2])
            assert not torch.allclose(out[2:], plain[2:])
        with pytest.raises(ValueError, match="model has 3 attention layers"):
            tiny_dit(x, t, y, plan=AttentionPlan.single(Temperature(0.05), [3]))


def test_batched_rows_equal_rows_one_by_one(tiny_dit):
    x, t, y = torch.randn(4, 2, 8, 8), torch.rand(4), torch.tensor([0, 1, 5, 2])
    with torch.no_grad():
        batched = tiny_dit(x, t, y)
        single = torch.cat([tiny_dit(x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_unconditional_and_bad_inputs():
    model = DiT(input_size=8, in_channels=1, num_classes=0, patch_size=2, hidden_size=32, depth=1, num_heads=2)
    assert model.null_class is None and model.y_embedder is None
    assert model(torch.randn(1, 1, 8, 8), torch.rand(1)).shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 1, 8, 8), torch.rand(1), torch.tensor([0]))
    cond = DiT(input_size=8, in_channels=1, num_classes=3, patch_size=2, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="needs labels"):
        cond(torch.randn(1, 1, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match="expects inputs of shape"):
        cond(torch.randn(1, 3, 8, 8), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="unknown DiT architecture"):
        build_dit("DiT-M/2", input_size=8, in_channels=1, num_classes=0)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        DiT(input_size=10, patch_size=4)


def test_activation_checkpointing_gives_the_same_gradients(tiny_dit):
    x, t, y = torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([0, 1])
    tiny_dit.train()
    tiny_dit(x, t, y).square().mean().backward()
    grads = [p.grad.clone() for p in tiny_dit.parameters()]
    tiny_dit.zero_grad()
    tiny_dit.grad_checkpointing = True
    tiny_dit(x, t, y).square().mean().backward()
    for g, p in zip(grads, tiny_dit.parameters()):
        torch.testing.assert_close(p.grad, g)
