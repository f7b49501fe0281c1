"""compressed-tensors "pack-quantized" checkpoints: reading a quantized module's tensors strictly, and writing them.

Per quantized Linear `P` a checkpoint holds `P.weight_packed` int32 [N, K*bits/32], `P.weight_scale` [N, G] in the
model dtype, `P.weight_shape` int [2] = (N, K) and, asymmetric only, `P.weight_zero_point` int32 [ceil(N*bits/32), G]
packed along output rows. `split_quantized` turns those into `QuantizedWeight`s and refuses anything inconsistent,
naming the tensor; `write_quantized_checkpoint` quantizes a dense checkpoint's text-decoder Linears shard by shard.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError
from ..weights import CheckpointError, canonical_name, checkpoint_files, read_safetensors, transformers_name
from .rtn import QuantizedWeight, pack_zero_point, quantize_weight, unpack_zero_point
from .scheme import QuantScheme, parse_quantization_config, quantization_config

PACKED, SCALE, SHAPE, ZERO, G_IDX = "weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx"
QUANTIZED_SUFFIXES = (PACKED, SCALE, SHAPE, ZERO)
# The text decoder's Linear weights (canonical names): what `llama-mm quantize` quantizes by default.
TEXT_LINEAR = re.compile(
    r"^language_model\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj|cross_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
    r"\.weight$"
)
# Modules left dense, as llm-compressor's Mllama recipes list them; the leading `.*` resolves them against both key
# namings (`vision_model.*` on disk, `model.vision_model.*` in transformers' memory).
DEFAULT_IGNORE = ["re:.*lm_head", "re:.*multi_modal_projector.*", "re:.*vision_model.*"]
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
_INDEX = "model.safetensors.index.json"


def is_ignored(module: str, ignore: list[str]) -> bool:
    """Whether `ignore` (exact names or "re:" regexes, matched from the start as compressed-tensors does) names
    `module` in either key naming."""
    names = {module, canonical_name(module), transformers_name(canonical_name(module))}
    for entry in ignore:
        if entry.startswith("re:"):
            pattern = re.compile(entry[3:])
            if any(pattern.match(n) for n in names):
                return True
        elif entry in names:
            return True
    return False


def split_quantized(tensors: dict[str, torch.Tensor], scheme: QuantScheme, ignore: list[str],
                    source: str) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """({module: QuantizedWeight}, remaining dense tensors) from a checkpoint's tensors (either key naming; module
    names come out canonical). Raises CheckpointError listing every inconsistent tensor by name."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        key = canonical_name(name)
        prefix, _, suffix = key.rpartition(".")
        if suffix in QUANTIZED_SUFFIXES or suffix == G_IDX:
            modules.setdefault(prefix, {})[suffix] = t
        else:
            dense[key] = t
    problems: list[str] = []
    out: dict[str, QuantizedWeight] = {}
    for module, parts in sorted(modules.items()):
        found = len(problems)
        _check_module(module, parts, scheme, ignore, dense, problems)
        if len(problems) == found:
            out[module] = _quantized_weight(parts, scheme)
    if problems:
        raise CheckpointError(f"{source}: quantized tensors do not match the quantization_config "
                              f"({scheme}):\n  " + "\n  ".join(problems))
    return out, dense


