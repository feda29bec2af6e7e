"""Spatial transforms on uint8 clips, and normalisation once the batch is on its device."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

SCALE = 8 / 7  # short side = size * 8/7 before cropping (128 for 112, as in C3D/3D-ResNet setups)


def scale_for(size: int) -> int:
    """The short side a video is resized to before a `size` crop."""
    return int(round(size * SCALE))


def resized_shape(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) with the short side set to `short`, aspect kept (even sizes, >= short)."""
    if width <= 0 or height <= 0:
        return short, short
    if width <= height:
        w, h = short, max(short, int(round(height * short / width)))
    else:
        w, h = max(short, int(round(width * short / height))), short
    return w, h


def crop_offsets(height: int, width: int, size: int, crops: int) -> list[tuple[int, int]]:
    """(top, left) of `crops` deterministic crops: 1 = centre; 3 = start/centre/end of the long side."""
    cy, cx = (height - size) // 2, (width - size) // 2
    if crops == 1:
        return [(cy, cx)]
    if crops == 3:
        if width >= height:
            return [(cy, 0), (cy, cx), (cy, width - size)]
        return [(0, cx), (cy, cx), (height - size, cx)]
    raise ValueError(f"crops must be 1 or 3, got {crops}")


def random_offset(height: int, width: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) of a uniformly random `size` crop."""
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def fit_short_side(frames: np.ndarray, short: int) -> np.ndarray:
    """Resize uint8 (T, H, W, 3) so the short side is `short` if it is not already.

    Bilinear with antialiasing (filters over the whole footprint when shrinking, as Pillow
    does), on the uint8 frames directly: torch's vectorised uint8 kernel, one call per clip.
    """
    t, h, w, _ = frames.shape
    nw, nh = resized_shape(w, h, short)
    if (nh, nw) == (h, w):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W), channels-last memory
    y = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    return y.permute(0, 2, 3, 1).numpy()


def to_clip_tensor(frames: np.ndarray, top: int, left: int, size: int, flip: bool = False) -> torch.Tensor:
    """Crop uint8 (T, H, W, 3) frames to a uint8 (3, T, size, size) tensor, optionally mirrored."""
    crop = frames[:, top : top + size, left : left + size]
    if flip:
        crop = crop[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(crop.transpose(3, 0, 1, 2)))


def normalize(x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """uint8 clips (..., 3, T, H, W) -> float32 (x/255 - mean) / std, on x's device.

    Call after moving the uint8 batch to its device (4x less to copy than float).
    """
    dev = x.device
    m = torch.as_tensor(mean, dtype=torch.float32, device=dev).view(3, 1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=dev).view(3, 1, 1, 1)
    return (x.to(torch.float32) / 255.0 - m) / s
