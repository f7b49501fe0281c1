"""Model configuration parsed from a checkpoint's `config.json`.

Accepts both spellings real checkpoints use: the Hub's Llama-3.2-Vision files (`rope_scaling` + `rope_theta`,
written by transformers 4.45) and current transformers (`rope_parameters`). Unknown generic keys are ignored;
missing or contradictory fields raise `ConfigError` naming the field.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .quant.scheme import QuantScheme


class ConfigError(ValueError):
    """A config.json that is missing a field, or whose fields contradict each other."""


DEFAULT_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `rope_type` is "default" or "llama3" (the only types Mllama checkpoints use)."""

    theta: float = 500000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """Inverse frequencies [head_dim // 2] in float32, as transformers computes them."""
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if self.rope_type == "default":
            return inv_freq
        # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
        low_freq_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_freq_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 128256
    hidden_size: int = 4096
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    intermediate_size: int = 14336
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    cross_attention_layers: tuple[int, ...] = (3, 8, 13, 18, 23, 28, 33, 38)
    rope: RopeConfig = field(default_factory=RopeConfig)
    bos_token_id: int | None = 128000
    eos_token_id: tuple[int, ...] = (128001,)
    pad_token_id: int | None = 128004

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1280
    num_hidden_layers: int = 32
    num_global_layers: int = 8
    attention_heads: int = 16
    intermediate_size: int = 5120
    vision_output_dim: int = 7680
    image_size: int = 560
    patch_size: int = 14
    num_channels: int = 3
    norm_eps: float = 1e-5
    max_num_tiles: int = 4
    intermediate_layers_indices: tuple[int, ...] = (3, 7, 15, 23, 30)
    supported_aspect_ratios: tuple[tuple[int, int], ...] = tuple(tuple(r) for r in DEFAULT_ASPECT_RATIOS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.attention_heads

    @property
    def num_patches(self) -> int:
        """Patches per tile plus the class token (1601 for 560/14)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def padded_patches(self) -> int:
        """`num_patches` rounded up to a multiple of 8, as the encoder pads each tile."""
        return -(-self.num_patches // 8) * 8

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)


@dataclass(frozen=True)
class MllamaConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_index: int = 128256
    dtype: torch.dtype | None = None  # the dtype the checkpoint was saved in, when config.json says
    # A compressed-tensors checkpoint's `quantization_config`, parsed (quant/scheme.py): its scheme and the names
    # in its `ignore` list. None for a dense checkpoint.
    quant_scheme: QuantScheme | None = None
    quant_ignore: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "MllamaConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found (a Mllama checkpoint directory holds config.json)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "MllamaConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        model_type = raw.get("model_type")
        if model_type is not None and model_type != "mllama":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'mllama'")
        text_raw = _required(raw, "text_config", source)
        vision_raw = _required(raw, "vision_config", source)
        text = _parse_text(text_raw, f"{source}: text_config")
        vision = _parse_vision(vision_raw, f"{source}: vision_config")
        image_token_index = int(raw.get("image_token_index", text.vocab_size))
        if image_token_index != text.vocab_size:
            raise ConfigError(
                f"{source}: image_token_index {image_token_index} must equal text_config.vocab_size "
                f"{text.vocab_size} (the <|image|> row follows the text vocabulary)"
            )
        dtype_name = raw.get("dtype", raw.get("torch_dtype", text_raw.get("dtype", text_raw.get("torch_dtype"))))
        dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        scheme, ignore = None, ()
        if raw.get("quantization_config") is not None:
            from .quant.scheme import parse_quantization_config

            scheme, ignore = parse_quantization_config(raw["quantization_config"], f"{source}: quantization_config")
        return cls(text=text, vision=vision, image_token_index=image_token_index, dtype=dtype, quant_scheme=scheme,
                   quant_ignore=tuple(ignore))


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _required(raw: dict, key: str, where: str):
    if key not in raw or raw[key] is None:
        raise ConfigError(f"{where}: missing required field {key!r}")
    return raw[key]


def _int(raw: dict, key: str, where: str, default=None, minimum: int = 1) -> int:
    value = raw.get(key, default) if default is not None else _required(raw, key, where)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: field {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(raw: dict, key: str, where: str, default=None) -> float:
    value = raw.get(key, default) if default is not None else _required(raw, key, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: field {key!r} must be a positive number, got {value!r}")
    return float(value)


def _int_list(raw: dict, key: str, where: str, default) -> tuple[int, ...]:
    value = raw.get(key)
    if value is None:
        return tuple(default)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{where}: field {key!r} must be a list of integers, got {value!r}")
    return tuple(value)


def _parse_rope(raw: dict, where: str) -> RopeConfig:
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    if params is not None and scaling is not None and params != scaling:
        # Some writers keep both; they must then agree on everything they both name.
        clash = [k for k in set(params) & set(scaling) if params[k] != scaling[k] and k != "type"]
        if clash:
            raise ConfigError(f"{where}: rope_parameters and rope_scaling disagree on {sorted(clash)}")
    merged = dict(scaling or {})
    merged.update(params or {})
    theta_outer = raw.get("rope_theta")
    theta_inner = merged.get("rope_theta")
    if theta_outer is not None and theta_inner is not None and float(theta_outer) != float(theta_inner):
        raise ConfigError(f"{where}: rope_theta {theta_outer} contradicts rope_parameters.rope_theta {theta_inner}")
    theta = theta_inner if theta_inner is not None else theta_outer
    theta = 500000.0 if theta is None else theta  # transformers' MllamaTextConfig.default_theta
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    rope_where = f"{where}: rope_parameters"
    if rope_type == "default":
        return RopeConfig(theta=_float({"rope_theta": theta}, "rope_theta", where))
    if rope_type != "llama3":
        raise ConfigError(f"{rope_where}: rope_type {rope_type!r} is not supported (expected 'llama3' or 'default')")
    low = _float(merged, "low_freq_factor", rope_where)
    high = _float(merged, "high_freq_factor", rope_where)
    if high <= low:
        raise ConfigError(f"{rope_where}: high_freq_factor {high} must exceed low_freq_factor {low}")
    return RopeConfig(
        theta=_float({"rope_theta": theta}, "rope_theta", where),
        rope_type="llama3",
        factor=_float(merged, "factor", rope_where),
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_position_embeddings=_int(merged, "original_max_position_embeddings", rope_where),
    )


def _parse_text(raw: dict, where: str) -> TextConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (Mllama uses 'silu')")
    if raw.get("tie_word_embeddings"):
        raise ConfigError(f"{where}: tie_word_embeddings=true is not supported (Mllama's lm_head is its own tensor)")
    eos = raw.get("eos_token_id", 128001)
    eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    cfg = TextConfig(
        vocab_size=_int(raw, "vocab_size", where),
        hidden_size=_int(raw, "hidden_size", where),
        num_hidden_layers=_int(raw, "num_hidden_layers", where),
        num_attention_heads=_int(raw, "num_attention_heads", where),
        num_key_value_heads=_int(raw, "num_key_value_heads", where, default=raw.get("num_attention_heads")),
        intermediate_size=_int(raw, "intermediate_size", where),
        rms_norm_eps=_float(raw, "rms_norm_eps", where, default=1e-5),
        max_position_embeddings=_int(raw, "max_position_embeddings", where, default=131072),
        cross_attention_layers=_int_list(raw, "cross_attention_layers", where, TextConfig.cross_attention_layers),
        rope=_parse_rope(raw, where),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=raw.get("pad_token_id"),
    )
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(
            f"{where}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}"
        )
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(
            f"{where}: num_attention_heads {cfg.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {cfg.num_key_value_heads}"
        )
    if cfg.head_dim % 2:
        raise ConfigError(f"{where}: head_dim {cfg.head_dim} must be even for rotary embeddings")
    bad = [i for i in cfg.cross_attention_layers if not 0 <= i < cfg.num_hidden_layers]
    if bad or len(set(cfg.cross_attention_layers)) != len(cfg.cross_attention_layers):
        raise ConfigError(
            f"{where}: cross_attention_layers {list(cfg.cross_attention_layers)} must be distinct layer indices "
            f"in [0, {cfg.num_hidden_layers})"
        )
    return cfg


def _parse_vision(raw: dict, where: str) -> VisionConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    act = raw.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (Mllama's vision encoder uses 'gelu')")
    image_size, patch_size = raw.get("image_size", 560), raw.get("patch_size", 14)
    for key, value in (("image_size", image_size), ("patch_size", patch_size)):
        if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
            raw = {**raw, key: value[0]}
    ratios = raw.get("supported_aspect_ratios") or DEFAULT_ASPECT_RATIOS
    if not all(isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) and v > 0 for v in r) for r in ratios):
        raise ConfigError(f"{where}: supported_aspect_ratios must be a list of [rows, cols] pairs, got {ratios!r}")
    cfg = VisionConfig(
        hidden_size=_int(raw, "hidden_size", where),
        num_hidden_layers=_int(raw, "num_hidden_layers", where),
        num_global_layers=_int(raw, "num_global_layers", where),
        attention_heads=_int(raw, "attention_heads", where, default=raw.get("num_attention_heads")),
        intermediate_size=_int(raw, "intermediate_size", where),
        vision_output_dim=_int(raw, "vision_output_dim", where),
        image_size=_int(raw, "image_size", where),
        patch_size=_int(raw, "patch_size", where),
        num_channels=_int(raw, "num_channels", where, default=3),
        norm_eps=_float(raw, "norm_eps", where, default=1e-5),
        max_num_tiles=_int(raw, "max_num_tiles", where),
        intermediate_layers_indices=_int_list(
            raw, "intermediate_layers_indices", where, VisionConfig.intermediate_layers_indices
        ),
        supported_aspect_ratios=tuple(tuple(r) for r in ratios),
    )
    if cfg.hidden_size % cfg.attention_heads:
        raise ConfigError(
            f"{where}: hidden_size {cfg.hidden_size} is not divisible by attention_heads {cfg.attention_heads}"
        )
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"{where}: image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    expected = cfg.hidden_size * (len(cfg.intermediate_layers_indices) + 1)
    if cfg.vision_output_dim != expected:
        raise ConfigError(
            f"{where}: vision_output_dim {cfg.vision_output_dim} must equal hidden_size {cfg.hidden_size} x "
            f"(len(intermediate_layers_indices) {len(cfg.intermediate_layers_indices)} + 1) = {expected}"
        )
    bad = [i for i in cfg.intermediate_layers_indices if not 0 <= i < cfg.num_hidden_layers]
    if bad:
        raise ConfigError(
            f"{where}: intermediate_layers_indices {bad} out of range for num_hidden_layers {cfg.num_hidden_layers}"
        )
    too_big = [list(r) for r in cfg.supported_aspect_ratios if r[0] * r[1] > cfg.max_num_tiles]
    if too_big:
        raise ConfigError(f"{where}: supported_aspect_ratios {too_big} need more tiles than max_num_tiles "
                          f"{cfg.max_num_tiles}")
    return cfg
