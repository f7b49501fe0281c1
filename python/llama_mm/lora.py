"""LoRA adapters on `MllamaModel`: apply, merge/unmerge, and save/load in PEFT's on-disk format.

A targeted `nn.Linear` is replaced by a `LoraLinear` that keeps the very same `weight`/`bias` parameters (so the
base parameter names, and the tensors the native engine reads, do not change) and adds `lora_A` [r, in] and
`lora_B` [out, r]:

    y = x @ W^T + b + (dropout(x) @ A^T @ B^T) * scaling,    scaling = alpha / r  (alpha / sqrt(r) with rsLoRA)

A quantized base (quant.layers.QuantLinear) gets a `QuantLoraLinear` the same way (same quantized buffers); its
adapter runs unmerged only (merging would need requantizing).

Module selection follows PEFT exactly, applied to transformers' in-memory module names (`model.language_model...`,
`model.vision_model...`, `model.multi_modal_projector`, `lm_head`), so an `adapter_config.json` selects the same
modules here as on transformers' `MllamaForConditionalGeneration`: a list matches a module whose name equals an entry
or ends with "." + entry; a string is a regular expression matched against the whole name; "all-linear" is every
Linear but lm_head. On disk (`adapter_model.safetensors`) a module's tensors are
`base_model.model.<transformers name>.lora_A.weight` / `.lora_B.weight`, as PEFT writes them.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import ops
from .quant.layers import QuantLinear
from .weights import CheckpointError, canonical_name, mismatch_report, read_safetensors, transformers_name

_LINEAR = (nn.Linear, QuantLinear)  # what LoRA wraps: dense or quantized Linear layers

# PEFT's names: text self- and cross-attention and MLP, vision attention and MLP, the projector.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_TARGETS = DEFAULT_TARGETS + ("fc1", "fc2", "multi_modal_projector")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")


@dataclass(frozen=True)
class LoraSettings:
    """What `apply_lora` was called with; `adapter_config.json` is written from (and read into) this."""
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...] | str
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLayer(nn.Module):
    """The low-rank update shared by LoraLinear (dense base) and QuantLoraLinear (quantized base): `lora_A` [r, in],
    `lora_B` [out, r], float32 whatever the base dtype (as PEFT's autocast_adapter_dtype does: they are the trained
    master copy)."""

    def init_lora(self, r: int, scaling: float, dropout: float, device) -> None:
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.scaling, self.merged = r, scaling, False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A kaiming-uniform(a=sqrt(5)), B zero, so a fresh adapter changes nothing."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling [out, in], float32."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def add_update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The base layer's output `out` for input `x`, plus the (unmerged) adapter's update."""
        if self.merged:
            return out
        h = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return out + (self.lora_B(self.lora_A(h)) * self.scaling).to(out.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


class LoraLinear(LoraLayer, nn.Linear):
    """An `nn.Linear` (same `weight` and `bias` objects as the one it replaces) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.init_lora(r, scaling, dropout, base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_update(x, ops.linear(x, self.weight, self.bias))  # 16-bit: widened where that is faster


class QuantLoraLinear(LoraLayer, QuantLinear):
    """A `QuantLinear` (same quantized buffers and bias as the one it replaces) plus a low-rank update. Never merged:
    folding the update into the quantized weight would need requantizing it."""

    def __init__(self, base: QuantLinear, r: int, scaling: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bits, self.group_size, self.activations = base.bits, base.group_size, base.activations
        for name in ("weight_packed", "weight_scale", "weight_zero"):
            self.register_buffer(name, getattr(base, name))
        self.bias = base.bias
        self.init_lora(r, scaling, dropout, base.weight_packed.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_update(x, QuantLinear.forward(self, x))


def _peft_module_name(name: str) -> str:
    """Our module name -> transformers' in-memory module name (the name PEFT matches and writes)."""
    return transformers_name(name + ".weight")[: -len(".weight")]


def _our_module_name(peft_name: str) -> str:
    return canonical_name(peft_name + ".weight")[: -len(".weight")]


def _matches(target_modules, peft_name: str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, peft_name) is not None
    return peft_name in target_modules or any(peft_name.endswith("." + t) for t in target_modules)


def _normalise_targets(target_modules) -> tuple[str, ...] | str:
    if isinstance(target_modules, str):
        return target_modules
    targets = tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be a regex string or a non-empty list of module names, "
                         f"got {target_modules!r}")
    return targets


