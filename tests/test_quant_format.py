"""The compressed-tensors pack-quantized format: llama_mm's scheme parsing, RTN quantization, reader and writer,
checked value for value against compressed-tensors itself (and transformers loading what llama_mm writes)."""
from __future__ import annotations

import copy
import json

import compressed_tensors  # noqa: F401  (the oracle: a test dependency, never a runtime one)
import pytest
import torch

from checkpoints import build_reference, write_checkpoint
from llama_mm import cli
from llama_mm.config import ConfigError
from llama_mm.quant.checkpoint import (DEFAULT_IGNORE, split_quantized, write_quantized_checkpoint,
                                       read_quantization_config)
from llama_mm.quant.rtn import pack_zero_point, quantize_weight, unpack_zero_point
from llama_mm.quant.scheme import QuantScheme, parse_quantization_config, quantization_config
from llama_mm.weights import CheckpointError, canonical_name, checkpoint_files, read_safetensors, transformers_name
from quant_checkpoints import MLLAMA_IGNORE, ct_scheme, load_ct_reference, write_ct_checkpoint


# Text-decoder Linear modules of the tiny model: 4 layers (2 self-attention, 2 cross-attention) x (4 + 3)
N_TEXT_LINEARS = 4 * 7
WIDE_TEXT = dict(hidden_size=128, intermediate_size=256)  # room for groups of 128


# ---------------------------------------------------------------------------------------------------------------------
# RTN quantization vs compressed-tensors' calculate_qparams / quantize / pack_to_int32

def _ct_args(scheme: QuantScheme):
    return ct_scheme(scheme.bits, scheme.group_size, scheme.symmetric, scheme.strategy).weights


def _ct_quantize(w: torch.Tensor, scheme: QuantScheme):
    """compressed-tensors' min-max RTN of one weight: (packed, scale, zero point int8 or None)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = _ct_args(scheme)
    if scheme.group_size is None:
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    else:
        g = w.unflatten(-1, (w.shape[1] // scheme.group_size, scheme.group_size))
        lo, hi = g.amin(-1), g.amax(-1)
    scale, zero = calculate_qparams(lo, hi, args)
    q = quantize(x=w, scale=scale, zero_point=zero, args=args, dtype=torch.int8)
    return pack_to_int32(q, scheme.bits), scale, (None if scheme.symmetric else zero)


def _awkward_weight(n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows plus the edge cases of the min-max observer: an all-zero row (scale eps), an all-positive row
    (range widened to 0), a constant negative row, and values on rounding midpoints."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 3
    w[0] = 0
    w[1] = w[1].abs() + 0.5
    w[2] = -0.75
    w[3] = torch.arange(k) % 16 - 7.5
    return w.to(dtype)


RTN_CASES = [
    (QuantScheme(4, 32, True), torch.bfloat16), (QuantScheme(4, 32, False), torch.bfloat16),
    (QuantScheme(8, 64, True), torch.float16), (QuantScheme(8, 64, False), torch.float32),
    (QuantScheme(4, None, True), torch.float32), (QuantScheme(4, None, False), torch.float16),
    (QuantScheme(8, None, False), torch.bfloat16), (QuantScheme(4, 128, False), torch.float32),
]


@pytest.mark.parametrize("scheme,dtype", RTN_CASES, ids=lambda v: str(v))
def test_quantize_weight_matches_compressed_tensors(scheme, dtype):
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    w = _awkward_weight(40, 256, dtype, seed=scheme.bits)
    qw = quantize_weight(w, scheme)
    packed, scale, zero = _ct_quantize(w, scheme)
    assert qw.packed.dtype == torch.int32 and torch.equal(qw.packed, packed)
    assert qw.scale.dtype == dtype and torch.equal(qw.scale, scale)
    if scheme.symmetric:
        assert qw.zero is None
    else:
        assert qw.zero.dtype == torch.int8 and torch.equal(qw.zero, zero)
    assert qw.shape == (40, 256) and qw.group_size == (scheme.group_size or 256)
    ref = dequantize(x_q=qw.q(), scale=scale, zero_point=zero, args=_ct_args(scheme))
    out = qw.dequantize()
    assert out.dtype == dtype and torch.equal(out, ref)
    assert torch.equal(qw.dequantize(torch.float32), ref.float())


@pytest.mark.parametrize("bits,rows", [(4, 64), (4, 20), (8, 36), (8, 3)])
def test_zero_point_packing_matches_compressed_tensors(bits, rows):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    gen = torch.Generator().manual_seed(rows)
    zero = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (rows, 5), generator=gen, dtype=torch.int8)
    packed = pack_zero_point(zero, bits)
    assert torch.equal(packed, pack_to_int32(zero, bits, packed_dim=0))
    assert torch.equal(unpack_zero_point(packed, bits, rows), zero)


def test_quantize_weight_refuses_bad_shapes():
    with pytest.raises(ValueError, match="group size 48 does not divide 64 .*tensor blk.w"):
        quantize_weight(torch.randn(8, 64), QuantScheme(4, 48), "blk.w")
    with pytest.raises(ValueError, match="tensor w: expected a 2-D floating-point weight"):
        quantize_weight(torch.ones(8, 64, dtype=torch.int32), QuantScheme(4, 32), "w")
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize_weight(torch.randn(8, 36), QuantScheme(4, None), "w")


# ---------------------------------------------------------------------------------------------------------------------
# quantization_config: written as compressed-tensors writes it, parsed strictly

def _ct_written_config(tmp_path, scheme: QuantScheme) -> dict:
    """The quantization_config compressed-tensors' ModelCompressor writes for a model of Linear layers all carrying
    `scheme` (nothing ignored)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    model = torch.nn.ModuleList([torch.nn.Linear(256, 64), torch.nn.Linear(512, 32)])
    cfg = QuantizationConfig(config_groups={"group_0": ct_scheme(scheme.bits, scheme.group_size, scheme.symmetric,
                                                                 scheme.strategy)}, format="pack-quantized")
    apply_quantization_config(model, cfg, show_progress=False)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    (tmp_path / "config.json").write_text("{}")
    compressor.update_config(str(tmp_path))
    return json.loads((tmp_path / "config.json").read_text())["quantization_config"]


