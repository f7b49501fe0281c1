"""The image cache: cached and uncached requests give identical tensors and tokens (bit for bit), the LRU byte
budget evicts the least recently used image, 0 disables it, an image whose K/V exceed the budget keeps its states,
and different images never share an entry. The independent reference for the cached K/V is the PyTorch model: its
batched vision tower over all images at once (`MllamaModel.vision_states`) and its cross layers' own k/v
projections (`MllamaModel.cross_kv`)."""
import threading

import pytest
import torch
from PIL import Image

import llama_mm
from llama_mm.engine import Engine, request_tensors
from llama_mm.image_cache import KV, STATES, ImageCache, image_key
from checkpoints import build_reference, random_inputs, write_checkpoint
from tokenizer_fixture import write_tokenizer_files

N_NEW = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref = build_reference(attn_implementation="sdpa", seed=31)
    model = llama_mm.load_model(write_checkpoint(tmp_path_factory.mktemp("ck"), ref))
    return ref, model, Engine(model)


def image_bytes(model, tiles: int) -> int:
    """One image's cross-layer K/V: layers x (K, V) x keys x kv heads x head dim."""
    t = model.cfg.text
    keys = tiles * model.cfg.vision.num_patches
    return len(t.cross_attention_layers) * 2 * keys * t.num_key_value_heads * t.hidden_size // t.num_attention_heads \
        * model.dtype.itemsize


def states_bytes(model, tiles: int) -> int:
    return tiles * model.cfg.vision.num_patches * model.cfg.text.hidden_size * model.dtype.itemsize


