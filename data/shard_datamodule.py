"""Webdataset shards as a DataModule: images or precomputed latents, class labels or captions.

    data.shards       training shards (brace pattern, list, folder, `pipe:` commands)
    data.val_shards   held-out shards for the validation loss (null: no validation)
    data.kind         images (decoded, ADM centre crop, optional flip) | latents (.npy, model space)
    data.text_embeddings  null (text encoders run on the fly) | true | a folder: read the caption
                      encodings cached by scripts/precompute_text_embeddings.py (data/text_embeddings.py)

Training reads an endless stream of resampled shards per rank (`data.shards.TrainStream`);
`epoch_batches` sets a fixed epoch length (batches per rank), otherwise training is one endless
epoch counted in steps. `global_batch_size` states the recipe's batch (e.g. DiT's 256) and derives
the per-GPU batch from the number of GPUs, nodes and accumulation steps.

Skipped shards and samples are counted in every batch and logged by `data.base.DataErrorLog`
(`data/skipped_shards`: distinct broken shards; `data/skipped_samples`; summed over ranks and workers).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from data.base import DataErrorLog, FlowDataModule
from data.shard_decode import SampleDecoder
from data.shards import DataConfigError, EvalStream, TrainStream, expand_urls
from data.text_embeddings import read_manifest, resolve_folder
from models.autoencoder import Autoencoder

__all__ = ["DataErrorLog", "ShardDataModule"]

log = logging.getLogger("erg.data")

LATENTS_INFO = "latents.json"  # written next to latent shards by scripts/precompute_latents.py


class ShardDataModule(FlowDataModule):
    def __init__(
        self,
        shards: str | list[str],
        kind: str = "images",
        val_shards: str | list[str] | None = None,
        image_size: int | None = None,
        input_size: int | None = None,
        channels: int = 3,
        num_classes: int = 0,
        captions: list[str] | None = None,
        random_flip: bool = True,
        batch_size: int = 32,
        global_batch_size: int | None = None,
        val_batch_size: int | None = None,
        shuffle_buffer: int = 1000,
        epoch_batches: int | None = None,
        num_workers: int = 4,
        prefetch_factor: int = 2,
        max_consecutive_errors: int = 1000,
        seed: int = 0,
        autoencoder: Autoencoder | None = None,
        text_embeddings: str | bool | None = None,
    ):
        if kind == "images":
            image_size = image_size or input_size
            if image_size is None or (input_size is not None and input_size != image_size):
                raise DataConfigError(
                    f"image shards: data.input_size ({input_size}) must equal data.image_size ({image_size})"
                )
            input_size = image_size
        elif kind == "latents":
            if input_size is None:
                raise DataConfigError(
                    "latent shards: set data.input_size (the latent's spatial size, e.g. 32 at 256px)"
                )
            if autoencoder is None:
                raise DataConfigError(
                    "latent shards need data.autoencoder (its decoder turns the training sample grids into images): "
                    "use autoencoder@data.autoencoder=sd_vae (or sd3_vae) and set its path"
                )
            _check_latent_space(autoencoder, channels, input_size, image_size)
        if global_batch_size is not None and global_batch_size < 1:
            raise DataConfigError(f"data.global_batch_size must be >= 1, got {global_batch_size}")
        if shuffle_buffer < 0 or (epoch_batches is not None and epoch_batches < 1):
            raise DataConfigError("data.shuffle_buffer must be >= 0 and data.epoch_batches >= 1 (or null)")
        super().__init__(input_size, channels, num_classes, batch_size, num_workers, seed, val_batch_size)
        self.urls = expand_urls(shards)
        self.val_urls = expand_urls(val_shards) if val_shards else []
        self.kind = kind
        self.image_size = image_size
        self.global_batch_size = global_batch_size
        self.shuffle_buffer = shuffle_buffer
        self.epoch_batches = epoch_batches
        self.prefetch_factor = prefetch_factor
        self.max_consecutive_errors = max_consecutive_errors
        self.autoencoder = autoencoder
        # Cached text embeddings (scripts/precompute_text_embeddings.py): batches carry "text_encodings"
        # and training runs no text encoder (the run's text_encoder config is checked against the
        # manifest when the stack is built: data.text_embeddings.CachedTextConditioner).
        self.text_embeddings = resolve_folder(text_embeddings, shards)
        manifest = read_manifest(self.text_embeddings) if self.text_embeddings is not None else None
        common = dict(kind=kind, input_size=input_size, channels=channels, num_classes=num_classes,
                      image_size=image_size, captions=captions, text_embeddings=manifest)  # fmt: skip
        self.train_decoder = SampleDecoder(**common, random_flip=random_flip)
        self.eval_decoder = SampleDecoder(**common, random_flip=False)
        if kind == "latents":
            _check_latents_info(self.urls, autoencoder, channels, input_size)

    # --- model space -------------------------------------------------------------------------------
    def decode(self, x: Tensor) -> Tensor:
        """Model space -> images in [-1, 1]: the autoencoder's decoder for latents."""
        if self.kind == "latents":
            return self.autoencoder.decode(x)
        return x

    def callbacks(self) -> list[L.Callback]:
        return [DataErrorLog()]

    # --- batch size --------------------------------------------------------------------------------
    def per_rank_batch_size(self) -> int:
        """data.batch_size, or global_batch_size / (ranks x accumulation) when the recipe states it."""
        if self.global_batch_size is None:
            return self.batch_size
        _, world = self._rank_world()
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        per_rank, rest = divmod(self.global_batch_size, world * accumulate)
        if rest or per_rank == 0:
            raise DataConfigError(
                f"data.global_batch_size={self.global_batch_size} does not split over {world} GPU(s) x "
                f"{accumulate} accumulation step(s): choose GPUs/accumulation that divide it"
            )
        return per_rank

    # --- loaders -----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        pass  # streams are built per loader (they need the rank and the step to start at)

    def _loader(self, dataset: torch.utils.data.IterableDataset) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=None,  # the streams batch themselves
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )

    def train_stream(self) -> TrainStream:
        rank, world = self._rank_world()
        batch_size = self.per_rank_batch_size()
        if self.trainer is not None and rank == 0:
            accumulate = self.trainer.accumulate_grad_batches
            log.info(
                "shards: %d training shard(s); batch %d per GPU x %d GPU(s) x %d accumulation = %d per step",
                len(self.urls), batch_size, world, accumulate, batch_size * world * accumulate,
            )  # fmt: skip
        return TrainStream(
            self.urls,
            self.train_decoder,
            batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world,
            start_batch=self._resume_batch(),
            shuffle_buffer=self.shuffle_buffer,
            epoch_batches=self.epoch_batches,
            max_consecutive_errors=self.max_consecutive_errors,
        )

    def eval_stream(self) -> EvalStream:
        rank, world = self._rank_world()
        return EvalStream(
            self.val_urls,
            self.eval_decoder,
            self.val_batch_size,
            rank=rank,
            world_size=world,
            max_consecutive_errors=self.max_consecutive_errors,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_stream())

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
            return []  # no validation shards: Lightning skips validation
        return self._loader(self.eval_stream())


