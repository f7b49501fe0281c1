"""Quantized models at run time: compressed-tensors checkpoints loaded as they are, quantize-on-load, QuantLinear in
the PyTorch model and in the native engine, LoRA on a quantized base, bad input.

Oracle: transformers loading the same checkpoint with compressed-tensors, dequantized to dense
(`CompressedTensorsConfig(dequantize=True)`); checkpoints are written by compressed-tensors' own API
(quant_checkpoints.write_ct_checkpoint) from a random Mllama model with every parameter randomised.
"""
import json

import pytest
import torch
from torch import nn

import llama_mm
from llama_mm import _C, cli  # the extension must be built: CI builds it, so a missing module fails here
from llama_mm.engine import Engine, engine_weights, request_tensors
from llama_mm.quant.layers import QuantLinear
from checkpoints import build_reference, random_inputs, write_checkpoint
from quant_checkpoints import load_ct_reference, write_ct_checkpoint
from test_engine import hf_greedy, teacher_forced
from tokenizer_fixture import write_tokenizer_files

# K = 128 and 256 inputs: both group sizes divide every text linear
TEXT = dict(hidden_size=128, intermediate_size=256, vocab_size=1000)
N_TOKENS = 32

# (bits, group_size, symmetric, key naming): each of int4/int8, symmetric/asymmetric, group 32/128 and both key
# namings appears at least once
CASES = {
    "w4-g32-sym": (4, 32, True, "disk"),
    "w4-g128-asym-in-memory-names": (4, 128, False, "memory"),
    "w8-g128-sym-in-memory-names": (8, 128, True, "memory"),
    "w8-g32-asym": (8, 32, False, "disk"),
}


