"""Reference statistics and features: computed once per (reference set, feature space) and cached on disk.

The cache file's name carries the reference's identity and the feature space (extractor identity +
preprocessing protocol), e.g.

    <cache_dir>/data-digits-val-1a2b3c4d5e__digitscnn64-0f1e2d3c-grey16__asis.npz
        mu, sigma (float64), n, features (float32, N x D), source, feature_space
    <same stem>.radii-k3-exact.npz   the real k-NN radii for PRDC (float64; they depend on the set, k and
                                     the arithmetic: `-exact`, or `-float32` / `-float64` for prdc.exact=false)

so numbers from different networks, weights or preprocessing can never be read back for one another.
Files are written atomically; a cache hit is checked against the identity stored inside it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from eval.features import FeatureExtractor
from eval.fid import GaussianStats, RunningStats
from eval.io import atomic_save_npz
from eval.prdc import kth_neighbour_distances
from eval.preprocess import Protocol
from eval.sources import ImageSource

log = logging.getLogger("erg.eval")

__all__ = ["Reference", "cache_path", "extract_features", "feature_space", "load_cached", "load_or_compute_reference"]


def feature_space(extractor: FeatureExtractor, protocol: Protocol) -> str:
    """The identity of a feature space: network + weights + its internal resize, and the preprocessing."""
    return f"{extractor.identity}__{protocol.id}"


def cache_path(cache_dir: str | Path, source_identity: str, space: str) -> Path:
    return Path(cache_dir).expanduser() / f"{source_identity}__{space}.npz"


@dataclass
class Reference:
    identity: str  # what the reference set is (source identity)
    feature_space: str
    stats: GaussianStats
    features: Tensor | None  # (N, D) float32 on CPU, None for statistics-only references
    path: Path | None = None  # cache file, if any
    _radii: dict[tuple[int, str], Tensor] = field(default_factory=dict)

    def radii(self, k: int, chunk_size: int, device: torch.device, exact: bool = True,
              dtype: torch.dtype = torch.float32) -> Tensor:  # fmt: skip
        """Real k-NN radii, from `<stem>.radii-k{k}-{exact|float32|float64}.npz` or computed (and cached)
        now: exact float64 radii by default (eval/prdc.py), else the GEMM's in `dtype`."""
        tag = "exact" if exact else str(dtype).removeprefix("torch.")
        if (k, tag) in self._radii:
            return self._radii[(k, tag)]
        if self.features is None:
            raise ValueError(
                f"the reference {self.identity} holds statistics only (no features): precision/recall/density/"
                "coverage need the reference's features. Use a reference folder, dataset or .npz, or drop them "
                "with metrics=[fid]"
            )
        radii_file = self.path.with_name(self.path.stem + f".radii-k{k}-{tag}.npz") if self.path else None
        if radii_file is not None and radii_file.is_file():
            with np.load(radii_file) as data:
                self._radii[(k, tag)] = torch.from_numpy(data["radii"])
        else:
            features = self.features.to(device, dtype)
            radii = kth_neighbour_distances(features, k, chunk_size, exact=exact).cpu()
            if radii_file is not None:
                atomic_save_npz(radii_file, radii=radii.numpy())
            self._radii[(k, tag)] = radii
        return self._radii[(k, tag)]


def extract_features(
    source: ImageSource,
    extractor: FeatureExtractor,
    batch_size: int,
    device: torch.device,
    keep_features: bool = True,
    progress: bool = True,
    desc: str = "features",
    on_batch: Callable[[np.ndarray, list[dict[str, Any]]], None] | None = None,
) -> tuple[GaussianStats, Tensor | None, int]:
    """Stream `source` through `extractor`: Gaussian statistics, the (N, D) features if kept, the count.

    `on_batch(images, records)` sees every uint8 NHWC batch too (text metrics ride along the same pass).
    """
    stats = RunningStats()
    kept: list[Tensor] = []
    n = 0
    for images, records in _progress(source.batches(batch_size), len(source), progress, desc):
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)  # (B, C, H, W) uint8
        feats = extractor(x)  # (B, D)
        stats.update(feats)
        if keep_features:
            kept.append(feats.cpu())
        if on_batch is not None:
            on_batch(images, records)
        n += len(images)
    features = torch.cat(kept) if keep_features and kept else None
    return stats.compute(), features, n


def _progress(batches: Iterator, total: int, enabled: bool, desc: str) -> Iterator:
    if not enabled:
        yield from batches
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True) as bar:
        for images, records in batches:
            yield images, records
            bar.update(len(images))


def load_cached(path: str | Path, space: str | None = None) -> Reference:
    """Read a cached reference (or a statistics file given as the reference), checking its feature space."""
    path = Path(path)
    with np.load(path) as data:
        missing = {"mu", "sigma", "n", "feature_space", "source"} - set(data.files)
        if missing:
            raise ValueError(
                f"{path} is not a statistics file written by evaluate.py (missing {sorted(missing)}); an ADM "
                "reference batch is read as images (its arr_0), and its TensorFlow mu/sigma are not used"
            )
        stored_space = str(data["feature_space"])
        if space is not None and stored_space != space:
            raise ValueError(
                f"{path} holds statistics in feature space {stored_space}, but this evaluation uses {space}: "
                "numbers from different extractors or preprocessing protocols are never mixed. Use the same "
                "features/protocol settings, or a reference that can be recomputed (dataset, folder or .npz)"
            )
        stats = GaussianStats(data["mu"], data["sigma"], int(data["n"]))
        features = torch.from_numpy(data["features"]) if "features" in data.files else None
        return Reference(str(data["source"]), stored_space, stats, features, path)


def load_or_compute_reference(
    source: ImageSource,
    extractor: FeatureExtractor,
    cache_dir: str | Path | None,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> Reference:
    """The reference's statistics and features in this feature space, from the cache or computed once."""
    space = feature_space(extractor, source.protocol)
    identity = source.identity()
    path = cache_path(cache_dir, identity, space) if cache_dir else None
    if path is not None and path.is_file():
        log.info("reference statistics from the cache: %s", path)
        return load_cached(path, space)
    stats, features, _ = extract_features(
        source, extractor, batch_size, device, keep_features=True, progress=progress, desc="reference"
    )
    if path is not None:
        stats.save(path, features=features.numpy(), feature_space=np.array(space), source=np.array(identity))
        log.info("reference statistics cached: %s", path)
    return Reference(identity, space, stats, features, path)
