"""llama_mm.MllamaProcessor against transformers' MllamaProcessor (PIL image backend), plus hand-computed cases.

Tolerance: pixel_values within 1e-5 (float32 rounding of the affine normalisation); every integer tensor identical.
"""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import skimage
import torch
import transformers
from llama_mm import image_resize
from llama_mm.image_processing import fit_to_canvas, optimal_canvas, supported_aspect_ratios
from llama_mm.processor import MllamaProcessor
from tokenizer_fixture import LLAMA3_SPECIAL_TOKENS, write_tokenizer_files
from transformers.models.mllama.image_processing_pil_mllama import (
    MllamaImageProcessorPil,
    get_image_size_fit_to_canvas,
    get_optimal_tiled_canvas,
)

VOCAB = 1000
SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
PIXEL_TOL = 1e-5


def _hf_processor(directory):
    hf = transformers.MllamaProcessor.from_pretrained(directory)
    if not isinstance(hf.image_processor, MllamaImageProcessorPil):  # the oracle is the PIL backend
        hf.image_processor = MllamaImageProcessorPil.from_pretrained(directory)
    return hf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    write_tokenizer_files(d, vocab_size=VOCAB)
    return d


@pytest.fixture(scope="module")
def ours(checkpoint):
    return MllamaProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def hf(checkpoint):
    return _hf_processor(checkpoint)


def hf_call(hf, images=None, text=None, padding_side=None):
    """transformers' processor; padding_side None: the checkpoint's own side, as ours without the argument."""
    side = {} if padding_side is None else {"padding_side": padding_side}
    return hf(images=images, text=text, padding=True, return_tensors="pt", **side)


def assert_matches(got: dict, want, label="", pixel_unit=1.0):
    """Every key transformers returns is identical (pixel_values within PIXEL_TOL, measured in units of
    `pixel_unit`); num_tiles agrees with it."""
    for key in want:
        assert key in got, f"{label}: missing {key}"
        a, b = got[key], want[key]
        assert a.shape == b.shape, f"{label}: {key} shape {tuple(a.shape)} != {tuple(b.shape)}"
        if key == "pixel_values":
            diff = (a - b).abs().max().item() / pixel_unit
            print(f"{label}: pixel_values max |diff| = {diff:.3g}")
            assert diff <= PIXEL_TOL, f"{label}: pixel_values differ by {diff}"
        else:
            assert a.dtype == b.dtype == torch.int64, f"{label}: {key} dtype {a.dtype} vs {b.dtype}"
            assert torch.equal(a, b), f"{label}: {key} differs"
    if "aspect_ratio_ids" in want:  # transformers drops num_tiles; it is the mask's count in real image slots
        expected = want["aspect_ratio_mask"].sum(-1) * (want["aspect_ratio_ids"] > 0)
        assert torch.equal(got["num_tiles"], expected), f"{label}: num_tiles"


# ------------------------------------------------------------------------------------------- photographs

PHOTOS = [
    "astronaut.png",  # RGB PNG
    "camera.png",  # greyscale PNG
    "logo.png",  # RGBA PNG
    "horse.png",  # RGBA PNG with EXIF
    "chelsea.png",  # RGB PNG with EXIF, 451x300
    "coffee.png",  # RGB 600x400
    "motorcycle_left.png",  # RGB 741x500
    "hubble_deep_field.jpg",  # JPEG 1000x872
    "rocket.jpg",  # JPEG
    "retina.jpg",  # JPEG
    "no_time_for_that_tiny.gif",  # GIF
]


@pytest.mark.parametrize("name", PHOTOS)
def test_photographs_pil_path_bytes(ours, hf, name):
    path = SKIMAGE_DATA / name
    prompt = "<|image|>Describe this image in detail."
    with PIL.Image.open(path) as im:
        assert_matches(ours(images=im, text=prompt), hf_call(hf, im, prompt), f"{name} as PIL ({im.mode})")
    from_path = ours(images=str(path), text=prompt)
    assert_matches(from_path, hf_call(hf, str(path), prompt), f"{name} as path")
    from_bytes = ours(images=path.read_bytes(), text=prompt)  # transformers takes no bytes: same as the path
    for key in from_path:
        assert torch.equal(from_bytes[key], from_path[key]), f"{name}: bytes and path differ in {key}"
    assert torch.equal(ours(images=path, text=prompt)["pixel_values"], from_path["pixel_values"])  # PathLike


