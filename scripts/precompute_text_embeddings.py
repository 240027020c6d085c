"""Encode the captions of text-image (or latent) shards once, so training reads the encodings instead
of running the frozen text encoders (an 8B Llama) at every step.

    # the paper's Llama3-8B + Flan-T5-XL, both caption sources of experiment=t2i_mmdit_b2, on the
    # latent shards; only the real tokens are stored (text_encoder.padding=zeros, also at training)
    python scripts/precompute_text_embeddings.py --shards $T2I_LATENTS --out /data/latents/t2i256_text \\
        --captions json:long_caption,json:short_caption --prompt 'a photo of a cat' --prompt ... \\
        text_encoder=llama3_t5 text_encoder.padding=zeros

    # several GPUs: one process per GPU, each takes every world_size-th input shard
    torchrun --nproc-per-node 8 scripts/precompute_text_embeddings.py ...   (or srun, or --rank/--world-size)

The trailing arguments are Hydra overrides of configs/train.yaml: the text_encoder config of the
run that will train on the cache (the cache is checked against it). Each input shard becomes an
output shard of the same name holding every member of each sample unchanged plus the encodings of
each of its --captions sources by each encoder (data/text_embeddings.py describes the format and the
storage dtypes), so `data.captions` still draws one source at random per step. Next to the shards:
text_embeddings.json (the encoders' identity, checked by training) and null_encodings.pt (each
encoder's empty-prompt encoding, and the encodings of each --prompt for the sample grids), and the
input's latents.json for latent shards (so training still checks the autoencoder). Shards are
written atomically; a rerun skips finished shards and refuses to mix encoder setups in one folder.
Unreadable input shards are not written (a rerun retries them) and are listed at the end. A progress
bar (shards, rate, ETA) shows on a terminal; `--no-progress` turns it off.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import webdataset as wds

from data.shard_datamodule import LATENTS_INFO
from data.shard_decode import caption_texts, parse_caption_sources
from data.shard_writer import check_manifest, write_shard
from data.shards import SkipCounter, expand_urls
from data.text_embeddings import MANIFEST, NULLS, STORAGE_DTYPES, encode_sample, encoder_identity, source_tag
from models.cli import add_progress_flag, progress, reported
from models.io import atomic_write_bytes
from models.runtime import ConfigError, check_device, composition_error
from models.text_encoders import TextConditioner, TextEncoding
from scripts.precompute_latents import ShardFailed, distributed_rank

log = logging.getLogger("erg.precompute_text_embeddings")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load_stack(overrides: list[str], device: torch.device) -> tuple[TextConditioner, dict[str, Any]]:
    """The run's text encoder stack (configs/text_encoder/*.yaml with the overrides) on `device`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from models.runtime import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
    except Exception as err:  # a misspelled override: named with its closest key
        raise composition_error(err) from err
    if not cfg.get("text_encoder"):
        raise ConfigError("name the run's text encoders as a Hydra override, e.g. text_encoder=llama3_t5")
    node = OmegaConf.to_container(cfg.text_encoder, resolve=True)
    for enc in node["encoders"].values():
        enc["device"] = str(device)  # this rank's GPU (the configs' `auto` would put every rank on cuda:0)
    return instantiate(node), node


def describe(stack: TextConditioner, node: dict[str, Any]) -> dict[str, Any]:
    """The manifest's encoder entries: identity (compared with a training run's config) and sizes."""
    return {
        name: {
            "identity": encoder_identity({k: v for k, v in node["encoders"][name].items()}),
            "class": type(enc).__name__,
            "hidden_size": enc.hidden_size,
            "pooled_size": enc.pooled_size,
            "max_length": enc.max_length,
            "compute_dtype": str(enc.dtype).removeprefix("torch."),
        }
        for name, enc in stack.encoders.items()
    }


def write_nulls(path: Path, stack: TextConditioner, prompts: list[str]) -> None:
    """null_encodings.pt: each encoder's null input and the encodings of "" and `prompts`, float32."""
    if path.is_file():
        return
    table = ["", *prompts]
    encoded = stack.encode(table)

    def plain(e: TextEncoding) -> dict[str, torch.Tensor]:
        return {"tokens": e.tokens.float().cpu(), "mask": e.mask.bool().cpu(), "pooled": e.pooled.float().cpu()}

    data = {
        "null": {name: plain(stack.null_encoding(name)) for name in stack.names},
        "prompts": table,
        "prompt_encodings": {name: plain(e) for name, e in encoded.items()},
    }
    buf = io.BytesIO()
    torch.save(data, buf)
    atomic_write_bytes(path, buf.getvalue())


