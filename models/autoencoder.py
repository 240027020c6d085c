"""Autoencoders between images and the space the flow model is trained in.

    encode: images in [-1, 1] (B, 3, H, W)  ->  z = (E(images) - shift) * scale   (B, C, H/f, W/f)
    decode: z  ->  D(z / scale + shift), images in [-1, 1]

`IdentityAutoencoder` is pixel space (f = 1, shift 0, scale 1). `DiffusersVAE` wraps diffusers'
AutoencoderKL, read from a local folder (no download), with its shift and scale taken from the
model's own config: the SD VAE (4 channels, scaling_factor 0.18215, no shift) and the SD3 VAE
(16 channels, shift_factor 0.0609, scaling_factor 1.5305). Latent shards store z, so the data the
flow sees is already in model space (DESIGN.md: "Latents are scaled by the autoencoder's scaling
factor (and shift, for the SD3 VAE) before the flow sees them").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Autoencoder", "DiffusersVAE", "IdentityAutoencoder"]

ENCODE_MODES = ("mean", "sample")


class Autoencoder(nn.Module):
    """Interface: `channels` and `factor` (downsampling) of the latent space, `shift` and `scale`."""

    channels: int
    factor: int
    shift: float = 0.0
    scale: float = 1.0

    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images in [-1, 1] (B, 3, H, W) -> mean and standard deviation of z, in model space."""
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        """(B, C, h, w) model-space latents -> images in [-1, 1]."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, images: Tensor, mode: str = "mean", noise: Tensor | None = None) -> Tensor:
        """Model-space latents: the posterior mean, or a sample mean + std * noise (noise ~ N(0, I) of
        the latent's shape; drawn here if not given, pass it for per-sample seeds)."""
        if mode not in ENCODE_MODES:
            raise ValueError(f"encode mode must be one of {ENCODE_MODES}, got {mode!r}")
        mean, std = self.posterior(images)
        if mode == "mean":
            return mean
        if noise is None:
            noise = torch.randn_like(mean)
        return mean + std * noise.to(mean)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.factor:
            raise ValueError(f"image size {image_size} is not a multiple of the autoencoder's factor {self.factor}")
        return (self.channels, image_size // self.factor, image_size // self.factor)

    def describe(self) -> dict[str, Any]:
        """What produced a set of latents (written next to latent shards)."""
        return {"type": type(self).__name__, "channels": self.channels, "factor": self.factor,
                "shift": self.shift, "scale": self.scale}  # fmt: skip


class IdentityAutoencoder(Autoencoder):
    """Pixel space: latents are the images themselves."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.channels = channels
        self.factor = 1

    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return images, torch.zeros_like(images)

    def decode(self, z: Tensor) -> Tensor:
        return z


class DiffusersVAE(Autoencoder):
    """diffusers' AutoencoderKL from a local folder (a VAE folder, or a pipeline folder + subfolder="vae").

    shift / scale: None takes the model config's `shift_factor` (None -> 0) and `scaling_factor`;
    set them only to reproduce latents made with other constants.
    channels: the latent channels the caller expects (checked against the VAE's config; None: any).
    dtype: weights and compute dtype ("float32", "bfloat16", "float16"); the output is float32.
    """

    def __init__(
        self,
        path: str,
        subfolder: str | None = None,
        shift: float | None = None,
        scale: float | None = None,
        channels: int | None = None,
        dtype: str = "float32",
    ):
        super().__init__()
        try:
            from diffusers import AutoencoderKL
        except ImportError as err:
            raise ImportError("DiffusersVAE needs diffusers: pip install -e '.[diffusers]'") from err
        folder = Path(str(path)).expanduser()
        if not (folder / (subfolder or "") / "config.json").is_file():
            raise FileNotFoundError(
                f"no diffusers AutoencoderKL at {folder / (subfolder or '')} (config.json missing). Point the "
                "autoencoder's `path` at a local copy, e.g. of stabilityai/sd-vae-ft-ema (SD VAE) or the `vae` "
                "subfolder of stabilityai/stable-diffusion-3-medium-diffusers (SD3 VAE); nothing is downloaded"
            )
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"autoencoder dtype must be float32, bfloat16 or float16, got {dtype!r}")
        self.vae = AutoencoderKL.from_pretrained(
            str(folder),
            subfolder=subfolder,
            local_files_only=True,
            torch_dtype=getattr(torch, dtype),
            low_cpu_mem_usage=False,  # small model; avoids needing `accelerate`
        )
        self.vae.requires_grad_(False).eval()
        self.path = str(folder)
        config = self.vae.config
        self.channels = int(config.latent_channels)
        if channels is not None and channels != self.channels:
            raise ValueError(
                f"the VAE at {folder} has {self.channels} latent channels, the config expects {channels}: "
                "use the SD VAE for 4 channels, the SD3 VAE for 16"
            )
        self.factor = 2 ** (len(config.block_out_channels) - 1)
        self.shift = float(shift if shift is not None else (getattr(config, "shift_factor", None) or 0.0))
        self.scale = float(scale if scale is not None else config.scaling_factor)

    def train(self, mode: bool = True) -> DiffusersVAE:
        super().train(mode)
        self.vae.eval()  # frozen: never in training mode
        return self

    @torch.no_grad()
    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE's diagonal Gaussian q(z | images), mapped to model space: ((m - shift) s, std s)."""
        p = next(self.vae.parameters())
        dist = self.vae.encode(images.to(p.device, p.dtype)).latent_dist
        return (dist.mean.float() - self.shift) * self.scale, dist.std.float() * self.scale

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """(B, C, h, w) model-space latents -> images (B, 3, h f, w f), clamped to [-1, 1]."""
        p = next(self.vae.parameters())
        if p.device != z.device:
            self.vae.to(z.device)
            p = next(self.vae.parameters())
        images = self.vae.decode((z / self.scale + self.shift).to(p.dtype)).sample
        return images.float().clamp(-1, 1)
