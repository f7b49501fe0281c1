"""The synthetic shapes task (llama_mm.demo) and the built-in model's tokenizer and processor files.

Independent references: captions are parsed back by a regex parser written here; images are analysed by
exact-colour masks and connected components (scikit-image), never by the spec's positions; the tokenizer is
checked against Llama 3's known special-token layout and against transformers' loading and chat rendering.
"""

import dataclasses
import json
import random
import re
from collections import Counter
from pathlib import Path

import jinja2.sandbox
import numpy as np
import pytest
import transformers
from skimage.measure import label, regionprops
from tokenizers import Tokenizer

from llama_mm import demo

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ROOT / "python" / "llama_mm" / "builtin"
N_IMAGES = 200

# ---------------------------------------------------------------- independent caption parsers

_RELATION_RE = re.compile(r"a (\w+) (\w+) (above|left of) a (\w+) (\w+)")
_COUNT_RE = re.compile(r"(\d) (shapes?): (\d \w+(?:, \d \w+)*)")


def parse_caption(text):
    m = _RELATION_RE.fullmatch(text)
    assert m, f"not a relation caption: {text!r}"
    c1, k1, rel, c2, k2 = m.groups()
    return (c1, k1), rel, (c2, k2)


def parse_count_caption(text):
    m = _COUNT_RE.fullmatch(text)
    assert m, f"not a count caption: {text!r}"
    n, noun, rest = int(m.group(1)), m.group(2), m.group(3)
    assert noun == ("shape" if n == 1 else "shapes")
    counts = [(int(k), c) for k, c in (p.split(" ") for p in rest.split(", "))]
    return n, counts


# ---------------------------------------------------------------- independent image analysis


def find_shapes(image):
    """Connected regions of each exact palette colour: [(colour, centroid (x, y), kind)]."""
    a = np.asarray(image)
    assert a.dtype == np.uint8 and a.shape[2] == 3
    palette = {"background": (255, 255, 255), **demo.COLOURS}
    known = np.zeros(a.shape[:2], bool)
    found = []
    for name, rgb in palette.items():
        mask = (a == np.array(rgb, np.uint8)).all(axis=2)
        known |= mask
        if name == "background":
            continue
        for region in regionprops(label(mask, connectivity=2)):
            cy, cx = region.centroid
            assert mask[round(cy), round(cx)], f"{name} region's centroid is not {name}"
            found.append((name, (cx, cy), classify(region)))
    assert known.all(), "image has pixels outside the palette (anti-aliasing or a stray colour)"
    return found


def classify(region):
    """Kind from geometry: fill of the bounding box, and where the mass sits vertically."""
    r0, c0, r1, c1 = region.bbox
    fill = region.area / ((r1 - r0) * (c1 - c0))
    mass_down = (region.centroid[0] - r0) / (r1 - r0)  # 0.5 symmetric, 2/3 for an apex-up triangle
    if fill > 0.9:
        return "square"
    if fill > 0.65:
        return "circle"
    return "triangle" if mass_down > 0.58 else "diamond"


def reading_order(found):
    """Two found shapes as the caption should name them: top then bottom, or left then right."""
    (_, p, _), (_, q, _) = found
    vertical = abs(q[1] - p[1]) > abs(q[0] - p[0])  # image y grows downward
    first, second = sorted(found, key=lambda f: f[1][1 if vertical else 0])
    return (first[0], first[2]), "above" if vertical else "left of", (second[0], second[2])


# ---------------------------------------------------------------- the task


@pytest.mark.parametrize("make", [demo.random_spec, demo.random_count_spec])
def test_same_seed_same_spec_and_pixels(make):
    for seed in range(5):
        a, b = make(random.Random(seed)), make(random.Random(seed))
        assert a == b
        assert demo.draw(a).tobytes() == demo.draw(b).tobytes()
        g1, g2 = make(np.random.default_rng(seed)), make(np.random.default_rng(seed))
        assert g1 == g2 and demo.draw(g1).tobytes() == demo.draw(g2).tobytes()
    specs = {json.dumps(dataclasses.asdict(make(random.Random(s)))) for s in range(20)}
    assert len(specs) == 20  # seeds matter


@pytest.mark.parametrize("make", [demo.random_spec, demo.random_count_spec])
def test_spec_json_round_trip(make):
    rng = random.Random(1)
    for _ in range(20):
        spec = make(rng)
        assert demo.Spec.from_dict(json.loads(json.dumps(dataclasses.asdict(spec)))) == spec


def test_relation_caption_parses_back_to_spec():
    rng = np.random.default_rng(2)
    seen = Counter()
    for _ in range(2000):
        spec = demo.random_spec(rng)
        (c1, k1), rel, (c2, k2) = parse_caption(demo.caption(spec))
        a, b = spec.shapes
        assert (c1, k1, rel, c2, k2) == (a.colour, a.kind, spec.relation, b.colour, b.kind)
        seen.update([rel, c1, c2, k1, k2, c1 == c2])
    # every word of the language occurs, and both shapes can share a colour
    assert set(seen) == set(demo.RELATIONS) | set(demo.COLOURS) | set(demo.KINDS) | {True, False}