# --------------------------------------------------------------------------------------- synthetic shapes


def _noise(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "size",
    [(4000, 300), (120, 1900), (9, 7), (560, 560), (1, 1), (561, 560), (1120, 1119), (1411, 1411), (2000, 50)],
)
def test_synthetic_extremes(ours, hf, size):
    im = _noise(*size)
    prompt = "<|image|>What is this?"
    assert_matches(ours(images=im, text=prompt), hf_call(hf, im, prompt), f"noise {size[0]}x{size[1]}")


def test_geometry_hand_computed():
    # 1411x1411 -> 2x2 canvas, 1120x1120, id 6 (the worked example in image_processing.py)
    assert optimal_canvas(1411, 1411, 4, 560) == (1120, 1120)
    assert fit_to_canvas(1411, 1411, 1120, 1120, 560) == (1120, 1120)
    assert supported_aspect_ratios(4).index((2, 2)) + 1 == 6
    # 4000 wide x 300 high: every canvas downscales, 1x4 least (0.56): 2240 wide, floor(300 * 0.56) = 168 high
    assert optimal_canvas(300, 4000, 4, 560) == (560, 2240)
    assert fit_to_canvas(300, 4000, 560, 2240, 560) == (168, 2240)
    # 9 wide x 7 high: 1x1 and 2x1 both upscale by 560/9; the smaller area wins; height floor(7 * 560 / 9) = 435
    assert optimal_canvas(7, 9, 4, 560) == (560, 560)
    assert fit_to_canvas(7, 9, 560, 560, 560) == (435, 560)


def test_geometry_matches_reference_on_a_grid():
    sizes = [1, 2, 7, 99, 280, 559, 560, 561, 839, 1000, 1119, 1120, 1121, 1680, 2239, 2240, 2241, 3000, 9000]
    for h in sizes:
        for w in sizes:
            for tiles in (1, 2, 4, 6):
                want = tuple(int(v) for v in get_optimal_tiled_canvas(h, w, tiles, 560))
                assert optimal_canvas(h, w, tiles, 560) == want, (h, w, tiles)
                want_size = get_image_size_fit_to_canvas(h, w, *want, 560)
                assert fit_to_canvas(h, w, *want, 560) == tuple(int(v) for v in want_size), (h, w, tiles)


# ------------------------------------------------------------------------------------------ input forms


def _photo_array(name):
    with PIL.Image.open(SKIMAGE_DATA / name) as im:
        return np.asarray(im).copy()


def test_numpy_and_tensor_inputs(ours, hf):
    prompt = "<|image|>Caption:"
    rgb, grey, rgba = _photo_array("coffee.png"), _photo_array("camera.png"), _photo_array("logo.png")
    cases = [
        ("numpy HWC rgb", rgb, rgb),
        ("numpy HWC rgba", rgba, rgba),
        ("numpy HWC 1-channel", grey[..., None], grey[..., None]),
        ("numpy HW grey", grey, grey[..., None]),
        ("tensor CHW rgb", torch.from_numpy(rgb).permute(2, 0, 1), torch.from_numpy(rgb).permute(2, 0, 1)),
        ("tensor CHW rgba", torch.from_numpy(rgba).permute(2, 0, 1), torch.from_numpy(rgba).permute(2, 0, 1)),
        ("tensor 1HW", torch.from_numpy(grey)[None], torch.from_numpy(grey)[None]),
    ]
    for label, mine, theirs in cases:
        assert_matches(ours(images=mine, text=prompt), hf_call(hf, theirs, prompt), label)


