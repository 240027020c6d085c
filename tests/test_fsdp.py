"""trainer=fsdp for real: PyTorch's FSDP2 (`fully_shard`, through Lightning's ModelParallelStrategy) on 2 CPU
ranks with gloo. A sharded run, stopped and resumed from its checkpoint, ends where an unsharded (DDP) run
of the same global batch ends, to float tolerance (the gradient reductions differ in order: reduce-scatter
vs all-reduce). Lightning's FSDPStrategy (FSDP1) cannot run here: it refuses CPU, and so does torch's
FullyShardedDataParallel. What only a GPU run can confirm: NCCL, bf16 autocast with sharded parameters,
memory and speed of the 3.2B model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.checkpoints import build_dit, load_into
from tests.conftest import TINY_MODEL
from tests.test_distributed import _launch


def _overrides(run_dir: Path, trainer: str, steps: int) -> list[str]:
    return [
        *TINY_MODEL, f"run_dir={run_dir}", f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.num_nodes=1", "trainer.precision=32-true", "trainer.benchmark=false", f"trainer.max_steps={steps}",
        "trainer.val_check_interval=1000000", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
        "data.batch_size=8", "optim.warmup_steps=2", "samples.every_n_steps=0", "samples.steps=2",
        "samples.per_class=1", "checkpoint.every_n_steps=2", "checkpoint.at_fractions=[]",
    ]  # fmt: skip


@pytest.mark.slow  # 3 launches of 2 ranks (~60 s of CPU); the sharded forward/backward alone: tests/test_mmdit.py
def test_fsdp_on_two_cpu_ranks_saves_resumes_and_equals_an_unsharded_run(tmp_path):
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    for d in (fsdp, ddp):
        d.mkdir()
    first = _launch(fsdp, 2, _overrides(fsdp / "run", "fsdp", 2))
    # really sharded: each rank holds about half of the parameters, as DTensor shards
    assert all(r["local_numel"] < 0.6 * r["numel"] for r in first) and first[0]["numel"] == first[1]["numel"]
    assert torch.load(fsdp / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    resumed = _launch(fsdp, 2, _overrides(fsdp / "run", "fsdp", 4))  # the same command, further: resumes
    unsharded = _launch(ddp, 2, _overrides(ddp / "run", "multinode", 4))
    assert {r["step"] for r in resumed + unsharded} == {4}
    assert unsharded[0]["local_numel"] == unsharded[0]["numel"]

    a = torch.load(fsdp / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(ddp / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()  # one full state dict, the layout DDP writes
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for i, state in b["optimizer_states"][0]["state"].items():
        torch.testing.assert_close(a["optimizer_states"][0]["state"][i]["exp_avg"], state["exp_avg"], rtol=1e-4,
                                   atol=1e-7)  # fmt: skip
    # the sample grid at the end came from the sharded EMA model (every rank took part), and the
    # checkpoint loads into a plain model for sampling
    assert (fsdp / "run" / "samples" / "step_0000004.png").is_file()
    model = build_dit(
        depth=2,
        hidden_size=32,
        num_heads=2,
        patch_size=2,
        input_size=16,
        in_channels=1,
        num_classes=10,
        learn_sigma=False,
    )
    load_into(model, fsdp / "run" / "checkpoints" / "last.ckpt")
