"""Mllama image preprocessing: tile geometry, resize, pad, rescale + normalise, pack.

Produces what transformers' `MllamaImageProcessorPil` produces (pixel values within float32 rounding, everything
else identical), without transformers. For each image:

  1. Canvas: among the tile arrangements (rows, cols) with rows * cols <= max_image_tiles, pick the one whose
     fit-scale min(canvas_h / h, canvas_w / w) is the smallest >= 1 (upscale least) or, if every canvas is
     smaller, the largest (downscale least); ties go to the smaller canvas area.
  2. Size inside the canvas: clamp the target to [tile, canvas] per axis and scale by the tighter axis, keeping
     the aspect ratio (floor, at least 1 pixel).
  3. Resize with PIL (bilinear in the real configs), exactly as one `PIL.Image.resize` call would.
  4. Pad bottom/right with black to the canvas, map x -> (x * rescale_factor - mean) / std per channel.
  5. Cut the canvas into tiles row-major: tile (i, j) is index i * cols + j.

Worked example (560 px tiles, 4 tiles max): a 1411 x 1411 photo fits a 1x1 canvas at scale 0.397 and a 2x2
canvas at 0.794; no canvas needs upscaling, so the least downscale wins: 2x2, the image becomes 1120 x 1120 and
fills 4 tiles exactly; aspect_ratio_id = 1 + index of (2, 2) in [(1,1),(1,2),(1,3),(1,4),(2,1),(2,2),(3,1),(4,1)]
= 6, aspect_ratio_mask = [1, 1, 1, 1].

Batch layout: pixel_values (batch, max_num_images, max_image_tiles, 3, tile, tile) float32, zeros in tiles an
image does not use and in image slots a prompt does not use; aspect_ratio_ids (batch, max_num_images) with 0 for
unused slots; aspect_ratio_mask (batch, max_num_images, max_image_tiles) whose first entry is 1 even for unused
slots (the reference does this); num_tiles (batch, max_num_images) with 0 for unused slots.
"""

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from . import image_resize

# Rows normalised per ufunc call: 3 x 56 x 560 float32 is ~375 KB, so the in-place add finds it still in cache.
_ROWS_PER_PASS = 56