def _modes():
    with PIL.Image.open(SKIMAGE_DATA / "astronaut.png") as im:
        base = im.convert("RGB").crop((0, 0, 512, 384))
    alpha = PIL.Image.linear_gradient("L").resize(base.size)
    rgba = base.copy()
    rgba.putalpha(alpha)
    la = base.convert("L")
    la.putalpha(alpha)
    p_trns = base.convert("P")
    p_trns.info["transparency"] = 0
    i16 = PIL.Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 3)  # saturates above 255
    assert i16.mode == "I;16"
    return {
        "L": base.convert("L"),
        "LA": la,
        "P": base.convert("P"),
        "P+transparency": p_trns,
        "RGBA": rgba,
        "CMYK": base.convert("CMYK"),
        "I;16": i16,
        "1": base.convert("1"),
    }


@pytest.mark.parametrize("mode", ["L", "LA", "P", "P+transparency", "RGBA", "CMYK", "I;16", "1"])
def test_pil_modes_in_memory_and_from_file(ours, hf, mode, tmp_path):
    im = _modes()[mode]
    prompt = "<|image|>What colour is it?"
    assert_matches(ours(images=im, text=prompt), hf_call(hf, im, prompt), f"mode {mode} in memory")
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    im.save(path)
    with PIL.Image.open(path) as reopened:
        assert reopened.mode == im.mode
    assert_matches(ours(images=str(path), text=prompt), hf_call(hf, str(path), prompt), f"mode {mode} from file")


