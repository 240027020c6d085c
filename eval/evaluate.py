"""Assemble and run one evaluation from the composed Hydra config (the body of `evaluate.py`).

samples (sample.py folder, image folder or ADM .npz) vs a reference (a dataset config's split, an image
folder, an ADM reference batch, or a statistics file written here) -> metrics.json next to the samples
(eval/records.py), the same numbers to the configured logger, and the record returned.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from eval.preprocess import Protocol
from eval.records import METRICS_FILE, write_record
from eval.sources import DatasetSource, ImageSource, open_source
from models.runtime import (
    ConfigError,
    check_device,
    check_keys,
    check_kwargs,
    check_missing,
    check_top_level,
    check_value,
    register_resolvers,
    target_of,
)

log = logging.getLogger("erg.eval")

IMAGE_METRICS = ("fid", "precision", "recall", "density", "coverage")
PRDC_METRICS = ("precision", "recall", "density", "coverage")
TEXT_METRICS = ("clip_score", "vqa_score")
TOP_LEVEL_KEYS = {
    "samples", "reference", "data", "features", "protocol", "metrics", "fid_method", "prdc", "clip_score", "vqa_score",
    "batch_size", "num_workers", "device", "cache_dir", "out", "logger", "name", "run_dir", "seed", "progress",
    "hydra",
}  # fmt: skip
NESTED_KEYS = {"reference": ("path", "split"), "protocol": ("mode", "size"), "prdc": ("k", "chunk_size")}

__all__ = ["IMAGE_METRICS", "TEXT_METRICS", "MetricsWriteError", "output_path", "run", "settings_digest", "validate"]


class MetricsWriteError(ConfigError):
    """metrics.json could not be written; `record` holds the computed numbers (evaluate.py prints them)."""

    def __init__(self, message: str, record: dict[str, Any]):
        super().__init__(message)
        self.record = record


# --- config ----------------------------------------------------------------------------------------
def validate(cfg: DictConfig) -> list[str]:
    """Check the config before anything heavy runs; returns the requested metrics."""
    register_resolvers()
    check_missing(cfg)
    check_top_level(cfg, TOP_LEVEL_KEYS)
    for node, keys in NESTED_KEYS.items():  # plain groups (no _target_ to read their keys from)
        check_keys(cfg.get(node), keys, node)
    for key in ("batch_size", "prdc.k", "prdc.chunk_size"):
        check_value(OmegaConf.select(cfg, key), key, int, minimum=1)
    check_value(cfg.num_workers, "num_workers", int, minimum=0)
    check_value(cfg.seed, "seed", int)
    check_value(cfg.protocol.size, "protocol.size", int, minimum=1, allow_none=True)
    if isinstance(cfg.metrics, str):
        raise ConfigError(f"metrics must be a list, e.g. metrics=[{cfg.metrics}], got {cfg.metrics!r}")
    metrics = list(cfg.metrics)
    bad = [m for m in metrics if m not in IMAGE_METRICS + TEXT_METRICS]
    if bad or not metrics:
        raise ConfigError(f"metrics={metrics}: choose from {list(IMAGE_METRICS + TEXT_METRICS)}")
    if set(metrics) & set(IMAGE_METRICS):
        if cfg.get("data") is None and not cfg.reference.get("path"):
            raise ConfigError(
                "no reference: set data=<dataset config> (e.g. data=digits, its reference.split is used) or "
                "reference.path=<image folder | ADM reference .npz | statistics .npz written by evaluate.py>"
            )
        if cfg.get("data") is not None and cfg.reference.get("path"):
            raise ConfigError("give one reference: data=... or reference.path=..., not both")
        check_kwargs(cfg.features, target_of(cfg.features), "features")
        if cfg.get("data") is not None:
            check_kwargs(cfg.data, target_of(cfg.data), "data")
    for key in ("clip_score", "vqa_score"):
        if key in metrics:
            check_kwargs(cfg[key], target_of(cfg[key]), key, ignore=("batch_size",))
    if cfg.reference.split not in ("val", "train", "all"):
        raise ConfigError(f"reference.split must be val, train or all, got {cfg.reference.split!r}")
    if cfg.fid_method not in ("sqrtm", "eigh"):
        raise ConfigError(f"fid_method must be sqrtm or eigh, got {cfg.fid_method!r}")
    try:
        Protocol(cfg.protocol.mode, cfg.protocol.size)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return metrics


# What decides the numbers of an evaluation (the rest: batch sizes, workers, device, cache, logging, where
# the record goes, does not). Text scorers count only where their metric is requested.
SETTINGS_KEYS = ("reference", "data", "features", "protocol", "metrics", "fid_method", "prdc.k")
RUNTIME_KEYS = ("batch_size", "device", "cache_dir")


def settings_digest(cfg: DictConfig) -> str:
    """A short hash of the settings that decide an evaluation's numbers, stored in its record as
    `settings`: a sweep re-evaluates a point only when no record of its metrics.json carries the digest
    of the current settings (eval/sweep.py). Files the settings name (feature weights, a reference
    file) count by content, so retraining the digits feature net in place is noticed."""
    import hashlib
    import json

    from eval.features import file_hash

    register_resolvers()

    def resolved(node: Any) -> Any:  # sub-nodes resolve against the whole config (e.g. data.seed: ${seed})
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    settings = {key: resolved(OmegaConf.select(cfg, key)) for key in SETTINGS_KEYS}
    for name in TEXT_METRICS:
        if name in cfg.metrics:
            settings[name] = {k: v for k, v in resolved(cfg[name]).items() if k not in RUNTIME_KEYS}

    def files(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [f for v in node.values() for f in files(v)]
        if isinstance(node, list):
            return [f for v in node for f in files(v)]
        if isinstance(node, str) and node and Path(node).expanduser().is_file():
            return [f"{node}:{file_hash(Path(node).expanduser())}"]
        return []

    text = json.dumps({"settings": settings, "files": files(settings)}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name)


def output_path(samples: str | Path, out: str | None) -> Path:
    """metrics.json next to the samples: inside a sample/image folder, `<stem>.metrics.json` beside an .npz."""
    if out:
        return Path(str(out)).expanduser()
    samples = Path(str(samples)).expanduser()
    return samples.with_name(samples.stem + ".metrics.json") if samples.is_file() else samples / METRICS_FILE


# --- reference -------------------------------------------------------------------------------------
def _dataset_source(cfg: DictConfig, protocol: Protocol) -> ImageSource:
    """A split of the dataset config as the reference; fingerprint = the data config minus loader knobs."""
    import hashlib
    import json

    from hydra.utils import instantiate

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    if "random_flip" in data_cfg:  # a reference set is read as is
        data_cfg["random_flip"] = False
    dm = instantiate(data_cfg)
    dm.setup("fit")
    split = cfg.reference.split
    if split == "all":
        dataset = torch.utils.data.ConcatDataset([dm.train_set, dm.val_set])
    else:
        dataset = dm.val_set if split == "val" else dm.train_set
    ident = {k: v for k, v in data_cfg.items() if k not in ("batch_size", "val_batch_size", "num_workers")}
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = f"{data_cfg['_target_'].rsplit('.', 1)[-1].replace('DataModule', '').lower()}-{split}"
    return DatasetSource(dataset, name, digest, protocol, num_workers=cfg.num_workers)


def _reference(cfg: DictConfig, extractor, protocol: Protocol, device: torch.device):
    from eval.reference import feature_space, load_cached, load_or_compute_reference

    if cfg.get("data") is not None:
        source = _dataset_source(cfg, protocol)
    else:
        path = Path(str(cfg.reference.path)).expanduser()
        if path.is_file() and path.suffix == ".npz":
            with np.load(path) as data:
                is_stats = "feature_space" in data.files
            if is_stats:
                return load_cached(path, feature_space(extractor, protocol))
        source = open_source(path, protocol, cfg.num_workers)
    return load_or_compute_reference(source, extractor, cfg.cache_dir, cfg.batch_size, device, cfg.progress)


# --- text metrics ----------------------------------------------------------------------------------
class _TextScores:
    """Accumulates per-image CLIPScore / VQAScore over the streamed batches (prompts from the records)."""

    def __init__(self, scorers: dict[str, Any], batch_sizes: dict[str, int]):
        self.scorers, self.batch_sizes = scorers, batch_sizes
        self.sums = dict.fromkeys(scorers, 0.0)
        self.n = 0

    def __call__(self, images: np.ndarray, records: list[dict[str, Any]]) -> None:
        prompts = [r.get("prompt") for r in records]
        if any(p is None for p in prompts):
            raise ValueError(
                f"{', '.join(self.scorers)} need a prompt per image, but sample "
                f"{records[prompts.index(None)]['index']} "
                "has none (class-conditional or unconditional samples: drop clip_score / vqa_score from metrics)"
            )
        for name, scorer in self.scorers.items():
            bs = self.batch_sizes[name]
            for s in range(0, len(images), bs):
                self.sums[name] += float(scorer(images[s : s + bs], prompts[s : s + bs]).double().sum())
        self.n += len(images)

    def results(self) -> dict[str, float]:
        # Stored as defined: CLIPScore on its 0-100 scale, VQAScore as a probability (tables print it x100,
        # like precision / recall / density / coverage; eval/tables.py).
        return {name: total / self.n for name, total in self.sums.items()}


def _build_text_scorers(cfg: DictConfig, metrics: list[str], device: torch.device) -> tuple[dict, dict]:
    from hydra.utils import instantiate

    scorers, batch_sizes = {}, {}
    for name in TEXT_METRICS:
        if name in metrics:
            node = OmegaConf.to_container(cfg[name], resolve=True)
            batch_sizes[name] = int(node.pop("batch_size", 32))
            if "device" in node and node["device"] in (None, "auto"):
                node["device"] = str(device)
            scorers[name] = instantiate(node)
    return scorers, batch_sizes


# --- the run ---------------------------------------------------------------------------------------
def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate; writes the record to metrics.json next to the samples and returns it."""
    metrics = validate(cfg)
    from hydra.utils import instantiate

    from eval.fid import frechet_distance
    from eval.prdc import compute_prdc
    from eval.reference import extract_features, feature_space

    started = time.time()
    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    protocol = Protocol(cfg.protocol.mode, cfg.protocol.size)
    samples = open_source(cfg.samples, protocol, cfg.num_workers)
    out_path = output_path(cfg.samples, cfg.out)
    scorers, batch_sizes = _build_text_scorers(cfg, metrics, device)
    text = _TextScores(scorers, batch_sizes) if scorers else None
    values: dict[str, float] = {}
    protocols: dict[str, str] = {}
    extra: dict[str, Any] = {}

    image_metrics = [m for m in metrics if m in IMAGE_METRICS]
    if image_metrics:
        extractor = instantiate(cfg.features).to(device).eval()
        reference = _reference(cfg, extractor, protocol, device)
        need_prdc = bool(set(image_metrics) & set(PRDC_METRICS))
        stats, fake, n = extract_features(
            samples, extractor, cfg.batch_size, device, keep_features=need_prdc, progress=cfg.progress,
            desc="samples", on_batch=text,
        )  # fmt: skip
        key = f"{reference.identity}__{feature_space(extractor, protocol)}"
        if "fid" in image_metrics:
            ref = reference.stats
            values["fid"] = frechet_distance(ref.mu, ref.sigma, stats.mu, stats.sigma, method=cfg.fid_method)
        if need_prdc:
            k, chunk = cfg.prdc.k, cfg.prdc.chunk_size
            real_radii = reference.radii(k, chunk, device)
            prdc = compute_prdc(reference.features, fake, k=k, chunk_size=chunk, real_radii=real_radii, device=device)
            values.update({m: v for m, v in prdc.as_dict().items() if m in image_metrics})
            extra["prdc_k"] = k
        # k changes precision / recall / density / coverage: part of their protocol (never mixed in a table)
        protocols.update({m: f"{key}__k{cfg.prdc.k}" if m in PRDC_METRICS else key for m in values})
        extra.update(
            reference=reference.identity, feature_space=reference.feature_space, num_reference=reference.stats.n
        )
    else:
        n = 0
        for images, records in samples.batches(cfg.batch_size):
            text(images, records)
            n += len(images)
    if text is not None:
        for name, value in text.results().items():
            values[name] = value
            protocols[name] = scorers[name].identity

    skipped = [str(p) for p in getattr(samples, "skipped", [])]  # unreadable files of an image folder
    if skipped:
        log.warning("%d unreadable image(s) of %s were skipped (named above)", len(skipped), cfg.samples)
        extra["skipped_images"] = skipped
    record = {
        "metrics": values,
        "protocols": protocols,
        "num_samples": n,
        "samples": str(Path(str(cfg.samples)).expanduser().resolve()),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 2),
        "settings": settings_digest(cfg),
        **extra,
    }
    try:
        write_record(out_path, record)
    except OSError as err:  # e.g. samples in a read-only folder: the numbers must not be lost
        reason = f"{err.strerror}: {err.filename}" if err.strerror and err.filename else (err.strerror or repr(err))
        raise MetricsWriteError(
            f"could not write {out_path} ({reason}); the metrics are printed above. Write them elsewhere "
            "with out=<file>, e.g. out=metrics/run.metrics.json",
            record,
        ) from err
    _log(cfg, values, out_path)
    record["path"] = str(out_path)
    return record


def _log(cfg: DictConfig, values: dict[str, float], out_path: Path) -> None:
    """Send the numbers to the configured logger (CSV by default), next to metrics.json."""
    if not cfg.get("logger"):
        return
    from hydra.utils import instantiate

    node = OmegaConf.to_container(cfg.logger, resolve=False)
    run_dir = str(cfg.run_dir) if cfg.get("run_dir") else str(out_path.parent)
    resolved = OmegaConf.create({"logger": node, "run_dir": run_dir, "name": cfg.name})
    logger = instantiate(resolved.logger)
    logger.log_metrics({f"eval/{k}": v for k, v in values.items()}, step=0)
    logger.save()
    logger.finalize("success")
