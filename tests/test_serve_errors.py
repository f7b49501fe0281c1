"""Bad requests get OpenAI's error JSON with the right 4xx and a message naming the problem, and the server still
answers correctly afterwards. The server here requires an API key, reads local files only from one folder, and
has small image and body limits."""
import asyncio
import base64
import http.server
import threading

import httpx
import openai
import pytest
from PIL import Image

import llama_mm
from llama_mm.serve.media import MediaLimits
from serve_server import data_url, png_bytes, random_images, start_server, write_chat_checkpoint

KEY = "sk-test-123"
IMAGE = random_images([(40, 40)])[0]
BIG = Image.new("RGB", (150, 150), (200, 30, 30))  # 22500 pixels (a small PNG): over the pixel limit below


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("serve_err"))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "ok.png").write_bytes(png_bytes(IMAGE))
    (d.parent / "secret.png").write_bytes(png_bytes(IMAGE))
    return d


@pytest.fixture(scope="module")
def server(ckpt, media_dir):
    limits = MediaLimits(max_bytes=60_000, max_pixels=20_000, fetch_timeout_s=5, allowed_dir=media_dir)
    service, srv = start_server(ckpt, api_key=KEY, max_body_bytes=200_000, limits=limits, max_batch=4,
                                kv_cache_mb=32)
    yield service, srv
    srv.stop()


@pytest.fixture(scope="module")
def expected(ckpt):
    """The correct greedy answer to a small image request, from the single-request Generator."""
    gen = llama_mm.Generator(ckpt)
    return gen.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
                    images=[IMAGE], max_new_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def image_host():
    """A local HTTP server with one image and one large file (http(s) image_url fetching)."""
    files = {"/cat.png": png_bytes(IMAGE), "/huge.bin": b"\0" * 100_000}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = files.get(self.path)
            self.send_response(200 if data else 404)
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def post(server, path, body=None, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server[1].url + path, json=body, headers=headers, timeout=60, **kw)


def image_request(model, url, text="What?", role="user", **extra):
    return {"model": model, "max_tokens": 8, "temperature": 0, **extra,
            "messages": [{"role": role, "content": [{"type": "image_url", "image_url": {"url": url}},
                                                    {"type": "text", "text": text}]}]}