def _check_module(module: str, parts: dict[str, torch.Tensor], scheme: QuantScheme, ignore: list[str],
                  dense: dict[str, torch.Tensor], problems: list[str]) -> None:
    """Append to `problems` everything wrong with one quantized module's tensors."""
    def bad(suffix: str, why: str) -> None:
        problems.append(f"{module}.{suffix}: {why}")

    start = len(problems)

    if G_IDX in parts:
        bad(G_IDX, "activation ordering (a group index) is not supported")
    if is_ignored(module, ignore):
        bad(PACKED if PACKED in parts else sorted(parts)[0], "module is quantized but the ignore list names it")
    if f"{module}.weight" in dense:
        problems.append(f"{module}.weight: a dense weight next to quantized tensors of the same module")
    for suffix in (PACKED, SCALE, SHAPE):
        if suffix not in parts:
            bad(suffix, "missing")
    if scheme.symmetric and ZERO in parts:
        bad(ZERO, "present, but the scheme is symmetric")
    if not scheme.symmetric and ZERO not in parts:
        bad(ZERO, "missing (the scheme is asymmetric)")
    if len(problems) > start:
        return
    shape = parts[SHAPE]
    if shape.dtype not in (torch.int64, torch.int32) or shape.shape != (2,) or bool((shape <= 0).any()):
        return bad(SHAPE, f"expected 2 positive integers (out, in), got {shape.dtype} {shape.tolist()}")
    n, k = (int(v) for v in shape)
    try:
        scheme.validate(k, module)
    except ValueError as e:
        return bad(SHAPE, str(e))
    _expect(parts[PACKED], torch.int32, (n, k * scheme.bits // 32), f"{module}.{PACKED}",
            f"{scheme.bits}-bit values of a [{n}, {k}] weight", problems)
    scale = parts[SCALE]
    if not scale.is_floating_point():
        bad(SCALE, f"dtype {scale.dtype}, expected floating point")
    elif tuple(scale.shape) != (n, scheme.groups(k)):
        bad(SCALE, f"shape {list(scale.shape)}, expected {[n, scheme.groups(k)]} ({scheme.groups(k)} groups of "
                   f"{scheme.group_size or k} of the {k} inputs)")
    if ZERO in parts:
        rows = -(-n * scheme.bits // 32)
        _expect(parts[ZERO], torch.int32, (rows, scheme.groups(k)), f"{module}.{ZERO}",
                f"{scheme.bits}-bit zero points of {n} rows packed along rows", problems)


def _expect(t: torch.Tensor, dtype: torch.dtype, shape: tuple, name: str, what: str, problems: list[str]) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape:
        problems.append(f"{name}: {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)} ({what})")


def _quantized_weight(parts: dict[str, torch.Tensor], scheme: QuantScheme) -> QuantizedWeight:
    n, k = (int(v) for v in parts[SHAPE])
    zero = unpack_zero_point(parts[ZERO], scheme.bits, n) if ZERO in parts else None
    return QuantizedWeight(parts[PACKED], parts[SCALE], zero, scheme.bits, scheme.group_size or k, (n, k))


def module_tensors(prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized module `prefix` (in whatever key naming `prefix` is in)."""
    out = {f"{prefix}.{PACKED}": qw.packed, f"{prefix}.{SCALE}": qw.scale,
           f"{prefix}.{SHAPE}": torch.tensor(qw.shape, dtype=torch.int64)}
    if qw.zero is not None:
        out[f"{prefix}.{ZERO}"] = pack_zero_point(qw.zero, qw.bits)
    return out


@dataclass
class QuantizeReport:
    """What write_quantized_checkpoint wrote."""

    out_dir: Path
    quantized: list[str] = field(default_factory=list)  # module names, in the source's key naming
    bytes_before: int = 0
    bytes_after: int = 0
    files: list[str] = field(default_factory=list)


def write_quantized_checkpoint(src_dir: str | Path, out_dir: str | Path, scheme: QuantScheme,
                               ignore: list[str] | None = None, progress: bool = False) -> QuantizeReport:
    """Quantize every text-decoder Linear weight of the checkpoint in `src_dir` (except modules `ignore` names;
    default DEFAULT_IGNORE) and write a compressed-tensors pack-quantized checkpoint to `out_dir`.

    One output shard per input shard, in the source's key naming and dtype; config.json gains the
    `quantization_config`; tokenizer, processor, chat-template and generation files are copied. Reads memory-mapped
    and holds at most one shard's quantized tensors.
    """
    src, out = Path(src_dir), Path(out_dir)
    ignore = list(DEFAULT_IGNORE if ignore is None else ignore)
    config_path = src / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{config_path}: cannot read ({e})") from None
    if "quantization_config" in config:
        raise ConfigError(f"{config_path}: already has a quantization_config; quantize an unquantized checkpoint")
    files = checkpoint_files(src)
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: the output directory must differ from the source")
    for path in files:  # check every weight before writing anything (headers only: the data stays mapped)
        for name, t in read_safetensors(path).items():
            if _selected(name, ignore):
                _check_quantizable(t, scheme, f"{name} ({path.name})")
    out.mkdir(parents=True, exist_ok=True)
    report = QuantizeReport(out)
    weight_map: dict[str, str] = {}
    bar = _progress_bar(files, progress)
    for path in files:
        tensors = read_safetensors(path)
        written: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            report.bytes_before += t.numel() * t.element_size()
            if _selected(name, ignore):
                prefix = name[: -len(".weight")]
                written.update(module_tensors(prefix, quantize_weight(t, scheme, name)))
                report.quantized.append(prefix)
            else:
                written[name] = t
            if bar is not None:
                bar.update(t.numel() * t.element_size())
        report.bytes_after += write_safetensors(out / path.name, written)
        weight_map.update({name: path.name for name in written})
        report.files.append(path.name)
        del tensors, written
    if bar is not None:
        bar.close()
    if not report.quantized:
        raise CheckpointError(f"{src}: no text-decoder Linear weight to quantize (all ignored, or not a Mllama "
                              "checkpoint)")
    if len(files) > 1:
        index = {"metadata": {"total_size": report.bytes_after}, "weight_map": dict(sorted(weight_map.items()))}
        (out / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
        report.files.append(_INDEX)
    config["quantization_config"] = quantization_config(scheme, ignore)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    report.files.append("config.json")
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != "config.json" and f.name != _INDEX and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copyfile(f, out / f.name)
            report.files.append(f.name)
    return report


def _selected(name: str, ignore: list[str]) -> bool:
    """Whether the writer quantizes tensor `name`: a text-decoder Linear weight that `ignore` does not name."""
    return bool(TEXT_LINEAR.match(canonical_name(name))) and not is_ignored(name[: -len(".weight")], ignore)


def _check_quantizable(t: torch.Tensor, scheme: QuantScheme, name: str) -> None:
    if t.dim() != 2 or not t.is_floating_point():
        raise CheckpointError(f"tensor {name}: expected a 2-D floating-point weight, got {t.dtype} {list(t.shape)}")
    try:
        scheme.validate(t.shape[1], name)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def read_quantization_config(model_dir: str | Path) -> tuple[QuantScheme, list[str]] | None:
    """(scheme, ignore) of a checkpoint directory whose config.json has a quantization_config, else None."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    if not isinstance(config, dict) or "quantization_config" not in config:
        return None
    return parse_quantization_config(config["quantization_config"], str(path))


def _progress_bar(files: list[Path], progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="quantizing",
                leave=False)


_ST_TAGS = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Write `tensors` as one safetensors file, streaming one tensor at a time (no copy of the whole shard);
    returns the bytes of tensor data. Layout as the safetensors library writes it: larger dtypes first, then by name,
    so every tensor is aligned; header padded with spaces to 8 bytes."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_TAGS[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in order:
            t = tensors[name].contiguous()
            if t.numel():
                f.write(t.view(-1).view(torch.uint8).numpy().data)
    return offset