def encoded_samples(
    url: str, stack: TextConditioner, args: argparse.Namespace, counter: SkipCounter
) -> Iterator[dict[str, Any]]:
    """The samples of one input shard with their captions' encodings, in batches of --batch-size samples."""
    sources = parse_caption_sources(args.captions.split(","))
    source = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=counter.shard_error))
    pending: list[tuple[dict[str, Any], list[tuple[str, str]]]] = []

    def flush() -> Iterator[dict[str, Any]]:
        prompts = [text for _, captions in pending for _, text in captions]
        encoded = stack.encode(prompts) if prompts else {}
        i = 0
        for sample, captions in pending:
            rows = {}
            for tag, _ in captions:
                rows[tag] = {n: TextEncoding(e.tokens[i], e.mask[i], e.pooled[i]) for n, e in encoded.items()}
                i += 1
            # every original member, but not encodings of an earlier cache (these are replaced)
            out = {k: v for k, v in sample.items() if not k.startswith("__") and not k.startswith("te.")}
            out.update(encode_sample(rows, args.dtype, valid_only=stack.padding == "zeros"))
            yield {"__key__": sample["__key__"], **out}
        pending.clear()

    shards_before = counter.shards
    for sample in source:
        counter.good()
        pending.append((sample, caption_texts(sample, sources)))
        if len(pending) == args.batch_size:
            yield from flush()
    if counter.shards > shards_before:
        raise ShardFailed(f"{url} could not be read completely")
    if pending:
        yield from flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="input shards (brace pattern, folder, list with ::)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--captions", default="txt", help="caption sources to encode: txt,json:<field> (every one data.captions uses)"
    )
    p.add_argument(
        "--prompt", action="append", default=[], dest="prompts", help="a prompt to store for the grids (repeatable)"
    )
    p.add_argument("--dtype", choices=STORAGE_DTYPES, default="bfloat16", help="storage (data/text_embeddings.py)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per encoder batch")
    p.add_argument("--device", default=None, help="default: cuda:<local rank> if available, else cpu")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world-size", type=int, default=None)
    p.add_argument("overrides", nargs="*", help="Hydra overrides naming the text encoders, e.g. text_encoder=llama3_t5")
    add_progress_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rank, world, local_rank = distributed_rank(args.rank, args.world_size)
    if args.device:
        device = check_device(args.device, "--device")
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    tags = [source_tag(m, f) for m, f in parse_caption_sources(args.captions.split(","))]
    urls = expand_urls(args.shards, key="--shards")
    stack, node = load_stack(args.overrides, device)
    prompts = list(dict.fromkeys(p for p in args.prompts if p))
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    check_manifest(out / MANIFEST, {
        "source": args.shards, "sources": tags, "dtype": args.dtype, "encoders": describe(stack, node),
        "padding": stack.padding, "null_input": stack.null_input, "prompts": prompts,
    })  # fmt: skip
    write_nulls(out / NULLS, stack, prompts)
    for folder in sorted({Path(u).parent for u in urls if Path(u).is_file()}):  # latent shards: keep their record
        if (folder / LATENTS_INFO).is_file() and not (out / LATENTS_INFO).is_file():
            atomic_write_bytes(out / LATENTS_INFO, (folder / LATENTS_INFO).read_bytes())

    mine = urls[rank::world]
    todo = [u for u in mine if not (out / Path(u).name).is_file()]
    log.info("rank %d/%d: %d of its %d shards to encode on %s", rank, world, len(todo), len(mine), device)
    counter = SkipCounter(where=f"[rank {rank}] ")
    failed, written = [], 0
    bar = progress(todo, unit="shard", desc=f"rank {rank} text", enabled=args.progress)
    for url in bar:
        try:
            written += write_shard(out / Path(url).name, encoded_samples(url, stack, args, counter))
        except ShardFailed as err:
            failed.append(url)
            log.error("%s; not written (rerun to retry)", err)
        bar.set_postfix(samples=written, refresh=False)
    print(
        f"rank {rank}/{world}: {len(todo) - len(failed)} shard(s), {written} samples encoded into {out}; "
        f"{len(failed)} unreadable shard(s)" + (f": {failed}" if failed else "")
    )
    return {"written": written, "shards": len(todo) - len(failed), "failed": failed}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with reported(writes="--out <folder>"):
        result = main()
    sys.exit(1 if result["failed"] else 0)
