"""LoRA adapters against PEFT on transformers' MllamaForConditionalGeneration (the oracle), both directions, with
randomised adapter weights so every adapter matters; merge/unmerge; gradients; strict and clear loading errors."""
import hashlib
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import llama_mm
from checkpoints import build_reference, random_inputs, write_checkpoint
from llama_mm.lora import (ALL_TARGETS, apply_lora, load_adapter, lora_layers, merge_lora, save_adapter,
                           select_modules, unmerge_lora)
from llama_mm.weights import canonical_name, transformers_name
from test_model import TOL, rel_diff

GRAD_TOL = 1e-4  # fp32 gradients: the same sums accumulated in another order measure ~1e-5 here


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("base"), build_reference(seed=11))


def reference(base_dir):
    """A fresh transformers model (PEFT modifies the model it wraps)."""
    from transformers import MllamaForConditionalGeneration
    return MllamaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32).eval()


def randomise(params, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)


def lora_params(module):
    return [p for n, p in sorted(module.named_parameters()) if "lora_" in n]


def inputs_for(ref, **kw):
    return random_inputs(ref, aspect_ratios=((2, 2),), seq=14, **kw)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_ours_to_peft(base_dir, tmp_path):
    ours = apply_lora(llama_mm.load_model(base_dir), r=4, alpha=8, target_modules=list(ALL_TARGETS))
    randomise(lora_params(ours), seed=1)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(base_dir)

    ref = reference(base_dir)
    inputs = inputs_for(ref)
    base_logits = logits(ref, inputs)
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    want, got = logits(peft_model, inputs), logits(ours, inputs)
    assert rel_diff(base_logits, want) > 1e-2  # the adapter matters
    diff = rel_diff(want, got)
    print(f"max rel diff {diff:.2e}")
    assert diff < TOL
    # PEFT put an adapter exactly where we did
    peft_names = {canonical_name(n.removeprefix("base_model.model.") + ".weight").removesuffix(".weight")
                  for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert peft_names == set(lora_layers(ours))


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_peft_to_ours(base_dir, tmp_path, rslora):
    ref = reference(base_dir)
    config = peft.LoraConfig(r=6, lora_alpha=12, lora_dropout=0.1, use_rslora=rslora,
                             target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "fc1", "multi_modal_projector"])
    peft_model = peft.get_peft_model(ref, config)
    randomise(lora_params(peft_model), seed=2)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()

    ours = load_adapter(llama_mm.load_model(base_dir), tmp_path / "adapter")
    assert ours.lora_settings.r == 6 and ours.lora_settings.dropout == 0.1
    inputs = inputs_for(ref, seed=4)
    want = logits(peft_model, inputs)
    assert rel_diff(logits(llama_mm.load_model(base_dir), inputs), want) > 1e-2  # the adapter matters
    diff = rel_diff(want, logits(ours.eval(), inputs))
    print(f"max rel diff {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("targets", [
    pytest.param(list(ALL_TARGETS), id="all-named"),
    pytest.param(["self_attn.q_proj"], id="dotted-suffix"),
    pytest.param(["cross_attn.o_proj", "fc2"], id="cross-and-vision"),
    pytest.param(r".*language_model.*\.(q_proj|v_proj)", id="regex"),
    pytest.param(r"model\.vision_model\.global_transformer\.layers\.1\.(self_attn\..*|mlp\.fc\d)",
                 id="regex-one-layer"),
    pytest.param("all-linear", id="all-linear"),
])
def test_same_modules_as_peft(base_dir, targets):
    ref = reference(base_dir)
    peft_model = peft.get_peft_model(ref, peft.LoraConfig(r=2, target_modules=targets))
    want = {canonical_name(n.removeprefix("base_model.model.") + ".weight").removesuffix(".weight")
            for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert want and set(select_modules(llama_mm.load_model(base_dir), targets)) == want


def test_merge_and_unmerge(base_dir):
    path = base_dir / "model.safetensors"
    file_hash = hashlib.sha256(path.read_bytes()).hexdigest()
    ours = apply_lora(llama_mm.load_model(base_dir), r=4, alpha=16, target_modules=list(ALL_TARGETS))
    randomise(lora_params(ours), seed=3)
    inputs = inputs_for(reference(base_dir), seed=5)
    with torch.no_grad():
        base = torch.cat([ours.get_submodule(n).weight.clone().flatten() for n in lora_layers(ours)])
    unmerged = logits(ours, inputs)

    merge_lora(ours)
    assert all(layer.merged for layer in lora_layers(ours).values())
    merged = logits(ours, inputs)
    print(f"merged vs unmerged {rel_diff(unmerged, merged):.2e}")
    assert rel_diff(unmerged, merged) < TOL
    # the weights changed in memory, never in the checkpoint file (a copy-on-write map)
    fresh = llama_mm.load_model(base_dir)
    q = "language_model.model.layers.0.self_attn.q_proj"
    assert rel_diff(fresh.get_submodule(q).weight, ours.get_submodule(q).weight) > 1e-2
    assert hashlib.sha256(path.read_bytes()).hexdigest() == file_hash

    unmerge_lora(ours)
    with torch.no_grad():
        restored = torch.cat([ours.get_submodule(n).weight.flatten() for n in lora_layers(ours)])
    assert rel_diff(base, restored) < 1e-6
    assert rel_diff(unmerged, logits(ours, inputs)) < TOL


def test_only_lora_parameters_train(base_dir):
    """Gradients reach exactly the LoRA weights, and equal PEFT's on transformers' model."""
    targets = list(ALL_TARGETS)
    ours = apply_lora(llama_mm.load_model(base_dir), r=4, alpha=8, target_modules=targets)
    randomise(lora_params(ours), seed=6)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in ours.named_parameters() if ".lora_" in n} and trainable

    ref = reference(base_dir)
    peft_model = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    peft_params = dict(peft_model.named_parameters())
    pairs = {}  # ours -> PEFT's parameter ("...q_proj.lora_A.weight" -> "base_model.model....q_proj.lora_A.default.weight")
    for name in trainable:
        module, which = name.removesuffix(".weight").rsplit(".", 1)
        key = "base_model.model." + transformers_name(module + ".weight").removesuffix(".weight")
        pairs[name] = peft_params[f"{key}.{which}.default.weight"]
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():  # same adapter weights on both
        for name, theirs in pairs.items():
            theirs.copy_(ours_params[name])
    inputs = inputs_for(ref, seed=7)
    peft_model.train()
    ours.train()
    ours(**inputs).logits.pow(2).mean().backward()
    peft_model(**inputs).logits.pow(2).mean().backward()

    assert {n for n, p in ours.named_parameters() if p.grad is not None} == trainable
    worst = max(rel_diff(theirs.grad, ours_params[name].grad) for name, theirs in pairs.items())
    print(f"max rel grad diff {worst:.2e}")
    assert worst < GRAD_TOL