def assert_error(r, status, *words, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param
    return err


@pytest.fixture(autouse=True)
def still_answers(server, expected):
    """After every bad request the server still gives the right answer."""
    yield
    r = post(server, "/v1/chat/completions", image_request(server[0].model_id, data_url(IMAGE)))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected


def test_api_key(server):
    m = server[0].model_id
    body = {"model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert_error(post(server, "/v1/chat/completions", body, key=None), 401, "API key")
    assert_error(post(server, "/v1/chat/completions", body, key="wrong"), 401, "API key")
    assert httpx.get(server[1].url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[1].url + "/v1", api_key="nope", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=server[1].url + "/v1", api_key=KEY, max_retries=0)
    assert [x.id for x in ok.models.list().data] == [m]
    assert httpx.get(server[1].url + "/health").status_code == 200  # outside /v1: no key needed


def test_malformed_json(server):
    r = httpx.post(server[1].url + "/v1/chat/completions", content=b'{"model": "x", "messages": [',
                   headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    assert_error(r, 400, "malformed JSON")


@pytest.mark.parametrize("field,value,param,words", [
    ("temperature", "hot", "temperature", ["temperature", "number"]),
    ("max_tokens", 0, "max_tokens", ["max_tokens", "greater than or equal to 1"]),
    ("n", 0, "n", ["n:"]),
    ("messages", "hello", "messages", ["messages", "list"]),
    ("stream", "maybe", "stream", ["stream", "bool"]),
    ("top_logprobs", 50, "top_logprobs", ["top_logprobs", "20"]),
    ("tools", [{"type": "function"}], "tools", ["tools"]),
])
def test_wrong_types(server, field, value, param, words):
    body = {"model": server[0].model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            field: value}
    assert_error(post(server, "/v1/chat/completions", body), 400, *words, param=param)


def test_missing_field_and_bad_role(server):
    assert_error(post(server, "/v1/chat/completions", {"model": server[0].model_id}), 400, "messages",
                 param="messages")
    body = {"model": server[0].model_id, "messages": [{"role": "robot", "content": "hi"}]}
    assert_error(post(server, "/v1/chat/completions", body), 400, "messages.0.role")


def test_unknown_model(server):
    body = {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}
    err = assert_error(post(server, "/v1/chat/completions", body), 404, "gpt-9", param="model")
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=server[1].url + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def test_image_slots(server):
    m = server[0].model_id
    assert_error(post(server, "/v1/chat/completions", image_request(m, data_url(IMAGE), text="and <|image|> too")),
                 400, "2 <|image|> slot(s) for 1 image(s)", param="messages")
    assert_error(post(server, "/v1/chat/completions", image_request(m, data_url(IMAGE), role="assistant")), 400,
                 "images can only be in user messages", param="messages[0].content[0].image_url")
    body = {"model": m, "prompt": "<|image|>A picture of", "max_tokens": 4}
    assert_error(post(server, "/v1/completions", body), 400, "prompt", "<|image|>")


@pytest.mark.parametrize("url,status,words", [
    ("data:image/png;base64," + base64.b64encode(b"definitely not an image").decode(), 400, ["not a readable image"]),
    ("data:image/png;base64,@@not base64@@", 400, ["invalid base64"]),
    ("data:image/png,rawdata", 400, ["data:image/png;base64"]),
    ("ftp://example.com/cat.png", 400, ["unsupported URL scheme 'ftp'"]),
    ("file:///etc/passwd", 400, ["outside the allowed media folder"]),
    ("../secret.png", 400, ["outside the allowed media folder"]),
    ("missing.png", 400, ["no such file"]),
])
def test_bad_images(server, url, status, words):
    err = assert_error(post(server, "/v1/chat/completions", image_request(server[0].model_id, url)), status, *words)
    assert err["param"] == "messages[0].content[0].image_url"


def test_oversized_images(server):
    m = server[0].model_id
    big_bytes = random_images([(140, 140)], seed=2)[0]  # ~59 KB of noise as PNG, 19600 pixels
    data = png_bytes(big_bytes) + b"\0" * 2000  # over 60000 bytes, under the 200000-byte body limit
    assert_error(post(server, "/v1/chat/completions", image_request(m, data_url(data))), 400,
                 "exceeds the limit of 60000 bytes")
    assert_error(post(server, "/v1/chat/completions", image_request(m, data_url(BIG))), 400,
                 "150x150 = 22500 pixels exceeds the limit of 20000")


def test_local_file_inside_allowed_dir(server, media_dir, expected):
    for url in ("ok.png", f"file://{media_dir}/ok.png"):
        r = post(server, "/v1/chat/completions", image_request(server[0].model_id, url))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected


def test_http_image_urls(server, image_host, expected):
    m = server[0].model_id
    r = post(server, "/v1/chat/completions", image_request(m, image_host + "/cat.png"))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected
    assert_error(post(server, "/v1/chat/completions", image_request(m, image_host + "/nothing.png")), 400,
                 "HTTP 404")
    assert_error(post(server, "/v1/chat/completions", image_request(m, image_host + "/huge.bin")), 400,
                 "exceeds the limit of 60000 bytes")


def test_context_and_sampling_values(server):
    m = server[0].model_id
    hi = [{"role": "user", "content": "hi"}]
    err = assert_error(post(server, "/v1/chat/completions", {"model": m, "messages": hi, "max_tokens": 100000}),
                       400, "beyond the model's context of 512 tokens", param="max_tokens")
    assert err["code"] == "context_length_exceeded"
    assert_error(post(server, "/v1/chat/completions", {"model": m, "messages": hi, "max_completion_tokens": 600}),
                 400, "max_completion_tokens 600", param="max_completion_tokens")
    for field, value, words in [("top_p", 0.0, "top_p must be in (0, 1]"), ("top_p", 1.5, "top_p must be in (0, 1]"),
                                ("top_k", -1, "top_k must be an integer >= 0"), ("min_p", 2.0, "min_p must be in"),
                                ("repetition_penalty", 0, "repetition_penalty must be > 0")]:
        body = {"model": m, "messages": hi, "max_tokens": 2, field: value}
        assert_error(post(server, "/v1/chat/completions", body), 400, words, param=field)


def test_oversized_body(server):
    body = {"model": server[0].model_id, "messages": [{"role": "user", "content": "x" * 300_000}]}
    assert_error(post(server, "/v1/chat/completions", body), 413, "exceeds the limit of 200000 bytes")


def test_unknown_route(server):
    r = httpx.get(server[1].url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert_error(r, 404, "Not Found")


def test_full_queue_answers_429(ckpt):
    """max_batch 1, max_queue 1: of 8 simultaneous requests some are refused with 429 + Retry-After, the rest
    complete correctly."""
    service, srv = start_server(ckpt, max_batch=1, max_queue=1, kv_cache_mb=16)
    try:
        body = {"model": service.model_id, "messages": [{"role": "user", "content": "Tell me everything."}],
                "max_tokens": 60, "temperature": 0}

        async def main():
            async with httpx.AsyncClient(timeout=120) as c:
                return await asyncio.gather(*(c.post(srv.url + "/v1/chat/completions", json=body)
                                              for _ in range(8)))

        responses = asyncio.run(main())
        refused = [r for r in responses if r.status_code == 429]
        done = [r for r in responses if r.status_code == 200]
        assert refused and done and len(refused) + len(done) == 8
        for r in refused:
            assert_error(r, 429, "busy")
            assert int(r.headers["Retry-After"]) >= 1
        assert len({r.json()["choices"][0]["message"]["content"] for r in done}) == 1
    finally:
        srv.stop()
