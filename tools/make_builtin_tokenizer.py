"""Write the built-in model's tokenizer and processor files into python/llama_mm/builtin/.

    PYTHONPATH=python python tools/make_builtin_tokenizer.py [--out DIR]

The tokenizer is a byte-level BPE in Llama 3's form (the same pre-tokenizer regex, byte-level decoding, a
`<|begin_of_text|>` post-processor) trained on captions of both styles from `llama_mm.demo`, the prompts, the
chat roles and a little generic English. Every byte is in the base alphabet, so any text encodes.

Ids: 0 .. BPE_TOKENS-1 are BPE tokens; then the Llama 3 special tokens in Llama 3's own order (begin_of_text,
end_of_text, two reserved, finetune_right_pad_id, reserved, start/end_header_id, eom_id, eot_id, python_tag),
which brings the text vocabulary to TEXT_VOCAB; `<|image|>` is id TEXT_VOCAB, the last id, as Mllama requires
(its embedding has TEXT_VOCAB + 8 rows and image_token_index = TEXT_VOCAB).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llama_mm import demo
from llama3_tokens import IMAGE_TOKEN, SPECIAL_TOKENS, SPLIT_REGEX

TEXT_VOCAB = 512
BPE_TOKENS = TEXT_VOCAB - len(SPECIAL_TOKENS)
BOS, EOS, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")  # Instruct checkpoints stop on any of these
MAX_NEW_TOKENS = 32  # the longest caption is far shorter
# Llama-3.2-11B-Vision-Instruct's template without tools, dates and the default system turn.
CHAT_TEMPLATE = r"""{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
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
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""
# Llama's image normalisation (CLIP's mean and std).
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
GENERIC_ENGLISH = """\
This is a small model that looks at a picture and says what it sees. The pictures show simple shapes in a few
colours on a white background. Ask it what is in the image, and it will tell you which shapes there are, what
colour each one has, and where they are. It was trained for a few minutes on a computer without a graphics card,
so it knows nothing else: it cannot answer questions about the world, write a story, or translate a sentence.
You can teach it a new kind of answer with a short fine-tuning run. Give it a few hundred examples of images and
the answers you want, and after some steps it will answer in the new way. The weights of the model are small
enough to ship with the package, and the same code runs the large models with eleven or ninety billion numbers.
Hello! How are you? What is this? Where is it? Is it here or there, up or down, near or far? Thank you.
One, two, three, four, five, six, seven, eight, nine, ten. The first, the second, the last one.
"""


def corpus(n: int = 20000, seed: int = 0) -> list[str]:
    """Training text: n captions of each style, the prompts, the chat roles, generic English."""
    rng = random.Random(seed)
    texts = [demo.caption(demo.random_spec(rng)) for _ in range(n)]
    texts += [demo.count_caption(demo.random_count_spec(rng)) for _ in range(n)]
    texts += [demo.PROMPT, demo.COUNT_PROMPT, "user", "assistant", "system", "\n\n"] * (n // 10)
    texts += GENERIC_ENGLISH.splitlines() * 20
    return texts


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if tok.get_vocab_size() != BPE_TOKENS:
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, expected {BPE_TOKENS}")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + (IMAGE_TOKEN,)])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    if tok.token_to_id(IMAGE_TOKEN) != TEXT_VOCAB or tok.get_vocab_size() != TEXT_VOCAB + 1:
        raise RuntimeError(f"{IMAGE_TOKEN} is id {tok.token_to_id(IMAGE_TOKEN)}, expected {TEXT_VOCAB}")
    return tok


def _token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def write_files(out: Path) -> None:
    tok = build_tokenizer()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + (IMAGE_TOKEN,)}
    files = {
        "tokenizer_config.json": {
            "added_tokens_decoder": {str(i): {**_token_entry(t), "special": True} for t, i in ids.items()},
            "bos_token": BOS,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": EOS,
            "model_input_names": ["input_ids", "attention_mask"],
            "pad_token": PAD,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
        "chat_template.json": {"chat_template": CHAT_TEMPLATE},  # where AutoProcessor looks, as in the real repo
        "special_tokens_map.json": {
            "bos_token": _token_entry(BOS),
            "eos_token": _token_entry(EOS),
            "pad_token": _token_entry(PAD),
        },
        "preprocessor_config.json": {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_pad": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": IMAGE_MEAN,
            "image_processor_type": "MllamaImageProcessor",
            "image_std": IMAGE_STD,
            "max_image_tiles": 1,
            "processor_class": "MllamaProcessor",
            "resample": 2,
            "rescale_factor": 1 / 255,
            "size": {"height": demo.IMAGE_SIZE, "width": demo.IMAGE_SIZE},
        },
        "generation_config.json": {
            "bos_token_id": ids[BOS],
            "do_sample": False,
            "eos_token_id": [ids[t] for t in STOP_TOKENS],
            "max_new_tokens": MAX_NEW_TOKENS,
            "pad_token_id": ids[PAD],
        },
    }
    for name, data in files.items():
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=demo.BUILTIN_DIR)
    write_files(parser.parse_args().out)


if __name__ == "__main__":
    main()
