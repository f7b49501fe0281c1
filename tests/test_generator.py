"""Generator and CLI end to end on a tiny random checkpoint with a Llama-3.2-Vision-style tokenizer: the same
directory through transformers' processor + generate is the oracle."""
import json
import shutil

import pytest
import torch
from PIL import Image

import llama_mm
from llama_mm import cli
from checkpoints import build_reference, write_checkpoint
from tokenizer_fixture import write_tokenizer_files

V = 1000


def special_ids(directory):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>",
                                            "<|finetune_right_pad_id|>")}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    write_tokenizer_files(d, vocab_size=V)
    ids = special_ids(d)
    eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
    ref = build_reference(dict(vocab_size=V, bos_token_id=ids["<|begin_of_text|>"], eos_token_id=eos,
                               pad_token_id=ids["<|finetune_right_pad_id|>"]), seed=3, attn_implementation="sdpa")
    write_checkpoint(d, ref)
    pre = json.loads((d / "preprocessor_config.json").read_text())
    pre["size"] = {"height": 28, "width": 28}  # the tiny vision tower's tile
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": eos, "pad_token_id": ids["<|finetune_right_pad_id|>"],
         "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    return d, ref


@pytest.fixture(scope="module")
def gen(ckpt):
    return llama_mm.Generator(ckpt[0])


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for h, w in
            [(40, 90), (70, 30), (28, 28)]]


def hf_generate(ckpt, text, images, n, chat=False):
    from transformers import AutoProcessor

    d, ref = ckpt
    proc = AutoProcessor.from_pretrained(d)
    if chat:
        text = [proc.apply_chat_template(t, add_generation_prompt=True) for t in text]
    inputs = proc(images=images, text=text, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [proc.decode(row, skip_special_tokens=True) for row in new], new


def test_generate_matches_transformers(ckpt, gen, images):
    texts, ids = hf_generate(ckpt, ["<|image|>A picture of"], [[images[0]]], 24)
    ours = gen.generate(images[0], "A picture of", max_new_tokens=24, temperature=0, chat=False)
    assert ours == texts[0]
    inputs = gen.request_inputs("A picture of", [images[0]], chat=False)
    got = gen.generate_ids(inputs, 24, temperature=0)
    assert torch.equal(got[:, :ids.shape[1]], ids)


def test_chat_matches_transformers(ckpt, gen, images):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "Compare these."}]}]
    texts, _ = hf_generate(ckpt, [messages], [images[:2]], 20, chat=True)
    assert gen.chat(messages, images=images[:2], max_new_tokens=20, temperature=0) == texts[0]


def test_batch_of_prompts_matches_transformers(ckpt, gen, images):
    prompts = ["<|image|>The first", "<|image|>A much longer second prompt about"]
    texts, _ = hf_generate(ckpt, prompts, [[images[1]], [images[2]]], 16)
    assert gen.generate(prompt=prompts, images=[[images[1]], [images[2]]], max_new_tokens=16, temperature=0,
                        chat=False) == texts


def test_text_only(ckpt, gen):
    texts, _ = hf_generate(ckpt, ["Once upon a time"], None, 16)
    assert gen.generate(prompt="Once upon a time", max_new_tokens=16, temperature=0, chat=False) == texts[0]


def user_turn(prompt, n_images):
    return [{"role": "user", "content": [*[{"type": "image"}] * n_images, {"type": "text", "text": prompt}]}]


def test_chat_checkpoint_gets_its_template_by_default(ckpt, gen, images):
    """The fixture is an Instruct-style checkpoint (it stops on <|eot_id|>, which ends its template's turns): plain
    prompts go through the chat template unless chat=False, for one prompt, a batch and a stream."""
    assert gen.chat_by_default
    texts, _ = hf_generate(ckpt, [user_turn("A picture of", 1)], [[images[0]]], 16, chat=True)
    assert gen.generate(images[0], "A picture of", max_new_tokens=16, temperature=0) == texts[0]
    assert gen.generate(images[0], "A picture of", max_new_tokens=16, temperature=0, chat=True) == texts[0]
    assert "".join(gen.stream(images[0], "A picture of", max_new_tokens=16, temperature=0)) == texts[0]
    batch, _ = hf_generate(ckpt, [user_turn("The first", 1), user_turn("A longer second one", 1)],
                           [[images[1]], [images[2]]], 12, chat=True)
    assert gen.generate(prompt=["The first", "A longer second one"], images=[[images[1]], [images[2]]],
                        max_new_tokens=12, temperature=0) == batch
    raw, _ = hf_generate(ckpt, ["<|image|>A picture of"], [[images[0]]], 16)
    assert gen.generate(images[0], "A picture of", max_new_tokens=16, temperature=0, chat=False) == raw[0]


def test_base_checkpoint_gets_raw_prompts_by_default(ckpt, images, tmp_path):
    """A base checkpoint (stops only on <|end_of_text|>, though its tokenizer ships a chat template, like
    Llama-3.2-11B-Vision) gets the raw prompt."""
    d = tmp_path / "base"
    shutil.copytree(ckpt[0], d)
    end_of_text = special_ids(d)["<|end_of_text|>"]
    for name in ("generation_config.json", "config.json"):
        cfg = json.loads((d / name).read_text())
        (cfg.get("text_config") or cfg)["eos_token_id"] = end_of_text
        (d / name).write_text(json.dumps(cfg))
    base = llama_mm.Generator(d)
    assert base.processor.chat_template is not None and not base.chat_by_default
    from transformers import AutoProcessor

    theirs = AutoProcessor.from_pretrained(d)(images=[[images[0]]], text=["<|image|>A picture of"], return_tensors="pt")
    assert torch.equal(base.request_inputs("A picture of", [images[0]])["input_ids"], theirs["input_ids"])
    assert base.generate(images[0], "A picture of", max_new_tokens=8, temperature=0) == \
        base.generate(images[0], "A picture of", max_new_tokens=8, temperature=0, chat=False)


