"""Turns whatever image a user has into an RGB `PIL.Image`, the way transformers' `MllamaImageProcessorPil` does.

Accepted forms and what happens to each (mirroring transformers 5.x, `image_transforms.convert_to_rgb` and
`image_utils.load_image`):

- path (`str` / `os.PathLike`) or raw `bytes`: decoded with PIL, EXIF orientation applied, converted with
  `convert("RGB")` (transparency is dropped, not composited), then the `PIL.Image` rule below.
- `PIL.Image`: images with an alpha band or a `transparency` entry are composited onto white; every other mode
  (L, P, CMYK, I;16, ...) goes through PIL's own `convert("RGB")` (I;16 saturates at 255).
- `numpy.ndarray`, HWC (or HW) `uint8`: 1 channel is repeated to 3, 4 channels are composited onto white in
  float64 and rounded, 3 channels are used as they are.
- `torch.Tensor`, CHW (or HW) `uint8`: as the numpy array it holds.

Every failure is a `ValueError` that names the image (`images[i][j]`) and the problem.
"""

import io
import os

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

ImageLike = PIL.Image.Image | str | os.PathLike | bytes | bytearray | memoryview | np.ndarray | torch.Tensor


def is_image_like(obj) -> bool:
    """True for a single image in any accepted form (as opposed to a list of images)."""
    return isinstance(obj, (PIL.Image.Image, str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, torch.Tensor))


def load_rgb(image: ImageLike, name: str = "image") -> PIL.Image.Image:
    """Return `image` as a fully loaded RGB `PIL.Image`; `name` is used in error messages."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ValueError(f"{name}: no such image file: {path!r}")
        with open(path, "rb") as f:
            image = _decode_file(f, f"{name} ({path!r})")
    elif isinstance(image, (bytes, bytearray, memoryview)):
        image = _decode_file(io.BytesIO(image), f"{name} ({len(image)} bytes)")
    elif isinstance(image, torch.Tensor):
        shape = tuple(image.shape)
        if image.dim() == 3:
            image = image.permute(1, 2, 0)  # CHW -> HWC
        return _rgb_from_array(image.detach().cpu().numpy(), name, f"CHW (or HW) tensor, got shape {shape}")
    elif isinstance(image, np.ndarray):
        return _rgb_from_array(image, name, f"HWC (or HW) array, got shape {image.shape}")
    elif not isinstance(image, PIL.Image.Image):
        raise ValueError(
            f"{name}: unsupported image type {type(image).__name__}; expected a PIL.Image, a path, bytes, "
            "a numpy HWC uint8 array or a torch CHW uint8 tensor"
        )
    return _rgb_from_pil(image, name)


def _decode_file(fp, name: str) -> PIL.Image.Image:
    """Decode an encoded image fully (so truncation surfaces here), apply EXIF orientation, convert to RGB."""
    limit = PIL.Image.MAX_IMAGE_PIXELS
    try:
        with PIL.Image.open(fp) as im:
            width, height = im.size
            if limit is not None and width * height > limit:
                raise ValueError(
                    f"{name}: {width}x{height} = {width * height} pixels exceeds PIL's decompression-bomb limit "
                    f"PIL.Image.MAX_IMAGE_PIXELS = {limit}"
                )
            if width == 0 or height == 0:
                raise ValueError(f"{name}: image has zero size {width}x{height}")
            im.load()
            return PIL.ImageOps.exif_transpose(im).convert("RGB")
    except PIL.Image.DecompressionBombError as e:
        raise ValueError(f"{name}: {e}") from e
    except PIL.UnidentifiedImageError as e:
        raise ValueError(f"{name}: not a readable image file ({e})") from e
    except OSError as e:  # truncated or corrupt data: raised by load()
        raise ValueError(f"{name}: cannot decode image data ({e})") from e


def _rgb_from_pil(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """transformers' `convert_to_rgb` for PIL images: composite transparency onto white, else convert("RGB")."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{name}: image has zero size {image.width}x{image.height}")
    try:
        image.load()
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except OSError as e:  # lazily opened file that turns out truncated or corrupt
        raise ValueError(f"{name}: cannot decode image data ({e})") from e
    except ValueError as e:
        raise ValueError(f"{name}: cannot convert mode {image.mode!r} to RGB ({e})") from e


def _rgb_from_array(array: np.ndarray, name: str, expected: str) -> PIL.Image.Image:
    """transformers' `convert_to_rgb` for channels-last uint8 arrays (`expected` words the shape errors)."""
    if array.dtype != np.uint8:
        raise ValueError(
            f"{name}: array images must be uint8 with values 0..255, got dtype {array.dtype}; "
            "convert with (x * 255).round().astype(np.uint8) for data in [0, 1]"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"{name}: expected a 1, 3 or 4 channel {expected}")
    height, width, channels = array.shape
    if height == 0 or width == 0:
        raise ValueError(f"{name}: image has zero size {width}x{height}")
    if channels == 1:
        array = np.repeat(array, 3, axis=2)
    elif channels == 4:
        alpha = array[..., 3:4] / 255
        array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return PIL.Image.fromarray(np.ascontiguousarray(array))
