"""Chat templates: where a checkpoint keeps its template, and rendering it with jinja2 as transformers 5.x does.

Lookup order (transformers' processor, then its tokenizer): `processor_config.json` key "chat_template",
`chat_template.json` key "chat_template", `chat_template.jinja`, `tokenizer_config.json` key "chat_template"
(a string, or a list of {"name", "template"} of which "default" is used).

Rendering environment (transformers' `_cached_compile_jinja_template`): a sandboxed environment with
trim_blocks and lstrip_blocks, the loop-controls extension, a `tojson` that does not escape HTML, and the globals
`raise_exception`, `strftime_now`, `namespace` and `dict`. Variables: `messages`, `tools`, `documents`,
`add_generation_prompt`, the named special tokens (`bos_token`, `eos_token`, ...) and any extra keyword arguments.
Messages are passed as plain JSON data: keys whose value is None are dropped, OpenAI-style "image_url" blocks
become {"type": "image", "url": ...}, and non-JSON values (decoded images, arrays) become a "<TypeName>" string.
"""

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

Message = dict
Conversation = list[Message]


def read_json(path: Path) -> dict | None:
    """A checkpoint's JSON file, or None when it does not exist; unreadable JSON is a ValueError naming the file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def find_chat_template(directory: str | os.PathLike) -> str | None:
    """The checkpoint's chat template, or None if it has none."""
    directory = Path(directory)

    processor_config = read_json(directory / "processor_config.json") or {}
    if processor_config.get("chat_template") is not None:
        return _default_template(processor_config["chat_template"], directory / "processor_config.json")
    legacy = read_json(directory / "chat_template.json")
    if legacy is not None:
        if "chat_template" not in legacy:
            raise ValueError(f"{directory / 'chat_template.json'} has no 'chat_template' key")
        return _default_template(legacy["chat_template"], directory / "chat_template.json")
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    tokenizer_config = read_json(directory / "tokenizer_config.json") or {}
    if tokenizer_config.get("chat_template") is not None:
        return _default_template(tokenizer_config["chat_template"], directory / "tokenizer_config.json")
    return None


def _default_template(value, source: Path) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "default" in value:
        return value["default"]
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, dict) and entry.get("name") == "default":
                return entry["template"]
    raise ValueError(f"{source}: chat_template must be a string or contain a template named 'default'")


def render(
    template: str,
    conversation: Conversation,
    special_tokens: Mapping[str, str],
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **kwargs,
) -> str:
    """Render one conversation (a list of {"role", "content"} messages)."""
    if not isinstance(conversation, (list, tuple)) or not all(isinstance(m, Mapping) for m in conversation):
        raise ValueError("a conversation must be a list of message dicts with 'role' and 'content'")
    messages = [_plain({k: v for k, v in m.items() if v is not None}) for m in conversation]
    for message in messages:
        if isinstance(message.get("content"), list):
            message["content"] = [_image_url_to_image(block) for block in message["content"]]
    try:
        return _compile(template).render(
            messages=messages,
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **{**special_tokens, **_plain(kwargs)},
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from e


def _image_url_to_image(block):
    if isinstance(block, dict) and block.get("type") == "image_url" and "image_url" in block:
        info = block["image_url"]
        url = info.get("url", "") if isinstance(info, dict) else info
        return {"type": "image", "url": url}
    return block


def _plain(value):
    """JSON-only copy of template data; anything else becomes an inert "<TypeName>" placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes (as transformers' sandbox does)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes, got {name!r}")


class _Dict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace, dict=_Dict())
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse: {e}") from e
