"""The built-in model (python/llama_mm/builtin, trained by tools/train_builtin.py): it loads with no directory, its
files are a strict, transformers-loadable Mllama checkpoint, it captions fresh images correctly (truth from
`demo.caption`, the spec the image was drawn from), transformers' own processor + generate on the same directory
gives the same answer, and `llama-mm demo` prints caption and truth.

Fresh images come from seeds 2_000_000.. (training used seeds below 1_000_000; bench/builtin_accuracy.py uses
1_000_000..).
"""
import json
import random

import pytest
import torch
from safetensors import safe_open

import llama_mm
from llama_mm import cli, demo
from llama_mm.config import MllamaConfig
from llama_mm.model import MllamaModel, load_model

BUILTIN = demo.BUILTIN_DIR
FRESH_SEEDS = range(2_000_000, 2_000_008)


def ask(gen, image) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": demo.PROMPT}]}]
    return gen.chat(messages, images=[image], max_new_tokens=32, temperature=0)


@pytest.fixture(scope="module")
def gen():
    return llama_mm.Generator()


def test_generator_with_no_directory_loads_the_builtin_model(gen):
    assert gen.model_dir == BUILTIN
    assert gen.model.cfg == MllamaConfig.from_pretrained(BUILTIN)


def test_config_matches_the_tokenizer_files():
    cfg = json.loads((BUILTIN / "config.json").read_text())
    tok = json.loads((BUILTIN / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    text = cfg["text_config"]
    assert text["vocab_size"] == cfg["image_token_index"] == ids["<|image|>"]
    assert text["bos_token_id"] == ids["<|begin_of_text|>"]
    assert text["pad_token_id"] == ids["<|finetune_right_pad_id|>"]
    assert set(text["eos_token_id"]) == {ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]}
    assert cfg["vision_config"]["image_size"] == demo.IMAGE_SIZE
    pre = json.loads((BUILTIN / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": demo.IMAGE_SIZE, "width": demo.IMAGE_SIZE}


def test_weights_are_a_complete_strict_checkpoint():
    path = BUILTIN / "model.safetensors"
    assert path.stat().st_size <= 20 * 2**20
    expected = MllamaModel(MllamaConfig.from_pretrained(BUILTIN)).state_dict()
    with safe_open(str(path), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {k: tuple(v.shape) for k, v in expected.items()}
    model = load_model(BUILTIN)  # strict: raises on any missing, unexpected or misshapen tensor
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name


def test_captions_fresh_images(gen):
    specs = [demo.random_spec(random.Random(s)) for s in FRESH_SEEDS]
    answers = [ask(gen, demo.draw(spec)) for spec in specs]
    assert answers == [demo.caption(spec) for spec in specs]


def test_transformers_gives_the_same_answer():
    """The oracle: transformers' MllamaForConditionalGeneration and processor on the same directory."""
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    spec = demo.random_spec(random.Random(FRESH_SEEDS[0]))
    image = demo.draw(spec)
    proc = AutoProcessor.from_pretrained(BUILTIN)
    model = MllamaForConditionalGeneration.from_pretrained(BUILTIN).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": demo.PROMPT}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = proc(images=[[image]], text=[text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    theirs = proc.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert theirs == demo.caption(spec)
    assert ask(llama_mm.Generator(), image) == theirs


def test_cli_demo_prints_caption_and_truth(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "--seed", "3", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    truth = demo.caption(demo.random_spec(random.Random(3)))
    assert f"model:  {truth}\n" in printed
    assert f"truth:  {truth}\n" in printed
    assert printed.rstrip().endswith("match")
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (demo.IMAGE_SIZE, demo.IMAGE_SIZE)