# --- consistency checks ----------------------------------------------------------------------------
def _check_latent_space(autoencoder: Autoencoder, channels: int, input_size: int, image_size: int | None) -> None:
    if autoencoder.channels != channels:
        raise DataConfigError(
            f"data.channels={channels} but the autoencoder has {autoencoder.channels} latent channels"
        )
    if image_size is not None and image_size // autoencoder.factor != input_size:
        raise DataConfigError(
            f"data.input_size={input_size} but {image_size}px images give {image_size // autoencoder.factor} with "
            f"the autoencoder's factor {autoencoder.factor}"
        )


def _check_latents_info(urls: list[str], autoencoder: Autoencoder, channels: int, input_size: int) -> None:
    """Compare with the latents.json that precompute_latents.py writes next to local shards."""
    folders = {Path(u).parent for u in urls if Path(u).is_file()}
    for folder in sorted(folders):
        info_path = folder / LATENTS_INFO
        if not info_path.is_file():
            continue
        info = json.loads(info_path.read_text())
        made_with = info.get("autoencoder", {})
        mismatch = [
            f"{name}: shards {made_with.get(name)} vs config {value}"
            for name, value in (
                ("channels", autoencoder.channels),
                ("shift", autoencoder.shift),
                ("scale", autoencoder.scale),
            )
            if made_with.get(name) is not None and abs(float(made_with[name]) - float(value)) > 1e-6
        ]
        if info.get("latent_shape") and list(info["latent_shape"]) != [channels, input_size, input_size]:
            mismatch.append(
                f"latent shape: shards {info['latent_shape']} vs config {[channels, input_size, input_size]}"
            )
        if mismatch:
            raise DataConfigError(
                f"the latent shards in {folder} were made with another autoencoder or size ({'; '.join(mismatch)}): "
                "point data.autoencoder at the one named in latents.json, or re-run scripts/precompute_latents.py"
            )
