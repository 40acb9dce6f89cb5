"""Image similarity of cached against uncached outputs: PSNR and SSIM, per image, for [0, 1] RGB batches.

SSIM uses the usual 11x11 Gaussian window (sigma 1.5) with K1 = 0.01, K2 = 0.03, per channel over
the windows that fit inside the image (no padding, so borders are not diluted by zeros), averaged
over channels and positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: PSNR reported for identical images (an infinite value would break tables and plots).
PSNR_CAP_DB = 100.0


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``images`` against ``reference`` (both (N, C, H, W) in [0, 1])."""
    _check(images, reference)
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(dim=1)
    value = 10.0 * torch.log10(1.0 / mse.clamp_min(10.0 ** (-PSNR_CAP_DB / 10.0)))
    return value.clamp(max=PSNR_CAP_DB)


def ssim(images: torch.Tensor, reference: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of ``images`` against ``reference`` (both (N, C, H, W) in [0, 1])."""
    _check(images, reference)
    x, y = images.float(), reference.float()
    channels = x.shape[1]
    size = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    score = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return score.flatten(1).mean(dim=1)


def _check(images: torch.Tensor, reference: torch.Tensor) -> None:
    if images.shape != reference.shape or images.dim() != 4:
        raise ValueError(
            f"expected two (N, C, H, W) batches of the same shape, got {tuple(images.shape)} and "
            f"{tuple(reference.shape)}"
        )