PRESETS = {"W4A16": QuantScheme(4, 128, True), "W8A16": QuantScheme(8, 128, True),
           "W4A16_ASYM": QuantScheme(4, 128, False)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_schemes_equal_compressed_tensors_presets(name):
    from compressed_tensors.quantization import preset_name_to_scheme

    assert preset_name_to_scheme(name, ["Linear"]).weights == _ct_args(PRESETS[name])


@pytest.mark.parametrize("scheme", [*PRESETS.values(), QuantScheme(4, 32, False), QuantScheme(8, None, True),
                                    QuantScheme(4, None, False)], ids=str)
def test_quantization_config_equals_compressed_tensors(tmp_path, scheme):
    assert quantization_config(scheme, []) == _ct_written_config(tmp_path, scheme)
    assert parse_quantization_config(quantization_config(scheme, MLLAMA_IGNORE), "x") == (scheme, MLLAMA_IGNORE)


def test_parse_accepts_preset_group_form():
    cfg = quantization_config(QuantScheme(4, 128, False), [])
    cfg["config_groups"] = {"W4A16_ASYM": ["Linear"]}
    assert parse_quantization_config(cfg, "x") == (QuantScheme(4, 128, False), [])


def _mutated(path: str, value):
    """A valid int4 group-32 config with `path` (dotted; "-" deletes) set to `value`."""
    cfg = copy.deepcopy(quantization_config(QuantScheme(4, 32, True), ["re:.*lm_head"]))
    *parents, leaf = path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    if value == "-":
        del node[leaf]
    else:
        node[leaf] = value
    return cfg


W = "config_groups.group_0.weights"
REFUSED = [
    ("quant_method", "gptq", "quant_method is 'gptq'"),
    ("format", "int-quantized", "format is 'int-quantized'"),
    ("format", "float-quantized", "format is 'float-quantized'"),
    ("format", "marlin-24", "format is 'marlin-24'"),
    ("config_groups.group_0.format", "naive-quantized", "group_0.format is 'naive-quantized'"),
    ("config_groups.group_0.input_activations", {"num_bits": 8, "type": "int", "dynamic": True},
     "group_0.input_activations is set: activation quantization"),
    ("config_groups.group_0.output_activations", {"num_bits": 8}, "group_0.output_activations is set"),
    ("config_groups.group_0.targets", ["Linear", "Embedding"], "group_0.targets is"),
    ("config_groups.group_0.weights", None, "group_0.weights: expected an object"),
    ("sparsity_config", {"format": "sparse-bitmask"}, "sparsity_config is set"),
    ("kv_cache_scheme", {"num_bits": 8, "type": "float"}, "kv_cache_scheme is set"),
    ("transform_config", {"config_groups": {"u": {}}}, "transform_config is set"),
    ("quantization_status", "frozen", "quantization_status is 'frozen'"),
    (f"{W}.actorder", "group", "weights.actorder is 'group': activation ordering"),
    (f"{W}.actorder", "weight", "weights.actorder is 'weight'"),
    (f"{W}.type", "float", "weights.type is 'float'"),
    (f"{W}.num_bits", 2, "weights.num_bits is 2"),
    (f"{W}.dynamic", True, "weights.dynamic is True"),
    (f"{W}.strategy", "tensor", "weights.strategy is 'tensor'"),
    (f"{W}.strategy", "block", "weights.strategy is 'block'"),
    (f"{W}.group_size", 0, "weights.group_size is 0"),
    (f"{W}.group_size", None, "weights.group_size is None"),
    (f"{W}.symmetric", "yes", "weights.symmetric is 'yes'"),
    (f"{W}.zp_dtype", "torch.float8_e4m3fn", "weights.zp_dtype"),
    (f"{W}.block_structure", [128, 128], "weights.block_structure"),
    (f"{W}.scale_dtype", "torch.float8_e4m3fn", "weights.scale_dtype"),
    (f"{W}.mystery", 1, "weights: unknown field(s) ['mystery']"),
    ("ignore", "lm_head", "ignore: expected a list"),
    ("config_groups", {}, "config_groups: expected a non-empty object"),
]


@pytest.mark.parametrize("path,value,message", REFUSED, ids=[f"{p}={v}" for p, v, _ in REFUSED])
def test_unsupported_configs_are_refused_by_name(path, value, message):
    with pytest.raises(ConfigError) as e:
        parse_quantization_config(_mutated(path, value), "ckpt/config.json")
    assert "ckpt/config.json: quantization_config" in str(e.value) and message in str(e.value)


def test_several_groups_with_different_schemes_are_refused():
    cfg = quantization_config(QuantScheme(4, 32, True), [])
    other = quantization_config(QuantScheme(8, 32, True), [])["config_groups"]["group_0"]
    cfg["config_groups"]["group_1"] = other
    with pytest.raises(ConfigError, match="groups with different schemes"):
        parse_quantization_config(cfg, "x")
    cfg["config_groups"]["group_1"] = copy.deepcopy(cfg["config_groups"]["group_0"])
    assert parse_quantization_config(cfg, "x") == (QuantScheme(4, 32, True), [])


def test_scheme_validate_names_the_tensor():
    with pytest.raises(ValueError, match="group size 100 does not divide 4096 .*tensor layers.0.q_proj"):
        QuantScheme(4, 100).validate(4096, "layers.0.q_proj")
    QuantScheme(4, 128).validate(4096)
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantScheme(3, 128)


# ---------------------------------------------------------------------------------------------------------------------
# `llama-mm quantize` vs compressed-tensors on whole random Mllama checkpoints

@pytest.fixture(scope="module")
def refs():
    return {"narrow": build_reference(seed=3), "wide": build_reference(text=WIDE_TEXT, seed=4)}


# (model, bits, group size, symmetric, key naming, dtype, sharded)
WRITER_CASES = [
    ("narrow", 4, 32, True, "disk", torch.bfloat16, False),
    ("narrow", 4, 32, False, "memory", torch.bfloat16, True),
    ("narrow", 8, 32, True, "memory", torch.float16, False),
    ("narrow", 8, None, False, "disk", torch.bfloat16, False),
    ("narrow", 4, None, True, "memory", torch.float32, False),
    ("wide", 4, 128, True, "memory", torch.bfloat16, False),
    ("wide", 4, 128, False, "disk", torch.bfloat16, True),
    ("wide", 8, 128, True, "disk", torch.bfloat16, False),
]


def _raw_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint under its stored name."""
    out = {}
    for f in checkpoint_files(directory):
        out.update(read_safetensors(f))
    return out


@pytest.mark.parametrize("case", WRITER_CASES, ids=lambda c: f"{c[0]}-int{c[1]}-g{c[2]}-{'sym' if c[3] else 'asym'}-"
                                                         f"{c[4]}-{str(c[5])[6:]}{'-sharded' if c[6] else ''}")
def test_llama_mm_quantize_equals_compressed_tensors(tmp_path, refs, case, capsys):
    model, bits, group, symmetric, naming, dtype, sharded = case
    ref = refs[model]
    src = write_checkpoint(tmp_path / "src", ref, dtype=dtype, in_memory_names=naming == "memory",
                           max_shard_size="200KB" if sharded else None)
    (src / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    argv = ["quantize", "--model", str(src), "--out", str(tmp_path / "mine"), "--bits", str(bits)]
    argv += ["--channel"] if group is None else ["--group-size", str(group)]
    argv += [] if symmetric else ["--asymmetric"]
    assert cli.main(argv) == 0
    assert f"{N_TEXT_LINEARS} Linear weights quantized" in capsys.readouterr().out
    theirs = write_ct_checkpoint(ref, tmp_path / "ct", bits, group, symmetric, key_naming=naming,
                                 strategy="channel" if group is None else "group", dtype=dtype)
    mine, expected = _raw_tensors(tmp_path / "mine"), _raw_tensors(theirs)
    assert sorted(mine) == sorted(expected)
    packed = [k for k in mine if k.endswith(".weight_packed")]
    assert len(packed) == N_TEXT_LINEARS and all(".layers." in k and "vision" not in k for k in packed)
    assert all(("model.language_model." if naming == "memory" else "language_model.model.") in k for k in packed)
    for k in mine:
        assert mine[k].dtype == expected[k].dtype and torch.equal(mine[k], expected[k]), k
    src_config = json.loads((src / "config.json").read_text())
    my_config = json.loads((tmp_path / "mine" / "config.json").read_text())
    assert my_config.pop("quantization_config") == json.loads((theirs / "config.json").read_text())[
        "quantization_config"]
    assert my_config == src_config
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "mine" / name).read_bytes() == (src / name).read_bytes()
    src_files = [f.name for f in checkpoint_files(src)]
    assert [f.name for f in checkpoint_files(tmp_path / "mine")] == src_files and (len(src_files) > 1) == sharded
    # transformers + compressed-tensors load what llama_mm wrote; its dense weights are our dequantized ones
    scheme, ignore = read_quantization_config(tmp_path / "mine")
    assert scheme == QuantScheme(bits, group, symmetric) and ignore == DEFAULT_IGNORE
    quantized, dense = split_quantized(mine, scheme, ignore, "mine")
    loaded = load_ct_reference(tmp_path / "mine").state_dict()
    assert len(quantized) == N_TEXT_LINEARS
    for module, qw in quantized.items():
        assert torch.equal(loaded[transformers_name(module) + ".weight"], qw.dequantize(torch.float32)), module
    for name, t in dense.items():
        assert torch.equal(loaded[transformers_name(name)], t.float()), name


def test_reader_matches_transformers_dequantized(tmp_path, refs):
    """split_quantized on compressed-tensors' own checkpoint (both namings) gives transformers' dense weights."""
    for naming in ("disk", "memory"):
        qdir = write_ct_checkpoint(refs["narrow"], tmp_path / naming, 4, 32, False, key_naming=naming,
                                   dtype=torch.bfloat16)
        scheme, ignore = read_quantization_config(qdir)
        quantized, dense = split_quantized(_raw_tensors(qdir), scheme, ignore, naming)
        loaded = load_ct_reference(qdir).state_dict()
        text_linears = sorted(canonical_name(n)[: -len(".weight")] for n, p in refs["narrow"].state_dict().items()
                              if n.startswith("model.language_model.layers.") and n.endswith("_proj.weight"))
        assert sorted(quantized) == text_linears and len(text_linears) == N_TEXT_LINEARS  # canonical names
        assert all(m.startswith("language_model.model.layers.") for m in quantized)
        for module, qw in quantized.items():
            assert torch.equal(loaded[transformers_name(module) + ".weight"], qw.dequantize(torch.float32)), module
        assert not any(k.endswith(("weight_packed", "weight_scale", "weight_shape")) for k in dense)


# ---------------------------------------------------------------------------------------------------------------------
# Reader: every inconsistent tensor refused by name

P = "language_model.model.layers.0.self_attn.q_proj"  # [64, 64]: int4 group 32 -> packed [64, 8], scale [64, 2]


@pytest.fixture(scope="module")
def ct_tensors(tmp_path_factory, refs):
    d = tmp_path_factory.mktemp("ct")
    out = {}
    for symmetric in (True, False):
        qdir = write_ct_checkpoint(refs["narrow"], d / str(symmetric), 4, 32, symmetric, dtype=torch.bfloat16)
        out[symmetric] = (read_quantization_config(qdir), _raw_tensors(qdir))
    return out


def _edit(tensors: dict, **changes) -> dict:
    """A copy of `tensors` with `P.<suffix>` replaced (a tensor) or removed (None)."""
    out = dict(tensors)
    for suffix, value in changes.items():
        if value is None:
            del out[f"{P}.{suffix}"]
        else:
            out[f"{P}.{suffix}"] = value
    return out


def _packed(tensors):
    return tensors[f"{P}.weight_packed"]


BAD_READS = [
    (True, lambda t: _edit(t, weight_scale=None), "weight_scale: missing"),
    (True, lambda t: _edit(t, weight_packed=None), "weight_packed: missing"),
    (True, lambda t: _edit(t, weight_shape=None), "weight_shape: missing"),
    (True, lambda t: _edit(t, weight_packed=_packed(t)[:, :-1]),
     "weight_packed: torch.int32 [64, 7], expected torch.int32 [64, 8]"),
    (True, lambda t: _edit(t, weight_packed=_packed(t).long()), "weight_packed: torch.int64 [64, 8], expected"),
    (True, lambda t: _edit(t, weight_shape=torch.tensor([64, 128])),
     "weight_packed: torch.int32 [64, 8], expected torch.int32 [64, 16]"),
    (True, lambda t: _edit(t, weight_shape=torch.tensor([64, 48])),
     f"weight_shape: group size 32 does not divide 48 (the input size of tensor {P})"),
    (True, lambda t: _edit(t, weight_shape=torch.tensor([64.0, 64.0])), "weight_shape: expected 2 positive integers"),
    (True, lambda t: _edit(t, weight_scale=t[f"{P}.weight_scale"][:, :1]),
     "weight_scale: shape [64, 1], expected [64, 2]"),
    (True, lambda t: _edit(t, weight_scale=torch.ones(64, 2, dtype=torch.int32)), "weight_scale: dtype torch.int32"),
    (True, lambda t: _edit(t, weight_zero_point=torch.zeros(8, 2, dtype=torch.int32)),
     "weight_zero_point: present, but the scheme is symmetric"),
    (False, lambda t: _edit(t, weight_zero_point=None), "weight_zero_point: missing (the scheme is asymmetric)"),
    (False, lambda t: _edit(t, weight_zero_point=torch.zeros(64, 2, dtype=torch.int32)),
     "weight_zero_point: torch.int32 [64, 2], expected torch.int32 [8, 2]"),
    (True, lambda t: _edit(t, weight_g_idx=torch.zeros(64, dtype=torch.int32)),
     "weight_g_idx: activation ordering (a group index) is not supported"),
    (True, lambda t: {**t, f"{P}.weight": torch.zeros(64, 64)}, "weight: a dense weight next to quantized tensors"),
]


@pytest.mark.parametrize("symmetric,edit,message", BAD_READS, ids=[m[:45] for _, _, m in BAD_READS])
def test_reader_refuses_inconsistent_tensors_by_name(ct_tensors, symmetric, edit, message):
    (scheme, ignore), tensors = ct_tensors[symmetric]
    split_quantized(tensors, scheme, ignore, "ok")  # the unedited checkpoint reads
    with pytest.raises(CheckpointError) as e:
        split_quantized(edit(tensors), scheme, ignore, "ckpt")
    assert str(e.value).startswith("ckpt: quantized tensors") and f"{P}.{message}" in str(e.value)


def test_reader_refuses_quantized_modules_the_ignore_list_names(ct_tensors):
    (scheme, ignore), tensors = ct_tensors[True]
    for entry in (P, "re:.*layers\\.0\\.self_attn\\..*", transformers_name(P)):
        with pytest.raises(CheckpointError, match=f"{P}.weight_packed: module is quantized but the ignore list"):
            split_quantized(tensors, scheme, [*ignore, entry], "ckpt")


def test_reader_refuses_a_scheme_that_does_not_fit(ct_tensors):
    (_, ignore), tensors = ct_tensors[True]
    with pytest.raises(CheckpointError, match=f"{P}.weight_scale: shape \\[64, 2\\], expected \\[64, 1\\]"):
        split_quantized(tensors, QuantScheme(4, 64), ignore, "ckpt")
    with pytest.raises(CheckpointError, match="group size 48 does not divide 64"):
        split_quantized(tensors, QuantScheme(4, 48), ignore, "ckpt")


def test_writer_refuses_before_writing(tmp_path, refs):
    src = write_checkpoint(tmp_path / "src", refs["narrow"], dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match="group size 48 does not divide 64 .*layers.0.*weight"):
        write_quantized_checkpoint(src, tmp_path / "out", QuantScheme(4, 48))
    assert not (tmp_path / "out").exists()
    write_quantized_checkpoint(src, tmp_path / "q", QuantScheme(8, 32))
    with pytest.raises(ConfigError, match="already has a quantization_config"):
        write_quantized_checkpoint(tmp_path / "q", tmp_path / "qq", QuantScheme(4, 32))
    with pytest.raises(CheckpointError, match="no text-decoder Linear weight to quantize"):
        write_quantized_checkpoint(src, tmp_path / "none", QuantScheme(4, 32), ignore=["re:.*"])
