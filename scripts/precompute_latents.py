"""Encode image shards into latent shards once, so training reads latents instead of running the VAE.

    # SD VAE (4 channels, DiT's latents): 256px images -> 32x32x4 latents, plus mirrored-image latents
    python scripts/precompute_latents.py --shards '/data/shards/imagenet/train-{000000..001281}.tar' \\
        --out /data/latents/imagenet256 --image-size 256 --autoencoder /models/sd-vae-ft-ema --flip

    # SD3 VAE (16 channels, shift and scale read from its config)
    python scripts/precompute_latents.py ... --autoencoder /models/sd3-medium --subfolder vae

    # several GPUs: one process per GPU, each takes every world_size-th input shard
    torchrun --nproc-per-node 8 scripts/precompute_latents.py ...      (or srun, or --rank/--world-size)

Each input shard becomes an output shard of the same name holding, per sample, `.npy` (the
model-space latent (C, h, w): (z - shift) * scale), `.flip.npy` with --flip (the latent of the
mirrored image; the loader picks one at random when data.random_flip=true), and the input's other
members (.cls, .txt, .json) unchanged. Images are ADM centre-cropped to --image-size first, as DiT
does. Shards are written atomically; a rerun skips finished shards. `--mode sample` draws the
posterior sample of each image from a seed of (--seed, sample key), so results do not depend on
batching or on the number of GPUs. `latents.json` in the output folder records the autoencoder,
shift, scale and shapes; the DataModule checks its config against it.

Unreadable input shards are not written (a rerun retries them) and are listed at the end;
undecodable images are skipped and counted (warnings name the shard and the sample). A progress bar
(shards, rate, ETA) shows on a terminal; `--no-progress` turns it off.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import webdataset as wds

from data.shard_datamodule import LATENTS_INFO
from data.shard_decode import IMAGE_MEMBERS, decode_image
from data.shard_writer import check_manifest, write_shard
from data.shards import SkipCounter, bad_sample, expand_urls
from erg.sampling import sample_noise
from models.autoencoder import Autoencoder, DiffusersVAE, IdentityAutoencoder
from models.cli import add_progress_flag, progress, reported
from models.runtime import ConfigError, check_device

log = logging.getLogger("erg.precompute_latents")

DROPPED = {*IMAGE_MEMBERS, "__url__", "__local_path__"}


class ShardFailed(RuntimeError):
    """An input shard could not be read completely; its output is not written."""


def distributed_rank(rank: int | None, world_size: int | None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from the arguments, torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or
    srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); one process by default."""
    env = os.environ
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ConfigError("give both --rank and --world-size")
        if not 0 <= rank < world_size:
            raise ConfigError(f"--rank {rank} must be in [0, --world-size {world_size})")
        return rank, world_size, rank
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def load_autoencoder(args: argparse.Namespace, device: torch.device) -> Autoencoder:
    if args.autoencoder == "identity":
        return IdentityAutoencoder(channels=3)
    folder = Path(args.autoencoder).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"--autoencoder {args.autoencoder}: no such folder (a local diffusers AutoencoderKL, e.g. sd-vae-ft-ema, "
            "or a pipeline folder with --subfolder vae; 'identity' keeps pixels)"
        )
    if args.subfolder and not (folder / args.subfolder).is_dir():
        raise ConfigError(f"--subfolder {args.subfolder}: {folder} has no such sub-folder")
    return DiffusersVAE(args.autoencoder, subfolder=args.subfolder, dtype=args.vae_dtype).to(device)


