"""A folder of photo-like JPEGs of varied sizes (one sub-folder per class), generated so the
throughput benchmark needs no download: smooth colour fields, shapes and sensor-like noise, at
160 to 512 px a side, so decoding and resizing cost what real photos cost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def make_photo_folder(root: Path, images: int, classes: int = 4, seed: int = 0) -> Path:
    """``images`` JPEGs spread over ``classes`` sub-folders of ``root`` (kept if already there)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        label = i % classes
        path = root / f"class_{label}" / f"{i:05d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(exist_ok=True)
        _photo(rng, label, classes).save(path, quality=int(rng.integers(80, 95)))
    return root


def _photo(rng: np.random.Generator, label: int, classes: int) -> Image.Image:
    w, h = (int(v) for v in rng.integers(160, 513, size=2))
    hue = 255.0 * label / classes
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            hue + 60 * np.sin(xx / rng.uniform(20, 80)),
            128 + 60 * np.cos(yy / rng.uniform(20, 80)),
            255 - hue + 40 * np.sin((xx + yy) / rng.uniform(30, 90)),
        ],
        axis=-1,
    )
    base += rng.normal(0, 12, size=base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, w // 2 + 11)), y0 + int(rng.integers(10, h // 2 + 11))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if (label + _) % 2 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