def select_modules(model: nn.Module, target_modules) -> list[str]:
    """Names (ours) of the modules `target_modules` selects, with PEFT's rules. Raises ValueError naming the problem
    when nothing matches or a match is not a Linear."""
    target_modules = _normalise_targets(target_modules)
    all_linear = isinstance(target_modules, str) and target_modules.lower() == "all-linear"
    names, not_linear = [], []
    for name, module in model.named_modules():
        if not name or ".lora_" in name:
            continue
        if all_linear:
            if isinstance(module, _LINEAR) and name != "language_model.lm_head":
                names.append(name)
        elif _matches(target_modules, _peft_module_name(name)):
            (names if isinstance(module, _LINEAR) else not_linear).append(name)
    if not_linear:
        raise ValueError(f"target_modules {target_modules!r} selects modules that are not Linear layers "
                         f"(LoRA wraps only nn.Linear and QuantLinear): {not_linear[:8]}{' ...' if len(not_linear) > 8 else ''}")
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matches no module of the model (PEFT names are "
                         f"matched, e.g. 'q_proj', 'fc1', 'multi_modal_projector', or a regex over "
                         f"'model.language_model.layers.0.self_attn.q_proj')")
    return names


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Our module name -> LoraLinear / QuantLoraLinear, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               target_modules=DEFAULT_TARGETS, use_rslora: bool = False) -> nn.Module:
    """Wrap the selected Linear layers of `model` with LoRA (in place) and freeze everything else.

    Afterwards only `lora_A`/`lora_B` weights require grad. The settings are kept on the model (`model.lora_settings`)
    for `save_adapter`. Returns the model."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; load a fresh model to apply another adapter")
    if not (isinstance(r, int) and r > 0):
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    settings = LoraSettings(r=r, alpha=float(alpha), dropout=float(dropout),
                            target_modules=_normalise_targets(target_modules), use_rslora=bool(use_rslora))
    names = select_modules(model, settings.target_modules)
    model.requires_grad_(False)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, leaf)
        wrapper = QuantLoraLinear if isinstance(base, QuantLinear) else LoraLinear
        setattr(parent, leaf, wrapper(base, r, settings.scaling, settings.dropout))
    model.lora_settings = settings
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight in place (W += B A * scaling); forward then skips the LoRA path.

    Memory-mapped weights (`load_model` on the CPU) are copy-on-write maps: writing to them changes this process's
    pages only, never the checkpoint file."""
    layers = _layers_or_error(model)
    quantized = [name for name, layer in layers.items() if isinstance(layer, QuantLoraLinear)]
    if quantized:
        raise ValueError(f"cannot merge the LoRA adapter into quantized base layers ({quantized[:3]}"
                         f"{' ...' if len(quantized) > 3 else ''}): the merged weight would have to be requantized. "
                         f"Run the adapter unmerged (Generator(..., merge_adapter=False)), or load the model "
                         f"unquantized to merge")
    for layer in layers.values():
        if not layer.merged:
            layer.weight.copy_((layer.weight.float() + layer.delta_weight()).to(layer.weight.dtype))
            layer.merged = True
    return model


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora` (W -= B A * scaling; exact up to floating-point rounding in the weight dtype)."""
    for layer in _layers_or_error(model).values():
        if layer.merged:
            layer.weight.copy_((layer.weight.float() - layer.delta_weight()).to(layer.weight.dtype))
            layer.merged = False
    return model


def _layers_or_error(model) -> dict[str, LoraLayer]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers (call apply_lora or load_adapter first)")
    return layers


def adapter_config(settings: LoraSettings, base_model_name_or_path: str | None = None) -> dict:
    """`adapter_config.json` as peft 0.21 writes it for a plain LoRA on MllamaForConditionalGeneration."""
    targets = settings.target_modules
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
        "auto_mapping": {"base_model_class": "MllamaForConditionalGeneration",
                         "parent_library": "transformers.models.mllama.modeling_mllama"},
        "base_model_name_or_path": base_model_name_or_path, "bias": "none", "corda_config": None,
        "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": settings.alpha, "lora_bias": False, "lora_dropout": settings.dropout,
        "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "monteclora_config": None, "peft_type": "LORA", "qalora_group_size": 16, "r": settings.r,
        "rank_pattern": {}, "revision": None,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "target_parameters": None, "task_type": None, "trainable_token_indices": None, "use_bdlora": None,
        "use_dora": False, "use_qalora": False, "use_rslora": settings.use_rslora, "velora_config": None,
    }


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (float32 A/B, PEFT key names) to `directory`."""
    from safetensors.torch import save_file

    layers = _layers_or_error(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in layers.items():
        key = _KEY_PREFIX + _peft_module_name(name)
        tensors[f"{key}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{key}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    config = adapter_config(model.lora_settings, base_model_name_or_path)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


# adapter_config.json fields whose non-default values ask for something this module does not implement
_UNSUPPORTED = {
    "use_dora": False, "bias": "none", "fan_in_fan_out": False, "lora_bias": False, "modules_to_save": None,
    "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None, "rank_pattern": {},
    "alpha_pattern": {}, "target_parameters": None, "trainable_token_indices": None, "layer_replication": None,
    "use_qalora": False, "alora_invocation_tokens": None, "use_bdlora": None, "megatron_config": None,
}
_EMPTY = (None, False, {}, [], "none")


def read_adapter_config(directory: str | Path) -> LoraSettings:
    """Parse and check `adapter_config.json`; ValueError (CheckpointError) naming the field at fault."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a PEFT LoRA adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' adapters are supported")
    bad = [f"{k}={cfg[k]!r}" for k in _UNSUPPORTED if k in cfg and cfg[k] not in _EMPTY]
    if bad:
        raise CheckpointError(f"{path}: unsupported LoRA options {bad} (plain LoRA only)")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in cfg:
            raise CheckpointError(f"{path}: missing field {field!r}")
    r, alpha, dropout = cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0)
    if not (isinstance(r, int) and r > 0):
        raise CheckpointError(f"{path}: field 'r' must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise CheckpointError(f"{path}: field 'lora_alpha' must be a number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise CheckpointError(f"{path}: field 'lora_dropout' must be in [0, 1), got {dropout!r}")
    try:
        targets = _normalise_targets(cfg["target_modules"])
    except ValueError as e:
        raise CheckpointError(f"{path}: field 'target_modules': {e}") from None
    return LoraSettings(r=r, alpha=float(alpha), dropout=float(dropout), target_modules=targets,
                        use_rslora=bool(cfg.get("use_rslora", False)))


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a PEFT LoRA adapter directory onto `model` (strictly) and return it.

    A model without LoRA layers gets them from `adapter_config.json` (`apply_lora`); a model that has them must have
    the same targets, r and alpha (for instance when resuming training). Every tensor in the file must fill a LoRA
    weight of the model and every LoRA weight must be filled; otherwise CheckpointError (a ValueError) names the
    missing, unexpected and wrongly shaped tensors, and the model is left as it was. Pickle files
    (`adapter_model.bin`) are never opened."""
    directory = Path(directory)
    settings = read_adapter_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        pickled = directory / "adapter_model.bin"
        extra = (f" (it has {pickled.name}, a pickle file, which llama_mm never loads: convert it to safetensors)"
                 if pickled.exists() else "")
        raise CheckpointError(f"{weights_path}: missing{extra}")
    layers = lora_layers(model)
    if layers:
        _check_same_adapter(model, layers, settings, directory)
    names = list(layers) or select_modules(model, settings.target_modules)
    # our "<module>.lora_A" -> (the key PEFT writes for it, the expected shape)
    expected = {}
    for name in names:
        linear, key = model.get_submodule(name), f"{_KEY_PREFIX}{_peft_module_name(name)}"
        expected[f"{name}.lora_A"] = (f"{key}.lora_A.weight", (settings.r, linear.in_features))
        expected[f"{name}.lora_B"] = (f"{key}.lora_B.weight", (linear.out_features, settings.r))
    found, unexpected = {}, []
    for key, tensor in read_safetensors(weights_path).items():
        # PEFT's keys; adapters saved with older transformers use the on-disk names: both are accepted.
        m = _KEY_RE.match(key[len(_KEY_PREFIX):]) if key.startswith(_KEY_PREFIX) else None
        ours = f"{_our_module_name(m['module'])}.{m['which']}" if m else None
        if ours in expected and ours not in found:
            found[ours] = (key, tensor)
        else:
            unexpected.append(key)
    missing = sorted(peft_key for ours, (peft_key, _) in expected.items() if ours not in found)
    wrong = [f"{key}: file {list(t.shape)} vs model {list(expected[ours][1])}"
             for ours, (key, t) in found.items() if tuple(t.shape) != expected[ours][1]]
    problems = mismatch_report(missing, unexpected, wrong,
                               unexpected_label="unexpected tensors, not LoRA weights of a targeted module",
                               shape_note=f"; {CONFIG_FILE} says r={settings.r}")
    if problems:
        raise CheckpointError(f"{weights_path} does not match the model and {CONFIG_FILE}:\n  " + "\n  ".join(problems))
    if not layers:
        apply_lora(model, settings.r, settings.alpha, settings.dropout, settings.target_modules, settings.use_rslora)
        layers = lora_layers(model)
    with torch.no_grad():
        for ours, (_, t) in found.items():
            name, which = ours.rsplit(".", 1)
            getattr(layers[name], which).weight.copy_(t)
    return model


def _check_same_adapter(model, layers: dict[str, LoraLayer], settings: LoraSettings, directory: Path) -> None:
    have: LoraSettings = model.lora_settings
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the model's LoRA layers are merged; unmerge_lora before loading other adapter weights")
    diffs = [f"{f}: model {getattr(have, f)!r} vs adapter {getattr(settings, f)!r}"
             for f in ("r", "alpha", "use_rslora") if getattr(have, f) != getattr(settings, f)]
    selected = set(select_modules(model, settings.target_modules))
    if selected != set(layers):
        diffs.append(f"targeted modules differ: only in the model {sorted(set(layers) - selected)[:4]}, "
                     f"only in the adapter {sorted(selected - set(layers))[:4]}")
    if diffs:
        raise CheckpointError(f"{directory}: adapter does not match the model's LoRA layers: " + "; ".join(diffs))