def batched_reference(model, inputs) -> torch.Tensor:
    """The PyTorch model's cross K/V of all images at once -> [L, 2, B, Hkv, S, D]."""
    with torch.inference_mode():
        states = model.vision_states(inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
        return torch.stack([torch.stack(kv) for kv in model.cross_kv(states).values()])


def shared_image_batch(ref):
    """Two rows whose (one) image is the same photo, different text."""
    inputs = random_inputs(ref, batch=2, seq=10, aspect_ratios=((2, 1),), seed=7)
    for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        inputs[k][1] = inputs[k][0]
    return inputs


CASES = {
    "one-image": lambda ref: random_inputs(ref, seq=10, aspect_ratios=((1, 2),), seed=1),
    "two-images": lambda ref: random_inputs(ref, seq=12, images_per_row=2, aspect_ratios=((1, 2), (2, 2)), seed=2),
    "batch-sharing-an-image": shared_image_batch,
}


@pytest.mark.parametrize("case", list(CASES))
def test_cached_equals_uncached(setup, case):
    ref, model, engine = setup
    inputs = CASES[case](ref)
    B, N = inputs["aspect_ratio_ids"].shape
    distinct = N if case != "batch-sharing-an-image" else 1
    cache = ImageCache(2**30)
    plain = request_tensors(engine, inputs)
    first = request_tensors(engine, inputs, cache)
    again = request_tensors(engine, inputs, cache)
    assert cache.stats()["misses"] == distinct and cache.stats()["hits"] == distinct and len(cache) == distinct
    for a, b, c in zip(plain, first, again):
        assert (a is None and b is None and c is None) or (torch.equal(a, b) and torch.equal(a, c))
    torch.testing.assert_close(plain[2], batched_reference(model, inputs), rtol=1e-5, atol=1e-5)
    if case == "batch-sharing-an-image":
        assert torch.equal(plain[2][:, :, 0], plain[2][:, :, 1])
    ids = engine.run(inputs, N_NEW)
    assert torch.equal(ids, engine.run(inputs, N_NEW, image_cache=cache))
    assert torch.equal(ids, engine.run(inputs, N_NEW, image_cache=cache))
    with torch.inference_mode():  # the logits too: prefill from cached K/V
        logits = engine.native.start(*request_tensors(engine, inputs), 1)
        cached = engine.native.start(*request_tensors(engine, inputs, cache), 1)
    assert torch.equal(logits, cached)


def one_image(ref, seed, ratio=(1, 1)):
    return random_inputs(ref, seq=8, aspect_ratios=(ratio,), seed=seed)


def test_lru_eviction_by_budget(setup):
    ref, model, engine = setup
    a, b, c = (one_image(ref, s) for s in (11, 12, 13))
    size = image_bytes(model, 4)  # every image is padded to max_num_tiles tiles
    cache = ImageCache(2 * size)  # room for two
    for x in (a, b, a, c):  # a is used again before c arrives: b is the least recently used
        request_tensors(engine, x, cache)
    s = cache.stats()
    assert (s["misses"], s["hits"], s["evictions"], s["entries"], s["bytes"]) == (3, 1, 1, 2, 2 * size)
    request_tensors(engine, a, cache)
    request_tensors(engine, c, cache)
    assert cache.stats()["hits"] == 3
    request_tensors(engine, b, cache)
    assert cache.stats()["misses"] == 4 and cache.stats()["evictions"] == 2


def test_repeated_image_after_eviction(setup):
    ref, model, engine = setup
    a, b = one_image(ref, 21, (2, 2)), one_image(ref, 22, (1, 3))
    cache = ImageCache(image_bytes(model, 4))  # one image
    first = engine.run(a, N_NEW, image_cache=cache)
    states = request_tensors(engine, a, cache)[2]
    engine.run(b, N_NEW, image_cache=cache)  # evicts a
    assert cache.stats()["evictions"] == 1
    assert torch.equal(engine.run(a, N_NEW, image_cache=cache), first)
    assert torch.equal(request_tensors(engine, a, cache)[2], states)
    assert cache.stats()["misses"] == 3 and cache.stats()["hits"] == 2


def test_zero_disables(setup):
    ref, model, engine = setup
    a = one_image(ref, 31)
    cache = ImageCache(0)
    assert not cache.enabled
    outs = [request_tensors(engine, a, cache)[2] for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    assert cache.stats() == {"hits": 0, "misses": 0, "evictions": 0, "entries": 0, "bytes": 0, "max_bytes": 0}
    small = ImageCache(states_bytes(model, 4) - 1)  # an image whose K/V and states exceed the budget: not stored
    request_tensors(engine, a, small)
    assert len(small) == 0 and small.stats()["bytes"] == 0


def test_one_image_is_read_in_place(setup):
    """A one-image request gets the cached K/V themselves, and serving from them leaves them as they were."""
    ref, model, engine = setup
    a = one_image(ref, 51, (2, 2))
    cache = ImageCache(2**30)
    kv = request_tensors(engine, a, cache)[2]
    kind, entry = next(iter(cache._entries.values()))
    assert kind == KV and kv.data_ptr() == entry.data_ptr()
    before = entry.clone()
    engine.run(a, N_NEW, image_cache=cache)
    assert torch.equal(entry, before)


def test_states_when_kv_exceed_the_budget(setup):
    """Budget for the image's states but not its K/V: the states are kept, the tower skipped, the K/V recomputed
    from them; the same numbers as without a cache."""
    ref, model, engine = setup
    a = one_image(ref, 61, (1, 2))
    assert states_bytes(model, 4) < image_bytes(model, 4)  # this checkpoint's K/V are larger than its states
    cache = ImageCache(states_bytes(model, 4))
    plain = request_tensors(engine, a)[2]
    first = request_tensors(engine, a, cache)[2]
    kind, entry = next(iter(cache._entries.values()))
    assert kind == STATES and cache.stats()["bytes"] == states_bytes(model, 4)
    calls = []
    tower = model.vision_states
    model.vision_states = lambda *args: calls.append(1) or tower(*args)
    try:
        again = request_tensors(engine, a, cache)[2]
    finally:
        del model.vision_states
    assert calls == [] and cache.stats()["hits"] == 1
    assert torch.equal(plain, first) and torch.equal(plain, again)


def test_bad_entry_kind():
    with pytest.raises(ValueError, match="'kv' or 'states'"):
        ImageCache(100).put(b"k", "pixels", torch.zeros(1))


def test_different_images_never_collide(setup):
    ref, model, engine = setup
    wide = one_image(ref, 41, (1, 2))
    tall = dict(wide, aspect_ratio_ids=torch.full_like(wide["aspect_ratio_ids"], 5))  # (2, 1): same pixels
    pixel = dict(wide, pixel_values=wide["pixel_values"].clone())
    pixel["pixel_values"][0, 0, 0, 0, 0, 0] += 1e-3  # one value differs
    fewer = dict(wide, aspect_ratio_ids=torch.ones_like(wide["aspect_ratio_ids"]),
                 aspect_ratio_mask=torch.tensor([[[1, 0, 0, 0]]]))  # (1, 1): same pixels, one tile
    cache = ImageCache(2**30)
    for x in (wide, tall, pixel, fewer):
        request_tensors(engine, x, cache)
        got = request_tensors(engine, x, cache)[2]
        torch.testing.assert_close(got, batched_reference(model, x), rtol=1e-5, atol=1e-5)
    assert cache.stats()["entries"] == 4 and cache.stats()["hits"] == 4
    keys = {image_key(x["pixel_values"][0, 0], x["aspect_ratio_ids"][0, 0], x["aspect_ratio_mask"][0, 0], dt,
                      torch.device("cpu")) for x in (wide, tall, pixel, fewer) for dt in (torch.float32, torch.bfloat16)}
    assert len(keys) == 8


def test_thread_safe_budget():
    cache = ImageCache(10 * 400)  # ten entries of 100 fp32 values

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(300):
            key = bytes([int(torch.randint(0, 30, (1,), generator=g))])
            if cache.get(key) is None:
                cache.put(key, KV, torch.full((100,), float(key[0])))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = cache.stats()
    assert s["hits"] + s["misses"] == 1200
    assert s["bytes"] == 400 * s["entries"] <= 4000
    assert all(float(cache._entries[k][1][0]) == k[0] for k in list(cache._entries))


def test_bad_budget():
    for bad in (-1, "512", True):
        with pytest.raises(ValueError, match="image_cache_mb"):
            ImageCache.from_mb(bad)


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    import json

    d = tmp_path_factory.mktemp("gen")
    write_tokenizer_files(d, vocab_size=1000)
    write_checkpoint(d, build_reference(dict(vocab_size=1000), seed=5))
    pre = json.loads((d / "preprocessor_config.json").read_text())
    pre["size"] = {"height": 28, "width": 28}  # the tiny vision tower's tile
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    return d


def test_generator_shares_the_cache(gen_dir):
    """generate, stream, chat and a batch all go through one cache; the answers equal an uncached Generator's."""
    g = torch.Generator().manual_seed(0)
    photo = Image.fromarray((torch.rand(50, 90, 3, generator=g) * 255).byte().numpy())
    cached, plain = llama_mm.Generator(gen_dir), llama_mm.Generator(gen_dir, image_cache_mb=0)
    assert cached.image_cache.max_bytes == 512 * 2**20
    kw = dict(max_new_tokens=8, temperature=0)
    calls = [
        lambda gen: gen.generate(photo, "Describe it.", **kw),
        lambda gen: gen.generate(photo, "What colour?", **kw),  # same image, another prompt: a hit
        lambda gen: "".join(gen.stream(photo, "Stream it.", **kw)),
        lambda gen: gen.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                             images=[photo], **kw),
        lambda gen: gen.generate(prompt=["One", "Two"], images=[[photo], [photo]], **kw),
    ]
    for call in calls:
        assert call(cached) == call(plain)
    assert cached.image_cache.stats()["misses"] == 1 and cached.image_cache.stats()["hits"] == 4
    assert plain.image_cache.stats()["entries"] == 0
