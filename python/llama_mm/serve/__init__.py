"""`llama-mm serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine,
with a chat page at `/`.

    llama-mm serve --model DIR --port 8000
    openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").chat.completions.create(...)
"""
from __future__ import annotations

from pathlib import Path

from .. import image_cache
from .media import MediaLimits

BUILTIN_MODEL_ID = "llama_mm-builtin"
MAX_BODY_BYTES = 64 * 2**20  # --max-body-bytes default


def build_service(model_dir=None, *, device=None, dtype=None, quantize=None, group_size=128, quantize_lm_head=False,
                  activations="float", max_batch=16, kv_cache_mb=512, max_queue=256,
                  image_cache_mb=image_cache.DEFAULT_MB, limits: MediaLimits | None = None,
                  model_id: str | None = None):
    """Loads the checkpoint (None: the built-in model) and starts a BatchEngine over it: a Service."""
    from ..batching import BatchEngine
    from ..generator import Generator
    from ..model import load_model
    from .metrics import Metrics
    from .service import Service

    text_side = Generator.__new__(Generator)  # processor, config, defaults: the weights load below
    text_side.init_text_side(model_dir)
    model = load_model(text_side.model_dir, device=device, dtype=dtype, progress=True, quantize=quantize,
                       group_size=group_size, quantize_lm_head=quantize_lm_head, activations=activations)
    engine = BatchEngine(model, max_batch=max_batch, kv_cache_mb=kv_cache_mb, max_queue=max_queue,
                         image_cache_mb=image_cache_mb)
    if model_id is None:
        model_id = BUILTIN_MODEL_ID if model_dir is None else Path(model_dir).resolve().name
    return Service(text_side, engine, model_id, limits or MediaLimits(), Metrics(engine))


def main(args) -> int:
    """Runs the server until SIGINT / SIGTERM (uvicorn's graceful shutdown: no new connections, running requests
    finish within --graceful-timeout seconds, what is left is cancelled, the engine closes)."""
    import uvicorn

    from .app import create_app

    limits = MediaLimits(max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels,
                         allowed_dir=Path(args.allowed_media_dir) if args.allowed_media_dir else None)
    if limits.allowed_dir is not None and not limits.allowed_dir.is_dir():
        raise ValueError(f"--allowed-media-dir {args.allowed_media_dir!r} is not a directory")
    service = build_service(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                            group_size=args.group_size, quantize_lm_head=args.quantize_lm_head,
                            activations=args.activations,
                            max_batch=args.max_batch, kv_cache_mb=args.kv_cache_mb, max_queue=args.max_queue,
                            image_cache_mb=args.image_cache_mb, limits=limits)
    app = create_app(service, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    print(f"llama-mm serve: {service.model_id} on http://{args.host}:{args.port} (chat page at /, API at /v1)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0