def sample_index(key: str) -> int:
    """An integer id of a sample key (make_shards' keys are integers already)."""
    return int(key) if key.isdigit() else zlib.crc32(key.encode())


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encoded_samples(
    url: str, ae: Autoencoder, args: argparse.Namespace, device: torch.device, counter: SkipCounter
) -> Iterator[dict[str, Any]]:
    """The latent samples of one input shard, encoded in batches of --batch-size."""
    source = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=counter.shard_error))
    pending: list[tuple[dict[str, Any], torch.Tensor]] = []

    def flush() -> Iterator[dict[str, Any]]:
        samples = [s for s, _ in pending]
        images = torch.stack([x for _, x in pending]).to(device)
        idx = [sample_index(s["__key__"]) for s in samples]
        views = [("npy", images)] + ([("flip.npy", images.flip(-1))] if args.flip else [])
        out = [{"__key__": s["__key__"], **{k: v for k, v in s.items() if k not in DROPPED}} for s in samples]
        for v, (member, x) in enumerate(views):
            noise = None
            if args.mode == "sample":  # per-sample seeds: independent of batching and ranks
                shape = ae.latent_shape(args.image_size)
                noise = sample_noise([2 * i + v for i in idx], shape, base_seed=args.seed, device=device)
            z = ae.encode(x, mode=args.mode, noise=noise).float().cpu().numpy().astype(args.dtype)
            for sample, latent in zip(out, z):
                sample[member] = _npy(latent)
        pending.clear()
        yield from out

    shards_before = counter.shards
    for sample in source:
        try:
            x = decode_image(sample, args.image_size, channels=3)
        except Exception as exn:
            counter.sample_error(bad_sample(sample, exn))  # the warning names the shard and the sample
            continue
        counter.good()
        pending.append((sample, x))
        if len(pending) == args.batch_size:
            yield from flush()
    if counter.shards > shards_before:
        raise ShardFailed(f"{url} could not be read completely")
    if pending:
        yield from flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="input image shards (brace pattern, folder, list with ::)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--image-size", type=int, required=True, help="ADM centre crop size before encoding")
    p.add_argument("--autoencoder", required=True, help="a local diffusers AutoencoderKL folder, or 'identity'")
    p.add_argument("--subfolder", default=None, help="e.g. 'vae' inside a pipeline folder")
    p.add_argument("--mode", choices=("mean", "sample"), default="mean", help="posterior mean or a seeded sample")
    p.add_argument("--flip", action="store_true", help="also store the latent of the mirrored image")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage dtype")
    p.add_argument("--vae-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda:<local rank> if available, else cpu")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world-size", type=int, default=None)
    add_progress_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rank, world, local_rank = distributed_rank(args.rank, args.world_size)
    if args.image_size < 1 or args.batch_size < 1:
        raise ConfigError(f"--image-size and --batch-size must be >= 1, got {args.image_size} and {args.batch_size}")
    if args.device:
        device = check_device(args.device, "--device")
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    urls = expand_urls(args.shards, key="--shards")
    ae = load_autoencoder(args, device)
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    check_manifest(out / LATENTS_INFO, {
        "source": args.shards, "image_size": args.image_size, "latent_shape": list(ae.latent_shape(args.image_size)),
        "autoencoder": ae.describe(), "mode": args.mode, "flip": args.flip, "dtype": args.dtype, "seed": args.seed,
    })  # fmt: skip

    mine = urls[rank::world]
    todo = [u for u in mine if not (out / Path(u).name).is_file()]
    log.info("rank %d/%d: %d of its %d shards to encode on %s", rank, world, len(todo), len(mine), device)
    counter = SkipCounter(where=f"[rank {rank}] ")
    failed, written = [], 0
    bar = progress(todo, unit="shard", desc=f"rank {rank} latents", enabled=args.progress)
    for url in bar:
        try:
            written += write_shard(out / Path(url).name, encoded_samples(url, ae, args, device, counter))
        except ShardFailed as err:
            failed.append(url)
            log.error("%s; not written (rerun to retry)", err)
        bar.set_postfix(samples=written, refresh=False)
    print(
        f"rank {rank}/{world}: {len(todo) - len(failed)} shard(s), {written} samples encoded into {out}; "
        f"skipped {counter.samples} undecodable image(s); {len(failed)} unreadable shard(s)"
        + (f": {failed}" if failed else "")
    )
    return {"written": written, "shards": len(todo) - len(failed), "failed": failed, "skipped_samples": counter.samples}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with reported(writes="--out <folder>"):
        result = main()
    sys.exit(1 if result["failed"] else 0)
