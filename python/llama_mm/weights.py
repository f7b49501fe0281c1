"""Checkpoint reading: safetensors only (single file or sharded with an index), memory-mapped, strict.

Tensors come out as views of a copy-on-write memory map of each shard, so loading holds no weight twice (a cast to
another dtype or device makes the one copy that is needed). Every tensor in the checkpoint is either consumed by the
model or named in the error; so is every tensor the model needs and the checkpoint lacks. Pickle files
(`pytorch_model.bin`, `*.pt`) are never opened.
"""
from __future__ import annotations

import json
import mmap
import re
import struct
import weakref
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names the file and the tensors at fault."""


# safetensors dtype tags -> torch dtypes
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The live memory maps read_safetensors made: map -> (first byte's address, length), for `release_pages`.
_MAPS: "weakref.WeakKeyDictionary[mmap.mmap, tuple[int, int]]" = weakref.WeakKeyDictionary()

# The one name map. Canonical names are the on-disk form the Hub's checkpoints use
# (`language_model.model.*`, `language_model.lm_head.weight`, `vision_model.*`, `multi_modal_projector.*`), which is
# also this package's module tree. transformers' in-memory form adds a `model.` prefix and hoists lm_head.
_IN_MEMORY_TO_CANONICAL = [
    (re.compile(r"^model\.language_model\.(.*)$"), r"language_model.model.\1"),
    (re.compile(r"^lm_head\.(.*)$"), r"language_model.lm_head.\1"),
    (re.compile(r"^model\.(vision_model|multi_modal_projector)\.(.*)$"), r"\1.\2"),
]
_CANONICAL_TO_IN_MEMORY = [
    (re.compile(r"^language_model\.model\.(.*)$"), r"model.language_model.\1"),
    (re.compile(r"^language_model\.lm_head\.(.*)$"), r"lm_head.\1"),
    (re.compile(r"^(vision_model|multi_modal_projector)\.(.*)$"), r"model.\1.\2"),
]


def canonical_name(name: str) -> str:
    """Map either key naming to the canonical (on-disk) one."""
    for pattern, repl in _IN_MEMORY_TO_CANONICAL:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return name


def transformers_name(name: str) -> str:
    """Map a canonical name to transformers' in-memory naming (used for PEFT adapter keys)."""
    for pattern, repl in _CANONICAL_TO_IN_MEMORY:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return name


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, validated against its index when sharded."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory")
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise CheckpointError(f"{index}: points at missing shard file(s) {missing}")
        return [model_dir / n for n in names]
    if single.is_file():
        return [single]
    found = sorted(p.name for p in model_dir.iterdir() if p.suffix == ".safetensors")
    if found:
        raise CheckpointError(f"{model_dir}: has {found} but neither model.safetensors nor model.safetensors.index.json")
    pickles = sorted(p.name for p in model_dir.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{model_dir}: only pickle checkpoint files {pickles}; llama_mm never loads pickle (it can run code). "
            "Convert the checkpoint to safetensors first."
        )
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file as zero-copy views of a copy-on-write memory map.

    The header is parsed and checked here (offsets inside the file, sizes matching shapes), so a truncated or
    corrupt file is reported by name instead of crashing later.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes; a safetensors file starts with an 8-byte header size)")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: corrupt or truncated (header of {header_len} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt header ({e})") from None
        data_start = 8 + header_len
        data_len = size - data_start
        header.pop("__metadata__", None)
        specs = {}
        for name, spec in header.items():
            try:
                dtype = _ST_DTYPES[spec["dtype"]]
                shape = [int(s) for s in spec["shape"]]
                begin, end = (int(o) for o in spec["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {spec!r}") from None
            nbytes = dtype.itemsize * _numel(shape)
            if end > data_len:
                raise CheckpointError(
                    f"{path}: truncated: tensor {name!r} ends at byte {end} of the data section, which has {data_len}"
                )
            if end - begin != nbytes:
                raise CheckpointError(f"{path}: corrupt: tensor {name!r} of shape {shape} occupies {end - begin} bytes, "
                                      f"expected {nbytes}")
            specs[name] = (dtype, shape, begin)
        if not specs:
            return {}
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    _MAPS[buf] = (torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr(), size)
    tensors = {}
    for name, (dtype, shape, begin) in specs.items():
        numel = _numel(shape)
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif (data_start + begin) % dtype.itemsize == 0:
            tensors[name] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=data_start + begin).view(shape)
        else:  # misaligned (non-standard writer): read bytes, then reinterpret
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=numel * dtype.itemsize, offset=data_start + begin)
            tensors[name] = raw.clone().view(dtype).view(shape)
    return tensors


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages of a memory-mapped checkpoint tensor that is no longer needed (the whole pages it
    alone covers), so reading a large checkpoint tensor by tensor (quantize on load) does not keep every page it
    read resident while the shard's map lives on for its other tensors. The file is untouched: the pages are read
    again from it if the tensor is used after all. Tensors not from `read_safetensors`' maps are left alone."""
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    for buf, (base, length) in list(_MAPS.items()):
        if base <= start and end <= base + length:
            first = -(-(start - base) // mmap.PAGESIZE) * mmap.PAGESIZE  # page-aligned, inside the tensor
            last = (end - base) // mmap.PAGESIZE * mmap.PAGESIZE
            if last > first:
                buf.madvise(mmap.MADV_DONTNEED, first, last - first)
            return


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def load_checkpoint(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under its canonical name (memory-mapped, in the stored dtype)."""
    files = checkpoint_files(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files:
        for name, tensor in read_safetensors(path).items():
            key = canonical_name(name)
            if key in tensors:
                raise CheckpointError(f"tensor {key!r} appears twice: in {origin[key].name} and {path.name}")
            tensors[key], origin[key] = tensor, path
    return tensors


def mismatch_report(missing: list, unexpected: list, wrong: list, unexpected_label: str = "unexpected tensors",
                    shape_note: str = "") -> list[str]:
    """The lines of a strict-loading error: every missing, unexpected and wrongly shaped tensor, by name."""
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"{unexpected_label} ({len(unexpected)}): {unexpected}")
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}{shape_note}): {wrong}")
    return problems


def assign_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], device, dtype, source="checkpoint",
                   progress: bool = False):
    """Strictly assign `tensors` (canonical names) to `module`'s parameters, cast to `dtype` on `device`.

    Raises `CheckpointError` listing every missing, unexpected and wrongly shaped tensor at once. Modules that hold
    no `.weight` parameter (quantized layers, installed before) are accounted for by whoever installed them.
    """
    expected = {name: p for name, p in module.named_parameters()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(
        f"{n}: checkpoint {list(tensors[n].shape)} vs model {list(p.shape)}"
        for n, p in expected.items() if n in tensors and tensors[n].shape != p.shape
    )
    problems = mismatch_report(missing, unexpected, wrong)
    if problems:
        raise CheckpointError(f"{source} does not match the model config:\n  " + "\n  ".join(problems))
    state = {}
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(t.numel() * t.element_size() for t in tensors.values())
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights")  # stays: the final count
    for name, t in tensors.items():
        if not (t.is_floating_point()):
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {t.dtype}, expected a floating-point type")
        state[name] = torch.nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)
        if bar is not None:
            bar.update(t.numel() * t.element_size())
    if bar is not None:
        bar.close()
    # Every parameter is accounted for above; buffers (a quantized layer's) are already in place.
    result = module.load_state_dict(state, strict=False, assign=True)
    assert not result.unexpected_keys and not set(result.missing_keys) & set(expected), result