def test_count_caption_parses_back_to_spec():
    rng = random.Random(3)
    sizes = Counter()
    for _ in range(2000):
        spec = demo.random_count_spec(rng)
        n, counts = parse_count_caption(demo.count_caption(spec))
        truth = Counter(s.colour for s in spec.shapes)
        assert n == len(spec.shapes) == sum(k for k, _ in counts)
        assert dict((c, k) for k, c in counts) == truth
        assert [c for _, c in counts] == [c for c in demo.COLOURS if c in truth]
        sizes[n] += 1
    assert set(sizes) == {1, 2, 3}
    # relation specs have a count caption too
    spec = demo.random_spec(rng)
    n, counts = parse_count_caption(demo.count_caption(spec))
    assert n == 2 and dict((c, k) for k, c in counts) == Counter(s.colour for s in spec.shapes)


@pytest.mark.parametrize("size, n", [(demo.IMAGE_SIZE, N_IMAGES), (224, N_IMAGES // 5)])
def test_relation_image_matches_caption(size, n):
    rng = random.Random(4)
    for _ in range(n):
        spec = demo.random_spec(rng)
        image = demo.draw(spec, size=size)
        assert image.mode == "RGB" and image.size == (size, size)
        found = find_shapes(image)
        assert len(found) == 2
        assert reading_order(found) == parse_caption(demo.caption(spec))


def test_count_image_matches_caption():
    rng = np.random.default_rng(5)
    for _ in range(N_IMAGES):
        spec = demo.random_count_spec(rng)
        n, counts = parse_count_caption(demo.count_caption(spec))
        found = find_shapes(demo.draw(spec))
        assert len(found) == n
        assert Counter(c for c, _, _ in found) == {c: k for k, c in counts}
        assert Counter(k for _, _, k in found) == Counter(s.kind for s in spec.shapes)


def test_bad_input_is_rejected():
    spec = demo.random_spec(random.Random(6))
    a, b = spec.shapes
    with pytest.raises(ValueError, match="colour"):
        dataclasses.replace(a, colour="pink")
    with pytest.raises(ValueError, match="kind"):
        dataclasses.replace(a, kind="star")
    with pytest.raises(ValueError, match="Shape.x"):
        dataclasses.replace(a, x=1.5)
    with pytest.raises(ValueError, match="do not show"):
        demo.Spec(shapes=(b, a), relation=spec.relation)
    other = {"above": "left of", "left of": "above"}[spec.relation]
    with pytest.raises(ValueError, match="do not show"):
        demo.Spec(shapes=spec.shapes, relation=other)
    with pytest.raises(ValueError, match="relation"):
        demo.Spec(shapes=spec.shapes, relation="below")
    with pytest.raises(ValueError, match="1 to 3"):
        demo.Spec(shapes=(a, b, a, b))
    with pytest.raises(ValueError, match="malformed spec dict"):
        demo.Spec.from_dict({"shapes": [{"colour": "red", "kind": "circle", "x": 0.5, "y": 0.5}]})
    with pytest.raises(ValueError, match="Shape objects"):
        demo.Spec(shapes=({"colour": "red"},))
    with pytest.raises(ValueError, match="relation spec"):
        demo.caption(demo.Spec(shapes=(a,)))
    with pytest.raises(ValueError, match="size"):
        demo.draw(spec, size=8)
    with pytest.raises(TypeError, match="rng"):
        demo.random_spec(7)


# ---------------------------------------------------------------- the tokenizer

# Llama 3's special-token ids, offsets from <|begin_of_text|> = 128000 (hand-copied from the real tokenizer).
LLAMA3_SPECIAL_OFFSETS = {
    "<|begin_of_text|>": 0,
    "<|end_of_text|>": 1,
    "<|finetune_right_pad_id|>": 4,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "<|eom_id|>": 8,
    "<|eot_id|>": 9,
    "<|python_tag|>": 10,
}
USER_TURN = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": demo.PROMPT}]}]
RENDERED_USER_TURN = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe the shapes.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(BUILTIN / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_tok():
    return transformers.AutoTokenizer.from_pretrained(str(BUILTIN))


def _texts():
    rng = random.Random(8)
    texts = [demo.caption(demo.random_spec(rng)) for _ in range(500)]
    texts += [demo.count_caption(demo.random_count_spec(rng)) for _ in range(500)]
    return texts + [demo.PROMPT, demo.COUNT_PROMPT]


def test_image_token_is_the_last_id(tok):
    vocab = tok.get_vocab(with_added_tokens=True)
    text_vocab = len(vocab) - 1
    assert sorted(vocab.values()) == list(range(len(vocab)))  # dense ids
    assert vocab["<|image|>"] == text_vocab == max(vocab.values())
    assert 300 <= text_vocab <= 600
    bos = vocab["<|begin_of_text|>"]
    assert {t: vocab[t] - bos for t in LLAMA3_SPECIAL_OFFSETS} == LLAMA3_SPECIAL_OFFSETS
    assert tok.encode("<|image|>Describe", add_special_tokens=False).ids[0] == text_vocab


def test_captions_tokenize_and_round_trip(tok, hf_tok):
    image_id = tok.token_to_id("<|image|>")
    words = set()
    for text in _texts():
        enc = tok.encode(text, add_special_tokens=False)
        assert all(i < image_id for i in enc.ids)
        assert tok.decode(enc.ids) == text
        assert hf_tok.decode(enc.ids) == text
        assert hf_tok(text).input_ids == [tok.token_to_id("<|begin_of_text|>")] + enc.ids
        words.update(t.lstrip("Ġ") for t in enc.tokens)
    # every word of both caption languages is a single token
    assert set(demo.COLOURS) | set(demo.KINDS) | {"above", "left", "of", "shape", "shapes"} <= words


def test_byte_fallback_round_trip(tok):
    text = "Ünïcödé — 形状 🙂\ttabs\r\n and 12345 <not special>"
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.decode(enc.ids) == text
    assert tok.token_to_id("<unk>") is None


def test_chat_template_matches_transformers(hf_tok):
    config = json.loads((BUILTIN / "tokenizer_config.json").read_text())
    template = config["chat_template"]
    assert json.loads((BUILTIN / "chat_template.json").read_text())["chat_template"] == template
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    answer = {"role": "assistant", "content": [{"type": "text", "text": "a red circle above a blue square"}]}
    conversations = [
        (USER_TURN, True),
        (USER_TURN + [answer], False),
        ([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}], False),
    ]
    for messages, gen in conversations:
        ours = env.from_string(template).render(
            messages=messages, add_generation_prompt=gen, bos_token="<|begin_of_text|>"
        )
        theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours == theirs
    assert hf_tok.apply_chat_template(USER_TURN, tokenize=False, add_generation_prompt=True) == RENDERED_USER_TURN
    rendered = hf_tok.apply_chat_template(USER_TURN + [answer], tokenize=False)
    assert rendered == RENDERED_USER_TURN + "a red circle above a blue square<|eot_id|>"


def test_transformers_loads_the_directory(tok, hf_tok):
    assert len(hf_tok) == tok.get_vocab_size()
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    )
    direct = transformers.PreTrainedTokenizerFast(tokenizer_file=str(BUILTIN / "tokenizer.json"))
    assert direct(RENDERED_USER_TURN, add_special_tokens=False).input_ids == tok.encode(
        RENDERED_USER_TURN, add_special_tokens=False
    ).ids
    chat = hf_tok.apply_chat_template(USER_TURN, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = chat["input_ids"]
    assert ids == tok.encode(RENDERED_USER_TURN, add_special_tokens=False).ids
    assert ids.count(tok.token_to_id("<|image|>")) == 1

    gen = transformers.GenerationConfig.from_pretrained(str(BUILTIN))
    assert gen.do_sample is False
    assert gen.eos_token_id == [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    assert (gen.bos_token_id, gen.pad_token_id) == (hf_tok.bos_token_id, hf_tok.pad_token_id)


def test_processor_tiles_a_drawn_image(tok):
    processor = transformers.AutoProcessor.from_pretrained(str(BUILTIN))
    assert type(processor).__name__ == "MllamaProcessor"
    image = demo.draw(demo.random_spec(random.Random(9)))
    text = processor.apply_chat_template(USER_TURN, add_generation_prompt=True)
    out = processor(images=image, text=text, add_special_tokens=False, return_tensors="pt")
    s = demo.IMAGE_SIZE
    assert tuple(out["pixel_values"].shape) == (1, 1, 1, 3, s, s)
    assert out["aspect_ratio_ids"].tolist() == [[1]]
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    expected = ((np.asarray(image) / 255.0 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(out["pixel_values"][0, 0, 0].numpy(), expected, atol=1e-5)
    ids = out["input_ids"][0].tolist()
    assert ids == tok.encode(RENDERED_USER_TURN, add_special_tokens=False).ids
    image_at = ids.index(tok.token_to_id("<|image|>"))
    assert out["cross_attention_mask"][0, :, 0, 0].tolist() == [0] * image_at + [1] * (len(ids) - image_at)


def test_builtin_files_come_from_the_script(tmp_path):
    import make_builtin_tokenizer as script  # tools/, on the path through conftest.py

    script.write_files(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in BUILTIN.iterdir() if p.name in written)
    for name in written:
        assert (tmp_path / name).read_bytes() == (BUILTIN / name).read_bytes(), name
