"""PIL's resize, byte for byte, computed in strips on several threads.

Why this exists: transformers resizes with `PIL.Image.resize` (one thread), and that call is most of the time it
takes to preprocess a photo; matching its pixels exactly rules out any other resampler. PIL releases the GIL while
it resamples, so the work can be split across threads, provided every output byte is computed exactly as a single
call would compute it.

How a single call works (Pillow's `ImagingResampleInner`, filters other than NEAREST): two separable passes, each
with its coefficients fixed by (input size, output size) along its own axis:
  1. horizontal pass: each output column mixes a few input columns; rows are independent of each other;
  2. vertical pass: each output row mixes a few input rows; columns are independent of each other.
The intermediate image is rounded to uint8. Pillow 13 runs the vertical pass first when the height shrinks by
more than twice as many pixels as the width does; older releases run the horizontal pass first.

So the split is: the horizontal pass over bands of rows, the vertical pass over bands of columns, each band a
single-axis `resize` of a crop with the same full-axis sizes, hence the same coefficients. Which pass runs first is
learnt once from the installed Pillow (`_pass_order`); with an unknown order, or NEAREST, one plain call is made.

Threads: at most `torch.get_num_threads()` (set it to 1 to resize on the calling thread only), and only cores
that are idle (usable cores minus the 1-minute load average): on a saturated machine extra threads and the band
copies cost more than they gain (measured +20% at load 7 on 2 cores), so then one plain call is made. The calling
thread works through the bands too and never waits for a helper that has not started.
"""

import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import torch

# A consumer receives an HWC uint8 band of the resized image and the (row, column) of its top-left pixel.
Consumer = Callable[[np.ndarray, int, int], None]

# Rows or columns per work item of the first pass: small enough to share out well. The last pass has one band per
# thread, so that the consumer gets large blocks.
_BAND = 128
_MIN_PARALLEL_PIXELS = 1 << 18  # below this many output pixels, one call is faster than the thread hand-off


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="llama_mm_resize")


@functools.cache
def _pass_order() -> str | None:
    """How the installed Pillow orders its two passes: "shrink-aware" (Pillow >= 13), "horizontal-first", or None
    when neither reproduces it (then resizes are not split)."""
    rng = np.random.default_rng(0)
    probe = PIL.Image.fromarray(rng.integers(0, 256, (256, 64, 3), dtype=np.uint8))  # W=64, H=256: tall
    size = (60, 64)  # the height shrinks by 192 > 2 * 4 pixels: Pillow >= 13 runs the vertical pass first
    bilinear = PIL.Image.Resampling.BILINEAR
    full = np.asarray(probe.resize(size, bilinear))
    horizontal_first = np.asarray(probe.resize((60, 256), bilinear).resize(size, bilinear))
    vertical_first = np.asarray(probe.resize((64, 64), bilinear).resize(size, bilinear))
    if np.array_equal(horizontal_first, vertical_first):
        return None  # the probe cannot tell (does not happen with random pixels)
    if np.array_equal(full, vertical_first):
        return "shrink-aware"
    if np.array_equal(full, horizontal_first):
        return "horizontal-first"
    return None


def _spare_cores() -> int:
    """Cores not already busy: usable cores minus the 1-minute load average (which counts this process too)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        return int(usable - os.getloadavg()[0])
    except OSError:  # no load average on this platform
        return usable


def _horizontal_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    if _pass_order() == "horizontal-first":
        return True
    return not (in_h - out_h > 0 and in_h - out_h > (in_w - out_w) * 2)  # Pillow 13's ImagingResampleInner


def _map(fn, items: list, helpers: int) -> list:
    """`[fn(x) for x in items]`, the items shared out between this thread and up to `helpers` pool threads. This
    thread works too and never waits for a helper that has not started (on a busy machine it may do it all)."""
    results = [None] * len(items)
    todo = iter(enumerate(items))
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                job = next(todo, None)
            if job is None:
                return
            results[job[0]] = fn(job[1])

    futures = [_pool().submit(work) for _ in range(min(helpers, len(items) - 1))]
    try:
        work()
    finally:
        with lock:  # after an error here, helpers stop after their current item
            for _ in todo:
                pass
        for future in futures:
            if not future.cancel():  # started: wait for its last item (and re-raise its error)
                future.result()
    return results


def _bands(length: int, parts: int) -> list[tuple[int, int]]:
    """`parts` [start, end) bands of (nearly) equal size covering 0 .. length."""
    edges = [round(i * length / parts) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def resize(image: PIL.Image.Image, size: tuple[int, int], resample: int, consume: Consumer) -> None:
    """Resize RGB `image` to `size` = (width, height) with PIL filter `resample` and pass the result to `consume` in
    disjoint bands, possibly from several threads at once. The bands tile the output exactly and hold the same bytes
    as `np.asarray(image.resize(size, resample))`."""
    in_w, in_h = image.size
    out_w, out_h = size
    need_h, need_v = out_w != in_w, out_h != in_h
    threads = min(torch.get_num_threads(), 1 + _spare_cores())
    if (
        threads < 2
        or resample == PIL.Image.Resampling.NEAREST
        or not (need_h or need_v)
        or out_w * out_h < _MIN_PARALLEL_PIXELS
        or _pass_order() is None
    ):
        consume(np.asarray(image.resize(size, resample)), 0, 0)
        return

    def horizontal(src, rows):  # horizontal pass over rows [r0, r1) of src
        r0, r1 = rows
        return src.crop((0, r0, src.width, r1)).resize((out_w, r1 - r0), resample)

    def vertical(src, cols):  # vertical pass over columns [c0, c1) of src
        c0, c1 = cols
        return src.crop((c0, 0, c1, src.height)).resize((c1 - c0, out_h), resample)

    def last_pass(pass_fn, src, length, by_rows):
        def one(band):
            consume(np.asarray(pass_fn(src, band)), *((band[0], 0) if by_rows else (0, band[0])))

        _map(one, _bands(length, min(threads, max(1, length // _BAND))), threads - 1)

    if not need_v:
        last_pass(horizontal, image, in_h, by_rows=True)
    elif not need_h:
        last_pass(vertical, image, in_w, by_rows=False)
    elif _horizontal_first(in_w, in_h, out_w, out_h):
        mid = PIL.Image.new("RGB", (out_w, in_h))
        first = _bands(in_h, max(1, in_h // _BAND))
        for (r0, _), part in zip(first, _map(lambda rows: horizontal(image, rows), first, threads - 1)):
            mid.paste(part, (0, r0))
        last_pass(vertical, mid, out_w, by_rows=False)
    else:
        mid = PIL.Image.new("RGB", (in_w, out_h))
        first = _bands(in_w, max(1, in_w // _BAND))
        for (c0, _), part in zip(first, _map(lambda cols: vertical(image, cols), first, threads - 1)):
            mid.paste(part, (c0, 0))
        last_pass(horizontal, mid, out_h, by_rows=True)