@pytest.fixture
def saved_adapter(base_dir, tmp_path):
    ours = apply_lora(llama_mm.load_model(base_dir), r=4, alpha=8, target_modules=["q_proj", "fc1"])
    randomise(lora_params(ours), seed=8)
    return save_adapter(ours, tmp_path / "adapter")


def edit_weights(adapter, edit):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def edit_config(adapter, **fields):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **fields)))


KEY = "base_model.model.model.language_model.layers.0.self_attn.q_proj"


def expect_error(base_dir, adapter, *fragments):
    model = llama_mm.load_model(base_dir)
    with pytest.raises(ValueError) as e:
        load_adapter(model, adapter)
    for f in fragments:
        assert f in str(e.value)
    assert not lora_layers(model)  # a failed load leaves the model as it was
    return str(e.value)


def test_missing_tensor(base_dir, saved_adapter):
    edit_weights(saved_adapter, lambda t: t.pop(f"{KEY}.lora_B.weight"))
    expect_error(base_dir, saved_adapter, "missing tensors (1)", f"{KEY}.lora_B.weight")


def test_wrong_rank(base_dir, saved_adapter):
    edit_config(saved_adapter, r=8)
    expect_error(base_dir, saved_adapter, "shape mismatches", "r=8",
                 f"{KEY}.lora_A.weight: file [4, 64] vs model [8, 64]")


def test_unknown_module(base_dir, saved_adapter):
    extra = "base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.weight"
    edit_weights(saved_adapter, lambda t: t.update({extra: torch.zeros(4, 64), "something.else": torch.zeros(1)}))
    expect_error(base_dir, saved_adapter, "unexpected tensors", extra, "something.else")


