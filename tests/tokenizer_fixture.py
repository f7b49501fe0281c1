"""Writes Llama-3.2-Vision-style tokenizer and preprocessor files into a directory (no network, no real checkpoint).

`write_tokenizer_files(directory, vocab_size=V)` produces what a Hub checkpoint of
Llama-3.2-11B-Vision-Instruct carries besides its weights and config.json:

- tokenizer.json: a byte-level BPE with Llama 3's pre-tokenizer regex, trained on a fixed corpus (Python's own
  standard-library sources, so the result depends on nothing downloaded; past the ~6.5k tokens it yields, the
  vocabulary is filled with unreachable `<|filler_i|>` entries). Ids 0 .. V-12 are BPE tokens; the first
  eleven Llama 3 special tokens follow in Llama 3's order at V-11 .. V-1 (real checkpoints have 256 special tokens at
  128000 .. 128255; the tail of `<|reserved_special_token_k|>` is left out so that tiny vocabularies keep room for
  merges); `<|image|>` is id V, the text vocabulary size (the model's embedding has V + 8 rows).
- tokenizer_config.json / special_tokens_map.json: bos `<|begin_of_text|>`, eos `<|eot_id|>`, pad
  `<|finetune_right_pad_id|>`, the Instruct chat template.
- chat_template.json: the same template, where the processor looks for it.
- preprocessor_config.json: the image-processor settings of the real checkpoints.
"""

import functools
import json
import os
import sys
import sysconfig
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from llama3_tokens import IMAGE_TOKEN, SPECIAL_TOKENS as LLAMA3_SPECIAL_TOKENS, SPLIT_REGEX as LLAMA3_SPLIT_REGEX  # noqa: E402

# Llama-3.2-11B-Vision-Instruct's chat template (chat_template.json / tokenizer_config.json of the Hub checkpoint).
LLAMA32_VISION_CHAT_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_message = messages[0]['content']|trim %}
    {%- else %}
        {#- FIXME: The processor requires an array, always. #}
        {%- set system_message = messages[0]['content'][0]['text']|trim %}
    {%- endif %}
    {%- set messages = messages[1:] %}
    {%- set user_supplied_system_message = true %}
{%- else %}
    {%- set system_message = "" %}
    {%- set user_supplied_system_message = false %}
{%- endif %}

{#- Find out if there are any images #}
{% set image_ns = namespace(has_images=false) %}
{%- for message in messages %}
    {%- for content in message['content'] %}
        {%- if content['type'] == 'image' %}
            {%- set image_ns.has_images = true %}
        {%- endif %}
    {%- endfor %}
{%- endfor %}

{#- System message if there are no images, or if the user supplied one #}
{%- if user_supplied_system_message or not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\\n" }}
    {%- endif %}
    {{- "Cutting Knowledge Date: December 2023\\n" }}
    {{- "Today Date: " + date_string + "\\n\\n" }}
    {%- if tools is not none and not tools_in_user_message %}
        {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
        {{- "Do not use variables.\\n\\n" }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "\\n\\n" }}
        {%- endfor %}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- if messages[0]['content'] is string %}
            {%- set first_user_message = messages[0]['content']|trim %}
        {%- else %}
            {%- set first_user_message = messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | map('trim') | join('\\n') %}
        {%- endif %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# preprocessor_config.json of Llama-3.2-11B-Vision(-Instruct) and -90B: CLIP mean/std, bilinear, 560 px, 4 tiles.
PREPROCESSOR_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "MllamaImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_image_tiles": 4,
    "processor_class": "MllamaProcessor",
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 560, "width": 560},
}

# Standard-library sources used as the BPE training corpus (present in every CPython install).
_CORPUS_MODULES = ("argparse.py", "difflib.py", "textwrap.py", "calendar.py")
_CORPUS_TEXT = (
    "Describe this image in detail. What is in the picture? The astronaut stands in front of a flag, "
    "a cat sits on a chair, a cup of coffee is on the table. If I had to write a haiku for this one, "
    "it would be about the sky, the rocket and the moon. Answer the question in one word.\n"
)


def _corpus():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    yield _CORPUS_TEXT
    for name in _CORPUS_MODULES:
        yield from (stdlib / name).read_text(encoding="utf-8").splitlines(keepends=True)


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int, bos_in_post_processor: bool) -> str:
    num_bpe = vocab_size - len(LLAMA3_SPECIAL_TOKENS)
    if num_bpe < 256:
        raise ValueError(f"vocab_size={vocab_size} leaves {num_bpe} BPE tokens; byte-level BPE needs at least 256")
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_bpe, min_frequency=1, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    if tokenizer.get_vocab_size() < num_bpe:  # the corpus yields ~6.5k tokens; fill up with unreachable ones
        data = json.loads(tokenizer.to_str())
        vocab = data["model"]["vocab"]
        vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), num_bpe)})
        tokenizer = Tokenizer.from_str(json.dumps(data))
    special = [AddedToken(t, special=True, normalized=False) for t in (*LLAMA3_SPECIAL_TOKENS, IMAGE_TOKEN)]
    tokenizer.add_special_tokens(special)
    assert tokenizer.token_to_id(IMAGE_TOKEN) == vocab_size
    post = [processors.ByteLevel(trim_offsets=False)]
    if bos_in_post_processor:
        bos = LLAMA3_SPECIAL_TOKENS[0]
        post.append(
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, num_bpe)]
            )
        )
    tokenizer.post_processor = processors.Sequence(post)
    return tokenizer.to_str()


def _added_token_entry(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def write_tokenizer_files(
    directory: str | os.PathLike,
    vocab_size: int = 1000,
    bos_in_post_processor: bool = False,
    chat_template: str = LLAMA32_VISION_CHAT_TEMPLATE,
) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.json and
    preprocessor_config.json into `directory`.

    vocab_size: the model's text vocabulary size V (`<|image|>` gets id V).
    bos_in_post_processor: make the tokenizer itself prepend `<|begin_of_text|>` (as Llama 3 text checkpoints do);
        Llama 3.2 Vision's tokenizer does not, the processor inserts it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(_tokenizer_json(vocab_size, bos_in_post_processor), encoding="utf-8")

    first_special = vocab_size - len(LLAMA3_SPECIAL_TOKENS)
    added = {str(first_special + i): _added_token_entry(t) for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    added[str(vocab_size)] = _added_token_entry(IMAGE_TOKEN)
    named = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"}
    tokenizer_config = {
        "added_tokens_decoder": added,
        **named,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    special_tokens_map = {key: _added_token_entry(value) for key, value in named.items()}
    for entry in special_tokens_map.values():
        del entry["special"]

    def dump(name, obj):
        (directory / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    dump("tokenizer_config.json", tokenizer_config)
    dump("special_tokens_map.json", special_tokens_map)
    dump("chat_template.json", {"chat_template": chat_template})
    dump("preprocessor_config.json", PREPROCESSOR_CONFIG)
