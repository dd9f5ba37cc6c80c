"""Pictures people look at: validation render grids and turntables."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[..., H, W, C] floats in [0, 1] -> uint8 (a 1-channel opacity becomes grey RGB)."""
    array = images.detach().float().clamp(0, 1).cpu().numpy()
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return (array * 255 + 0.5).astype(np.uint8)


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> np.ndarray:
    """Rows of [N, H, W, C] images -> one uint8 image, rows stacked vertically, white padding."""
    tiles = [to_uint8(row) for row in rows]
    n, h, w = tiles[0].shape[:3]
    grid = np.full((len(tiles) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c in range(n):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y : y + h, x : x + w] = row[c]
    return grid


def save_render_grid(path: str | Path, rgb: torch.Tensor, opacity: torch.Tensor) -> Path:
    """Validation views: colour on the first row, opacity below."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, image_grid([rgb, opacity]))
    return path


def save_turntable(path: str | Path, frames: torch.Tensor, fps: int = 12) -> Path:
    """[N, H, W, 3] frames -> an animated GIF (or MP4 when the path says so and imageio-ffmpeg is there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = to_uint8(frames)
    if path.suffix == ".gif":
        iio.imwrite(path, images, duration=1000 / fps, loop=0)
    else:
        iio.imwrite(path, images, fps=fps)
    return path