def test_exif_orientation(ours, hf, tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    _noise(900, 300, seed=3).save(path, exif=exif)
    prompt = "<|image|>x"
    from_path = ours(images=str(path), text=prompt)
    assert_matches(from_path, hf_call(hf, str(path), prompt), "EXIF-rotated file")
    # stored 900x300, displayed 300 wide x 900 high: a 2x1 canvas (scale 1120 / 900) -> portrait id
    assert from_path["aspect_ratio_ids"].tolist() == [[supported_aspect_ratios(4).index((2, 1)) + 1]]
    with PIL.Image.open(path) as im:  # an opened image is taken as it is stored, as transformers does
        assert_matches(ours(images=im, text=prompt), hf_call(hf, im, prompt), "EXIF-rotated PIL")


# ----------------------------------------------------------------------------- batches, prompts, masks


def test_several_images_per_prompt_and_padded_batch(ours, hf):
    a, b, c = _noise(1411, 700, 1), _noise(300, 900, 2), _noise(560, 560, 4)
    texts = [
        "<|image|><|image|>Compare these two.",
        "No image in this one, but it is a longer prompt than the others by far.",
        "First look: <|image|> then answer.",
    ]
    images = [[a, b], [], [c]]
    for side in ("left", "right"):
        got = ours(images=images, text=texts, padding_side=side)
        assert_matches(got, hf_call(hf, images, texts, padding_side=side), f"batch padded {side}")
    default = ours(images=images, text=texts)  # no side given: the checkpoint's, as transformers does
    assert_matches(default, hf(images=images, text=texts, padding=True, return_tensors="pt"), "default side")
    assert default["attention_mask"][:, 0].all() and not default["attention_mask"][:, -1].all()  # right: absent
    flat = ours(images=[a, b, c], text=texts)  # all images in prompt order
    for key in default:
        assert torch.equal(flat[key], default[key]), key


def test_padding_side_follows_tokenizer_config(tmp_path):
    write_tokenizer_files(tmp_path, vocab_size=VOCAB)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    texts = ["<|image|>A short one.", "<|image|>A much longer prompt than the first one."]
    images = [[_noise(300, 500, 7)], [_noise(500, 300, 8)]]
    for side in ("left", "right"):
        config_path.write_text(json.dumps({**config, "padding_side": side}))
        got = MllamaProcessor.from_pretrained(tmp_path)(images=images, text=texts)
        assert_matches(got, _hf_processor(tmp_path)(images=images, text=texts, padding=True, return_tensors="pt"),
                       f"tokenizer_config padding_side={side}")
        assert bool(got["attention_mask"][0, 0]) == (side == "right")
    config_path.write_text(json.dumps({**config, "padding_side": "middle"}))
    with pytest.raises(ValueError, match="tokenizer_config.json: padding_side must be 'left' or 'right'"):
        MllamaProcessor.from_pretrained(tmp_path)


def test_text_only_and_images_only(ours, hf):
    texts = ["Hello there.", "A longer prompt, with punctuation!"]
    assert_matches(ours(text=texts), hf_call(hf, None, texts), "text only")
    images = [[_noise(700, 500)], [_noise(100, 100, 1), _noise(2000, 600, 2)]]
    got = ours(images=images)
    assert set(got) == {"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "num_tiles"}
    assert_matches(got, hf(images=images, return_tensors="pt"), "images only")


def test_base_prompt_bos_and_cross_attention_by_hand(ours, hf):
    img_id, bos = ours.image_token_id, ours.bos_token_id
    assert img_id == VOCAB and bos == VOCAB - len(LLAMA3_SPECIAL_TOKENS)
    a, b = _noise(600, 600), _noise(1200, 500, 1)  # 2x1... tile counts checked through num_tiles below
    text = "<|image|><|image|>ab"
    got = ours(images=[a, b], text=text)
    assert_matches(got, hf_call(hf, [a, b], text), "two leading images")
    ids = got["input_ids"][0].tolist()
    assert ids[:3] == [img_id, img_id, bos]
    # consecutive image tokens both attend from their own position to the end
    n_a, n_b = got["num_tiles"][0].tolist()
    expected = torch.zeros(len(ids), 2, 4, dtype=torch.int64)
    expected[0:, 0, :n_a] = 1
    expected[1:, 1, :n_b] = 1
    assert torch.equal(got["cross_attention_mask"][0], expected)

    text = "Look <|image|>at this<|image|>and"  # image 0 until image 1's token; text before sees nothing
    got = ours(images=[a, b], text=text)
    assert_matches(got, hf_call(hf, [a, b], text), "interleaved images")
    ids = got["input_ids"][0].tolist()
    assert ids[0] == bos  # no leading image: bos first
    first, second = [i for i, t in enumerate(ids) if t == img_id]
    expected = torch.zeros(len(ids), 2, 4, dtype=torch.int64)
    expected[first:second, 0, :n_a] = 1
    expected[second:, 1, :n_b] = 1
    assert torch.equal(got["cross_attention_mask"][0], expected)

    explicit = "<|begin_of_text|><|image|>already has bos"
    assert ours(images=a, text=explicit)["input_ids"][0].tolist().count(bos) == 1


# ---------------------------------------------------------------------------------------- chat template

CONVERSATIONS = {
    "image and text": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    "text only, string content": [{"role": "user", "content": "Tell me a joke."}],
    "system + image": [
        {"role": "system", "content": [{"type": "text", "text": "  Be brief.  "}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
    ],
    "multi-turn, two images": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What animal?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image"}]},
    ],
    "openai image_url and None fields": [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "x.png"}}, {"type": "text", "text": "Hi"}],
            "name": None,
        }
    ],
    "image object in block": [
        {
            "role": "user",
            "content": [{"type": "image", "image": PIL.Image.new("RGB", (4, 4))}, {"type": "text", "text": "?"}],
        }
    ],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_reference(ours, hf, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    for kwargs in ({}, {"date_string": "26 Jul 2024"}):
        want = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        assert got == want
        if name != "openai image_url and None fields":  # only the processor rewrites image_url blocks
            assert got == hf.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
            )
    if name == "text only, string content":
        assert "Cutting Knowledge Date: December 2023\n" in got


def test_chat_template_tools_batches_and_tokens(ours, hf):
    messages = CONVERSATIONS["text only, string content"]
    for tools_in_user in (True, False):
        kw = {"tools": TOOLS, "tools_in_user_message": tools_in_user, "date_string": "1 Jan 2025"}
        want = hf.apply_chat_template(messages, add_generation_prompt=True, **kw)
        assert ours.apply_chat_template(messages, **kw) == want
    batch = [CONVERSATIONS["image and text"], CONVERSATIONS["multi-turn, two images"]]
    assert ours.apply_chat_template(batch) == hf.apply_chat_template(batch, add_generation_prompt=True)
    prompt = ours.apply_chat_template(CONVERSATIONS["image and text"])
    ids = ours.apply_chat_template(CONVERSATIONS["image and text"], tokenize=True)
    assert ids == hf.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="chat template failed"):
        ours.apply_chat_template([{"role": "assistant", "tool_calls": [1, 2], "content": None}])