def test_bad_configs(base_dir, saved_adapter):
    edit_config(saved_adapter, use_dora=True)
    expect_error(base_dir, saved_adapter, "use_dora=True")
    edit_config(saved_adapter, use_dora=False, peft_type="IA3")
    expect_error(base_dir, saved_adapter, "peft_type", "IA3")
    edit_config(saved_adapter, peft_type="LORA", target_modules=["nothing_like_this"])
    expect_error(base_dir, saved_adapter, "matches no module", "nothing_like_this")
    (saved_adapter / "adapter_config.json").write_text("{not json")
    expect_error(base_dir, saved_adapter, "adapter_config.json", "not valid JSON")


def test_pickle_adapter_is_refused(base_dir, saved_adapter):
    (saved_adapter / "adapter_model.safetensors").rename(saved_adapter / "adapter_model.bin")
    expect_error(base_dir, saved_adapter, "adapter_model.safetensors: missing", "pickle")


def test_old_transformers_key_names_load(base_dir, saved_adapter):
    """Adapters saved with transformers < 4.52 name modules as on disk (`language_model.model.layers...`)."""
    want = load_adapter(llama_mm.load_model(base_dir), saved_adapter)
    edit_weights(saved_adapter, lambda t: t.update(
        {"base_model.model." + canonical_name(k.removeprefix("base_model.model.")): t.pop(k) for k in list(t)}))
    assert any(k.startswith("base_model.model.language_model.model.")
               for k in load_file(saved_adapter / "adapter_model.safetensors"))
    got = load_adapter(llama_mm.load_model(base_dir), saved_adapter)
    for a, b in zip(lora_params(want), lora_params(got), strict=True):
        assert torch.equal(a, b)


def test_apply_lora_errors(base_dir):
    model = llama_mm.load_model(base_dir)
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(model, target_modules=["qkv"])
    with pytest.raises(ValueError, match="not Linear layers.*embed_tokens"):
        apply_lora(model, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(ValueError, match="rank r"):
        apply_lora(model, r=0)
    apply_lora(model, r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model, r=2, target_modules=["q_proj"])


def test_load_onto_existing_layers_checks_them(base_dir, saved_adapter):
    model = apply_lora(llama_mm.load_model(base_dir), r=4, alpha=8, target_modules=["q_proj", "fc1"])
    load_adapter(model, saved_adapter)  # same structure: weights replaced
    other = apply_lora(llama_mm.load_model(base_dir), r=2, alpha=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="r: model 2 vs adapter 4.*targeted modules differ"):
        load_adapter(other, saved_adapter)


def greedy(model, inputs, n):
    """n greedy tokens by full recomputation through the PyTorch model (the image stays visible to new tokens)."""
    x, out = dict(inputs), []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(**x).logits[:, -1].argmax(-1)  # (B,)
            out.append(nxt)
            x["input_ids"] = torch.cat([x["input_ids"], nxt[:, None]], 1)
            x["attention_mask"] = torch.cat([x["attention_mask"], torch.ones_like(nxt)[:, None]], 1)
            x["cross_attention_mask"] = torch.cat([x["cross_attention_mask"], x["cross_attention_mask"][:, -1:]], 1)
    return torch.stack(out, 1)


def test_native_engine_runs_a_merged_adapter(base_dir):
    """merge_lora writes into the weight tensors the C++ engine already holds: an engine built before the adapter
    existed decodes with it once merged (its text path ignores unmerged LoRA layers; the vision tower runs in
    PyTorch and honours them either way)."""
    from llama_mm.engine import Engine

    model = llama_mm.load_model(base_dir)
    engine = Engine(model)
    apply_lora(model, r=4, alpha=8, target_modules=list(ALL_TARGETS))
    randomise(lora_params(model), seed=9)
    inputs = inputs_for(reference(base_dir), seed=10)
    want = greedy(model, inputs, 8)  # unmerged, through the PyTorch path
    base = Engine(llama_mm.load_model(base_dir)).run(inputs, 8)
    merge_lora(model)
    got = engine.run(inputs, 8)
    print(want.tolist(), got.tolist(), base.tolist())
    assert torch.equal(got, want) and not torch.equal(got, base)
