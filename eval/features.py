"""Feature extractors: uint8 images (N, C, H, W) on a device -> float32 features (N, D).

- `InceptionV3Features`: the standard FID network (2048-d pool features) through torch-fidelity or
  torchmetrics, weights `weights-inception-2015-12-05-6726825d.pth` from a local file, the torch hub
  cache, or the usual download; a clear error naming the file when none works.
- `DinoV2Features`: DINOv2 ViTs through timm, weights from a local file (FD_DINOv2-style features:
  CLS token at 224 px, bicubic resize, ImageNet normalisation).
- `DigitsFeatures`: the quickstart's digits classifier (eval/digits_net.py), penultimate layer.

Every extractor has an `identity` (network, short hash of its weights file, input protocol inside the
network such as the resize to 299): it names cached statistics and every metrics record, so numbers
from different networks or resizes are never mixed.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.runtime import ConfigError

log = logging.getLogger("erg.eval")

__all__ = [
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "DigitsFeatures",
    "DinoV2Features",
    "FeatureExtractor",
    "InceptionV3Features",
    "file_hash",
    "resolve_inception_weights",
    "write_random_inception_weights",
]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_SHA256_PREFIX = "6726825d"  # torch hub's hash check of the file above (sha256 prefix)

_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: str | Path, length: int = 8) -> str:
    """sha256 prefix of a file (memoised on path, size and mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key][:length]


def _require_file(path: str | Path | None, what: str, key: str) -> Path:
    if not path:
        raise ConfigError(f"{what}: set {key}=/path/to/the/weights (no weights file was configured)")
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{key}={path}: no such file ({what})")
    return p


class FeatureExtractor(nn.Module):
    """Base class: `forward(uint8 (N, C, H, W)) -> float32 (N, dim)`; `identity` names the feature space."""

    dim: int

    @property
    def identity(self) -> str:
        raise NotImplementedError

    @staticmethod
    def _rgb(images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"feature extractors take uint8 (N, 1 or 3, H, W) images, got {images.dtype} {images.shape}"
            )
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


# --- Inception-v3 (FID) ----------------------------------------------------------------------------
def resolve_inception_weights(weights: str | None, url: str = INCEPTION_URL, download: bool = True) -> Path:
    """The FID Inception weights file: `weights` if given, else torch hub's cache, else downloaded there."""
    hint = (
        f"The FID Inception-v3 weights are the file {INCEPTION_FILE} ({url}). Fetch it on a machine with "
        f"network and point features.weights=/path/to/{INCEPTION_FILE} at it"
    )
    if weights:
        path = Path(str(weights)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"features.weights={weights}: no such file. {hint}.")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return cached
    if not download:
        raise FileNotFoundError(f"no FID Inception-v3 weights: {cached} does not exist. {hint}, or put it at {cached}.")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:  # writes a temporary file and renames it: an interrupted download leaves nothing behind
        log.info("downloading %s to %s", url, cached)
        prefix = INCEPTION_SHA256_PREFIX if url == INCEPTION_URL else None
        torch.hub.download_url_to_file(url, str(cached), hash_prefix=prefix, progress=False)
    except Exception as err:
        raise FileNotFoundError(
            f"could not download the FID Inception-v3 weights ({type(err).__name__}: {err}). {hint}, "
            f"or put it at {cached}."
        ) from err
    return cached