@pytest.fixture(scope="module")
def ref():
    return build_reference(TEXT, seed=11, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def dense_dir(ref, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("dense"), ref)


@pytest.fixture(scope="module")
def build_case(ref, tmp_path_factory):
    """name -> (compressed-tensors checkpoint dir, transformers' dequantized reference model, our model, our
    engine), each built once."""
    built = {}

    def build(name):
        if name not in built:
            bits, group, symmetric, naming = CASES[name]
            qdir = write_ct_checkpoint(ref, tmp_path_factory.mktemp(name), bits=bits, group_size=group,
                                       symmetric=symmetric, key_naming=naming)
            oracle = load_ct_reference(qdir)
            model = llama_mm.load_model(qdir)
            built[name] = (qdir, oracle, model, Engine(model))
        return built[name]

    return build


@pytest.fixture(scope="module", params=list(CASES))
def case(request, build_case):
    return (request.param, *build_case(request.param))


def assert_logits_close(ours, theirs):
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


def quant_layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text-only"])
def test_logits_match_transformers_dequantized(case, ref, with_image):
    name, qdir, oracle, model, engine = case
    layers = quant_layers(model)
    bits, group, symmetric, _ = CASES[name]
    assert len(layers) == 7 * ref.config.text_config.num_hidden_layers  # every text linear, lm_head not
    assert all((m.bits, m.group_size, m.weight_zero is None) == (bits, group, symmetric) for m in layers.values())
    assert isinstance(model.language_model.lm_head, nn.Linear)
    inputs = random_inputs(ref, seq=11, aspect_ratios=((2, 2),), seed=4, with_image=with_image)
    with torch.no_grad():
        theirs = oracle(**inputs).logits
        ours = model(**inputs).logits
    assert_logits_close(ours, theirs)  # the PyTorch path, every position
    engine_logits = engine.native.start(*request_tensors(engine, inputs), 1)
    assert_logits_close(engine_logits, theirs[:, -1])  # the native engine's prefill


def test_greedy_generation_identical_to_transformers(case, ref):
    _, qdir, oracle, model, engine = case
    inputs = random_inputs(ref, batch=2, seq=10, left_pad=(3, 0), aspect_ratios=((1, 2), (1, 1)), seed=6)
    ours = engine.run(inputs, N_TOKENS)
    theirs = hf_greedy(oracle, inputs, n=N_TOKENS)
    assert torch.equal(ours, theirs), f"first difference at {(ours != theirs).nonzero()[:1].tolist()}"


def test_generator_on_quantized_checkpoint_matches_transformers(ref, tmp_path):
    """Generator (processor + engine) on a compressed-tensors directory against transformers' processor + generate
    on the same directory."""
    from transformers import AutoProcessor
    from PIL import Image

    write_tokenizer_files(tmp_path, vocab_size=TEXT["vocab_size"])
    write_ct_checkpoint(ref, tmp_path, bits=4, group_size=32, symmetric=False)
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    pre["size"] = {"height": 28, "width": 28}  # the tiny vision tower's tile
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    image = Image.fromarray((torch.rand(40, 90, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    gen = llama_mm.Generator(tmp_path)
    ours = gen.generate_ids(gen.request_inputs("A picture of", [image]), N_TOKENS, temperature=0)
    oracle = load_ct_reference(tmp_path)
    proc = AutoProcessor.from_pretrained(tmp_path)
    inputs = proc(images=[[image]], text=["<|image|>A picture of"], return_tensors="pt")
    with torch.no_grad():
        theirs = oracle.generate(**inputs, max_new_tokens=N_TOKENS, do_sample=False, eos_token_id=None,
                                 pad_token_id=proc.tokenizer.pad_token_id)[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(ours[:, :theirs.shape[1]], theirs)


def test_cli_quantize_options(ref, dense_dir, tmp_path, capsys):
    """`llama-mm generate --quantize int8 --group-size 32`: the same text as Generator(quantize="int8",
    group_size=32); --quantize on an already quantized checkpoint is reported naming both."""
    write_tokenizer_files(dense_dir, vocab_size=TEXT["vocab_size"])
    args = ["generate", "--model", str(dense_dir), "--prompt", "A picture of", "--max-new-tokens", "8",
            "--temperature", "0"]
    assert cli.main(args + ["--quantize", "int8", "--group-size", "32"]) == 0
    gen = llama_mm.Generator(dense_dir, quantize="int8", group_size=32)
    assert capsys.readouterr().out.strip() == gen.generate_text("A picture of", None, max_new_tokens=8,
                                                                temperature=0).strip()
    qdir = tmp_path / "q"
    assert cli.main(["quantize", "--model", str(dense_dir), "--out", str(qdir), "--bits", "4"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(qdir), "--prompt", "x", "--quantize", "int4"]) == 2
    assert "quantize='int4' asked for" in capsys.readouterr().err


@pytest.mark.parametrize("quantize,group", [("int4", 32), ("int8", 128)])
def test_quantize_on_load_equals_quantized_checkpoint(dense_dir, tmp_path, quantize, group):
    """load_model(dense, quantize=...) holds bit for bit the tensors of the checkpoint `llama-mm quantize` writes."""
    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", str(dense_dir), "--out", str(out), "--bits", quantize[3:],
                     "--group-size", str(group)]) == 0
    on_load = llama_mm.load_model(dense_dir, quantize=quantize, group_size=group)
    from_file = llama_mm.load_model(out)
    ours, theirs = on_load.state_dict(), from_file.state_dict()
    assert ours.keys() == theirs.keys()
    assert len(quant_layers(on_load)) == len(quant_layers(from_file)) > 0
    different = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not different


def test_quantized_lm_head_engine_matches_dequantized_pytorch(ref, dense_dir):
    """quantize_lm_head: the engine (lm_head through Linear::load's quantized path) and the PyTorch model against a
    pure-PyTorch model whose every QuantLinear is replaced by an nn.Linear of its dequantized weight."""
    model = llama_mm.load_model(dense_dir, quantize="int8", group_size=32, quantize_lm_head=True)
    assert isinstance(model.language_model.lm_head, QuantLinear)
    dense = llama_mm.load_model(dense_dir)
    for name, layer in quant_layers(model).items():
        parent, _, leaf = name.rpartition(".")
        linear = nn.Linear(layer.in_features, layer.out_features, bias=False)
        linear.weight = nn.Parameter(layer.dequantize(), requires_grad=False)
        setattr(dense.get_submodule(parent), leaf, linear)
    inputs = random_inputs(ref, seq=9, aspect_ratios=((2, 2),), seed=8)
    with torch.no_grad():
        assert_logits_close(model(**inputs).logits, dense(**inputs).logits)
    for logits, _, expected in teacher_forced(Engine(model), inputs, 3, lambda full: dense(**full).logits[:, -1]):
        assert_logits_close(logits, expected)


def test_lora_unmerged_on_quantized_base(build_case, ref):
    """An unmerged adapter on a quantized base: engine == PyTorch model, the adapter changes the output, and
    merging is refused."""
    from llama_mm.lora import apply_lora, merge_lora

    qdir = build_case("w4-g128-asym-in-memory-names")[0]
    model = llama_mm.load_model(qdir)
    inputs = random_inputs(ref, seq=9, aspect_ratios=((1, 2),), seed=9)
    with torch.no_grad():
        before = model(**inputs).logits[:, -1]
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    engine = Engine(model)
    for logits, _, expected in teacher_forced(engine, inputs, 3, lambda full: model(**full).logits[:, -1]):
        assert_logits_close(logits, expected)
    assert (expected - before).abs().max() > 1e-2  # the adapter matters
    with pytest.raises(ValueError, match="cannot merge the LoRA adapter into quantized base layers"):
        merge_lora(model)


def test_bad_quantize_arguments(dense_dir, build_case):
    qdir = build_case("w4-g32-sym")[0]
    with pytest.raises(ValueError, match="quantize='int3' is not supported"):
        llama_mm.load_model(dense_dir, quantize="int3")
    with pytest.raises(ValueError, match=r"group size 48 does not divide 128 \(the input size of tensor .*q_proj"):
        llama_mm.load_model(dense_dir, quantize="int4", group_size=48)
    with pytest.raises(ValueError, match=r"quantize='int8' asked for .*already quantized"):
        llama_mm.load_model(qdir, quantize="int8")
    with pytest.raises(ValueError, match="quantize_lm_head=True needs quantize"):
        llama_mm.load_model(dense_dir, quantize_lm_head=True)


def test_engine_rejects_bad_quantized_tensors(build_case):
    model = build_case("w4-g32-sym")[2]
    t = model.cfg.text
    module = "language_model.model.layers.0.self_attn.k_proj"

    def build(**changes):
        w = engine_weights(model)
        w.update(changes)
        return _C.Engine({k: v for k, v in w.items() if v is not None}, t.hidden_size, t.num_hidden_layers,
                         t.num_attention_heads, t.num_key_value_heads, t.vocab_size, t.rms_norm_eps,
                         t.max_position_embeddings, list(t.cross_attention_layers), model.language_model.model.inv_freq)

    packed = model.get_submodule(module).weight_packed
    with pytest.raises(ValueError, match=f"{module}.weight_packed must be int32"):
        build(**{module + ".weight_packed": packed[:, :-1]})
    with pytest.raises(ValueError, match=f"{module}.weight_packed .* packs 2 bits"):
        build(**{module + ".weight_packed": packed[:, : packed.shape[1] // 2].contiguous()})
    with pytest.raises(ValueError, match=f"weight '{module}.weight_scale' is missing"):
        build(**{module + ".weight_scale": None})
    with pytest.raises(ValueError, match=f"{module}.weight_scale must be"):
        build(**{module + ".weight_scale": model.get_submodule(module).weight_scale[:, :3]})


def test_lora_gradients_on_quantized_base(build_case, ref):
    """QLoRA-style training: the adapter's gradients through a quantized base equal those through a dense model
    holding the dequantized weights."""
    from llama_mm.lora import apply_lora, lora_layers

    qdir = build_case("w4-g32-sym")[0]
    models = [llama_mm.load_model(qdir), llama_mm.load_model(qdir)]
    for name, layer in quant_layers(models[1]).items():  # the second one: dense, dequantized weights
        parent, _, leaf = name.rpartition(".")
        linear = nn.Linear(layer.in_features, layer.out_features, bias=False)
        linear.weight = nn.Parameter(layer.dequantize(), requires_grad=False)
        setattr(models[1].get_submodule(parent), leaf, linear)
    inputs = random_inputs(ref, seq=9, aspect_ratios=((1, 2),), seed=9)
    grads = []
    for model in models:
        torch.manual_seed(0)  # the same A initialisation in both
        apply_lora(model, r=4, alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape,
                                                      generator=torch.Generator().manual_seed(1)) * 0.1)
        model(**inputs).logits.float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 3 * ref.config.text_config.num_hidden_layers
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-5 * grads[1][n].abs().max().item())