# transformers' MllamaImageProcessorPil class defaults, used for keys a preprocessor_config.json leaves out.
_DEFAULT_MEAN = (0.5, 0.5, 0.5)
_DEFAULT_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Settings from preprocessor_config.json (unknown keys are ignored)."""

    tile_size: int = 560
    max_image_tiles: int = 4
    resample: int = PIL.Image.Resampling.BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = _DEFAULT_MEAN
    image_std: tuple[float, float, float] = _DEFAULT_STD

    @classmethod
    def from_dict(cls, d: dict, source: str = "preprocessor config") -> "ImageProcessorConfig":
        for key in ("do_resize", "do_pad", "do_convert_rgb"):
            if d.get(key, True) is not True:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported by Mllama preprocessing (must be true)")
        size = d.get("size", {"height": 560, "width": 560})
        if not isinstance(size, dict) or "height" not in size or "width" not in size:
            raise ValueError(f"{source}: 'size' must be {{'height': H, 'width': W}}, got {size!r}")
        if size["height"] != size["width"] or size["height"] <= 0:
            raise ValueError(f"{source}: tiles must be square with a positive size, got size={size!r}")
        max_tiles = d.get("max_image_tiles", 4)
        if not isinstance(max_tiles, int) or max_tiles <= 0:
            raise ValueError(f"{source}: max_image_tiles must be a positive integer, got {max_tiles!r}")
        mean, std = d.get("image_mean", _DEFAULT_MEAN), d.get("image_std", _DEFAULT_STD)
        for key, value in (("image_mean", mean), ("image_std", std)):
            if not isinstance(value, (list, tuple)) or len(value) != 3:
                raise ValueError(f"{source}: {key} must list 3 channel values, got {value!r}")
        if any(s == 0 for s in std):
            raise ValueError(f"{source}: image_std has a zero entry: {std!r}")
        resample = d.get("resample", PIL.Image.Resampling.BILINEAR)
        if resample not in {int(r) for r in PIL.Image.Resampling}:
            raise ValueError(f"{source}: resample={resample!r} is not a PIL resampling filter")
        return cls(
            tile_size=size["height"],
            max_image_tiles=max_tiles,
            resample=resample,
            do_rescale=bool(d.get("do_rescale", True)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            do_normalize=bool(d.get("do_normalize", True)),
            image_mean=tuple(float(m) for m in mean),
            image_std=tuple(float(s) for s in std),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ImageProcessorConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read image processor config {path}: {e}") from e
        return cls.from_dict(d, source=str(path))


@functools.lru_cache(maxsize=16)
def supported_aspect_ratios(max_image_tiles: int) -> tuple[tuple[int, int], ...]:
    """Tile arrangements (rows, cols) with rows * cols <= max_image_tiles, in the order ids are assigned
    (aspect_ratio_id = index + 1): for 4, (1,1),(1,2),(1,3),(1,4),(2,1),(2,2),(3,1),(4,1)."""
    return tuple(
        (a, b) for a in range(1, max_image_tiles + 1) for b in range(1, max_image_tiles + 1) if a * b <= max_image_tiles
    )


@functools.lru_cache(maxsize=256)
def optimal_canvas(height: int, width: int, max_image_tiles: int, tile_size: int) -> tuple[int, int]:
    """Step 1: the canvas (height, width), in pixels, a `height` x `width` image is fitted into."""
    canvases = [(a * tile_size, b * tile_size) for a, b in supported_aspect_ratios(max_image_tiles)]
    scales = [min(ch / height, cw / width) for ch, cw in canvases]
    upscales = [s for s in scales if s >= 1]
    chosen = min(upscales) if upscales else max(scales)
    candidates = [c for c, s in zip(canvases, scales) if s == chosen]
    return min(candidates, key=lambda c: c[0] * c[1])  # first of the smallest area, as np.argmin picks


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile_size: int) -> tuple[int, int]:
    """Step 2: the resized (height, width) of an image inside its canvas."""
    target_w = min(max(width, tile_size), canvas_w)
    target_h = min(max(height, tile_size), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


@dataclass(frozen=True)
class TileLayout:
    """Where one image goes: canvas of rows x cols tiles, resized to (height, width) pixels."""

    rows: int
    cols: int
    height: int
    width: int

    @property
    def num_tiles(self) -> int:
        return self.rows * self.cols


def tile_layout(height: int, width: int, cfg: ImageProcessorConfig) -> TileLayout:
    canvas_h, canvas_w = optimal_canvas(height, width, cfg.max_image_tiles, cfg.tile_size)
    new_h, new_w = fit_to_canvas(height, width, canvas_h, canvas_w, cfg.tile_size)
    return TileLayout(canvas_h // cfg.tile_size, canvas_w // cfg.tile_size, new_h, new_w)


class ImageProcessor:
    """Nested lists of RGB PIL images -> Mllama's vision inputs (see the module docstring for layouts)."""

    def __init__(self, config: ImageProcessorConfig):
        self.config = config
        mean = np.array(config.image_mean if config.do_normalize else (0.0, 0.0, 0.0))
        std = np.array(config.image_std if config.do_normalize else (1.0, 1.0, 1.0))
        rescale = config.rescale_factor if config.do_rescale else 1.0
        # Step 4 as one affine map per channel, y = x * scale + bias (float32, as the reference computes it).
        self._scale = (rescale / std).astype(np.float32).reshape(3, 1, 1)
        self._bias = (-mean / std).astype(np.float32).reshape(3, 1, 1)

    def __call__(self, images: list[list[PIL.Image.Image]]) -> dict[str, torch.Tensor]:
        """`images[b]` are the RGB images of prompt b (possibly none); returns pixel_values, aspect_ratio_ids,
        aspect_ratio_mask, num_tiles."""
        cfg = self.config
        batch, max_images, max_tiles = len(images), max(len(row) for row in images), cfg.max_image_tiles
        if max_images == 0:
            raise ValueError("no images to preprocess")
        layouts = [[tile_layout(im.height, im.width, cfg) for im in row] for row in images]
        pixel_values = torch.empty(batch, max_images, max_tiles, 3, cfg.tile_size, cfg.tile_size)
        aspect_ratio_ids = torch.zeros(batch, max_images, dtype=torch.int64)
        aspect_ratio_mask = torch.zeros(batch, max_images, max_tiles, dtype=torch.int64)
        aspect_ratio_mask[:, :, 0] = 1
        num_tiles = torch.zeros(batch, max_images, dtype=torch.int64)
        ratios = supported_aspect_ratios(max_tiles)
        for b, row in enumerate(images):
            for n in range(max_images):
                if n >= len(row):
                    pixel_values[b, n].zero_()
                    continue
                layout = layouts[b][n]
                self._fill(pixel_values[b, n], row[n], layout)
                aspect_ratio_ids[b, n] = ratios.index((layout.rows, layout.cols)) + 1
                aspect_ratio_mask[b, n, : layout.num_tiles] = 1
                num_tiles[b, n] = layout.num_tiles
        return {
            "pixel_values": pixel_values,
            "aspect_ratio_ids": aspect_ratio_ids,
            "aspect_ratio_mask": aspect_ratio_mask,
            "num_tiles": num_tiles,
        }

    def _fill(self, tiles: torch.Tensor, image: PIL.Image.Image, layout: TileLayout) -> None:
        """Write one image into `tiles` (max_tiles, 3, S, S): normalised pixels, normalised black padding, zero
        tiles beyond the layout."""
        S = self.config.tile_size
        tiles[layout.num_tiles :].zero_()
        out = tiles.numpy()  # same memory; numpy ufuncs run outside the GIL on the resize threads
        for i in range(layout.rows):  # padding: the part of each tile the resized image does not reach
            for j in range(layout.cols):
                tile = out[i * layout.cols + j]
                h, w = max(min(layout.height - i * S, S), 0), max(min(layout.width - j * S, S), 0)
                tile[:, h:] = self._bias
                tile[:, :h, w:] = self._bias

        def consume(band: np.ndarray, y0: int, x0: int) -> None:
            self._write_band(out, layout.cols, band, y0, x0)

        image_resize.resize(image, (layout.width, layout.height), self.config.resample, consume)

    def _write_band(self, tiles: np.ndarray, cols: int, band: np.ndarray, y0: int, x0: int) -> None:
        """Normalise `band` (h, w, 3) uint8, whose top-left pixel is (y0, x0) of the resized image, into the tiles
        (max_tiles, 3, S, S) float32 it overlaps."""
        S = self.config.tile_size
        h, w = band.shape[:2]
        for i in range(y0 // S, (y0 + h - 1) // S + 1):
            r0, r1 = max(y0, i * S), min(y0 + h, (i + 1) * S)
            for j in range(x0 // S, (x0 + w - 1) // S + 1):
                c0, c1 = max(x0, j * S), min(x0 + w, (j + 1) * S)
                for r in range(r0, r1, _ROWS_PER_PASS):
                    e = min(r + _ROWS_PER_PASS, r1)
                    src = band[r - y0 : e - y0, c0 - x0 : c1 - x0].transpose(2, 0, 1)  # (3, rows, cols) uint8
                    dst = tiles[i * cols + j, :, r - i * S : e - i * S, c0 - j * S : c1 - j * S]
                    np.multiply(src, self._scale, out=dst)
                    dst += self._bias
