"""Weight-only integer quantization schemes and the compressed-tensors `quantization_config` that names them.

One `QuantScheme` (bits, group size or per-channel, symmetric or not) covers what llm-compressor's round-to-nearest
W4A16 / W8A16 / W4A16_ASYM presets write in the "pack-quantized" format. `parse_quantization_config` reads a
checkpoint's `quantization_config` and refuses, by field and value, everything else (other formats, activation
quantization, sparsity, activation ordering, float types, mixed schemes, KV-cache quantization, transforms);
`quantization_config` writes the dict compressed-tensors writes for a scheme. Neither imports compressed_tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
# The format version written into `quantization_config["version"]`: the compressed-tensors release whose
# pack-quantized layout and config shape this module reproduces (tests compare against the installed package).
COMPRESSED_TENSORS_VERSION = "0.20.1"
SUPPORTED_BITS = (4, 8)
TARGETS = ["Linear"]

# compressed-tensors' preset names (a config group may be `{"W4A16": ["Linear"]}`) -> (bits, group, symmetric)
_PRESETS = {"W4A16": (4, 128, True), "W8A16": (8, 128, True), "W4A16_ASYM": (4, 128, False)}
# QuantizationArgs fields that must hold these values (absent counts as the default shown)
_WEIGHT_FIXED = {"type": "int", "dynamic": False, "block_structure": None, "scale_dtype": None}
_WEIGHT_FIELDS = {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic",
                  "actorder", "scale_dtype", "zp_dtype", "observer", "observer_kwargs"}
_ZP_DTYPES = (None, "torch.int8", "int8")


@dataclass(frozen=True)
class QuantScheme:
    """Integer weight-only quantization: `bits` 4 or 8; `group_size` columns share a scale (None = one scale per
    output channel); `symmetric` False adds a zero point per group."""

    bits: int
    group_size: int | None = 128
    symmetric: bool = True

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group_size must be a positive integer or None (per channel), got {self.group_size!r}")

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size is None else "group"

    def groups(self, in_features: int) -> int:
        """Scales per output row."""
        return 1 if self.group_size is None else in_features // self.group_size

    def validate(self, in_features: int, tensor: str = "weight") -> None:
        """Raise ValueError unless a Linear weight with `in_features` columns can be quantized with this scheme."""
        if self.group_size is not None and in_features % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide {in_features} (the input size of "
                             f"tensor {tensor})")
        if in_features * self.bits % 32:
            raise ValueError(f"{in_features} columns of {self.bits} bits do not fill whole int32 words (tensor "
                             f"{tensor}); the input size must be a multiple of {32 // self.bits}")


def weight_args(scheme: QuantScheme) -> dict:
    """The `weights` QuantizationArgs dict compressed-tensors serialises for `scheme`."""
    return {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric,
            "group_size": scheme.group_size, "strategy": scheme.strategy, "dynamic": False}


def quantization_config(scheme: QuantScheme, ignore: list[str]) -> dict:
    """The `quantization_config` of config.json as compressed-tensors' ModelCompressor writes it after compressing
    a model whose Linear layers (except those `ignore` names) carry `scheme`."""
    return {
        "config_groups": {"group_0": {"targets": list(TARGETS), "weights": weight_args(scheme),
                                      "input_activations": None, "output_activations": None, "format": FORMAT}},
        "format": FORMAT,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def parse_quantization_config(cfg: dict, source: str) -> tuple[QuantScheme, list[str]]:
    """(scheme, ignore list) of a compressed-tensors `quantization_config`; ConfigError naming the field otherwise.

    `source` names where the dict came from (e.g. "model/config.json"), for the messages.
    """
    where = f"{source}: quantization_config"
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    method = cfg.get("quant_method")
    if method != QUANT_METHOD:
        raise ConfigError(f"{where}.quant_method is {method!r}; only {QUANT_METHOD!r} checkpoints are supported")
    _refuse_set(cfg, "kv_cache_scheme", where, "KV-cache quantization is not supported")
    _refuse_set(cfg, "sparsity_config", where, "sparse checkpoints are not supported")
    _refuse_set(cfg, "transform_config", where, "transforms (rotations, Hadamard) are not supported")
    _refuse_set(cfg, "moe_sparsity_config", where, "expert sparsity is not supported")
    status = cfg.get("quantization_status", "compressed")
    if status != "compressed":
        raise ConfigError(f"{where}.quantization_status is {status!r}; only 'compressed' checkpoints are supported")
    global_format = cfg.get("format")
    if global_format not in (None, FORMAT):
        raise ConfigError(f"{where}.format is {global_format!r}; only {FORMAT!r} is supported")
    groups = cfg.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{where}.config_groups: expected a non-empty object, got {groups!r}")
    schemes = {name: _parse_group(group, f"{where}.config_groups.{name}", global_format)
               for name, group in groups.items()}
    distinct = set(schemes.values())
    if len(distinct) > 1:
        raise ConfigError(f"{where}.config_groups: groups with different schemes are not supported: "
                          + ", ".join(f"{name}={s}" for name, s in schemes.items()))
    ignore = cfg.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise ConfigError(f"{where}.ignore: expected a list of module names, got {ignore!r}")
    return distinct.pop(), list(ignore)


def _refuse_set(cfg: dict, key: str, where: str, why: str) -> None:
    if cfg.get(key) not in (None, {}):
        raise ConfigError(f"{where}.{key} is set ({cfg[key]!r}): {why}")


def _parse_group(group, where: str, global_format: str | None) -> QuantScheme:
    if isinstance(group, list):  # preset form: {"W4A16": ["Linear"]}
        name = where.rsplit(".", 1)[-1]
        if name.upper() not in _PRESETS:
            raise ConfigError(f"{where}: preset scheme {name!r} is not supported (supported: {sorted(_PRESETS)})")
        _check_targets(group, where)
        if global_format is None:
            raise ConfigError(f"{where}: no format given; only {FORMAT!r} is supported")
        return QuantScheme(*_PRESETS[name.upper()])
    if not isinstance(group, dict):
        raise ConfigError(f"{where}: expected an object, got {group!r}")
    _check_targets(group.get("targets"), f"{where}.targets")
    fmt = group.get("format") or global_format
    if fmt != FORMAT:
        raise ConfigError(f"{where}.format is {fmt!r}; only {FORMAT!r} is supported")
    for key in ("input_activations", "output_activations"):
        if group.get(key) is not None:
            raise ConfigError(f"{where}.{key} is set: activation quantization is not supported (weight-only only)")
    unknown = set(group) - {"targets", "weights", "input_activations", "output_activations", "format"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise ConfigError(f"{where}.weights: expected an object (weight quantization), got {weights!r}")
    return _parse_weights(weights, f"{where}.weights")


def _check_targets(targets, where: str) -> None:
    if targets != TARGETS:
        raise ConfigError(f"{where} is {targets!r}; only {TARGETS!r} is supported")


def _parse_weights(w: dict, where: str) -> QuantScheme:
    unknown = set(w) - _WEIGHT_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
    for key, value in _WEIGHT_FIXED.items():
        if w.get(key, value) != value:
            raise ConfigError(f"{where}.{key} is {w[key]!r}; only {value!r} is supported")
    if w.get("actorder") not in (None, False):
        raise ConfigError(f"{where}.actorder is {w['actorder']!r}: activation ordering is not supported")
    bits = w.get("num_bits", 8)
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"{where}.num_bits is {bits!r}; supported: {list(SUPPORTED_BITS)}")
    symmetric = w.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise ConfigError(f"{where}.symmetric is {symmetric!r}; expected true or false")
    if w.get("zp_dtype") not in _ZP_DTYPES:
        raise ConfigError(f"{where}.zp_dtype is {w['zp_dtype']!r}; only int8 zero points are supported")
    group_size, strategy = w.get("group_size"), w.get("strategy")
    if strategy is None:  # compressed-tensors infers it: a group size means "group", none means "channel"
        strategy = "channel" if group_size in (None, -1) else "group"
    if strategy == "channel":
        if group_size not in (None, -1):
            raise ConfigError(f"{where}.group_size is {group_size!r} with strategy 'channel'; expected null")
        return QuantScheme(bits, None, symmetric)
    if strategy != "group":
        raise ConfigError(f"{where}.strategy is {strategy!r}; supported: 'group', 'channel'")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ConfigError(f"{where}.group_size is {group_size!r}; expected a positive integer for strategy 'group'")
    return QuantScheme(bits, group_size, symmetric)
