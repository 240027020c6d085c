"""Webdataset shard streams: an endless, resampled training stream and a finite evaluation stream.

Training (one stream per rank and DataLoader worker):

    shards of this rank (split by node) -> ResampledShards (endless, seeded) -> tar samples
      -> shuffle buffer -> decode (skip + count what fails) -> batches [-> fixed epoch length]

Evaluation: shards split by node and by worker, read once in order, no shuffle, no augmentation.

Randomness and resuming. A stream is seeded by (seed, rank, worker, start_batch, iteration):
`start_batch` is the global batch the run starts at (non-zero when resuming) and `iteration` counts
the epochs this stream object has begun. Runs with the same settings read the same batches; a
resumed run draws a new sequence of shards and samples: it does not replay the one it already
read. An exact resume is not possible here (the shuffle buffers and the open shards are not saved
in checkpoints); with resampled shards every sample has the same probability at every step, so the
resumed run reads the data with the same statistics as an uninterrupted run.

Errors. Unreadable shards (missing, truncated, not a tar) and undecodable samples are skipped with
a warning and counted; the counts travel with every batch (`batch["data_errors"]`) so the training
loop can log them (`data.base.DataErrorLog`). A stream that hits many errors in a row
with no good sample between them stops with an error naming the last one instead of spinning.
`DataConfigError` (data that does not match the config, e.g. latent shape) is raised at once.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import zlib
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from erg.sampling import sample_seed
from models.runtime import ConfigError

__all__ = [
    "DataConfigError",
    "EvalStream",
    "SampleError",
    "SkipCounter",
    "TrainStream",
    "bad_sample",
    "expand_urls",
    "rank_share",
    "stream_seed",
]

log = logging.getLogger("erg.data")


class DataConfigError(ConfigError):
    """The data does not match the configuration (never skipped: the message says what to change)."""


# --- shard lists -----------------------------------------------------------------------------------
def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def expand_urls(spec: str | list[str] | tuple[str, ...], key: str = "data.shards") -> list[str]:
    """Shard URLs from a brace pattern (`/data/train-{000000..000099}.tar`), a list of patterns, a
    `::`-separated string, a local folder (its *.tar files), a local glob, or `pipe:` commands
    (`pipe:aws s3 cp s3://bucket/train-000000.tar -`). Local shards must exist: if none does, this
    raises; missing ones among existing ones are named in a warning (and skipped when drawn). `key`:
    the setting the shards came from, named in errors (a script's option, e.g. --shards)."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise DataConfigError(f"no shards given: set {key} (a brace pattern, a folder of .tar, or a list)")
    patterns = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    urls: list[str] = []
    for pattern in patterns:
        for url in wds.shardlists.expand_urls(pattern):
            if _is_local(url) and Path(url).expanduser().is_dir():
                urls += sorted(str(p) for p in Path(url).expanduser().glob("*.tar"))
            elif _is_local(url) and any(c in url for c in "*?["):
                urls += sorted(glob.glob(os.path.expanduser(url)))
            else:
                urls.append(os.path.expanduser(url) if _is_local(url) else url)
    if not urls:
        raise DataConfigError(f"{key}={spec}: no shards match (a brace pattern, a folder of .tar, or a list)")
    local = [u for u in urls if _is_local(u)]
    missing = [u for u in local if not Path(u).is_file()]
    if local and len(missing) == len(local):
        raise FileNotFoundError(
            f"none of the {len(local)} shard file(s) of {key}={spec} exists (first: {missing[0]}). Check {key}"
            + (" (or the environment variable the experiment reads it from)" if key == "data.shards" else "")
            + "; scripts/make_shards.py writes shards"
        )
    if missing:
        log.warning("%d of %d shards do not exist and will be skipped, e.g. %s", len(missing), len(urls), missing[0])
    return urls


def rank_share(urls: list[str], rank: int, world_size: int) -> list[str]:
    """The shards of one rank: every `world_size`-th, so ranks read disjoint shards (webdataset's
    split_by_node, with rank and world size passed explicitly: wds reads them from RANK/WORLD_SIZE or
    an initialised process group, neither of which is reliable in DataLoader workers)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    if len(urls) < world_size:
        log.warning(
            "only %d shard(s) for %d ranks: every rank resamples all shards (ranks may read the same samples; "
            "write smaller shards to give each rank its own)",
            len(urls),
            world_size,
        )
        return list(urls)
    return urls[rank::world_size]


def stream_seed(seed: int, rank: int, worker: int, start_batch: int, iteration: int) -> int:
    """The seed of one training stream (see the module docstring)."""
    s = seed
    for k in (rank, worker, start_batch, iteration):
        s = sample_seed(s, k)
    return s


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# --- skipped data ----------------------------------------------------------------------------------
class SampleError(ValueError):
    """A sample that could not be decoded, named by its shard and key (the decoder's error as the cause)."""


class SkipCounter:
    """webdataset error handlers that warn, count and continue (`shard_error` for tar reading,
    `sample_error` for decoding). Warnings name the shard (and the sample's key); `bad_shards` holds
    each broken shard once however often a resampled stream draws it. Raises after `max_consecutive`
    errors with no good sample between."""

    def __init__(self, max_consecutive: int = 1000, where: str = ""):
        self.bad_shards: set[str] = set()
        self.samples = 0
        self.consecutive = 0
        self.max_consecutive = max_consecutive
        self.where = where
        self._warned = 0
        self._seen: set[str] = set()

    @property
    def shards(self) -> int:
        """Distinct shards skipped (in whole or in part)."""
        return len(self.bad_shards)

    def good(self) -> None:
        self.consecutive = 0

    def _count(self, exn: BaseException, what: str, why: str, new: bool) -> bool:
        self.consecutive += 1
        if new and (self._warned < 10 or (self.shards + self.samples) % 100 == 0):
            self._warned += 1
            log.warning(
                "%sskipped %s (%d shard(s), %d sample(s) skipped so far): %s",
                self.where, what, self.shards, self.samples, why,
            )  # fmt: skip
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self.consecutive} data errors in a row without one readable sample; last: {what}: {why}. "
                "Check data.shards and the data format"
            ) from exn
        return True

    def shard_error(self, exn: BaseException) -> bool:
        if isinstance(exn, DataConfigError):
            raise exn
        url = _url_of(exn) or f"<unnamed shard {len(self.bad_shards) + 1}>"
        new = url not in self.bad_shards
        self.bad_shards.add(url)
        return self._count(exn, f"shard {url} (or its rest)", _describe(exn, drop=url), new)

    def sample_error(self, exn: BaseException) -> bool:
        if isinstance(exn, DataConfigError):
            raise exn
        self.samples += 1
        why = _describe(exn)
        new = why not in self._seen  # a resampled stream meets the same bad sample again: warned once
        self._seen.add(why)
        return self._count(exn, "a sample", why, new)


