"""An image is encoded once: what the text stack reads of each image, keyed by its content, in a byte-bounded LRU
cache shared by every request of a Generator (generate, stream, chat, batches) or of a server's engine.

What the text stack reads of an image is its K/V in every cross-attention layer, [L, 2, 1, Hkv, S, D] from
`Engine.image_kv` (the vision tower, the projector, then each cross layer's k/v projections and k norm). An image
sent again (a multi-turn chat resends it with every turn; many clients may ask about one picture) skips all of
that: on the 450M benchmark checkpoint the cross K/V of one image are ~40% of a cached-image request's time to first
token on 2 cores, and at 11B they are 8 layers x 2 x 6404 keys x 4096 x 1024 multiply-adds, seconds on a CPU. The
K/V are read in place by every request that uses them (no copy per request).

They cost more memory than the projected vision states they come from for the big models (a 4-tile image: 11B bf16
210 MB of K/V against 52 MB of states; 90B bf16 525 MB against 105 MB; the 450M benchmark checkpoint in fp32 26 MB
either way), so an image whose K/V exceed the whole budget keeps its states instead and recomputes only the K/V.

Every image is encoded on its own, cached or not, so the cached and uncached paths compute the same numbers bit for
bit (the vision tower attends within one image; the k/v projections and norm are per key).

Key: SHA-256 over the image's preprocessed pixel values (bytes, dtype, shape), its aspect-ratio id and mask, and the
model's dtype and device (SHA-256 rather than blake2b: with the CPU's SHA instructions 11 ms against 30 ms for the
15 MB of a 4-tile image on the 2-core dev machine). Two images collide only if all of those are equal, i.e. the
tower would see the same input. A cache belongs to one model and engine (their weights are not part of the key).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch

DEFAULT_MB = 512
"""Default budget: one 4-tile image's K/V cost 210 MB for an 11B in bf16 (2 images; states instead: 52 MB each) and
26 MB for the 450M benchmark checkpoint in fp32 (19 images); raise it for many concurrent chats about different
images."""

KV, STATES = "kv", "states"  # what an entry holds: the image's cross-layer K/V, or (too big for the budget) its states


class ImageCache:
    """Byte-bounded LRU map: image key -> (KV, K/V [L, 2, 1, Hkv, S, D]) or (STATES, vision states [S, hidden]).
    Thread-safe.

    max_bytes 0 disables it (nothing is stored, every lookup misses). An entry larger than the whole budget is not
    stored (`put` returns False). `stats()` reports hits, misses, evictions, entries and bytes."""

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"image cache budget must be a non-negative number of bytes, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, tuple[str, torch.Tensor]] = OrderedDict()
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

    def get(self, key: bytes) -> tuple[str, torch.Tensor] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def holds(self, value: torch.Tensor) -> bool:
        """Whether `value` itself (not a copy) is an entry: who reads it must not expect to own its memory."""
        with self._lock:
            return any(v is value for _, v in self._entries.values())

    def put(self, key: bytes, kind: str, value: torch.Tensor) -> bool:
        """Stores (kind, value) under key, evicting the least recently used; False if larger than the budget."""
        if kind not in (KV, STATES):
            raise ValueError(f"an image cache entry holds {KV!r} or {STATES!r}, got {kind!r}")
        size = value.nbytes
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:  # two threads encoded the same image at once, or K/V replace states: keep one
                self.bytes -= old[1].nbytes
            while self._entries and self.bytes + size > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.evictions += 1
            self._entries[key] = (kind, value)
            self.bytes += size
            return True

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


def encode_image_kv(engine, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                    aspect_ratio_mask: torch.Tensor, cache: ImageCache | None = None) -> torch.Tensor:
    """pixel_values [B, N, T, 3, H, W]; aspect_ratio_ids [B, N]; aspect_ratio_mask [B, N, T] -> the images'
    cross-layer K/V [L, 2, B, Hkv, N * T * num_patches, D] for `engine` (llama_mm.engine.Engine), one image at a
    time through the cache. A request with one image gets the cached tensor itself (no copy).

    Images repeated within a request (e.g. two batch rows with the same photo) are encoded once too."""
    model = engine.model
    B, N = pixel_values.shape[:2]
    dev, dtype = model.device, model.dtype
    use_cache = cache is not None and cache.enabled
    local: dict[bytes, torch.Tensor] = {}
    rows = []
    for b in range(B):
        per_image = []
        for n in range(N):
            key = image_key(pixel_values[b, n], aspect_ratio_ids[b, n], aspect_ratio_mask[b, n], dtype, dev)
            kv = local.get(key)
            if kv is None:
                hit = cache.get(key) if use_cache else None
                if hit is not None and hit[0] == KV:
                    kv = hit[1]
                else:
                    states = hit[1] if hit is not None else model.vision_states(
                        pixel_values[b:b + 1, n:n + 1].to(dev), aspect_ratio_ids[b:b + 1, n:n + 1].to(dev),
                        aspect_ratio_mask[b:b + 1, n:n + 1].to(dev))  # (1, T * P, hidden)
                    kv = engine.native.image_kv(states.reshape(1, -1, states.shape[-1]))  # (L, 2, 1, Hkv, T * P, D)
                    if use_cache and not cache.put(key, KV, kv) and hit is None:
                        cache.put(key, STATES, states.reshape(-1, states.shape[-1]))  # (T * P, hidden)
            local[key] = kv
            per_image.append(kv)
        rows.append(per_image[0] if N == 1 else torch.cat(per_image, dim=4))  # (L, 2, 1, Hkv, N * T * P, D)
    return rows[0] if B == 1 else torch.cat(rows, dim=2)  # (L, 2, B, Hkv, N * T * P, D)