def test_chat_prompt_through_processor(ours, hf):
    messages = CONVERSATIONS["multi-turn, two images"]
    prompt = ours.apply_chat_template(messages)
    images = [_noise(800, 600), _noise(300, 1000, 1)]
    got = ours(images=images, text=prompt)
    assert_matches(got, hf_call(hf, images, prompt), "chat prompt")
    assert got["input_ids"][0].tolist().count(ours.bos_token_id) == 1


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja", "processor_config.json"])
def test_chat_template_file_locations(tmp_path, where):
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    write_tokenizer_files(tmp_path, vocab_size=512, chat_template=template if where == "tokenizer_config.json" else "")
    (tmp_path / "chat_template.json").unlink()
    if where == "chat_template.jinja":
        (tmp_path / "chat_template.jinja").write_text(template)
    if where == "processor_config.json":
        (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": template}))
    messages = [{"role": "user", "content": "hi"}]
    got = MllamaProcessor.from_pretrained(tmp_path).apply_chat_template(messages)
    assert got == "<|begin_of_text|>[user]hi"
    hf = _hf_processor(tmp_path)
    if where == "tokenizer_config.json":  # transformers' processor has no template then; its tokenizer has
        assert got == hf.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        assert got == hf.apply_chat_template(messages, add_generation_prompt=True)


# ------------------------------------------------------------------------------------ tokenizer variants


@pytest.mark.parametrize("vocab_size", [300, 8192])  # 8192 needs filler tokens past the trained merges
def test_fixture_vocabulary_layout(tmp_path, vocab_size):
    write_tokenizer_files(tmp_path, vocab_size=vocab_size)
    ours, hf = MllamaProcessor.from_pretrained(tmp_path), _hf_processor(tmp_path)
    vocab = ours.tokenizer.get_vocab()
    assert vocab["<|image|>"] == ours.image_token_id == hf.image_token_id == vocab_size
    first = vocab_size - len(LLAMA3_SPECIAL_TOKENS)
    assert [vocab[t] for t in LLAMA3_SPECIAL_TOKENS] == list(range(first, vocab_size))
    assert len(vocab) == vocab_size + 1
    texts = ["<|image|>Describe this image in detail.", "Cutting Knowledge Date: December 2023"]
    images = [[_noise(64, 48)], []]
    assert_matches(ours(images=images, text=texts), hf_call(hf, images, texts), f"vocab {vocab_size}")



def test_tokenizer_that_adds_bos_itself(tmp_path):
    write_tokenizer_files(tmp_path, vocab_size=512, bos_in_post_processor=True)
    ours, hf = MllamaProcessor.from_pretrained(tmp_path), _hf_processor(tmp_path)
    texts = ["<|image|>Hi", "plain"]
    images = [[_noise(50, 60)], []]
    assert_matches(ours(images=images, text=texts), hf_call(hf, images, texts), "bos post-processor")


@pytest.mark.parametrize("flags", [{"add_bos_token": True}, {"add_bos_token": False, "add_eos_token": True}])
@pytest.mark.parametrize("bos_in_post_processor", [True, False])
def test_add_bos_eos_flags_in_tokenizer_config(tmp_path, flags, bos_in_post_processor):
    write_tokenizer_files(tmp_path, vocab_size=512, bos_in_post_processor=bos_in_post_processor)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **flags}))
    ours, hf = MllamaProcessor.from_pretrained(tmp_path), _hf_processor(tmp_path)
    texts = ["Hello", "<|image|>two words"]
    images = [[], [_noise(40, 30)]]
    assert_matches(ours(images=images, text=texts), hf_call(hf, images, texts), f"flags {flags}")