def bad_sample(sample: dict[str, Any], exn: BaseException) -> SampleError:
    """The error to count for a sample that could not be decoded: its key and shard, and why."""
    where = f"sample {sample.get('__key__')} of {sample.get('__url__', 'an unnamed shard')}"
    return SampleError(f"{where}: {_describe(exn)}")


def _url_of(exn: BaseException) -> str | None:
    """The shard webdataset names in a reading error (it appends the URL to the exception's args)."""
    return next((a for a in reversed(exn.args) if isinstance(a, str) and (".tar" in a or "/" in a)), None)


def _describe(exn: BaseException, drop: str | None = None) -> str:
    """`Type: message` with what names nothing left out (object reprs such as <_io.BytesIO object at 0x..>)."""
    from models.cli import strip_addresses

    parts = [strip_addresses(str(a)) for a in exn.args if isinstance(a, str | int | float) and a != drop]
    return f"{type(exn).__name__}: {' | '.join(p for p in parts if p)}"


# --- batches ---------------------------------------------------------------------------------------
def _collate(samples: list[dict[str, Any]], counter: SkipCounter, stream_id: str) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "x": torch.stack([s["x"] for s in samples]),
        "y": torch.tensor([s["y"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
    }
    if "caption" in samples[0]:
        batch["caption"] = [s["caption"] for s in samples]
    if "text_encodings" in samples[0]:  # cached embeddings: encoder -> tokens (B, L, d), mask (B, L), pooled (B, p)
        batch["text_encodings"] = {
            name: {k: torch.stack([s["text_encodings"][name][k] for s in samples]) for k in parts}
            for name, parts in samples[0]["text_encodings"].items()
        }
    # What this stream skipped so far: the broken shards by name (counted once per rank however often
    # they are drawn) and the number of skipped samples (plain Python values: logging needs no device sync).
    batch["data_errors"] = (stream_id, tuple(sorted(counter.bad_shards)), counter.samples)
    return batch


def _decode_counted(decoder: Callable[..., dict[str, Any]], counter: SkipCounter, **kwargs: Any):
    def run(sample: dict[str, Any]) -> dict[str, Any]:
        try:
            out = decoder(sample, **kwargs)
        except DataConfigError:
            raise
        except Exception as exn:  # name the sample and its shard in the warning
            raise bad_sample(sample, exn) from exn
        counter.good()
        return out

    return run


class TrainStream(IterableDataset):
    """Endless batches for one rank (see the module docstring); `epoch_batches` (per rank) makes
    each DataLoader epoch exactly that long, split exactly over the workers."""

    def __init__(
        self,
        urls: list[str],
        decoder: Callable[..., dict[str, Any]],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        shuffle_buffer: int = 1000,
        epoch_batches: int | None = None,
        max_consecutive_errors: int = 1000,
    ):
        super().__init__()
        self.urls = rank_share(urls, rank, world_size)
        self.decoder = decoder
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.start_batch = start_batch
        self.shuffle_buffer = shuffle_buffer
        self.epoch_batches = epoch_batches
        self.max_consecutive_errors = max_consecutive_errors
        self.iteration = -1  # epochs begun by this copy of the stream (each worker has its own copy)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        self.iteration += 1
        seed = stream_seed(self.seed, self.rank, worker, self.start_batch, self.iteration)
        rng = random.Random(seed)
        counter = SkipCounter(self.max_consecutive_errors, where=f"[rank {self.rank} worker {worker}] ")
        stream_id = f"{worker}.{self.iteration}"
        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.urls, worker_seed=lambda: seed, deterministic=True),
            wds.tarfile_to_samples(handler=counter.shard_error),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng) if self.shuffle_buffer > 1 else None,
            wds.map(_decode_counted(self.decoder, counter, rng=rng), handler=counter.sample_error),
            wds.batched(self.batch_size, collation_fn=lambda s: _collate(s, counter, stream_id), partial=False),
        )
        if self.epoch_batches:
            # Exactly epoch_batches per rank: worker w takes its share, so all ranks stay in step.
            share = self.epoch_batches // num_workers + (worker < self.epoch_batches % num_workers)
            pipeline = pipeline.with_epoch(nbatches=share)
        return iter(pipeline)


