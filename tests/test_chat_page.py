"""The chat page at `/` in a real headless Chromium (Playwright driving Debian's /usr/bin/chromium): attach a
drawn image, ask the built-in model about it, the answer streams in and equals the API's greedy answer to the same
request; a second turn carries the history."""
import random
from pathlib import Path

import openai
import pytest

from llama_mm import demo
from serve_server import data_url, png_bytes, start_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def server():
    service, srv = start_server(None, max_batch=4, kv_cache_mb=32)
    yield service, srv
    srv.stop()


@pytest.fixture(scope="module")
def page(server):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (tools/test.sh does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page()
        pg.goto(server[1].url + "/")
        yield pg
        browser.close()


def ask(page, text, image_path=None) -> str:
    """Attach, type, send; wait for the stream to end; the last assistant bubble's text."""
    n = page.locator(".msg.assistant").count()
    if image_path is not None:
        page.set_input_files("#file", str(image_path))
        page.wait_for_selector("#attachments img")
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length > {n} && "
                           "document.getElementById('status').dataset.state === 'done'", timeout=60_000)
    return page.locator(".msg.assistant .text").last.text_content()


def test_page_streams_the_api_answer(server, page, tmp_path):
    service, srv = server
    spec = demo.random_spec(random.Random(5))
    path = tmp_path / "shapes.png"
    path.write_bytes(png_bytes(demo.draw(spec)))
    assert page.locator("#model").text_content() == service.model_id

    shown = ask(page, demo.PROMPT, path)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    first = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(path.read_bytes())}},
                                         {"type": "text", "text": demo.PROMPT}]}
    answer = client.chat.completions.create(model=service.model_id, messages=[first], temperature=0,
                                            max_tokens=256).choices[0].message.content
    assert shown == answer and answer  # the page's streamed text is the API's greedy answer
    assert page.locator(".msg.user img").count() == 1

    shown2 = ask(page, "Again, please.")
    history = [first, {"role": "assistant", "content": answer},
               {"role": "user", "content": [{"type": "text", "text": "Again, please."}]}]
    answer2 = client.chat.completions.create(model=service.model_id, messages=history, temperature=0,
                                             max_tokens=256).choices[0].message.content
    assert shown2 == answer2
