"""Training callbacks: sample grids from the EMA weights during training; checkpoints at chosen steps."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from erg.guidance import build_guidance
from erg.sampler import GuidedSampler, SamplerConfig
from models.io import image_grid, save_image

__all__ = ["CheckpointAtFractions", "SampleGrid", "StepCheckpoint"]


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (step_<n>.ckpt every n steps, last.ckpt) with two guarantees a resume needs:
    - last.ckpt holds the final step: Lightning writes it at the end only if no periodic checkpoint was
      written during the fit, so a run of 8 steps saving every 3 ended with last.ckpt at step 6;
    - the loggers are flushed whenever any checkpoint is written, so metrics.csv holds every step the
      checkpoint holds (a resumed run then drops the rows after it: `models.runtime.csv_logger`)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trained = trainer.global_step > getattr(self, "_start_step", 0)
        if self.save_last and trained and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            logger.save()


class CheckpointAtFractions(L.Callback):
    """A full checkpoint `<dirpath>/step_XXXXXXX.ckpt` (ModelCheckpoint's naming) when training reaches
    the given fractions of `trainer.max_steps` (step = int(fraction x max_steps), at least 1): e.g.
    AutoGuidance's weak model, which the ERG paper takes at ~1/16 of training. Steps the periodic
    checkpoints already write (multiples of `every_n_steps`) are left to them; steps already passed when
    a run resumes are not revisited."""

    def __init__(self, dirpath: str | Path, fractions: list[float], every_n_steps: int = 0):
        bad = [f for f in fractions if not (isinstance(f, int | float) and 0 < f < 1)]
        if bad:
            raise ValueError(f"checkpoint.at_fractions must hold numbers in (0, 1), got {list(fractions)}")
        self.dirpath = Path(dirpath)
        self.fractions = list(fractions)
        self.every_n_steps = every_n_steps
        self.steps: set[int] = set()
        self._saved: set[int] = set()

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.max_steps is None or trainer.max_steps < 1:
            raise ValueError("checkpoint.at_fractions needs trainer.max_steps (training is counted in steps)")
        steps = {max(1, int(f * trainer.max_steps)) for f in self.fractions}
        self.steps = {s for s in steps if not (self.every_n_steps > 0 and s % self.every_n_steps == 0)}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step  # counts optimizer steps: gradient accumulation repeats a value
        if step in self.steps and step not in self._saved and not trainer.sanity_checking:
            self._saved.add(step)
            trainer.save_checkpoint(self.dirpath / f"step_{step:07d}.ckpt")  # every rank calls it; rank 0 writes


@contextlib.contextmanager
def _gathered(model: torch.nn.Module) -> Iterator[None]:
    """Full parameters on every rank while sampling from an FSDP2-sharded model (trainer=fsdp): the sampler
    also calls sub-modules outside the model's forward (the class embedder), which FSDP would not gather.
    Every rank must enter it (a collective); a model that is not sharded is left alone."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.set_reshard_after_forward(False)
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
        model.set_reshard_after_forward(True)


class SampleGrid(L.Callback):
    """Every `every_n_steps` optimizer steps (and at the end), sample a grid with the EMA model using
    the plain Euler sampler, save it as `<out_dir>/step_XXXXXXX.png` and log it where the logger can
    show images. Rows are classes (columns: `per_class` samples); the noises are the same at every
    step (per-sample seeds), so grids are comparable along training. Text-to-image runs (a module with a
    `text_encoder`) draw a row per prompt of `prompts` instead (at most `max_classes` rows).

    `guidance_scale` != 1 applies classifier-free guidance (only for this monitoring view), through
    the same sampler `sample.py` uses.
    """

    def __init__(
        self,
        out_dir: str | Path,
        every_n_steps: int = 500,
        steps: int = 50,
        per_class: int = 8,
        max_classes: int = 10,
        guidance_scale: float = 1.0,
        prompts: list[str] | None = None,
        seed: int = 0,
    ):
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.steps = steps
        self.per_class = per_class
        self.max_classes = max_classes
        self.guidance_scale = guidance_scale
        self.prompts = list(prompts) if prompts else None
        self.seed = seed
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.sample_and_log(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step and not trainer.sanity_checking:
            self.sample_and_log(trainer, pl_module)

    @torch.no_grad()
    def sample(self, pl_module: L.LightningModule, decode: Any = None) -> torch.Tensor:
        """The grid's images, from the shared guidance sampler (CFG exists once, in erg/)."""
        model = pl_module.ema
        text_encoder = getattr(pl_module, "text_encoder", None)
        conditionings = None
        if text_encoder is not None:
            from models.generation import prompts_conditioning

            if not self.prompts:
                raise ValueError("samples.prompts: a text-to-image run needs prompts for its sample grids")
            text_encoder.to(pl_module.device)
            conditionings = {"main": prompts_conditioning(text_encoder)}
            rows_of = self.prompts[: self.max_classes]
        else:
            num_classes = getattr(model, "num_classes", 0)
            rows_of = list(range(min(num_classes, self.max_classes))) if num_classes else None
        n = len(rows_of or [None]) * self.per_class
        labels = [c for c in rows_of for _ in range(self.per_class)] if rows_of else None
        cfg = {"method": "cfg", "scale": self.guidance_scale} if rows_of else {"method": "none"}
        sampler = GuidedSampler(build_guidance(cfg), model, conditionings, config=SamplerConfig(steps=self.steps))
        with _gathered(model):
            x = sampler.sample_indices(range(n), labels, base_seed=self.seed)
        return decode(x) if decode is not None else x

    def sample_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sample on rank 0 only (no collective ops are involved) and save / log the grid. Under FSDP
        the weights are sharded, so every rank takes part in the forward passes and rank 0 saves."""
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if not trainer.is_global_zero and not isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy):
            return
        self._last_step = trainer.global_step
        images = self.sample(pl_module, decode=getattr(trainer.datamodule, "decode", None))
        if not trainer.is_global_zero:
            return
        grid = image_grid(images, nrow=self.per_class, min_size=64)
        path = save_image(self.out_dir / f"step_{trainer.global_step:07d}.png", grid)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid.permute(2, 0, 1), trainer.global_step)