def test_decode_and_special_ids(ours, hf, checkpoint, tmp_path):
    out = ours(text=["<|image|>Describe this image in detail.<|eot_id|>"], images=[_noise(10, 10)])
    ids = out["input_ids"][0]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids.tolist(), skip_special_tokens=skip)
    assert ours.decode(ids) == "Describe this image in detail."
    batch = torch.stack([ids, ids.flip(0)])
    assert ours.batch_decode(batch) == hf.batch_decode(batch.tolist(), skip_special_tokens=True)
    vocab = ours.tokenizer.get_vocab()
    assert ours.pad_token_id == vocab["<|finetune_right_pad_id|>"] == hf.tokenizer.pad_token_id
    assert ours.eos_token_ids == (vocab["<|eot_id|>"],)  # no generation_config.json: the tokenizer's eos
    write_tokenizer_files(tmp_path, vocab_size=VOCAB)
    stops = [vocab["<|end_of_text|>"], vocab["<|eom_id|>"], vocab["<|eot_id|>"]]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": stops, "temperature": 0.6}))
    assert MllamaProcessor.from_pretrained(tmp_path).eos_token_ids == tuple(stops)
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": stops[0]}}))
    assert MllamaProcessor.from_pretrained(tmp_path).eos_token_ids == (stops[0],)


# --------------------------------------------------------------------------------------------- bad input


