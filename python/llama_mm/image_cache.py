"""An image is encoded once: the projected vision states of each image, keyed by its content, in a byte-bounded
LRU cache shared by every request of a Generator (generate, stream, chat, batches; a server's threads).

What is cached is what the text stack reads from an image: `MllamaModel.vision_states` of that one image,
[tiles * num_patches, text hidden] in the model's dtype. The vision tower encodes each image of a request
independently of the others (attention runs per image), so a request's states are the per-image states
concatenated, and an image seen before skips the tower. `encode_images` always encodes one image at a time, cached
or not, so the cached and uncached paths compute the same numbers bit for bit.

Key: SHA-256 over the image's preprocessed pixel values (bytes, dtype, shape), its aspect-ratio id and mask, and the
model's dtype and device (SHA-256 rather than blake2b: with the CPU's SHA instructions 11 ms against 30 ms for the
15 MB of a 4-tile image on the 2-core dev machine). Two images collide only if all of those are equal, i.e. the
tower would see the same input. A cache belongs to one model (its weights are not part of the key).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch

DEFAULT_MB = 512
"""Default budget: one 4-tile image costs 4 * 1601 * 4096 * 2 bytes = 52 MB of states for an 11B in bf16 (105 MB in
fp32; 210 MB for a 90B in bf16), so 512 MB keeps the images of a few concurrent chats (about 9 at 11B bf16) for a
small fraction of the weights' memory."""


class ImageCache:
    """Byte-bounded LRU map: image key -> vision states [tiles * num_patches, hidden]. Thread-safe.

    max_bytes 0 disables it (nothing is stored, every lookup misses). An entry larger than the whole budget is not
    stored. `stats()` reports hits, misses, evictions, entries and bytes."""

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"image cache budget must be a non-negative number of bytes, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = self.evictions = 0

    @classmethod
    def from_mb(cls, mb) -> "ImageCache":
        if isinstance(mb, bool) or not isinstance(mb, (int, float)) or mb < 0:
            raise ValueError(f"image_cache_mb must be a non-negative number of MiB, got {mb!r}")
        return cls(int(mb * 2**20))

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: bytes) -> torch.Tensor | None:
        with self._lock:
            states = self._entries.get(key)
            if states is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return states

    def put(self, key: bytes, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:  # two threads encoded the same image at once: keep one copy
                self.bytes -= old.numel() * old.element_size()
            while self._entries and self.bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.numel() * evicted.element_size()
                self.evictions += 1
            self._entries[key] = states
            self.bytes += size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes}


def image_key(pixel_values: torch.Tensor, aspect_ratio_id: torch.Tensor, aspect_ratio_mask: torch.Tensor,
              dtype: torch.dtype, device: torch.device) -> bytes:
    """pixel_values [T, 3, H, W], aspect_ratio_id [] and aspect_ratio_mask [T] of one image -> a 32-byte digest."""
    h = hashlib.sha256()
    pixels = pixel_values.detach().to("cpu").contiguous()
    h.update(f"{pixels.dtype}|{tuple(pixels.shape)}|{int(aspect_ratio_id)}|"
             f"{aspect_ratio_mask.tolist()}|{dtype}|{device}|".encode())
    h.update(pixels.view(-1).view(torch.uint8).numpy().data)
    return h.digest()


def encode_images(model, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                  aspect_ratio_mask: torch.Tensor, cache: ImageCache | None = None) -> torch.Tensor:
    """pixel_values [B, N, T, 3, H, W]; aspect_ratio_ids [B, N]; aspect_ratio_mask [B, N, T] ->
    vision states [B, N * T * num_patches, text hidden], one image at a time through the cache.

    Images repeated within a request (e.g. two batch rows with the same photo) are encoded once too."""
    B, N = pixel_values.shape[:2]
    dev, dtype = model.device, model.dtype
    use_cache = cache is not None and cache.enabled
    local: dict[bytes, torch.Tensor] = {}
    rows = []
    for b in range(B):
        per_image = []
        for n in range(N):
            key = image_key(pixel_values[b, n], aspect_ratio_ids[b, n], aspect_ratio_mask[b, n], dtype, dev)
            states = local.get(key)
            if states is None and use_cache:
                states = cache.get(key)
            if states is None:
                states = model.vision_states(pixel_values[b:b + 1, n:n + 1].to(dev),
                                             aspect_ratio_ids[b:b + 1, n:n + 1].to(dev),
                                             aspect_ratio_mask[b:b + 1, n:n + 1].to(dev))[0]  # (T * P, hidden)
                if use_cache:
                    cache.put(key, states)
            local[key] = states
            per_image.append(states)
        rows.append(torch.cat(per_image, dim=0))  # (N * T * P, hidden)
    return torch.stack(rows)  # (B, N * T * P, hidden)
