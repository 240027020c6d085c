"""The DataModule interface the training module relies on.

Every DataModule of this repo yields batches as dicts:
    {"x": float (B, C, H, W) in model space, "y": long (B,) class labels}
(text-to-image data adds "caption"). It also says what the model sees (`input_size`, `channels`,
`num_classes`; 0 classes = unconditional) and how to turn model-space tensors back into images in
[-1, 1] (`decode`: identity for pixels, the autoencoder's decoder for latents).

Map-style datasets get an infinite, rank-aware, resumable training stream from
`InfiniteBatchSampler`: a run resumed at step s reads exactly the batches an uninterrupted run
would have read from step s on.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from data.sampling import InfiniteBatchSampler

__all__ = ["DataErrorLog", "FlowDataModule", "collate_dicts"]


def collate_dicts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep other values (captions, keys) as lists."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], int | float):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


class FlowDataModule(L.LightningDataModule):
    """Base class: subclasses set `self.train_set` / `self.val_set` (map-style) in `setup`."""

    collate = staticmethod(collate_dicts)  # items -> batch (subclasses may add e.g. skipped-file counts)

    def __init__(
        self,
        input_size: int,
        channels: int,
        num_classes: int,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        val_batch_size: int | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.input_size = input_size
        self.channels = channels
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def decode(self, x: Tensor) -> Tensor:
        """Model space -> images in [-1, 1] (identity for pixel data)."""
        return x

    def callbacks(self) -> list[L.Callback]:
        """Training callbacks this data needs (e.g. logging skipped shards); added by models/training.py."""
        return []

    # --- loaders -----------------------------------------------------------------------------
    def _resume_batch(self) -> int:
        """Global batch index to start the training stream at (non-zero when resuming)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        rank, world = self._rank_world()
        sampler = InfiniteBatchSampler(
            len(self.train_set),
            self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world,
            start_batch=self._resume_batch(),
        )
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        rank, world = self._rank_world()
        indices = list(range(rank, len(self.val_set), world))
        return DataLoader(
            torch.utils.data.Subset(self.val_set, indices),
            batch_size=self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.collate,
        )


# --- logging skipped data --------------------------------------------------------------------------
class DataErrorLog(L.Callback):
    """Logs `data/skipped_shards` and `data/skipped_samples` every `log_every_n_steps`, from what each
    batch carries in `batch["data_errors"]` = (stream id, names of the shards it skipped, number of
    samples it skipped so far); costs one small all-reduce per log step.

    A broken shard counts once per rank however often a resampled stream (or several DataLoader
    workers) draws it; the ranks' counts are summed (ranks read disjoint shards). Skipped samples
    are summed over the streams (a worker's epoch is a stream)."""

    def __init__(self) -> None:
        self.bad_shards: set[str] = set()
        self.samples: dict[str, int] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        errors = batch.get("data_errors") if isinstance(batch, dict) else None
        if errors is None:
            return
        stream_id, shards, samples = errors
        self.bad_shards.update(shards)
        self.samples[str(stream_id)] = int(samples)
        every = max(trainer.log_every_n_steps, 1)
        if trainer.global_step % every == 0:  # the same steps on every rank (a collective follows)
            local = torch.tensor(self.totals(), dtype=torch.float32, device=pl_module.device)
            total = trainer.strategy.reduce(local, reduce_op="sum")
            pl_module.log("data/skipped_shards", total[0], rank_zero_only=True)
            pl_module.log("data/skipped_samples", total[1], rank_zero_only=True)

    def totals(self) -> tuple[int, int]:
        """This rank's totals (distinct shards, samples)."""
        return len(self.bad_shards), sum(self.samples.values())
