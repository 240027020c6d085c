"""A resumable, rank-aware, infinite batch sampler for map-style training data.

Training in this repo is counted in optimizer steps, not epochs (DiT/SiT train by steps), so the
training stream is infinite: global batch g of rank r is a pure function of (seed, g, r, world).
That makes resuming exact without saving loader state: a run resumed at step s simply starts the
stream at batch s * accumulate_grad_batches (see `data.base.FlowDataModule.train_dataloader`).

Pass p over the data uses the permutation seeded by (seed, p); each rank takes a strided share of
it, so ranks read disjoint samples and all ranks have the same number of batches per pass.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["InfiniteBatchSampler"]


class InfiniteBatchSampler(Sampler[list[int]]):
    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        shuffle: bool = True,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world size {world_size}")
        per_rank = num_samples // world_size
        if per_rank < batch_size:
            raise ValueError(
                f"{num_samples} training samples over {world_size} rank(s) cannot fill one batch of "
                f"{batch_size}: lower data.batch_size or add data"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.shuffle = shuffle
        self.batches_per_pass = per_rank // batch_size

    def _pass_indices(self, p: int) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + p)
            perm = torch.randperm(self.num_samples, generator=g)
        else:
            perm = torch.arange(self.num_samples)
        return perm[self.rank :: self.world_size]

    def batch(self, g: int) -> list[int]:
        """Indices of global batch g for this rank."""
        p, j = divmod(g, self.batches_per_pass)
        idx = self._pass_indices(p)
        return idx[j * self.batch_size : (j + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        g = self.start_batch
        p, j = divmod(g, self.batches_per_pass)
        while True:
            idx = self._pass_indices(p)
            for jj in range(j, self.batches_per_pass):
                yield idx[jj * self.batch_size : (jj + 1) * self.batch_size].tolist()
            p, j = p + 1, 0
