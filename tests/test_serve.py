"""`llama-mm serve` end to end with the official `openai` client against a real uvicorn server on a tiny random
checkpoint (fp32): answers equal `Generator.chat` / `Generator.generate` on the same checkpoint (the single-request
engine, an independent path), streams concatenate to the same text, logprobs equal the pure-PyTorch model's
log-softmax, 200 concurrent requests each get the answer they get alone, dropped streams free their KV blocks, and
SIGTERM shuts the CLI server down."""
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

import llama_mm
from serve_server import data_url, free_port, metric, random_images, start_server, write_chat_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def gen(ckpt):
    return llama_mm.Generator(ckpt)


@pytest.fixture(scope="module")
def server(ckpt):
    service, srv = start_server(ckpt, max_batch=16, kv_cache_mb=64)
    yield service, srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1].url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_id(server):
    return server[0].model_id


IMAGES = random_images([(40, 90), (70, 30), (28, 28), (50, 50)])


def user(text, images=()):
    """(OpenAI message, template message) for one user turn with images first."""
    parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    return ({"role": "user", "content": parts + [{"type": "text", "text": text}]},
            {"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]})


CONVERSATIONS = {
    "one image": ([user("What is in this picture?", IMAGES[:1])], IMAGES[:1]),
    "two images": ([user("Compare these two.", IMAGES[1:3])], IMAGES[1:3]),
    "text only": ([user("Tell me a story.")], []),
    "multi-turn": ([{"role": "system", "content": "You are terse."}, user("Describe it.", IMAGES[3:4]),
                    {"role": "assistant", "content": "A square of noise."}, user("And the colours?")],
                   IMAGES[3:4]),
}


def split(conversation):
    """OpenAI messages and the same conversation in the chat template's form."""
    openai_msgs = [m[0] if isinstance(m, tuple) else m for m in conversation]
    template_msgs = [m[1] if isinstance(m, tuple) else m for m in conversation]
    return openai_msgs, template_msgs


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_matches_generator(client, model_id, gen, name):
    conversation, images = CONVERSATIONS[name]
    msgs, template = split(conversation)
    r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=24, temperature=0)
    expected = gen.chat(template, images=images or None, max_new_tokens=24, temperature=0)
    assert r.choices[0].message.content == expected
    assert r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.model == model_id
    text = gen.processor.apply_chat_template(template, add_generation_prompt=True)
    prompt_tokens = gen.processor(images=[images] if images else None, text=[text])["input_ids"].shape[1]
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.completion_tokens == gen.last_token_count
    assert r.usage.total_tokens == prompt_tokens + gen.last_token_count
    assert r.choices[0].finish_reason == ("length" if gen.last_token_count == 24 else "stop")


@pytest.mark.parametrize("name", ["text only", "one image"])
def test_no_max_tokens_gets_what_the_pool_holds(ckpt, gen, name):
    """Without max_tokens (the openai client's default) a request may run to what the model's context and the whole
    KV pool hold: on a pool of 12 blocks (192 tokens, fewer than the 512-token context) it is answered, with the
    budget computed here from the config, instead of refused for not fitting the context."""
    t = gen.model.cfg.text
    D, Hkv = t.hidden_size // t.num_attention_heads, t.num_key_value_heads
    n_cross = len(t.cross_attention_layers)
    block = (t.num_hidden_layers - n_cross) * 2 * Hkv * 16 * D * 4  # bytes of one 16-token block, fp32
    service, srv = start_server(ckpt, kv_cache_mb=12 * block / 2**20)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        conversation, images = CONVERSATIONS[name]
        msgs, template = split(conversation)
        r = client.chat.completions.create(model=service.model_id, messages=msgs, temperature=0)
    finally:
        srv.stop()
    image_keys = len(images) * gen.model.cfg.vision.max_num_tiles * gen.model.cfg.vision.num_patches
    image_blocks = -(-image_keys * n_cross * 2 * Hkv * D * 4 // block)
    budget = (12 - image_blocks) * 16 - r.usage.prompt_tokens
    expected = gen.chat(template, images=images or None, max_new_tokens=budget, temperature=0)
    assert 0 < budget < 512 - r.usage.prompt_tokens
    assert r.choices[0].message.content == expected
    assert r.usage.completion_tokens == gen.last_token_count <= budget
    assert r.choices[0].finish_reason == ("length" if gen.last_token_count == budget else "stop")


def test_stream_concatenates_to_the_same_text(client, model_id):
    msgs, _ = split(CONVERSATIONS["two images"][0])
    whole = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model=model_id, messages=msgs, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces) == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_raw_stream_ends_with_done(server, model_id):
    body = {"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0,
            "stream": True}
    r = httpx.post(server[1].url + "/v1/chat/completions", json=body, timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_n_choices_with_seed(client, model_id, gen):
    conversation, images = CONVERSATIONS["one image"]
    msgs, template = split(conversation)
    kw = dict(model=model_id, messages=msgs, max_tokens=16, temperature=1.0, top_p=1.0, seed=11, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]  # reproducible
    assert len(set(texts)) > 1  # different seeds per choice
    expected, tokens = [], 0
    for j in range(3):
        expected.append(gen.chat(template, images=images, max_new_tokens=16, temperature=1.0, top_p=1.0, seed=11 + j))
        tokens += gen.last_token_count
    assert texts == expected
    assert a.usage.completion_tokens == tokens


def test_logprobs_equal_log_softmax(client, model_id, gen):
    conversation, images = CONVERSATIONS["one image"]
    msgs, template = split(conversation)
    r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=4)
    content = r.choices[0].logprobs.content
    text = gen.processor.apply_chat_template(template, add_generation_prompt=True)
    inputs = gen.processor(images=[images], text=[text])
    new = gen.generate_ids(inputs, 12, temperature=0)[0, :gen.last_token_count]
    ends = set(gen.stop_ids)
    n = sum(1 for t in new.tolist() if t not in ends)
    assert len(content) == n
    full = {k: v for k, v in inputs.items() if k != "num_tiles"}
    full["input_ids"] = torch.cat([inputs["input_ids"], new[None]], 1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    full["cross_attention_mask"] = torch.cat(
        [inputs["cross_attention_mask"], inputs["cross_attention_mask"][:, -1:].expand(1, len(new), -1, -1)], 1)
    with torch.inference_mode():
        logits = gen.model(**full).logits[0].float()  # (T + N, V): the pure-PyTorch model, teacher-forced
    T = inputs["input_ids"].shape[1]
    logp = torch.log_softmax(logits[T - 1:T - 1 + n], -1)
    top = torch.topk(logp, 4, -1)
    for j, entry in enumerate(content):
        assert entry.logprob == pytest.approx(logp[j, new[j]].item(), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values[j].tolist(), abs=1e-4)
        assert entry.top_logprobs[0].bytes == entry.bytes  # greedy: the chosen token is the most likely
    assert bytes(b for e in content for b in e.bytes).decode(errors="replace") == r.choices[0].message.content


def test_completions_raw_prompt(client, model_id, gen):
    r = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=16, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == gen.generate(prompt="Once upon a time", max_new_tokens=16, temperature=0, chat=False)
    streamed = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=16, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    two = client.completions.create(model=model_id, prompt=["Once upon a time", "The end"], max_tokens=8,
                                    temperature=0, logprobs=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[1].text == gen.generate(prompt="The end", max_new_tokens=8, temperature=0, chat=False)
    lp = two.choices[0].logprobs
    assert "".join(lp.tokens) == two.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs)


def test_stop_strings_cut_and_finish(client, model_id, gen):
    msgs, template = split(CONVERSATIONS["text only"][0])
    full = gen.chat(template, max_new_tokens=40, temperature=0)
    stop = full[6:9]
    r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=40, temperature=0, stop=[stop, "@@"])
    assert r.choices[0].message.content == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    pieces = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=40, temperature=0, stop=stop,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == full[:full.find(stop)]


def test_models_health_metrics(server, client, model_id, ckpt):
    assert model_id == Path(ckpt).name
    assert [m.id for m in client.models.list().data] == [model_id]
    assert httpx.get(server[1].url + "/health").json()["status"] == "ok"
    text = httpx.get(server[1].url + "/metrics").text
    for name in ("llama_mm_requests_running", "llama_mm_requests_waiting", "llama_mm_requests_waiting_for_kv_blocks",
                 "llama_mm_kv_blocks_used",
                 "llama_mm_kv_blocks_total", "llama_mm_generated_tokens_total",
                 "llama_mm_time_to_first_token_seconds_count", "llama_mm_time_per_output_token_seconds_count",
                 "llama_mm_requests_finished_total"):
        metric(text, name)
    assert metric(text, "llama_mm_kv_blocks_total") > 0


def test_image_cache_serves_a_resent_image(server, client, model_id, ckpt):
    """The second request with the same image (another question) reads its vision states from the server's image
    cache: one miss then one hit in /metrics, and both answers equal a Generator's without any cache."""
    image = random_images([(61, 37)])[0]  # not used by any other test
    uncached = llama_mm.Generator(ckpt, image_cache_mb=0)
    before = httpx.get(server[1].url + "/metrics").text
    for question in ("What is this?", "Which colours are in it?"):
        msgs, template = split([user(question, [image])])
        r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == uncached.chat(template, images=[image], max_new_tokens=12,
                                                             temperature=0)
    after = httpx.get(server[1].url + "/metrics").text
    assert uncached.image_cache.stats()["hits"] == 0
    assert metric(after, "llama_mm_image_cache_misses_total") - metric(before, "llama_mm_image_cache_misses_total") == 1
    assert metric(after, "llama_mm_image_cache_hits_total") - metric(before, "llama_mm_image_cache_hits_total") == 1


def _wait_idle(url, timeout=60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics").text
        if metric(text, "llama_mm_requests_running") == 0 and metric(text, "llama_mm_requests_waiting") == 0:
            return text
        if time.monotonic() > deadline:
            raise AssertionError("requests still running:\n" + text)
        time.sleep(0.1)


def test_200_concurrent_requests_equal_alone(server, model_id, gen):
    specs = []
    for i in range(20):  # mixed prompt lengths, image counts and token budgets
        images = IMAGES[: i % 3]
        prompt = "Describe " + "and more " * (i * 3) + f"item {i}."
        specs.append((user(prompt, images), images, 4 + (i * 7) % 29))
    alone = [gen.chat([t], images=images or None, max_new_tokens=n, temperature=0) for (_, t), images, n in specs]

    async def main():
        client = openai.AsyncOpenAI(base_url=server[1].url + "/v1", api_key="unused", max_retries=0, timeout=300)
        gate = asyncio.Semaphore(32)

        async def one(k):
            (msg, _), _, n = specs[k % len(specs)]
            async with gate:
                r = await client.chat.completions.create(model=model_id, messages=[msg], max_tokens=n, temperature=0)
            return r.choices[0].message.content

        try:
            return await asyncio.gather(*(one(k) for k in range(200)))
        finally:
            await client.close()

    answers = asyncio.run(main())
    assert answers == [alone[k % len(specs)] for k in range(200)]
    assert metric(_wait_idle(server[1].url), "llama_mm_kv_blocks_used") == 0


def test_dropped_streams_return_their_blocks(server, model_id):
    url = server[1].url
    before = metric(httpx.get(url + "/metrics").text, "llama_mm_requests_finished_total", finish_reason="cancelled")
    body = {"model": model_id, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}},
        {"type": "text", "text": "Talk for a long time."}]}], "max_tokens": 400, "temperature": 1.0, "seed": 1,
            "stream": True, "stop": []}

    def drop(i):
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "seed": i}, timeout=120) as r:
            assert r.status_code == 200
            for n, _ in enumerate(r.iter_lines()):
                if n >= 4:  # the role chunk and a couple of tokens: then hang up mid-answer
                    break

    threads = [threading.Thread(target=drop, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text = _wait_idle(url)
    assert metric(text, "llama_mm_kv_blocks_used") == 0
    cancelled = metric(text, "llama_mm_requests_finished_total", finish_reason="cancelled") - before
    assert cancelled == 20


def test_dropped_non_streaming_requests_are_cancelled(server, model_id, gen, monkeypatch):
    """A client that gives up on a non-streaming answer (here: its read timeout) closes the connection; the server
    notices, cancels the request and frees its blocks instead of generating for nobody."""
    from llama_mm.serve import app as serve_app

    monkeypatch.setattr(serve_app, "DISCONNECT_POLL_S", 0.01)  # the in-process server reads it on every check
    # a greedy answer that runs to max_tokens (no end-of-turn token), so only a cancellation ends it early
    for i in range(20):
        prompt = f"Tell story number {i}."
        gen.chat([{"role": "user", "content": prompt}], max_new_tokens=400, temperature=0)
        if gen.last_token_count == 400:
            break
    else:
        raise AssertionError("no prompt with a 400-token greedy answer")
    url = server[1].url
    before = metric(httpx.get(url + "/metrics").text, "llama_mm_requests_finished_total", finish_reason="cancelled")
    body = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": 400,
            "temperature": 0, "stop": []}
    outcomes = []

    def give_up():
        try:
            httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.1))
            outcomes.append("answered")
        except httpx.ReadTimeout:
            outcomes.append("gave up")

    threads = [threading.Thread(target=give_up) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == ["gave up"] * 4
    text = _wait_idle(url)
    assert metric(text, "llama_mm_kv_blocks_used") == 0
    assert metric(text, "llama_mm_requests_finished_total", finish_reason="cancelled") - before == 4


def test_cli_serve_sigterm_graceful(tmp_path):
    port = free_port()
    # the llama_mm this test imported (the installed package in CI, python/ in a dev build)
    package_root = str(Path(llama_mm.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": package_root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "llama_mm.cli", "serve", "--port", str(port), "--max-batch", "4"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "llama_mm-builtin"
        body = {"model": "llama_mm-builtin", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 200,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)  # the request is running
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the running request finished its answer
        assert proc.wait(60) == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down
        log = proc.stdout.read().decode()
        assert "Waiting for application shutdown" in log and "llama-mm serve: engine closed" in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