class InceptionV3Features(FeatureExtractor):
    """Pool features (2048-d) of the standard FID Inception-v3.

    backend `torch-fidelity` resizes to 299 with the TensorFlow-1 compatible bilinear resize of the
    original FID code; backend `torchmetrics` uses the same network and offers its `antialias` flag
    (torchmetrics >= 1.8 defaults to antialias=True, which changes FIDs: REFERENCE.md). With
    antialias=False the two backends compute the same features, so they share one identity.
    """

    dim = 2048

    def __init__(
        self,
        weights: str | None = None,
        backend: str = "torch-fidelity",
        antialias: bool = False,
        download: bool = True,
        url: str = INCEPTION_URL,
    ):
        super().__init__()
        if backend not in ("torch-fidelity", "torchmetrics"):
            raise ConfigError(f"features.backend must be torch-fidelity or torchmetrics, got {backend!r}")
        if backend == "torch-fidelity" and antialias:
            raise ConfigError(
                "features.antialias=true needs features.backend=torchmetrics (torch-fidelity has no such flag)"
            )
        path = resolve_inception_weights(weights, url=url, download=download)
        # torch-fidelity loads the file with weights_only=False; refuse files that are not plain tensors first.
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path} is not a plain state dict of the FID Inception-v3 ({err})") from err
        if backend == "torch-fidelity":
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
            )
        else:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path),
                antialias=antialias,
            )  # fmt: skip
        self.backend, self.antialias = backend, antialias
        self.weights_hash = file_hash(path)
        if self.weights_hash != INCEPTION_SHA256_PREFIX:
            log.warning("%s is not the standard FID Inception weights (sha256 %s...): FIDs are not comparable", path,
                        self.weights_hash)  # fmt: skip

    @property
    def identity(self) -> str:
        return f"inception2048-{self.weights_hash}-{'aa299' if self.antialias else 'tf299'}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        out = self.net(self._rgb(images))
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(len(images), -1).float()


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """A randomly initialised FID Inception-v3 state dict, for tests and throughput benchmarks only
    (never for metrics: it is not the FID network, and its hash says so)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Untrained(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random initialisation
            return super().load_state_dict(state_dict, strict=False, assign=assign)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_suffix(".empty.pt")
    torch.save({}, empty)
    torch.manual_seed(seed)
    net = _Untrained("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    empty.unlink()
    torch.save(net.state_dict(), path)
    return path


# --- DINOv2 (timm) ---------------------------------------------------------------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoV2Features(FeatureExtractor):
    """DINOv2 CLS features through timm (`model` is a timm name), weights from a local file (timm's
    `model.safetensors` / `pytorch_model.bin`, or the original `dinov2_vit*14_pretrain.pth`: timm's
    checkpoint filter converts it)."""

    def __init__(
        self, weights: str | None = None, model: str = "vit_large_patch14_dinov2.lvd142m", image_size: int = 224
    ):
        super().__init__()
        import timm

        path = _require_file(weights, f"DINOv2 weights for timm model {model}", "features.weights")
        self.net = timm.create_model(
            model, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=0, img_size=image_size
        ).eval()
        self.net.requires_grad_(False)
        self.model_name, self.image_size = model, image_size
        self.dim = self.net.num_features
        self.weights_hash = file_hash(path)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def identity(self) -> str:
        return f"dinov2-{self.model_name.split('.')[0]}-{self.weights_hash}-bicubic{self.image_size}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = self._rgb(images).float() / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        x = (x - self.mean) / self.std
        return self.net(x).float()  # (N, dim): pooled CLS token (num_classes=0)


# --- the quickstart digits classifier ----------------------------------------------------------------
class DigitsFeatures(FeatureExtractor):
    """Penultimate features of the digits classifier trained by scripts/train_feature_net.py."""

    def __init__(self, weights: str | None = None):
        super().__init__()
        from eval.digits_net import load_digits_net

        path = _require_file(
            weights,
            "the digits feature net; train it with `python scripts/train_feature_net.py` (seconds on CPU)",
            "features.weights",
        )
        self.net, self.meta = load_digits_net(path)
        self.net.requires_grad_(False)
        self.image_size = self.net.config["image_size"]
        self.dim = self.net.config["feature_dim"]
        self.weights_hash = file_hash(path)

    @property
    def identity(self) -> str:
        return f"digitscnn{self.dim}-{self.weights_hash}-grey{self.image_size}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"feature extractors take uint8 (N, C, H, W) images, got {images.dtype} {images.shape}")
        x = images.float().div(127.5).sub(1.0).mean(dim=1, keepdim=True)  # grey, [-1, 1]
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return self.net.features(x).float()