def _png_header_only(width, height):
    """A PNG that declares width x height but carries no pixel data (enough for PIL to read the size)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_image_token_count_mismatch(ours):
    img = _noise(20, 20)
    with pytest.raises(ValueError, match=r"\[2\] <\|image\|> tokens and \[1\] images"):
        ours(images=[img], text="<|image|><|image|>two tokens")
    with pytest.raises(ValueError, match=r"\[1, 0\] <\|image\|> tokens and \[1, 1\] images"):
        ours(images=[[img], [img]], text=["<|image|>a", "b"])
    with pytest.raises(ValueError, match=r"hold 2 <\|image\|> tokens .* but 3 images"):
        ours(images=[img, img, img], text=["<|image|>a", "<|image|>b"])
    with pytest.raises(ValueError, match=r"\[1\] <\|image\|> tokens and \[0\] images"):
        ours(text="<|image|>no image given")
    with pytest.raises(ValueError, match="images is empty and no text"):
        ours(images=[[], []])
    with pytest.raises(ValueError, match="give text, images or both"):
        ours()
    with pytest.raises(ValueError, match="2 prompts but images for 1"):
        ours(images=[[img]], text=["<|image|>a", "<|image|>b"])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_images_raise_value_error(ours, tmp_path):
    good = _noise(30, 30)
    jpeg = (SKIMAGE_DATA / "rocket.jpg").read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg[: len(jpeg) // 2])
    not_image = tmp_path / "notes.txt"
    not_image.write_text("this is not an image\n" * 20)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(30000, 30000))  # 9e8 pixels: PIL itself refuses (> 2x the limit)
    near_bomb = tmp_path / "near_bomb.png"
    limit = PIL.Image.MAX_IMAGE_PIXELS
    near_bomb.write_bytes(_png_header_only(limit // 10000 + 1, 10000))  # just above the limit: PIL only warns
    cases = [
        (PIL.Image.new("RGB", (0, 5)), "zero size"),
        (np.zeros((0, 4, 3), np.uint8), "zero size"),
        (torch.zeros(3, 5, 0, dtype=torch.uint8), "zero size"),
        (str(truncated), "cannot decode"),
        (jpeg[: len(jpeg) // 2], "cannot decode"),
        (str(not_image), "not a readable image"),
        (b"\x00\x01garbage", "not a readable image"),
        (str(bomb), "decompression-bomb|decompression bomb"),
        (str(near_bomb), "decompression-bomb"),
        (str(tmp_path / "missing.png"), "no such image file"),
        (np.zeros((8, 8, 3), np.float32), "must be uint8"),
        (np.zeros((8, 8, 5), np.uint8), r"1, 3 or 4 channel HWC .*shape \(8, 8, 5\)"),
        (torch.zeros(2, 8, 8, dtype=torch.uint8), r"CHW .*shape \(2, 8, 8\)"),
    ]
    reference = ours(images=[[good], [good]], text=["<|image|>ok", "<|image|>ok"])
    for bad, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            ours(images=[[good], [bad]], text=["<|image|>ok", "<|image|>bad"])
        assert "images[1][0]" in str(info.value)
        # nothing half-processed: the processor is unchanged and still gives the same answer
        again = ours(images=[[good], [good]], text=["<|image|>ok", "<|image|>ok"])
        assert all(torch.equal(again[k], reference[k]) for k in reference)
    with pytest.raises(ValueError, match=r"images\[1\]\[0\] is not an image \(got int\)"):
        ours(images=[[good], [7]], text=["<|image|>ok", "<|image|>bad"])


@pytest.mark.parametrize(
    "change",
    [
        {"max_image_tiles": 6},
        {"size": {"height": 448, "width": 448}, "max_image_tiles": 2},
        {"do_normalize": False},
        {"do_rescale": False},
        {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.4], "resample": 3},
    ],
)
def test_preprocessor_config_variants(tmp_path, change):
    write_tokenizer_files(tmp_path, vocab_size=512)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, **change}))
    ours, hf = MllamaProcessor.from_pretrained(tmp_path), _hf_processor(tmp_path)
    images = [[_noise(1500, 400), _noise(300, 700, 1)]]
    text = "<|image|>a<|image|>b"
    unit = 1.0 if change.get("do_rescale", True) else 255.0  # unrescaled pixels: compare in units of 1/255
    assert_matches(ours(images=images, text=text), hf_call(hf, images, text), f"config {change}", unit)


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        MllamaProcessor.from_pretrained(tmp_path / "nope")
    write_tokenizer_files(tmp_path, vocab_size=512)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    for change, message in [
        ({"do_pad": False}, "do_pad=False"),
        ({"size": {"height": 560, "width": 448}}, "square"),
        ({"max_image_tiles": 0}, "max_image_tiles"),
        ({"image_std": [0.5, 0.5]}, "image_std"),
    ]:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            MllamaProcessor.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        MllamaProcessor.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------- resize exactness


def test_threaded_resize_is_byte_identical_to_pil(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # force the threaded path whatever this machine has
    monkeypatch.setattr(image_resize, "_spare_cores", lambda: 4)
    assert image_resize._pass_order() is not None, "the installed Pillow's pass order was not recognised"
    rng = np.random.default_rng(7)
    shapes = [((1411, 1411), (1120, 1120)), ((4000, 300), (2240, 168)), ((120, 1900), (560, 2240))]
    shapes += [((300, 3000), (280, 600)), ((600, 600), (600, 1200)), ((700, 500), (1400, 500))]
    shapes += [(tuple(rng.integers(200, 1600, 2)), tuple(rng.integers(512, 1400, 2))) for _ in range(12)]
    for (w, h), (ow, oh) in shapes:
        image = PIL.Image.fromarray(rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8))
        want = np.asarray(image.resize((int(ow), int(oh)), PIL.Image.Resampling.BILINEAR))
        got = np.full_like(want, 0)
        covered = np.zeros(want.shape[:2], np.int64)

        def consume(band, y, x):
            got[y : y + band.shape[0], x : x + band.shape[1]] = band
            covered[y : y + band.shape[0], x : x + band.shape[1]] += 1

        image_resize.resize(image, (int(ow), int(oh)), PIL.Image.Resampling.BILINEAR, consume)
        assert (covered == 1).all(), f"bands do not tile the output exactly for {(w, h)} -> {(ow, oh)}"
        assert np.array_equal(got, want), f"threaded resize differs for {(w, h)} -> {(ow, oh)}"


def test_work_sharing_map_keeps_order_and_raises():
    assert image_resize._map(lambda x: x * x, list(range(50)), helpers=3) == [x * x for x in range(50)]

    def fail_on_7(x):
        if x == 7:
            raise RuntimeError("item 7")
        return x

    with pytest.raises(RuntimeError, match="item 7"):
        image_resize._map(fail_on_7, list(range(50)), helpers=3)


def test_runtime_does_not_import_transformers(checkpoint):
    code = (
        "import sys, numpy as np; from llama_mm.processor import MllamaProcessor; "
        f"p = MllamaProcessor.from_pretrained({str(checkpoint)!r}); "
        "o = p(images=np.zeros((40, 50, 3), np.uint8), text='<|image|>hi'); "
        "p.apply_chat_template([{'role': 'user', 'content': 'x'}]); "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "python")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