def test_stream_concatenates_to_generate(gen, images):
    pieces = list(gen.stream(images[0], "Tell me", max_new_tokens=20, temperature=0))
    assert len(pieces) > 1
    assert "".join(pieces) == gen.generate(images[0], "Tell me", max_new_tokens=20, temperature=0)


def test_defaults_from_generation_config(gen):
    p = gen.sampling_params()
    assert p.do_sample and p.temperature == 0.6 and p.top_p == 0.9 and p.top_k == 50  # transformers' default top_k
    assert gen.sampling_params(temperature=0).do_sample is False


def test_seed_reproduces(gen, images):
    a = gen.generate(images[0], "Say", max_new_tokens=12, temperature=1.5, seed=1)
    b = gen.generate(images[0], "Say", max_new_tokens=12, temperature=1.5, seed=1)
    c = gen.generate(images[0], "Say", max_new_tokens=12, temperature=1.5, seed=2)
    assert a == b and a != c


def test_stop_strings(gen, images):
    full = gen.generate(images[0], "Go", max_new_tokens=30, temperature=0)
    stop = full[5:8]
    cut = gen.generate(images[0], "Go", max_new_tokens=30, temperature=0, stop=[stop])
    assert cut == full[: full.find(stop)]
    assert gen.last_token_count < 30  # the loop stopped early


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=600), "exceeds the model context of 512"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.2), "top_p"),
    (dict(top_k=-3), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"),
])
def test_bad_requests_then_still_works(gen, images, kwargs, message):
    kw = dict(max_new_tokens=8, temperature=0)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=message):
        gen.generate(images[0], "Hi", **kw)
    assert gen.generate(images[0], "Hi", max_new_tokens=4, temperature=0)


def test_image_count_mismatch(gen, images):
    with pytest.raises(ValueError, match="2"):
        gen.generate(images[0], "<|image|><|image|>two tokens, one image", max_new_tokens=4, chat=False)


@pytest.mark.parametrize("kwargs,message", [(dict(device="tpu"), "device"), (dict(dtype="int8"), "dtype")])
def test_unknown_device_or_dtype(ckpt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        llama_mm.Generator(ckpt[0], **kwargs)


def test_cli_generate_stats_and_backends(ckpt, images, tmp_path, capsys):
    path = tmp_path / "img.png"
    images[0].save(path)
    args = ["--model", str(ckpt[0]), "--image", str(path), "--prompt", "Describe.", "--chat",
            "--max-new-tokens", "12", "--temperature", "0"]
    assert cli.main(["generate", *args, "--stats"]) == 0
    out = capsys.readouterr()
    assert "time to first token" in out.err and "tokens/s" in out.err and "peak memory" in out.err
    ours = out.out.strip()
    assert cli.main(["generate", *args, "--backend", "transformers"]) == 0
    assert capsys.readouterr().out.strip() == ours
    assert cli.main(["compare", *args]) == 0
    report = capsys.readouterr().out
    assert "identical text: True" in report


def test_cli_reports_bad_input(ckpt, capsys):
    assert cli.main(["generate", "--model", str(ckpt[0]), "--prompt", "x", "--top-p", "3"]) == 2
    assert "top_p" in capsys.readouterr().err


@pytest.fixture(scope="module")
def adapter_dir(ckpt, tmp_path_factory):
    from llama_mm.lora import apply_lora, save_adapter

    model = llama_mm.load_model(ckpt[0])
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: randomise so the adapter changes the output
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_adapter(model, tmp_path_factory.mktemp("adapter"))


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_generator_with_adapter_matches_peft(ckpt, adapter_dir, images, merge):
    import copy

    from peft import PeftModel
    from transformers import AutoProcessor

    d, ref = ckpt
    gen = llama_mm.Generator(d, adapter=adapter_dir, merge_adapter=merge)
    inputs = gen.request_inputs("A picture of", [images[0]], chat=False)
    ours = gen.generate_ids(inputs, 24, temperature=0)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(ref), adapter_dir).eval()
    proc = AutoProcessor.from_pretrained(d)
    hf_inputs = proc(images=[[images[0]]], text=["<|image|>A picture of"], return_tensors="pt")
    with torch.no_grad():
        theirs = peft_model.generate(**hf_inputs, max_new_tokens=24, do_sample=False,
                                     pad_token_id=proc.tokenizer.pad_token_id)[:, hf_inputs["input_ids"].shape[1]:]
        plain = ref.generate(**hf_inputs, max_new_tokens=24, do_sample=False,
                             pad_token_id=proc.tokenizer.pad_token_id)[:, hf_inputs["input_ids"].shape[1]:]
    assert not torch.equal(theirs, plain)  # the adapter matters
    assert torch.equal(ours[:, :theirs.shape[1]], theirs)
