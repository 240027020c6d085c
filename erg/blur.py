"""Gaussian blur of a batch of 2D grids (or 3D: frames x height x width), per channel, with reflect padding.

Used on attention queries laid out on the image-token grid (SEG; a video's 3D token grid: `gaussian_blur_3d`)
and on predicted images (SAG; a video frame by frame).
Written here (a few lines) rather than taken from torchvision because SEG's definition fixes the
kernel size and the clipping to the grid, which `torchvision.transforms.functional.gaussian_blur`
does not expose the same way. As SEG's reference code (SusungHong/SEG-SDXL, `pipeline_seg.py`,
copied by diffusers' SEG):

    kernel size k = ceil(6 sigma) + 1 - ceil(6 sigma) % 2   (always odd: ceil(6 sigma) + 1 when
        ceil(6 sigma) is even, ceil(6 sigma) itself when it is odd; sigma 0.5 -> 3, 1 -> 7, 1.5 -> 9);
    clipped to the grid side (the largest odd size whose reflect padding fits: SEG's
        `min(kernel_size, height - (height % 2 - 1))`);
    weights = exp(-x^2 / (2 sigma^2)) sampled at integer offsets, normalised to sum 1;
    separable: the same 1D kernel along rows and columns (and frames, in 3D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_blur_2d", "gaussian_blur_3d", "gaussian_blur_frames", "gaussian_kernel_1d", "gaussian_kernel_size"]


def gaussian_kernel_size(sigma: float) -> int:
    """SEG's kernel size for a Gaussian of std `sigma`: ceil(6 sigma) + 1 - ceil(6 sigma) % 2 (odd)."""
    if not sigma > 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    c = math.ceil(6 * sigma)
    return c + 1 - c % 2


def _clip_to_grid(kernel_size: int, size: int) -> int:
    """The largest odd kernel <= kernel_size whose reflect padding fits a grid side of `size`."""
    limit = size if size % 2 else size + 1  # padding (k - 1) / 2 must stay < size
    return min(kernel_size, limit)


def gaussian_kernel_1d(kernel_size: int, sigma: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalised Gaussian weights at offsets -(k-1)/2 .. (k-1)/2."""
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).to(dtype)


def gaussian_blur_2d(x: Tensor, sigma: float, kernel_size: int | None = None) -> Tensor:
    """Blur each channel of x: (N, C, H, W) with a Gaussian of std `sigma` (reflect padding)."""
    if x.ndim != 4:
        raise ValueError(f"gaussian_blur_2d expects (N, C, H, W), got shape {tuple(x.shape)}")
    k = kernel_size or gaussian_kernel_size(sigma)
    if k % 2 == 0 or k < 1:
        raise ValueError(f"blur kernel size must be odd and >= 1, got {k}")
    _, c, h, w = x.shape
    kh, kw = _clip_to_grid(k, h), _clip_to_grid(k, w)
    compute = torch.promote_types(x.dtype, torch.float32)
    y = x.to(compute)
    if kh > 1:  # along rows (H)
        weight = gaussian_kernel_1d(kh, sigma, compute).to(x.device).view(1, 1, kh, 1).expand(c, 1, kh, 1)
        y = F.conv2d(F.pad(y, (0, 0, kh // 2, kh // 2), mode="reflect"), weight, groups=c)
    if kw > 1:  # along columns (W)
        weight = gaussian_kernel_1d(kw, sigma, compute).to(x.device).view(1, 1, 1, kw).expand(c, 1, 1, kw)
        y = F.conv2d(F.pad(y, (kw // 2, kw // 2, 0, 0), mode="reflect"), weight, groups=c)
    return y.to(x.dtype)


def gaussian_blur_3d(x: Tensor, sigma: float, kernel_size: int | None = None) -> Tensor:
    """Blur each channel of x: (N, C, F, H, W) with an isotropic Gaussian of std `sigma` (in grid cells) along
    frames, rows and columns; the same kernel rules as `gaussian_blur_2d` along each axis."""
    if x.ndim != 5:
        raise ValueError(f"gaussian_blur_3d expects (N, C, F, H, W), got shape {tuple(x.shape)}")
    k = kernel_size or gaussian_kernel_size(sigma)
    if k % 2 == 0 or k < 1:
        raise ValueError(f"blur kernel size must be odd and >= 1, got {k}")
    c = x.shape[1]
    compute = torch.promote_types(x.dtype, torch.float32)
    y = x.to(compute)
    for axis in (2, 3, 4):  # frames, rows, columns
        ka = _clip_to_grid(k, x.shape[axis])
        if ka == 1:
            continue
        shape = [1, 1, 1, 1, 1]
        shape[axis] = ka
        weight = gaussian_kernel_1d(ka, sigma, compute).to(x.device).view(*shape).expand(c, 1, *shape[2:])
        pad = [0, 0, 0, 0, 0, 0]  # (W, W, H, H, F, F)
        pad[2 * (4 - axis)] = pad[2 * (4 - axis) + 1] = ka // 2
        y = F.conv3d(F.pad(y, tuple(pad), mode="reflect"), weight, groups=c)
    return y.to(x.dtype)


def gaussian_blur_frames(x: Tensor, sigma: float, kernel_size: int | None = None) -> Tensor:
    """`gaussian_blur_2d` on every frame of x: (N, C, F, H, W) (a video blurred in space, not in time)."""
    if x.ndim != 5:
        raise ValueError(f"gaussian_blur_frames expects (N, C, F, H, W), got shape {tuple(x.shape)}")
    n, c, f, h, w = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w)
    return gaussian_blur_2d(frames, sigma, kernel_size).reshape(n, f, c, h, w).permute(0, 2, 1, 3, 4)