class EvalStream(IterableDataset):
    """Every sample of the evaluation shards once, in order, no augmentation: shards split by node
    (or, with fewer shards than ranks, samples split by a hash of their key) and by worker."""

    def __init__(
        self,
        urls: list[str],
        decoder: Callable[..., dict[str, Any]],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        max_consecutive_errors: int = 1000,
    ):
        super().__init__()
        self.split_samples = len(urls) < world_size
        self.urls = list(urls) if self.split_samples else urls[rank::world_size]
        self.decoder = decoder
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.max_consecutive_errors = max_consecutive_errors

    def _mine(self, sample: dict[str, Any]) -> bool:
        return zlib.crc32(sample["__key__"].encode()) % self.world_size == self.rank

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, _ = _worker()
        counter = SkipCounter(self.max_consecutive_errors, where=f"[eval rank {self.rank} worker {worker}] ")
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=counter.shard_error),
            wds.select(self._mine) if self.split_samples else None,
            wds.map(_decode_counted(self.decoder, counter, rng=None), handler=counter.sample_error),
            wds.batched(self.batch_size, collation_fn=lambda s: _collate(s, counter, f"eval{worker}"), partial=True),
        )
        return iter(pipeline)


def take(stream: IterableDataset, n: int) -> list[dict[str, Any]]:
    """The first n batches of a stream (tests, benchmarks)."""
    return list(islice(iter(stream), n))
