"""`image_url` content parts -> RGB images, within limits: `data:` URIs (base64), http(s) URLs (fetched with httpx,
size and time limited), and `file://` URLs / local paths only inside --allowed-media-dir. Every failure is a
`MediaError` (a 400) naming the part and the problem."""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import PIL.Image
from anyio import to_thread


class MediaError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int = 20 * 2**20  # encoded size of one image
    max_pixels: int = 40_000_000  # width * height of one image
    fetch_timeout_s: float = 10.0
    allowed_dir: Path | None = None  # local files only inside it; None: never read local files


async def load_image(url: str, limits: MediaLimits, param: str) -> PIL.Image.Image:
    """One image_url (param: where it sits in the request, for the error) -> a fully loaded RGB image."""
    scheme = urlparse(url).scheme.lower() if ":" in url else ""
    if len(scheme) == 1:  # a Windows drive letter, not a scheme
        scheme = ""
    if scheme == "data":
        data = _data_uri(url, limits, param)
    elif scheme in ("http", "https"):
        data = await _fetch(url, limits, param)
    elif scheme in ("file", ""):
        data = _local_file(url, scheme, limits, param)
    else:
        raise MediaError(f"{param}: unsupported URL scheme {scheme!r} (use data:, http:, https: or, with "
                         "--allowed-media-dir, file:)", param)
    return await to_thread.run_sync(decode, data, limits, param)  # decoding is CPU work: off the event loop


def decode(data: bytes, limits: MediaLimits, param: str) -> PIL.Image.Image:
    """Encoded bytes -> RGB image; the pixel limit is checked on the header, before decoding."""
    _check_bytes(len(data), limits, param)
    try:
        with PIL.Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except (PIL.UnidentifiedImageError, OSError) as e:
        raise MediaError(f"{param}: not a readable image ({len(data)} bytes: {e})", param) from None
    if w * h > limits.max_pixels:
        raise MediaError(f"{param}: image of {w}x{h} = {w * h} pixels exceeds the limit of {limits.max_pixels} "
                         "pixels (--max-image-pixels)", param)
    from ..image_loading import load_rgb  # (torch: imported when first needed, not by the CLI's parser)

    try:
        return load_rgb(data, param)
    except ValueError as e:
        raise MediaError(str(e), param) from None


def _check_bytes(n: int, limits: MediaLimits, param: str) -> None:
    if n > limits.max_bytes:
        raise MediaError(f"{param}: image of {n} bytes exceeds the limit of {limits.max_bytes} bytes "
                         "(--max-image-bytes)", param)


def _data_uri(url: str, limits: MediaLimits, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError(f"{param}: a data: URL must look like data:image/png;base64,<data>", param)
    _check_bytes(len(payload) * 3 // 4 - 2, limits, param)  # before decoding: the size it would have
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{param}: invalid base64 in the data: URL ({e})", param) from None


async def _fetch(url: str, limits: MediaLimits, param: str) -> bytes:
    import httpx

    chunks, total = [], 0
    try:
        async with httpx.AsyncClient(timeout=limits.fetch_timeout_s, follow_redirects=True) as client:
            async with client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise MediaError(f"{param}: fetching {url} answered HTTP {r.status_code}", param)
                async for chunk in r.aiter_bytes():
                    total += len(chunk)
                    _check_bytes(total, limits, param)
                    chunks.append(chunk)
    except httpx.TimeoutException:
        raise MediaError(f"{param}: fetching {url} took longer than {limits.fetch_timeout_s} s", param) from None
    except httpx.HTTPError as e:
        raise MediaError(f"{param}: cannot fetch {url} ({type(e).__name__}: {e})", param) from None
    return b"".join(chunks)


def _local_file(url: str, scheme: str, limits: MediaLimits, param: str) -> bytes:
    if limits.allowed_dir is None:
        raise MediaError(f"{param}: local files are not served (start the server with --allowed-media-dir to "
                         "allow a folder)", param)
    path = Path(unquote(urlparse(url).path) if scheme == "file" else url)
    root = limits.allowed_dir.resolve()
    resolved = (root / path).resolve()  # an absolute path replaces root; symlinks and .. are resolved
    if not resolved.is_relative_to(root):
        raise MediaError(f"{param}: {str(path)!r} is outside the allowed media folder", param)
    if not resolved.is_file():
        raise MediaError(f"{param}: no such file {str(path)!r} in the allowed media folder", param)
    _check_bytes(resolved.stat().st_size, limits, param)
    return resolved.read_bytes()
