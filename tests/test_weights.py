"""Strict loading: each bad checkpoint gets its own error naming the culprit; no pickle is ever opened."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama_mm
from llama_mm import CheckpointError
from llama_mm.weights import canonical_name, transformers_name
from checkpoints import build_reference, write_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("good"), build_reference(seed=11))


@pytest.fixture
def ckpt(tmp_path, good):
    dst = tmp_path / "ck"
    shutil.copytree(good, dst)
    return dst


def edit_tensors(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensors_are_all_named(ckpt):
    gone = ["language_model.model.layers.1.cross_attn.q_norm.weight", "vision_model.class_embedding"]
    edit_tensors(ckpt, lambda t: [t.pop(k) for k in gone])
    with pytest.raises(CheckpointError) as e:
        llama_mm.load_model(ckpt)
    assert "missing tensors (2)" in str(e.value) and all(k in str(e.value) for k in gone)


def test_unexpected_tensor_is_named(ckpt):
    edit_tensors(ckpt, lambda t: t.update({"language_model.model.layers.0.self_attn.rotary.inv_freq": torch.ones(4)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\).*rotary\.inv_freq"):
        llama_mm.load_model(ckpt)


def test_shape_mismatch_is_named(ckpt):
    key = "language_model.model.layers.2.mlp.up_proj.weight"
    edit_tensors(ckpt, lambda t: t.update({key: torch.zeros(95, 64)}))
    with pytest.raises(CheckpointError, match=r"up_proj.weight: checkpoint \[95, 64\] vs model \[96, 64\]"):
        llama_mm.load_model(ckpt)


def test_truncated_shard(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated"):
        llama_mm.load_model(ckpt)


def test_corrupt_header(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"garbage!!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt header"):
        llama_mm.load_model(ckpt)


def test_tiny_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="truncated"):
        llama_mm.load_model(ckpt)


def test_pickle_only_checkpoint_is_refused_without_opening(ckpt):
    (ckpt / "model.safetensors").unlink()
    # A pickle that would run code if loaded: it must never be opened.
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch /tmp/pwned'\ntR.")
    with pytest.raises(CheckpointError, match=r"pickle checkpoint files \['pytorch_model.bin'\]"):
        llama_mm.load_model(ckpt)


def test_index_pointing_at_missing_shard(tmp_path, good):
    ref = build_reference(seed=11)
    path = write_checkpoint(tmp_path / "sharded", ref, max_shard_size="100KB")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"missing shard file\(s\) \['{shard.name}'\]"):
        llama_mm.load_model(path)


def test_duplicate_tensor_across_namings(ckpt):
    edit_tensors(ckpt, lambda t: t.update({"lm_head.weight": t["language_model.lm_head.weight"].clone()}))
    with pytest.raises(CheckpointError, match="appears twice"):
        llama_mm.load_model(ckpt)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        llama_mm.weights.checkpoint_files(tmp_path / "nope")


def test_name_map_round_trips():
    for name in ["language_model.model.layers.3.cross_attn.k_norm.weight", "language_model.lm_head.weight",
                 "vision_model.patch_embedding.weight", "multi_modal_projector.bias"]:
        assert canonical_name(transformers_name(name)) == name
    assert transformers_name("language_model.lm_head.weight") == "lm_head.weight"
    assert transformers_name("vision_model.class_embedding") == "model.vision_model.class_embedding"


def test_error_leaves_no_state(ckpt):
    """A failed load raises before anything is returned; a good load afterwards works."""
    f = ckpt / "model.safetensors"
    good_bytes = f.read_bytes()
    f.write_bytes(good_bytes[:-10])
    with pytest.raises(CheckpointError):
        llama_mm.load_model(ckpt)
    f.write_bytes(good_bytes)
    assert llama_mm.load_model(ckpt).cfg.text.hidden_size == 64
