"""Rectified-flow training as a LightningModule.

    t ~ uniform(0, 1) or logit-normal (SD3)        eps ~ N(0, I)
    x_t = t x + (1 - t) eps                         target v = x - eps
    loss = || model(x_t, t, y_dropped) - v ||^2     (labels dropped to the null class with prob p)
    text-to-image (a `text_encoder`):  || model(x_t, t, context, pooled) - v ||^2 with
    context, pooled = text_encoder(captions), each encoder dropped per sample (its own probability)

The EMA copy of the weights (`self.ema`) is saved in every checkpoint and is what sampling and
evaluation use. Randomness of a training step (t, eps, label / encoder dropout) comes from a generator
seeded by (seed, step, micro-batch, rank), so a resumed run draws exactly what an uninterrupted run
draws.

The text encoder (`models.text_encoders.TextConditioner`) is frozen pretrained weights: it is held
*outside* the module tree, so it is not trained, not in the optimizer, not copied into the EMA, not
wrapped by DDP / FSDP and not saved in checkpoints (they store its config, `config["text_encoder"]`,
and the sampler rebuilds it from there). It follows the batches to their device on first use.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from erg.flow import interpolate, sample_timesteps, velocity_target
from erg.sampling import sample_seed
from models.ema import ema_copy, ema_update
from models.text_encoders import TextEncoding

__all__ = ["EMAConfig", "FlowConfig", "OptimConfig", "RectifiedFlowModule", "WarmupSchedule", "shard_model"]


@dataclass
class FlowConfig:
    """The training objective."""

    timesteps: str = "uniform"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    label_dropout: float = 0.1  # probability of the null class (classifier-free guidance)

    def __post_init__(self) -> None:
        if self.timesteps not in ("uniform", "logit_normal"):
            raise ValueError(f"flow.timesteps must be 'uniform' or 'logit_normal', got {self.timesteps!r}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"flow.label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.logit_std <= 0:
            raise ValueError(f"flow.logit_std must be > 0, got {self.logit_std}")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then constant (DiT) or cosine decay."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    decay_steps: int | None = None  # cosine horizon; None = trainer.max_steps

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class EMAConfig:
    """decay: the EMA's decay per optimizer step (DiT: 0.9999).
    warmup: use min(decay, (1 + step) / (10 + step)), so short runs get a useful average early
        (off reproduces DiT, whose EMA starts as a copy of the initial weights).
    start_step: before this step the EMA copies the weights."""

    decay: float = 0.9999
    warmup: bool = False
    start_step: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:
            raise ValueError(f"ema.decay must be in [0, 1), got {self.decay}")


class WarmupSchedule:
    """Learning-rate multiplier per optimizer step (a callable object so LambdaLR can save it)."""

    def __init__(self, warmup_steps: int, schedule: str, total_steps: int, min_lr_ratio: float):
        self.warmup_steps = warmup_steps
        self.schedule = schedule
        self.total_steps = max(total_steps, 1)
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class RectifiedFlowModule(L.LightningModule):
    """Trains `model` with the rectified-flow loss: a velocity predictor `forward(x, t, y)` (DiT family),
    or, with a `text_encoder`, `forward(x, t, context, pooled)` (MMDiT) conditioned on `batch["caption"]`."""

    def __init__(
        self,
        model: nn.Module,
        flow: FlowConfig | None = None,
        optim: OptimConfig | None = None,
        ema: EMAConfig | None = None,
        seed: int = 0,
        compile: bool = False,
        nan_check_every: int = 1,
        config: dict[str, Any] | None = None,
        text_encoder: nn.Module | None = None,
    ):
        super().__init__()
        # Frozen pretrained weights, kept out of the module tree on purpose (see the module docstring):
        # object.__setattr__ bypasses nn.Module's registration of sub-modules.
        object.__setattr__(self, "text_encoder", text_encoder)
        self.model = model
        self.ema = ema_copy(model)
        self.flow = flow or FlowConfig()
        self.optim = optim or OptimConfig()
        self.ema_cfg = ema or EMAConfig()
        self.seed = seed
        self.compile_model = compile
        self.nan_check_every = max(int(nan_check_every), 1)
        self.config = config or {}
        self._generators: dict[str, torch.Generator] = {}
        # First optimizer step whose loss was not finite (-1: none); kept on device so checking it
        # costs a host sync only every `nan_check_every` steps.
        self.register_buffer("_first_bad_step", torch.tensor(-1, dtype=torch.long), persistent=False)

    # --- setup ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        mesh = self.device_mesh  # set by Lightning's ModelParallelStrategy (trainer=fsdp), None otherwise
        if mesh is not None and not getattr(self, "_sharded", False):
            shard_model(self.model, mesh)
            shard_model(self.ema, mesh)  # the same units: each EMA shard sits beside its parameter's shard
            self._sharded = True
        if self.compile_model and not getattr(self, "_compiled", False):
            self.model.compile()  # in place: parameter names and checkpoints are unchanged
            self._compiled = True

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(
            params,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=fused or None,
        )
        total = cfg.decay_steps
        if total is None:
            total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else 1
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, WarmupSchedule(cfg.warmup_steps, cfg.schedule, total, cfg.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # --- randomness ----------------------------------------------------------------------------
    def _generator(self, *key: int) -> torch.Generator:
        """A generator on this device seeded by (seed, *key): no hidden RNG state to save or lose."""
        dev = str(self.device)
        if dev not in self._generators:
            self._generators[dev] = torch.Generator(device=self.device)
        g = self._generators[dev]
        seed = self.seed
        for k in key:
            seed = sample_seed(seed, int(k))
        return g.manual_seed(seed)

    # --- the objective -------------------------------------------------------------------------
    @property
    def null_class(self) -> int | None:
        return getattr(self.model, "null_class", None)

    def flow_loss(self, batch: dict[str, Any], g: torch.Generator, drop_labels: bool) -> Tensor:
        x = batch["x"]
        B = x.shape[0]
        t = sample_timesteps(
            B,
            self.flow.timesteps,
            mean=self.flow.logit_mean,
            std=self.flow.logit_std,
            generator=g,
            device=x.device,
        )
        eps = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        x_t = interpolate(x, eps, t)
        if self.text_encoder is not None:
            context, pooled = self.encode_captions(batch, g if drop_labels else None)
            pred = self.model(x_t, t, context, pooled)
            return F.mse_loss(pred.float(), velocity_target(x, eps).float())
        y = None
        if self.null_class is not None:
            y = batch["y"]
            if drop_labels and self.flow.label_dropout > 0:
                drop = torch.rand(B, generator=g, device=x.device) < self.flow.label_dropout
                y = torch.where(drop, torch.full_like(y, self.null_class), y)
        pred = self.model(x_t, t, y)
        return F.mse_loss(pred.float(), velocity_target(x, eps).float())

    @torch.no_grad()
    def encode_captions(self, batch: dict[str, Any], g: torch.Generator | None) -> tuple[Tensor, Tensor | None]:
        """The frozen text encoder's (context, pooled) for the batch's captions. With a generator, each
        encoder is dropped per sample with its probability (the paper: sqrt(0.1) each), drawn from `g`.
        Batches of cached shards (data.text_embeddings) carry the encodings ("text_encodings"): the same
        dropout then applies to them and no encoder runs."""
        captions = batch.get("caption")
        cached = batch.get("text_encodings")
        if captions is None and cached is None:
            raise ValueError(
                "this is a text-to-image run (text_encoder is set) but the batches carry no captions: use data "
                "with captions (data=text_image_shards with data.captions=[txt,...], or data=digits_captions)"
            )
        encoder = self.text_encoder
        device = batch["x"].device
        if next(encoder.buffers()).device != device:
            encoder.to(device)
        drop = encoder.drop_mask(batch["x"].shape[0], generator=g) if g is not None else None
        if cached is not None:
            cond = encoder.condition({name: TextEncoding(**cached[name]) for name in encoder.names}, drop)
        else:
            cond = encoder(list(captions), drop, use_cache=True)
        return cond.context, cond.pooled

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        g = self._generator(0, self.global_step, batch_idx % accumulate, self.global_rank)
        loss = self.flow_loss(batch, g, drop_labels=True)
        self._check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["x"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # Fixed randomness per validation batch: the curve is comparable across evaluations.
        g = self._generator(1, batch_idx, self.global_rank)
        loss = self.flow_loss(batch, g, drop_labels=False)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["x"].shape[0])
        return loss

    # --- divergence check ----------------------------------------------------------------------
    def _check_finite(self, loss: Tensor) -> None:
        step = torch.full_like(self._first_bad_step, self.global_step)
        bad = ~torch.isfinite(loss.detach()) & (self._first_bad_step < 0)
        self._first_bad_step = torch.where(bad, step, self._first_bad_step)
        if self.global_step % self.nan_check_every == 0:
            self.raise_if_diverged()

    def raise_if_diverged(self) -> None:
        first = int(self._first_bad_step.item())
        if first >= 0:
            raise FloatingPointError(
                f"training stopped: the loss became NaN/inf at step {first}. Lower optim.lr, add warm-up "
                "(optim.warmup_steps), clip gradients (trainer.gradient_clip_val), or resume from an earlier "
                "checkpoint in the run's checkpoints/ folder."
            )

    # --- EMA -----------------------------------------------------------------------------------
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        ema_update(self.ema, self.model, self.ema_decay(self.global_step))

    def ema_decay(self, step: int) -> float:
        """Decay used for the EMA update after optimizer step `step` (1-based count of steps done)."""
        cfg = self.ema_cfg
        if step < cfg.start_step:
            return 0.0
        if cfg.warmup:
            return min(cfg.decay, (1 + step) / (10 + step))
        return cfg.decay

    # --- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.raise_if_diverged()  # never write a checkpoint with diverged weights
        checkpoint["config"] = self.config
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state(),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("rng")
        if not rng:
            return
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        _set_numpy_state(rng["numpy"])
        random.setstate(rng["python"])


def shard_model(model: nn.Module, mesh: Any) -> nn.Module:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`): every block (`model.wrap_modules()`: DiTBlock, MMDiTBlock)
    is a unit whose parameters are gathered only for its own forward / backward, then the root (embedders,
    final layer). On Lightning's (data_parallel, tensor_parallel) mesh, i.e. (nodes, devices per node), a 2-D
    mesh is HSDP: parameters sharded over the devices of a node and replicated across nodes; one node:
    full sharding."""
    from torch.distributed.fsdp import fully_shard

    units = model.wrap_modules() if hasattr(model, "wrap_modules") else set()
    for module in model.modules():
        if type(module) in units:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _numpy_state() -> dict[str, Any]:
    """numpy's global RNG state as tensors and numbers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "gauss": (int(has_gauss), float(cached)),
    }


def _set_numpy_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["pos"], *state["gauss"]))
