"""Shared by the server tests: a tiny random chat checkpoint with the Llama-3.2-Vision tokenizer and chat template,
a real uvicorn server on 127.0.0.1 (a free port) in a background thread, and images as data: URLs."""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from pathlib import Path

import torch
from PIL import Image

from checkpoints import build_reference, write_checkpoint
from tokenizer_fixture import write_tokenizer_files

V = 1000


def write_chat_checkpoint(d: Path, seed: int = 3) -> Path:
    """Every parameter random (fp32), 512-token context, a 28 px tile; greedy needs temperature=0 (the
    generation_config samples, like the real Instruct checkpoints)."""
    from tokenizers import Tokenizer

    write_tokenizer_files(d, vocab_size=V)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>",
                                            "<|finetune_right_pad_id|>")}
    eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
    ref = build_reference(dict(vocab_size=V, bos_token_id=ids["<|begin_of_text|>"], eos_token_id=eos,
                               pad_token_id=ids["<|finetune_right_pad_id|>"]), seed=seed, attn_implementation="sdpa")
    write_checkpoint(d, ref)
    pre = json.loads((d / "preprocessor_config.json").read_text())
    pre["size"] = {"height": 28, "width": 28}
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": eos,
         "pad_token_id": ids["<|finetune_right_pad_id|>"], "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    return d


def random_images(sizes, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for h, w in sizes]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Image.Image | bytes) -> str:
    data = image if isinstance(image, bytes) else png_bytes(image)
    return "data:image/png;base64," + base64.b64encode(data).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread; `stop()` runs uvicorn's shutdown (and the app's
    lifespan end, which closes the engine)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def metric(text: str, name: str, **labels) -> float:
    """The sum of the samples called `name` whose labels include `labels` in prometheus text (0 when none has
    them; KeyError when the metric is not exported at all)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(text))
    if not any(name.startswith(f.name) for f in families):  # counters' samples add _total, histograms' _count
        raise KeyError(f"metric {name} not in /metrics")
    samples = [s for f in families for s in f.samples if s.name == name]
    return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))


def start_server(model_dir, api_key=None, max_body_bytes=None, **service_kwargs):
    """build_service + create_app + ServerThread: (service, server)."""
    from llama_mm.serve import build_service
    from llama_mm.serve.app import create_app

    service = build_service(model_dir, **service_kwargs)
    kwargs = {} if max_body_bytes is None else {"max_body_bytes": max_body_bytes}
    return service, ServerThread(create_app(service, api_key=api_key, **kwargs))
